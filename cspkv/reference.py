"""Public path of the pure-torch reference ops, `cspkv.ops.reference`."""

from .ops.reference import compact_kv, nsoftmax_attention, packed_attention, select_keep, window_scores  # noqa: F401

__all__ = ["window_scores", "select_keep", "compact_kv", "nsoftmax_attention", "packed_attention"]
