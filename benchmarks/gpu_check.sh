#!/usr/bin/env bash
# Everything cspkv checks on a GPU, in one run, for a machine held for minutes:
# build the CUDA kernels for the GPU present, the CUDA tests, compute-sanitizer
# (memcheck, alongside the tests), the op, decode host-time and end-to-end
# benchmarks, and one Nsight Compute report per kernel. Each step has its own
# time limit, cut to what is left before DEADLINE seconds (default 560) so the
# whole run ends in time; logs and results are packed into
# $OUT/gpu-results.tar.gz after every step (default OUT=/tmp/cspkv-gpu), the
# summary is printed last.
#
#   OUT=/tmp/gpu DEADLINE=560 bash benchmarks/gpu_check.sh
#
# STEPS picks the steps (default "build tests bench_ops bench_host profile_prefill ncu bench_e2e"), so a
# lease can be split into calls on the same warm machine (the build stays);
# SANITIZERS picks the compute-sanitizer tools (default "memcheck racecheck"),
# SANITIZE_K narrows their runs with a pytest -k expression.
#
# Needs python3 with torch (CUDA build), nvcc, pytest, hypothesis, transformers;
# compute-sanitizer and ncu are used when on PATH (or in the CUDA toolkit).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cspkv-gpu}
DEADLINE=${DEADLINE:-560}
LOGS=$(mktemp -d)  # everything lands here; $OUT gets one archive (the device tool returns few files)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
STEPS=${STEPS:-build tests bench_ops bench_host profile_prefill ncu bench_e2e}
SANITIZERS=${SANITIZERS-memcheck racecheck}
SANITIZE_K=${SANITIZE_K:-}
SUMMARY="$LOGS/summary.txt"
: >"$SUMMARY"
start=$(date +%s)

pack() {
  cp benchmarks/results/ops-*.* benchmarks/results/e2e-*.* benchmarks/results/host-*.* benchmarks/results/prefill-profile-*.* "$LOGS"/ 2>/dev/null
  local tmp="$OUT/gpu-results.$BASHPID.tmp"  # two steps can run side by side
  tar czf "$tmp" -C "$LOGS" . && mv "$tmp" "$OUT/gpu-results.tar.gz"
  cp "$SUMMARY" "$OUT/summary.txt"
}

step() {  # step NAME SECONDS COMMAND...: runs with a time limit (cut to the deadline), logs to $LOGS/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  local left=$(( DEADLINE - (t0 - start) - 15 ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    echo "$name: skipped (no time left before the deadline)" | tee -a "$SUMMARY"
    return 124
  fi
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s (limit $limit s; at $(( $(date +%s) - t0 + t0 - start )) s)" | tee -a "$SUMMARY"
  pack
  return $rc
}

want() { [[ " $STEPS " == *" $1 "* ]]; }

tool() {  # a CUDA tool from PATH or the toolkit
  command -v "$1" 2>/dev/null || ls /usr/local/cuda/bin/"$1" /opt/nvidia/nsight-compute/*/"$1" 2>/dev/null | head -1
}

{ nvidia-smi; nvcc --version; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
  >"$LOGS/env.log" 2>&1

# 1. Build, for this GPU's architecture only (setup.py asks torch when a GPU is visible).
if want build; then
  step build 300 env CSPKV_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace || { tail -40 "$LOGS/build.log"; exit 1; }
fi
$PY -m cspkv info >>"$LOGS/build.log" 2>&1

# 2. CUDA tests and memcheck over the CUDA op tests and the decode append's, side by side (neither is timed).
SANITIZER=$(tool compute-sanitizer)
if want tests; then
  step tests 240 $PY -m pytest -q -m cuda -p no:cacheprovider tests &
  if [ -n "$SANITIZER" ]; then
    # The caching allocator would hide out-of-bounds accesses inside its blocks.
    { [[ " $SANITIZERS " == *" memcheck "* ]] && step memcheck 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 9 \
        --print-limit 20 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_ops.py tests/test_op_properties.py \
        tests/test_patch_policy.py \
        ${SANITIZE_K:+-k "$SANITIZE_K"}
      [[ " $SANITIZERS " == *" racecheck "* ]] && step racecheck 120 "$SANITIZER" --tool racecheck --error-exitcode 9 --print-limit 20 \
        $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_ops.py -k "not nan${SANITIZE_K:+ and ($SANITIZE_K)}"; } &
  fi
  wait
fi

# 3. Benchmarks (alone on the GPU).
want bench_ops && step bench_ops 150 $PY benchmarks/bench_ops.py --device cuda
# What the patch adds to a decode step's host time (a tiny model: the step is host-bound).
want bench_host && step bench_host 60 $PY benchmarks/bench_host.py --device cuda
# Where a pruned prefill's extra time goes: kernels of one prefill, full vs CSP (7B shape, 4k).
want profile_prefill && step profile_prefill 90 $PY benchmarks/profile_prefill.py --device cuda

# 4. One Nsight Compute report per kernel (each kernel replayed in isolation).
NCU=$(tool ncu)
if want ncu && [ -n "$NCU" ]; then
  step ncu 120 "$NCU" --kernel-name regex:"window_|select_keep|compact_rows|attention_" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --export "$LOGS/ncu-ops" --force-overwrite $PY benchmarks/profile_ops.py
  "$NCU" --import "$LOGS/ncu-ops.ncu-rep" --page details >"$LOGS/ncu-details.txt" 2>&1
  $PY benchmarks/ncu_summary.py "$LOGS/ncu-details.txt" --title "Nsight Compute, one call per op (benchmarks/profile_ops.py)" \
    >"$LOGS/ncu-summary.md" 2>&1
  # The README's recipe: select one op by the extension's own NVTX range.
  step ncu_nvtx 60 env CSPKV_NVTX=1 "$NCU" --nvtx --nvtx-include "cspkv::compact_kv/" --section SpeedOfLight \
    $PY benchmarks/profile_ops.py --op compact_kv
fi

# 5. End to end (7B shape, random weights): the rest of the time.
want bench_e2e && step bench_e2e 300 $PY benchmarks/bench_e2e.py --device cuda
echo "total $(( $(date +%s) - start )) s" | tee -a "$SUMMARY"
pack
for f in tests memcheck racecheck bench_ops bench_host profile_prefill bench_e2e; do echo "== $f"; tail -n 25 "$LOGS/$f.log" 2>/dev/null; done
