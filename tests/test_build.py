"""What was built: build info, the registered ops, and the fallback when cspkv._C is missing."""

from __future__ import annotations

import importlib.abc
import inspect
import os
import platform
import shutil
import subprocess
import sys
import types
import warnings

import pytest
import torch

import cspkv
import cspkv.ops
from cspkv import reference

from conftest import OP_NAMES as OPS


def test_build_info(extension):
    info = cspkv.ops.build_info()
    assert set(info) == {"with_cuda", "cuda_archs", "cuda_version", "torch_version"}
    assert isinstance(info["with_cuda"], bool)
    assert info["torch_version"] == torch.__version__, "the extension must be built against the torch that runs it"
    if info["with_cuda"]:
        assert info["cuda_archs"] and info["cuda_version"] == torch.version.cuda, info


def test_cpu_kernels_use_torchs_threads(extension):
    """at::parallel_for only forks in code compiled with OpenMP, bound to torch's runtime
    (a build without it ran every CPU kernel on one thread; a second runtime would ignore
    torch.set_num_threads)."""
    before = torch.get_num_threads()
    try:
        for threads in sorted({1, min(2, os.cpu_count() or 1)}):
            torch.set_num_threads(threads)
            assert cspkv.ops.cpu_threads() == threads
    finally:
        torch.set_num_threads(before)


# The CPU kernels' per-logit exp loops (cpu::exp_nonpositive, with selects by modality or
# mask), by the function holding them: each runs once per logit (scalar, window_scores ran up to 3.6x slower).
EXP_LOOPS = {"accumulate_window_rows": 2, "attend_block": 1}


def _clone_disassembly(library: str, function: str, clone: str) -> str:
    """objdump's disassembly of `function`'s target_clones `clone` in `library`."""
    symbols = subprocess.run(["nm", "-S", "--defined-only", library], capture_output=True, text=True, check=True).stdout
    found = [line.split() for line in symbols.splitlines() if function in line and line.endswith("." + clone)]
    assert len(found) == 1, f"{function} [clone .{clone}] in {library}: {found}"
    start, size = int(found[0][0], 16), int(found[0][1], 16)
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={start}", f"--stop-address={start + size}", library],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(platform.machine() != "x86_64", reason="checks the x86-64 clones (target_clones) of the CPU kernels")
@pytest.mark.parametrize("function", EXP_LOOPS)
def test_exp_loops_are_vectorised_in_each_simd_clone(function, extension):
    """The AVX2 and AVX-512 clones compute exp_nonpositive 8 or 16 lanes at a time: its 2^k
    (k << 23) appears as a packed shift once per exp loop. GCC left the AVX2 loops scalar
    ("control flow in loop") until the build passed -fno-trapping-math (setup.py,
    CMakeLists.txt), which only AVX-512 hosts, with masked stores, did not need."""
    assert shutil.which("nm") and shutil.which("objdump"), "binutils (nm, objdump) come with the compiler the build needs"
    library = cspkv._C.__file__
    for clone, register in (("arch_x86_64_v3", "%ymm"), ("arch_x86_64_v4", "%zmm")):
        code = _clone_disassembly(library, function, clone)
        packed_pow2 = sum(1 for line in code.splitlines() if "vpslld $0x17," + register in line)
        want = EXP_LOOPS[function]
        assert packed_pow2 >= want, f"{function} [clone .{clone}]: {packed_pow2} vectorised exp loops, want {want} (a -O0 CSPKV_DEBUG=1 build has none)"


