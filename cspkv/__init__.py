"""cspkv: Cross-Self KV-cache Pruning (CSP) for Hugging Face transformers models.

    handle = cspkv.patch(model, budget=0.2)     # or: with cspkv.patched(model, ...):
    with cspkv.modalities(model, ids):          # optional explicit modality ids [B, L]
        out = model.generate(**inputs)
    handle.stats(); cspkv.unpatch(model)

Three wings, imports one way: `cspkv.hf` (the transformers integration: patch
API, per-layer attention, pruned cache, model adapters) -> `cspkv.pruning`
(the algorithm: config, budget plans, policies, selection, compaction) ->
`cspkv.ops` (the kernels, their pure-torch reference `cspkv.reference`). The
ops and the pruning work without transformers; the patching API needs it.
"""

from . import ops, reference
from .pruning.config import CSPConfig
from .pruning.policies import CSP, H2O, Policy, Random, ScoreInputs, Scores, SnapKV, StreamingLLM
from .pruning.policies import register_policy, registered_policies

__version__ = "0.1.0"

__all__ = [
    "ops", "reference", "__version__", "CSPConfig",
    "Policy", "ScoreInputs", "Scores", "CSP", "SnapKV", "H2O", "StreamingLLM", "Random",
    "register_policy", "registered_policies",
    "patch", "unpatch", "patched", "modalities", "stats", "compress",
]

try:
    from .hf.api import modalities, patch, patched, stats, unpatch
    from .hf.context import compress
except ImportError as _exc:  # transformers missing: the ops and the pruning still work
    if not (_exc.name or "").startswith("transformers"):
        raise
    _reason = f"{_exc}"

    def _needs_transformers(*args, **kwargs):
        raise ImportError(f"cspkv's patching API needs transformers (pip install 'cspkv[hf]'): {_reason}")

    modalities = patch = patched = stats = unpatch = compress = _needs_transformers
