"""Loads the CMake-built library (not cspkv._C), checks each op against the reference once
and that its CPU kernels run on torch's threads (built with OpenMP)."""
import importlib.util
import pathlib
import sys
import types

import torch

spec = importlib.util.spec_from_file_location("_C", sys.argv[1])  # a Python module named _C, as CMake builds it
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)  # registers the ops too
assert ext.parallel_threads() == torch.get_num_threads(), (ext.parallel_threads(), torch.get_num_threads())
# The reference alone: `import cspkv` or `import cspkv.ops` would load cspkv._C, a second
# registration of the ops. Bare packages (no __init__ run) let cspkv.ops.reference import its
# sibling checks module and nothing else.
root = pathlib.Path(__file__).resolve().parent.parent / "cspkv"
for name, path in (("cspkv", root), ("cspkv.ops", root / "ops")):
    package = types.ModuleType(name)
    package.__path__ = [str(path)]
    sys.modules[name] = package
from cspkv.ops import reference  # noqa: E402

torch.manual_seed(0)
q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
mod = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 0]] * 2)
got = torch.ops.cspkv.window_scores(q, k, mod[:, -3:], mod, scale=0.25, n=1.0)
want = reference.window_scores(q, k, mod[:, -3:], mod, scale=0.25, n=1.0)
assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want)), "window_scores"
idx, valid = torch.ops.cspkv.select_keep(*want, mod, budget=5, recent=2, cross_ratio=0.5)
ref_idx, ref_valid = reference.select_keep(*want, mod, budget=5, recent=2, cross_ratio=0.5)
assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid), "select_keep"
assert all(torch.equal(a, b) for a, b in zip(torch.ops.cspkv.compact_kv(k, v, idx), reference.compact_kv(k, v, idx)))
out = torch.ops.cspkv.nsoftmax_attention(q, k, v, scale=0.25, n=0.0, kv_valid=None)
assert torch.allclose(out, reference.nsoftmax_attention(q, k, v, scale=0.25), atol=1e-5), "nsoftmax_attention"
kd, vd = k.reshape(-1, 16), v.reshape(-1, 16)  # four segments of 9 rows, used in part
offsets, lengths = torch.tensor([0, 9, 18, 27]), torch.tensor([9, 4, 0, 6])
out = torch.ops.cspkv.packed_attention(q, kd, vd, offsets, lengths, scale=0.25, n=1.0)
assert torch.allclose(out, reference.packed_attention(q, kd, vd, offsets, lengths, scale=0.25, n=1.0), atol=1e-5), "packed_attention"
print("cmake build OK: the five ops match the reference")
