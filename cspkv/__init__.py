"""cspkv: Cross-Self KV-cache Pruning (CSP) for Hugging Face transformers models.

    handle = cspkv.patch(model, budget=0.2)     # or: with cspkv.patched(model, ...):
    with cspkv.modalities(model, ids):          # optional explicit modality ids [B, L]
        out = model.generate(**inputs)
    handle.stats(); cspkv.unpatch(model)

The ops live in `cspkv.ops` (compiled kernels, pure-torch fallback in
`cspkv.reference`) and work without transformers; the patching API needs it.
"""

from . import ops, reference
from .config import CSPConfig

__version__ = "0.1.0"

__all__ = ["ops", "reference", "__version__", "CSPConfig", "patch", "unpatch", "patched", "modalities", "stats"]

# Imported eagerly: the submodule cspkv.patch would otherwise shadow the function cspkv.patch.
try:
    from .patch import modalities, patch, patched, stats, unpatch
except ImportError as _exc:  # transformers missing: the ops still work
    if not (_exc.name or "").startswith("transformers"):
        raise
    _reason = f"{_exc}"

    def _needs_transformers(*args, **kwargs):
        raise ImportError(f"cspkv's patching API needs transformers (pip install 'cspkv[hf]'): {_reason}")

    modalities = patch = patched = stats = unpatch = _needs_transformers
