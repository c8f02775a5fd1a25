"""One table row per kernel from Nsight Compute's text report.

Reads the output of ``ncu --import REPORT --page details`` (sections
SpeedOfLight, MemoryWorkloadAnalysis, Occupancy, LaunchStats, as
benchmarks/gpu_check.sh collects them) and writes a markdown table: duration,
achieved DRAM bandwidth, the busiest unit's share of its peak, occupancy, and
the limiter that follows from them.

    python benchmarks/ncu_summary.py ncu-details.txt --title "..." > benchmarks/results/ncu-<device>.md
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Dict, List

KERNEL_LINE = re.compile(r"^  (?:void )?(\w+)(?:<[^(]*>)?\(.*\) \(([\d, ]+)\)x\(([\d, ]+)\), Context")
METRIC_LINE = re.compile(r"^    (\S.*?)\s{2,}(\S+(?:/\S+)?)?\s+([\d,.]+)$")
UNITS = {"Gbyte/s": 1.0, "Tbyte/s": 1e3, "Mbyte/s": 1e-3}


def parse(text: str) -> List[Dict[str, object]]:
    kernels: List[Dict[str, object]] = []
    for line in text.splitlines():
        match = KERNEL_LINE.match(line)
        if match:
            grid = "x".join(match.group(2).replace(" ", "").split(","))
            block = "x".join(match.group(3).replace(" ", "").split(","))
            kernels.append({"kernel": match.group(1), "launch": f"({grid})x({block})"})
            continue
        match = METRIC_LINE.match(line)
        if match and kernels:
            name, unit, value = match.group(1).strip(), match.group(2) or "", float(match.group(3).replace(",", ""))
            if name == "Duration":
                value *= {"ms": 1e3, "us": 1.0, "ns": 1e-3}.get(unit, 1.0)  # microseconds
            if name == "Memory Throughput" and unit in UNITS:
                name, value = "DRAM GB/s", value * UNITS[unit]
            kernels[-1].setdefault(name, value)
    return kernels


def limiter(k: Dict[str, object]) -> str:
    units = {"SM (compute)": k.get("Compute (SM) Throughput", 0.0), "L1/shared": k.get("L1/TEX Cache Throughput", 0.0),
             "L2": k.get("L2 Cache Throughput", 0.0), "DRAM": k.get("DRAM Throughput", 0.0)}
    unit, share = max(units.items(), key=lambda item: item[1])
    waves = k.get("Waves Per SM", 0.0)
    if share < 60 and waves < 1:
        return f"too few blocks ({waves:g} waves); busiest {unit} {share:.0f}%"
    if share < 60:
        return f"latency (busiest unit {unit} at {share:.0f}%; occupancy {k.get('Achieved Occupancy', 0):.0f}%)"
    return f"{unit} throughput ({share:.0f}% of peak)"


def table(kernels: List[Dict[str, object]]) -> str:
    columns = ["kernel", "launch", "duration us", "DRAM GB/s", "DRAM %", "L1/shared %", "SM %", "regs",
               "occupancy (theor./achieved) %", "limiter"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for k in kernels:
        lines.append("| " + " | ".join([
            str(k["kernel"]), str(k["launch"]), f"{k.get('Duration', 0):.1f}", f"{k.get('DRAM GB/s', 0):.0f}",
            f"{k.get('DRAM Throughput', 0):.0f}", f"{k.get('L1/TEX Cache Throughput', 0):.0f}",
            f"{k.get('Compute (SM) Throughput', 0):.0f}", f"{k.get('Registers Per Thread', 0):.0f}",
            f"{k.get('Theoretical Occupancy', 0):.0f} / {k.get('Achieved Occupancy', 0):.0f}", limiter(k),
        ]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("details", help="text of `ncu --import REPORT --page details`")
    parser.add_argument("--title", default="Nsight Compute summary")
    args = parser.parse_args()
    with open(args.details) as f:
        kernels = parse(f.read())
    if not kernels:
        raise SystemExit(f"ncu_summary: no kernel found in {args.details}")
    print(f"# {args.title}\n\n{table(kernels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
