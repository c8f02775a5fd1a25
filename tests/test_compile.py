"""A patched model under torch.compile (issue 25, item 9d).

transformers 5.x wraps the forwards of Llama's CausalLM, Model, DecoderLayer and
Attention in one `deprecate_kwarg` wrapper, so a graph break anywhere inside the
model splits each call into per-module frames sharing that wrapper's code and its
dynamo cache (`recompile_limit`, 8): a patched model used to exhaust it within
the prefill and a few decode steps and fall back to eager. The decode step must
now trace without graph breaks (prefill pruning runs after the compiled forward,
`LayerPatch._later`), with the outputs of the eager patched model.

The "eager" backend keeps it fast on a CPU: dynamo's frames, guards and graph
breaks are the same as with inductor.
"""

from __future__ import annotations

import torch
import torch._dynamo

import cspkv
from cspkv.hf.cache import PrunedLayer, padded_layout
from patch_models import CACHE_KW, left_pad, prompt, returned_cache, tiny_model

STEPS = 16


def _greedy(model, ids, mask):
    """Prefill, then STEPS greedy decode steps: (tokens [B, STEPS], last-position logits [STEPS + 1, B, V], cache)."""
    tokens, logits = [], []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = returned_cache(out)
        for _ in range(STEPS):
            logits.append(out.logits[:, -1])
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(tok)
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            out = model(tok, attention_mask=mask, use_cache=True, **{CACHE_KW: cache})
        logits.append(out.logits[:, -1])
    return torch.cat(tokens, 1), torch.stack(logits), cache


def test_compiled_patched_model_decodes_without_recompile_limit():
    # 4 layers: a graph break inside the model's forward would need 1 + 1 + 4 + 4 frames of the shared wrapper at prefill.
    model = tiny_model(layers=4)
    handle = cspkv.patch(model, budget=0.5, min_prompt=8)
    ids, mask = left_pad([prompt(40, seed=1)[0], prompt(29, seed=2)[0]])
    with padded_layout():  # what compiled code stores (its decode steps concatenate), to compare with
        eager_tokens, eager_logits, eager_cache = _greedy(model, ids, mask)
    eager_stats = handle.stats()

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
            tokens, logits, cache = _greedy(torch.compile(model, backend="eager"), ids, mask)
    finally:
        torch._dynamo.reset()

    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    stats = handle.stats()
    assert stats["pruned_layers"] == eager_stats["pruned_layers"] == 4
    assert stats["kv_bytes_after"] == eager_stats["kv_bytes_after"] < stats["kv_bytes_before"]
    for compiled, eager in zip(cache.layers, eager_cache.layers):
        assert type(compiled) is type(eager) is PrunedLayer
        assert compiled.logical_len == eager.logical_len == 40 + STEPS
        torch.testing.assert_close(compiled.keys, eager.keys)
        assert torch.equal(compiled.kv_valid, eager.kv_valid)

    # Back in eager mode, the cache the compiled steps grew decodes on.
    with torch.no_grad():
        out = model(tokens[:, -1:], attention_mask=torch.ones(2, 40 + STEPS + 1, dtype=torch.long), use_cache=True,
                    **{CACHE_KW: cache})
    assert returned_cache(out).layers[0].logical_len == 40 + STEPS + 1
