"""cspkv: Cross-Self KV-cache Pruning (CSP) for Hugging Face transformers models.

The ops live in `cspkv.ops` (compiled kernels, pure-torch fallback in
`cspkv.reference`).
"""

from . import ops, reference

__version__ = "0.1.0"

__all__ = ["ops", "reference", "__version__"]