@pytest.mark.parametrize("name", OPS)
def test_op_is_registered_with_the_reference_signature(name, extension):
    """torch.ops.cspkv.<name> exists, has a CPU kernel, and takes the reference's arguments."""
    assert hasattr(torch.ops.cspkv, name)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cspkv::{name}", "CPU")
    if cspkv.ops.build_info()["with_cuda"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cspkv::{name}", "CUDA")
    schema = getattr(torch.ops.cspkv, name).default._schema
    params = inspect.signature(getattr(reference, name)).parameters.values()
    assert [a.name for a in schema.arguments] == [p.name for p in params]
    assert [a.kwarg_only for a in schema.arguments] == [p.kind is inspect.Parameter.KEYWORD_ONLY for p in params]
    for a, p in zip(schema.arguments, params):
        if p.default is not inspect.Parameter.empty:
            assert a.default_value == p.default, (a.name, a.default_value, p.default)


def test_cpu_tensors_use_the_kernels(extension):
    assert cspkv.ops.backend("cpu") == "kernel"


@pytest.mark.parametrize("valid_rank", [None, 2, 3])
def test_decode_wrapper_runs_the_registered_op(extension, valid_rank):
    """cspkv.ops.nsoftmax_attention takes the extension's typed binding (less host time per decode
    step): the same op, arguments in their places, and seen by dispatch modes like torch.ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((func, dict(kwargs or {})))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(3)
    q, keys, values = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g), torch.randn(2, 2, 11, 6, generator=g)
    kv_valid = None if valid_rank is None else torch.rand((2, 11) if valid_rank == 2 else (2, 2, 11), generator=g) > 0.3
    want = torch.ops.cspkv.nsoftmax_attention(q, keys, values, scale=0.3, n=2.0, kv_valid=kv_valid)
    with Seen() as seen:
        got = cspkv.ops.nsoftmax_attention(q, keys, values, scale=0.3, n=2.0, kv_valid=kv_valid)
    assert torch.equal(got, want)
    assert not torch.equal(got, torch.ops.cspkv.nsoftmax_attention(q, keys, values, scale=0.3, n=0.0, kv_valid=kv_valid))
    [(func, kwargs)] = seen.calls
    assert func is torch.ops.cspkv.nsoftmax_attention.default
    assert kwargs.pop("kv_valid", None) is kv_valid and kwargs == {"scale": 0.3, "n": 2.0}


def test_ops_compile_in_a_fresh_process(extension):
    """`import cspkv` registers torch.ops.cspkv.*, and torch.compile(fullgraph=True) of code calling the ops
    in an interpreter that has not used them yet works: neither the extension's load nor the decode
    wrapper's typed binding may end up in the traced code."""
    code = (
        "import torch, cspkv\n"
        "assert hasattr(torch.ops.cspkv, 'window_scores')  # registered by the import\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)\n"
        "valid = torch.rand(1, 2, 9, generator=g) > 0.3\n"
        "step = lambda q, k, v, valid: 2 * cspkv.ops.nsoftmax_attention(q, k, v, scale=0.3, n=1.0, kv_valid=valid)\n"
        "got = torch.compile(step, fullgraph=True, backend='aot_eager')(q, k, v, valid)\n"
        "torch.testing.assert_close(got, 2 * cspkv.reference.nsoftmax_attention(q, k, v, scale=0.3, n=1.0, kv_valid=valid))\n"
        "print('compiled and equal')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "compiled and equal" in run.stdout, run.stdout + run.stderr[-3000:]


def test_info_command_reports_the_build(extension):
    run = subprocess.run([sys.executable, "-m", "cspkv", "info"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"built against torch {torch.__version__}" in run.stdout, run.stdout
    for name in OPS:
        assert f"cspkv::{name}" in run.stdout, run.stdout


# ----------------------------------------------------------- the fallback
class _BrokenExtension(importlib.abc.MetaPathFinder):
    """Makes ``import cspkv._C`` fail the way a stale or ABI-mismatched build does."""

    CAUSE = "_C.so: undefined symbol: _ZN5cspkv13stale_symbolEv"

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "cspkv._C":
            raise ImportError(self.CAUSE)
        return None


@pytest.fixture
def fresh_state(monkeypatch):
    """cspkv.ops as if the extension had never been loaded (restored afterwards)."""
    monkeypatch.setattr(cspkv.ops.loading, "_state", cspkv.ops.loading._initial_state())
    return monkeypatch


def test_fallback_warns_once_naming_the_cause(fresh_state):
    fresh_state.delitem(sys.modules, "cspkv._C", raising=False)
    fresh_state.delattr(cspkv, "_C", raising=False)
    fresh_state.setattr(sys, "meta_path", [_BrokenExtension(), *sys.meta_path])
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    keep_idx = torch.tensor([[[0, 3], [1, 4]]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [cspkv.ops.compact_kv(keys, values, keep_idx) for _ in range(3)]
        cspkv.ops.nsoftmax_attention(torch.randn(1, 2, 1, 4, generator=g), keys, values, scale=0.5)
    ours = [w for w in caught if "cspkv" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert ours[0].category is RuntimeWarning
    assert _BrokenExtension.CAUSE in str(ours[0].message) and "reference" in str(ours[0].message)
    assert cspkv.ops.extension() is None and _BrokenExtension.CAUSE in cspkv.ops.extension_error()
    assert cspkv.ops.build_info() == {}
    want = reference.compact_kv(keys, values, keep_idx)
    assert all(torch.equal(o[0], want[0]) and torch.equal(o[1], want[1]) for o in outs)


def test_cpu_only_build_warns_once_for_cuda_tensors(fresh_state):
    cpu_only = types.SimpleNamespace(build_info=lambda: {"with_cuda": False, "cuda_archs": "", "cuda_version": "", "torch_version": torch.__version__})
    cspkv.ops.loading._state.update(loaded=True, ext=cpu_only, with_cuda=False)  # as extension() records it on load
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [cspkv.ops.backend("cuda") for _ in range(3)] == ["reference"] * 3
        assert cspkv.ops.backend("cpu") == "kernel"
    assert len(caught) == 1 and "without CUDA kernels" in str(caught[0].message), [str(w.message) for w in caught]
