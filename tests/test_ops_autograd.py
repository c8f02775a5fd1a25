"""Gradients of the ops: `compact_kv` has one (a gather's), the others say clearly that they have none.

Every test runs on the compiled kernels and on the pure-torch reference path of
`cspkv.ops` (`backend` forced to "reference"), which must behave the same: a
gradient that exists on one backend and not on the other, or an error on only
one of them, fails here.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import cspkv.ops
from cspkv import reference as ref

from conftest import FLOAT_DTYPES, DTYPE_NAMES, generator, modality_ids, place, randn

BACKENDS = ("kernel", "reference")


@pytest.fixture(params=BACKENDS)
def ops_backend(request, monkeypatch, extension):
    """`cspkv.ops` with every call served by the named backend."""
    if request.param == "reference":
        monkeypatch.setattr(cspkv.ops, "backend", lambda device: "reference")
    return request.param


def _keep_idx(B, Hkv, L, K, gen):
    return torch.rand(B, Hkv, L, generator=gen).argsort(-1)[..., :K].sort(-1).values


# ------------------------------------------------------------------ compact_kv
def test_compact_kv_passes_gradcheck(ops_backend):
    """Finite differences agree with the registered backward.

    float32, not float64: every op (kernel and reference) accepts float32, float16 and
    bfloat16 only. A gather is linear with a 0/1 Jacobian, so with eps = 2**-6 the
    finite differences of float32 values of magnitude ~1 are within ~1e-5 of it."""
    gen = generator(0)
    B, Hkv, L, D, Dv, K = 2, 3, 7, 5, 3, 4
    keys = randn((B, Hkv, L, D), torch.float32, gen).requires_grad_()
    values = randn((B, Hkv, L, Dv), torch.float32, gen).requires_grad_()
    keep_idx = _keep_idx(B, Hkv, L, K, gen)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not a double precision.*")
        assert torch.autograd.gradcheck(
            lambda k, v: cspkv.ops.compact_kv(k, v, keep_idx), (keys, values), eps=2**-6, atol=1e-4, rtol=1e-3,
        )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=[DTYPE_NAMES[d] for d in FLOAT_DTYPES])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_compact_kv_gradient_is_the_gather_gradient(ops_backend, device, dtype, layout):
    """Exactly the gradient of ``keys.gather(2, keep_idx)``: each kept row's output gradient at its
    own row, zeros at the rows that were dropped, in keys' dtype and shape; keep_idx gets none."""
    gen = generator(1)
    B, Hkv, L, D, Dv, K = 2, 2, 9, 6, 4, 5
    keys = place(randn((B, Hkv, L, D), dtype, gen), layout, device).requires_grad_()
    values = place(randn((B, Hkv, L, Dv), dtype, gen), layout, device).requires_grad_()
    keep_idx = _keep_idx(B, Hkv, L, K, gen).to(device)
    grad_k, grad_v = randn((B, Hkv, K, D), dtype, gen).to(device), randn((B, Hkv, K, Dv), dtype, gen).to(device)

    keys_out, values_out = cspkv.ops.compact_kv(keys, values, keep_idx)
    assert keys_out.requires_grad and values_out.requires_grad
    got_k, got_v = torch.autograd.grad((keys_out, values_out), (keys, values), (grad_k, grad_v))

    want_k = torch.zeros(B, Hkv, L, D, dtype=dtype, device=device)
    want_v = torch.zeros(B, Hkv, L, Dv, dtype=dtype, device=device)
    for b in range(B):
        for h in range(Hkv):
            want_k[b, h, keep_idx[b, h]] = grad_k[b, h]
            want_v[b, h, keep_idx[b, h]] = grad_v[b, h]
    for got, want, name in ((got_k, want_k, "keys"), (got_v, want_v, "values")):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert torch.equal(got, want), f"grad of {name}"


def test_compact_kv_gradient_of_one_output_only(ops_backend):
    """A loss on keys_out alone: values gets no gradient (None), keys gets its own."""
    gen = generator(2)
    keys = randn((1, 2, 6, 4), torch.float32, gen).requires_grad_()
    values = randn((1, 2, 6, 3), torch.float32, gen).requires_grad_()
    keep_idx = torch.tensor([1, 3, 4]).expand(1, 2, 3).contiguous()
    keys_out, _ = cspkv.ops.compact_kv(keys, values, keep_idx)
    keys_out.sum().backward()
    assert values.grad is None
    assert torch.equal(keys.grad[0, 0].sum(-1), torch.tensor([0.0, 4, 0, 4, 4, 0]))


