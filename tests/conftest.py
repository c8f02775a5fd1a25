"""Shared fixtures and helpers for the op tests.

* `kernels` / `device`: the compiled ops (``torch.ops.cspkv.*``) and the devices
  they are tested on. A missing extension fails the kernel tests (never a
  skip); CUDA cases skip, with a reason, only where no GPU is visible.
* Tensor builders: `modality_ids` (padding on the left, optionally a fully
  padded row), `place` (the same values in another memory layout: transposed
  storage, a slice of a NaN-filled bigger tensor, a strided last dim).
* `assert_matches_oracle`: the tolerance rule. float32 inputs: ~1e-5 relative
  to the magnitude of the row. float16/bfloat16 inputs (FlashAttention style):
  per row, ``max|kernel - oracle| <= 2 * max|plain_torch - oracle| + atol``,
  where the oracle is the reference on float32-upcast inputs and plain_torch is
  the same reference math run in the input dtype (`same_precision`).
"""

from __future__ import annotations

import types
from typing import Optional, Sequence

import pytest
import torch

import cspkv.ops
import cspkv.reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
OP_NAMES = ("window_scores", "select_keep", "compact_kv", "nsoftmax_attention")
LAYOUTS = ("contiguous", "transposed", "nan_margin", "strided")

# Value written outside the valid region of an integer tensor by `place`:
# a modality no real token has (a stray read changes the scores) or, for
# keep_idx, a valid but wrong index (a stray read changes the gather without
# crashing the test process).
ID_SENTINEL = 7


# --------------------------------------------------------------- extension
def _extension_or_fail():
    ext = cspkv.ops.extension()
    if ext is None:
        pytest.fail(
            "cspkv._C could not be imported "
            f"({cspkv.ops.extension_error()}); the kernel tests need the compiled "
            "extension: `CSPKV_CUDA=0 pip install --no-build-isolation --no-deps -e .`",
            pytrace=False,
        )
    return ext


@pytest.fixture(scope="session")
def extension():
    """The loaded ``cspkv._C`` module (fails the test when it cannot be imported)."""
    return _extension_or_fail()


@pytest.fixture(scope="session")
def kernels(extension):
    """The compiled ops, called exactly like the functions of `cspkv.reference`."""
    return types.SimpleNamespace(**{name: getattr(torch.ops.cspkv, name).default for name in OP_NAMES})


_CUDA_PARAM = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
    ],
)


@pytest.fixture(params=["cpu", _CUDA_PARAM])
def device(request, extension):
    """Every op test runs on CPU and, where a GPU is visible, on CUDA."""
    if request.param == "cuda" and not extension.build_info()["with_cuda"]:
        pytest.fail("a GPU is visible but cspkv._C was built without CUDA kernels (rebuild with CSPKV_CUDA=1)", pytrace=False)
    return torch.device(request.param)


# ---------------------------------------------------------------- builders
def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """CPU normal values, rounded to `dtype` (so the oracle sees the same numbers)."""
    return torch.randn(*shape, generator=gen).to(dtype)


def modality_ids(
    B: int, L: int, padding: str, gen: torch.Generator, *, modalities: int = 3, dtype=torch.int64
) -> torch.Tensor:
    """[B, L] modality ids in [0, modalities) with ``-1`` padding on the left.

    padding: "none"; "left" (rows pad L//3, none, L-1 tokens, cycling); "left_full"
    (rows pad L//2, all L, none, cycling: the second row has no real token).
    """
    ids = torch.randint(0, modalities, (B, L), generator=gen)
    pads = {"none": [0], "left": [L // 3, 0, L - 1], "left_full": [L // 2, L, 0]}[padding]
    for b in range(B):
        ids[b, : pads[b % len(pads)]] = -1
    return ids.to(dtype)


def random_padding(B: int, L: int, gen: torch.Generator, p: float) -> torch.Tensor:
    """[B, L] modality ids in {0, 1, 2} with ``-1`` anywhere with probability p."""
    ids = torch.randint(0, 3, (B, L), generator=gen)
    return ids.masked_fill(torch.rand(B, L, generator=gen) < p, -1)


def ranking_scores(shape: Sequence[int], gen: torch.Generator, kind: str) -> torch.Tensor:
    """float32 scores for `select_keep`.

    kind: "continuous" (uniform, no ties); "ties" (values in {0, 0.25, 0.5}, zeros
    half -0.0: -0.0 and +0.0 must tie); "special" (ties plus NaN, -inf and +inf,
    each ~5%: NaN ranks below every number).
    """
    if kind == "continuous":
        return torch.rand(shape, generator=gen)
    s = torch.randint(0, 3, shape, generator=gen).float() * 0.25
    s = torch.where((s == 0) & (torch.rand(shape, generator=gen) < 0.5), torch.tensor(-0.0), s)
    if kind == "special":
        u = torch.rand(shape, generator=gen)
        s = s.masked_fill(u < 0.05, float("nan")).masked_fill((u >= 0.05) & (u < 0.1), float("-inf"))
        s = s.masked_fill((u >= 0.1) & (u < 0.15), float("inf"))
    return s


def _fill_value(t: torch.Tensor):
    return float("nan") if t.is_floating_point() else (False if t.dtype == torch.bool else ID_SENTINEL)


def place(t: torch.Tensor, layout: str, device) -> torch.Tensor:
    """A tensor with the values of `t` on `device`, stored in `layout`.

    contiguous  plain contiguous copy.
    transposed  storage with dims (1, 2) swapped (rank 2: (0, 1)), viewed back:
                e.g. keys stored [B, L, Hkv, D] as Hugging Face models do.
    nan_margin  a slice of a bigger tensor filled with NaN (ids: ID_SENTINEL):
                one extra row in the batch and head dims, 2 before / 3 after in
                the length dim, 1 before / 2 after in the head dim D.
    strided     a stride-2 view of the last dim; the skipped elements are NaN.
    """
    t = t.to(device)
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":
        a, b = (1, 2) if t.dim() >= 3 else (0, 1)
        return t.transpose(a, b).contiguous().transpose(a, b)
    if layout == "nan_margin":
        length_dim = 1 if t.dim() == 2 else 2
        before = [2 if d == length_dim else (1 if d == 3 else 0) for d in range(t.dim())]
        after = [3 if d == length_dim else (2 if d == 3 else 1) for d in range(t.dim())]
        big_shape = [s + x + y for s, x, y in zip(t.shape, before, after)]
        big = torch.full(big_shape, _fill_value(t), dtype=t.dtype, device=device)
        view = big[tuple(slice(x, x + s) for x, s in zip(before, t.shape))]
        view.copy_(t)
        return view
    if layout == "strided":
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), _fill_value(t), dtype=t.dtype, device=device)
        view = big[..., ::2]
        view.copy_(t)
        return view
    raise ValueError(f"unknown layout {layout!r}")


