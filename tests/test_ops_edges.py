"""Edges of the ops' contract: fake kernels, numpy scalars, unchecked indices.

* The fake kernels (torch.compile, meta tensors, FakeTensorMode) refuse what
  the real op refuses, with the same exception and the same message, for
  every case of tests/test_bad_input.py that needs no data; the kernel and the
  reference agree character for character too.
* numpy scalars work wherever an op, `CSPConfig` or a policy takes a number,
  and are stored as plain Python numbers.
* `compact_kv(check_indices=False)` does, per backend, what its docstring says.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cspkv
import cspkv.ops
from cspkv import reference as ref

from conftest import generator, modality_ids, randn
from test_bad_input import CASES, _base

# Cases whose error needs keep_idx's values: no fake kernel can see them.
VALUE_CASES = {"keep_idx-equals-L", "keep_idx-negative", "keep_idx-one-row-out", "keep_idx-unsorted",
               "keep_idx-duplicated", "keep_idx-one-row-unsorted"}
METADATA_CASES = [c for c in CASES if "other-device" not in c.label and c.label not in VALUE_CASES]


def _raised(fn, args) -> str:
    try:
        fn(**args)
    except Exception as exc:  # noqa: BLE001 -- the type is part of what is compared
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _to(args: dict, convert) -> dict:
    return {k: convert(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _case_args(case) -> dict:
    args = _base(case.op)
    args.update(case.change(args, torch.device("meta")))
    return args


# ------------------------------------------------------------------ messages
@pytest.mark.parametrize("case", METADATA_CASES, ids=[f"{c.op}-{c.label}" for c in METADATA_CASES])
def test_fake_kernel_raises_like_the_real_op(case, extension):
    """Meta tensors and FakeTensorMode reach the fake kernel, which must raise exactly what the
    compiled CPU op raises (not return a shape for a call the op refuses)."""
    args = _case_args(case)
    real = _raised(getattr(cspkv.ops, case.op), args)
    assert real.startswith(case.error.__name__), real
    meta = _raised(getattr(cspkv.ops, case.op), _to(args, lambda t: t.to("meta")))
    assert meta == real, f"meta tensors:\n  {meta}\nthe real op:\n  {real}"
    with FakeTensorMode() as mode:
        fake_args = _to(args, mode.from_tensor)
        fake = _raised(getattr(cspkv.ops, case.op), fake_args)
    assert fake == real, f"FakeTensorMode:\n  {fake}\nthe real op:\n  {real}"


@pytest.mark.parametrize("label", sorted(VALUE_CASES))
def test_fake_kernel_leaves_keep_idx_values_to_the_kernel(label, extension):
    """Range and order of keep_idx need its data: the fake kernel returns the output shapes."""
    [case] = [c for c in CASES if c.label == label]
    args = _to(_case_args(case), lambda t: t.to("meta"))
    keys_out, values_out = cspkv.ops.compact_kv(**args)
    K = args["keep_idx"].shape[2]
    assert keys_out.device.type == "meta" and keys_out.shape == (2, 2, K, 8) and values_out.shape == (2, 2, K, 5)


@pytest.mark.parametrize("case", METADATA_CASES, ids=[f"{c.op}-{c.label}" for c in METADATA_CASES])
def test_kernel_and_reference_messages_are_identical(case, extension):
    """Not only the same exception type and names: the same text (dtypes and floats printed the C++ way)."""
    args = _case_args(case)
    assert _raised(getattr(cspkv.ops, case.op), args) == _raised(getattr(ref, case.op), args)


def test_fake_kernel_rejects_under_torch_compile(extension):
    """torch.compile traces with the fake kernel: a budget over L fails while tracing, with the op's
    message, before any graph reaches the backend (not a graph built for a [1, 2, 11] output that
    only the real kernel refuses when it runs)."""
    s = torch.rand(1, 2, 10)
    k_mod = torch.zeros(1, 10, dtype=torch.long)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(lambda s: cspkv.ops.select_keep(s, s, k_mod, budget=11, recent=1, cross_ratio=0.5)[0] + 1,
                         fullgraph=True, backend=backend)
    with pytest.raises(Exception, match=r"cspkv.select_keep: budget must be an int in \[1, L=10\]"):
        step(s)
    assert graphs == [], "the graph was traced: the fake kernel accepted budget > L"


# -------------------------------------------------------------- numpy scalars
def _op_inputs():
    gen = generator(11)
    B, H, Hkv, W, L, D = 2, 4, 2, 3, 12, 8
    k_mod = modality_ids(B, L, "left", gen)
    return dict(q=randn((B, H, W, D), torch.float32, gen), keys=randn((B, Hkv, L, D), torch.float32, gen),
                values=randn((B, Hkv, L, D), torch.float32, gen), k_mod=k_mod)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_ops_take_numpy_scalars(backend, extension):
    """np.int64 / np.float32 arguments give exactly the result of the Python numbers they print as;
    np.float32(0.7) is 0.7 (floor(0.7 * 10) = 7), not 0.699999988 (which would keep 6 by cross score)."""
    fns = cspkv.ops if backend == "kernel" else ref
    x = _op_inputs()
    q, keys, values, k_mod = x["q"], x["keys"], x["values"], x["k_mod"]
    q_mod = k_mod[:, -3:].clone()
    pairs = [
        (dict(scale=np.float32(0.25), n=np.float64(1.0)), dict(scale=0.25, n=1.0)),
        (dict(scale=np.float16(0.5), n=np.int64(2)), dict(scale=0.5, n=2)),
    ]
    for numpy_kw, python_kw in pairs:
        for got, want in zip(fns.window_scores(q, keys, q_mod, k_mod, **numpy_kw),
                             fns.window_scores(q, keys, q_mod, k_mod, **python_kw)):
            assert torch.equal(got, want)
        assert torch.equal(fns.nsoftmax_attention(q, keys, values, **numpy_kw),
                           fns.nsoftmax_attention(q, keys, values, **python_kw))
    s, c = fns.window_scores(q, keys, q_mod, k_mod, scale=0.25)
    ids = torch.zeros_like(k_mod)
    got = fns.select_keep(s, c, ids, budget=np.int64(11), recent=np.int32(1), cross_ratio=np.float32(0.7))
    want = fns.select_keep(s, c, ids, budget=11, recent=1, cross_ratio=0.7)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


BAD_SCALARS = [
    ("select_keep", dict(budget=3.0), ValueError, "budget must be an int in [1, L=6] (tokens kept per row and KV head), got 3.0"),
    ("select_keep", dict(budget=np.float64(3.0)), ValueError, "budget must be an int in [1, L=6]"),
    ("select_keep", dict(budget=True), ValueError, "budget must be an int in [1, L=6]"),
    ("select_keep", dict(recent=np.bool_(True)), ValueError, "recent must be an int in [0, budget=3]"),
    ("select_keep", dict(cross_ratio="0.5"), ValueError, "cross_ratio must be a number in [0, 1], got '0.5'"),
    ("select_keep", dict(cross_ratio=True), ValueError, "cross_ratio must be a number in [0, 1], got True"),
    ("window_scores", dict(scale=None), ValueError, "scale must be a finite number > 0, got None"),
    ("window_scores", dict(n=np.float32(-1)), ValueError, "n must be a finite number >= 0, got -1"),
    ("nsoftmax_attention", dict(scale="0.3"), ValueError, "scale must be a finite number > 0, got '0.3'"),
    ("nsoftmax_attention", dict(scale=np.float32("nan")), ValueError, "scale must be a finite number > 0, got nan"),
]


@pytest.mark.parametrize("op, change, error, text", BAD_SCALARS, ids=[f"{b[0]}-{list(b[1].values())[0]!r}" for b in BAD_SCALARS])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_bad_scalar_arguments_name_the_argument(op, change, error, text, backend, extension):
    """A float for an int, a bool or a string for a number: the same message on both backends
    (not Python's "could not convert string to float" nor a bare "must be an int")."""
    fn = getattr(cspkv.ops if backend == "kernel" else ref, op)
    args = {**_base(op), **change}
    with pytest.raises(error) as info:
        fn(**args)
    assert str(info.value).startswith(f"cspkv.{op}: {text}"), str(info.value)


def test_config_takes_numpy_scalars():
    """numpy numbers in every numeric field: the config equals, hashes and prints as the one with Python numbers."""
    numpy_config = cspkv.CSPConfig(
        budget=np.float32(0.2), window=np.int64(16), recent=np.int32(4), decode_n=np.float64(0.5),
        min_prompt=np.int16(8), layers=[np.int64(2), np.uint8(0)], cross_ratio=np.float32(0.7), n=np.float16(0.5),
        pool=np.int64(5),
    )
    python_config = cspkv.CSPConfig(budget=0.2, window=16, recent=4, decode_n=0.5, min_prompt=8, layers=[2, 0],
                                    cross_ratio=0.7, n=0.5, pool=5)
    assert numpy_config == python_config and hash(numpy_config) == hash(python_config)
    assert repr(numpy_config) == repr(python_config)
    for value in (numpy_config.budget, numpy_config.window, numpy_config.recent, numpy_config.decode_n,
                  numpy_config.min_prompt, *numpy_config.layers, numpy_config.policy.cross_ratio,
                  numpy_config.policy.n, numpy_config.policy.pool):
        assert type(value) in (int, float), f"{value!r} is a {type(value).__name__}"
    fraction = cspkv.CSPConfig(budget=np.float64(0.25), window=np.float32(0.1), recent=np.float32(0.0))
    assert fraction == cspkv.CSPConfig(budget=0.25, window=0.1, recent=0.0)
    assert type(fraction.budget) is float and type(fraction.recent) is float


@pytest.mark.parametrize("policy, field, value", [
    (cspkv.SnapKV, "pool", np.int64(7)), (cspkv.H2O, "chunk", np.int32(64)), (cspkv.StreamingLLM, "sinks", np.int64(2)),
    (cspkv.Random, "seed", np.uint16(9)), (cspkv.CSP, "pool", np.int8(3)), (cspkv.CSP, "cross_ratio", np.float32(0.3)),
    (cspkv.CSP, "n", np.float64(2.0)),
])
def test_policies_take_numpy_scalars(policy, field, value):
    got, want = policy(**{field: value}), policy(**{field: value.item() if field != "cross_ratio" else 0.3})
    assert got == want and hash(got) == hash(want) and repr(got) == repr(want)
    assert type(getattr(got, field)) in (int, float)


BAD_FIELDS = [
    (dict(min_prompt=3.0), TypeError, "CSPConfig.min_prompt must be an int >= 1, got 3.0"),
    (dict(min_prompt=np.float64(3.0)), TypeError, "CSPConfig.min_prompt must be an int >= 1"),
    (dict(budget=np.bool_(True)), TypeError, "CSPConfig.budget must be a float fraction or an int token count"),
    (dict(budget=np.float32(1.5)), ValueError, "CSPConfig.budget as a float is a fraction of the prompt and must lie in (0, 1], got 1.5"),
    (dict(budget=np.int64(0)), ValueError, "CSPConfig.budget as an int is a token count and must be >= 1, got 0"),
    (dict(layers=[np.int64(1), 2.0]), ValueError, "CSPConfig.layers must hold ints >= 0, got 2.0"),
    (dict(decode_n=np.float32(-1)), ValueError, "CSPConfig.decode_n must be a finite number >= 0, got -1.0"),
    (dict(pool=3.0), TypeError, "CSP.pool must be an odd int >= 1, got 3.0"),
    (dict(pool=np.int64(4)), ValueError, "CSP.pool must be an odd int >= 1 (1 = no pooling; pooling keeps the length), got 4"),
    (dict(cross_ratio=np.float32(1.5)), ValueError, "CSP.cross_ratio must be a number in [0, 1] or 'auto', got 1.5"),
    (dict(policy="h2o", chunk=np.float64(8.0)), TypeError, "H2O.chunk must be an int >= 1"),
    (dict(policy="random", seed=np.int64(-1)), ValueError, "Random.seed must be an int >= 0, got -1"),
]


@pytest.mark.parametrize("fields, error, text", BAD_FIELDS, ids=[repr(f) for f, _, _ in BAD_FIELDS])
def test_bad_numbers_still_name_the_field(fields, error, text):
    with pytest.raises(error) as info:
        cspkv.CSPConfig(**fields)
    assert text in str(info.value), str(info.value)


# ------------------------------------------------- compact_kv(check_indices=False)
def _unchecked_inputs(device="cpu"):
    gen = generator(12)
    keys, values = randn((1, 2, 6, 4), torch.float32, gen).to(device), randn((1, 2, 6, 3), torch.float32, gen).to(device)
    return keys, values


@pytest.mark.parametrize("rows, error", [([[0, 2, 9]], IndexError), ([[-1, 2, 3]], IndexError),
                                         ([[3, 1, 4]], ValueError), ([[1, 1, 4]], ValueError)])
def test_unchecked_indices_cpu_kernel_checks_anyway(rows, error, extension):
    keys, values = _unchecked_inputs()
    with pytest.raises(error, match="cspkv.compact_kv: keep_idx"):
        cspkv.ops.compact_kv(keys, values, torch.tensor(rows).expand(1, 2, 3), check_indices=False)


def test_unchecked_indices_reference_gathers_as_given():
    """Duplicates and any order are copied; a value outside [0, L) is torch.gather's RuntimeError."""
    keys, values = _unchecked_inputs()
    idx = torch.tensor([[[4, 1, 1]]]).expand(1, 2, 3)
    keys_out, values_out = ref.compact_kv(keys, values, idx, check_indices=False)
    assert torch.equal(keys_out, keys[:, :, [4, 1, 1]]) and torch.equal(values_out, values[:, :, [4, 1, 1]])
    for bad in (6, -1):
        with pytest.raises(RuntimeError, match="out of bounds"):
            ref.compact_kv(keys, values, torch.tensor([[[0, 2, bad]]]).expand(1, 2, 3), check_indices=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_unchecked_indices_cuda_kernel_zero_fills(extension):
    """No error; a row out of [0, L) or not above the index before it (as given) is zeros in both outputs."""
    keys, values = _unchecked_inputs("cuda")
    idx = torch.tensor([[[0, 9, 3, 5], [2, 2, 1, 5]]], device="cuda")  # head 0: 9 out, then 3 <= 9; head 1: 2 <= 2, 1 <= 2
    keys_out, values_out = cspkv.ops.compact_kv(keys, values, idx, check_indices=False)
    torch.cuda.synchronize()
    for out, src in ((keys_out, keys), (values_out, values)):
        zero = torch.zeros_like(src[0, 0, 0])
        assert torch.equal(out[0, 0, 0], src[0, 0, 0]) and torch.equal(out[0, 0, 3], src[0, 0, 5])
        assert torch.equal(out[0, 0, 1], zero) and torch.equal(out[0, 0, 2], zero)
        assert torch.equal(out[0, 1, 0], src[0, 1, 2]) and torch.equal(out[0, 1, 3], src[0, 1, 5])
        assert torch.equal(out[0, 1, 1], zero) and torch.equal(out[0, 1, 2], zero)


def test_compact_kv_docstring_states_each_backend():
    """The documented contract names what each backend does with an unchecked bad index."""
    doc = " ".join(ref.compact_kv.__doc__.split())
    for phrase in ("CPU kernel", "checks anyway", "CUDA kernel", "written as zeros", "torch.gather",
                   "device-side assert", "duplicates and any order are copied"):
        assert phrase in doc, phrase