def test_compact_kv_gradient_under_torch_compile(ops_backend):
    """The backward also runs in a compiled graph (fullgraph: no break at the op) and matches eager.
    (Unchecked indices: the reference path's value check reads data, which a full graph cannot.)"""
    gen = generator(3)
    keys = randn((2, 2, 7, 4), torch.float32, gen)
    values = randn((2, 2, 7, 3), torch.float32, gen)
    keep_idx = _keep_idx(2, 2, 7, 4, gen)

    def loss(k, v):
        k_out, v_out = cspkv.ops.compact_kv(k, v, keep_idx, check_indices=False)
        return (k_out * k_out).sum() + (3 * v_out).sum()

    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        k, v = keys.clone().requires_grad_(), values.clone().requires_grad_()
        fn(k, v).backward()
        grads.append((k.grad, v.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert torch.count_nonzero(grads[0][1]) == 2 * 2 * 4 * 3  # only the kept rows


# -------------------------------------------- window_scores, nsoftmax_attention
def _inputs(op):
    gen = generator(4)
    B, H, Hkv, W, L, D = 1, 4, 2, 2, 6, 8
    keys = randn((B, Hkv, L, D), torch.float32, gen)
    if op == "window_scores":
        k_mod = modality_ids(B, L, "none", gen)
        return dict(q_win=randn((B, H, W, D), torch.float32, gen), keys=keys, q_mod=k_mod[:, -W:].clone(), k_mod=k_mod,
                    scale=0.3, lse=torch.randn(B, H, W, generator=gen) + 3.0)
    return dict(q=randn((B, H, W, D), torch.float32, gen), keys=keys, values=randn((B, Hkv, L, D), torch.float32, gen),
                scale=0.3, n=1.0)


NO_GRADIENT = [("window_scores", "q_win"), ("window_scores", "keys"), ("window_scores", "lse"),
               ("nsoftmax_attention", "q"), ("nsoftmax_attention", "keys"), ("nsoftmax_attention", "values")]


@pytest.mark.parametrize("op, name", NO_GRADIENT, ids=[f"{op}-{name}" for op, name in NO_GRADIENT])
def test_op_without_gradient_raises_when_one_is_asked(ops_backend, op, name):
    """Grad mode on and an input that requires grad: a RuntimeError that names the op and the input
    and says what to do, on either backend (not torch's warning at backward and a None .grad,
    nor a gradient on the reference path only)."""
    args = _inputs(op)
    args[name] = args[name].clone().requires_grad_()
    with pytest.raises(RuntimeError) as info:
        getattr(cspkv.ops, op)(**args)
    message = str(info.value)
    assert message.startswith(f"cspkv.{op}: has no gradient"), message
    assert f"{name} requires grad" in message and "torch.no_grad()" in message and "detach" in message, message


@pytest.mark.parametrize("op", ["window_scores", "nsoftmax_attention"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "detached"])
def test_op_without_gradient_runs_without_grad(ops_backend, op, mode):
    """The ways out the error names all work, and give the result of the reference."""
    args = _inputs(op)
    want = getattr(ref, op)(**args)
    tensor_names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if mode == "detached":
        args.update({k: args[k].clone().requires_grad_().detach() for k in tensor_names})
        got = getattr(cspkv.ops, op)(**args)
    else:
        args.update({k: args[k].clone().requires_grad_() for k in tensor_names})
        with getattr(torch, mode)():
            got = getattr(cspkv.ops, op)(**args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert not g.requires_grad
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_select_keep_takes_scores_that_require_grad(ops_backend):
    """Indices carry no gradient: scores that require grad are accepted without error or warning,
    the outputs do not require grad and equal those of detached scores."""
    gen = generator(5)
    s, c = torch.rand(2, 2, 9, generator=gen), torch.rand(2, 2, 9, generator=gen)
    k_mod = modality_ids(2, 9, "left", gen)
    kw = dict(budget=4, recent=1, cross_ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx, valid = cspkv.ops.select_keep(s.clone().requires_grad_(), c.clone().requires_grad_(), k_mod, **kw)
    assert not idx.requires_grad and not valid.requires_grad
    want_idx, want_valid = ref.select_keep(s, c, k_mod, **kw)
    assert torch.equal(idx, want_idx) and torch.equal(valid, want_valid)


def test_no_gradient_check_keeps_fullgraph_compile(ops_backend):
    """The wrappers' grad check traces: a fullgraph compile of both ops works without grad, and
    with an input that requires grad it fails with cspkv's message, not silently."""
    args = _inputs("nsoftmax_attention")

    def step(q, keys, values):
        return 2 * cspkv.ops.nsoftmax_attention(q, keys, values, scale=0.3, n=1.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(args["q"], args["keys"], args["values"]),
                               step(args["q"], args["keys"], args["values"]), rtol=0, atol=0)
    with pytest.raises(Exception, match="cspkv.nsoftmax_attention: has no gradient"):
        compiled(args["q"].clone().requires_grad_(), args["keys"], args["values"])