def assert_no_nan(outputs, what: str) -> None:
    for i, out in enumerate(outputs if isinstance(outputs, (tuple, list)) else (outputs,)):
        if out.is_floating_point():
            assert not torch.isnan(out).any(), f"{what}: output {i} has NaN at {torch.isnan(out).nonzero()[:5].tolist()}"


# --------------------------------------------------------------- tolerance
class _KeepDtype(torch.Tensor):
    """A tensor whose ``.float()`` is a no-op: runs the reference math in its own dtype."""

    def float(self, *args, **kwargs):  # noqa: A003
        return self


def same_precision(op, *tensors, **kwargs):
    """`op` (a `cspkv.reference` function) computed by plain torch in the dtype of its inputs.

    The reference upcasts with ``.float()``; wrapping the float inputs in a tensor
    subclass whose ``.float()`` does nothing makes the very same code run in
    float16/bfloat16, which is what plain PyTorch at that precision gives.
    """
    wrapped = [t.as_subclass(_KeepDtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]
    out = op(*wrapped, **kwargs)
    unwrap = lambda t: t.as_subclass(torch.Tensor).float()  # noqa: E731
    return tuple(unwrap(t) for t in out) if isinstance(out, tuple) else unwrap(out)


def oracle(op, *tensors, **kwargs):
    """`op` (a `cspkv.reference` function) on CPU, float32-upcast, contiguous inputs."""
    cpu = [t.detach().cpu().contiguous() for t in tensors]
    cpu = [t.float() if t.is_floating_point() else t for t in cpu]
    return op(*cpu, **kwargs)


F32_RTOL = 1e-5


def assert_matches_oracle(
    out: torch.Tensor,
    expected: torch.Tensor,
    lowp: Optional[torch.Tensor],
    *,
    row_scale: torch.Tensor,
    what: str,
) -> None:
    """The tolerance rule of the suite (see the module docstring).

    out : kernel output (any device, any float dtype).
    expected : float32 oracle on CPU, same shape.
    lowp : plain torch at the input precision (float32, CPU), or None for float32 inputs.
    row_scale : magnitude of each row (broadcastable to `expected`, last dim
        reduced): atol = F32_RTOL * row_scale.
    """
    out = out.detach().cpu().float()
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(out).any(), f"{what}: kernel output has NaN"
    assert torch.isfinite(expected).all(), f"{what}: the oracle has NaN/inf (a test bug)"
    assert lowp is None or torch.isfinite(lowp).all(), f"{what}: the plain-torch baseline has NaN/inf (a test bug)"
    err = (out - expected).abs()
    atol = F32_RTOL * row_scale.float().expand(*expected.shape[:-1], 1)
    if lowp is None:
        bound = atol + F32_RTOL * expected.abs()
        bad = err > bound
        if bad.any():
            i = tuple(bad.nonzero()[0].tolist())
            pytest.fail(
                f"{what}: {int(bad.sum())} elements off; max error {err.max().item():.3e}; "
                f"first at {i}: kernel {out[i].item():.8g}, oracle {expected[i].item():.8g}, bound {bound[i].item():.3e}",
                pytrace=False,
            )
        return
    lowp_err = (lowp.float() - expected).abs().amax(-1, keepdim=True)
    bound = 2 * lowp_err + atol
    row_err = err.amax(-1, keepdim=True)
    bad = row_err > bound
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        pytest.fail(
            f"{what}: {int(bad.sum())} rows off; max error {err.max().item():.3e} "
            f"(plain torch at this precision: {lowp_err.max().item():.3e}); first row {i[:-1]}: "
            f"kernel error {row_err[i].item():.3e} > bound {bound[i].item():.3e}",
            pytrace=False,
        )


def scores_row_scale(self_scores: torch.Tensor, cross_scores: torch.Tensor) -> torch.Tensor:
    """Mean score mass per key of each (b, h) row: [B, Hkv, 1]."""
    total = self_scores.abs() + cross_scores.abs()
    return total.mean(-1, keepdim=True).clamp_min(1e-2)


def attention_row_scale(values: torch.Tensor) -> torch.Tensor:
    """Largest |value|: the output is a weighted average of the value rows."""
    return values.detach().cpu().float().abs().amax().clamp_min(1e-2).reshape(1, 1, 1, 1)
