"""Autograd invariants of the loss and of the fused head, on every backend that serves CPU tensors
here (Triton through the interpreter, on small cases).

The loss computes its gradient in the forward (one pass over the logits) and the backward hands
it over, rescaled to the upstream gradient (fused_ls/_ops.py). Whatever path a backward takes,
it must be exact: a retained graph's second backward, float64 gradcheck for every reduction, an
upstream gradient of 0 or negative, a compiled fullgraph step with a scaled loss; logits changed
in place between forward and backward give the forward-time gradient or a clear error; without
autograd nothing N×C is written.
"""

from __future__ import annotations

import pytest
import torch
from helpers import backends, class_weight, kw_to, make_case, make_data, make_head

import fused_ls
from fused_ls import reference

BACKENDS = backends("cpu", interpreted_triton=True)
F64_BACKENDS = [b for b in BACKENDS if b != "triton"]  # Triton accumulates fp64 in fp32
REDUCTIONS = ("mean", "sum", "none")
lsce = fused_ls.label_smoothing_cross_entropy
llsce = fused_ls.linear_label_smoothing_cross_entropy


def _upstream(loss, g, scale=1.0):
    if loss.dim() == 0:
        return torch.tensor(scale, dtype=loss.dtype)
    return (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.dtype) * scale


def _reference_grad(x, y, go, reduction, **kw):
    xd = x.double().requires_grad_(True)
    loss = reference.cross_entropy(xd, y, reduction=reduction, **kw)
    (g,) = torch.autograd.grad(loss, xd, go.double())
    return g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["uniform", "everything"])  # (tests/helpers.py MODES)
def test_retained_graph_backwards_are_exact(backend, reduction, mode):
    """The first backward takes the forward's gradient, later ones recompute it: the same
    upstream gives the same bits, another upstream its multiple, each equal to the reference."""
    x, y, kw = make_case(mode, 7, 13, scale=2.0)
    g = torch.Generator().manual_seed(1)
    xr = x.clone().requires_grad_(True)
    loss = lsce(xr, y, reduction=reduction, backend=backend, **kw)
    go = _upstream(loss, g)
    (first,) = torch.autograd.grad(loss, xr, go, retain_graph=True)
    (again,) = torch.autograd.grad(loss, xr, go, retain_graph=True)
    (neg,) = torch.autograd.grad(loss, xr, -3 * go)
    assert torch.equal(first, again)
    ref = _reference_grad(x, y, go, reduction, **kw)
    torch.testing.assert_close(first, ref.float(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(neg, (-3 * ref).float(), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_and_negative_upstream(backend, reduction):
    """An upstream of 0 gives exactly 0 (finite logits); a negative one, the negated multiple;
    also as the first backward of a fresh graph each time."""
    x, y, g = make_data(7, 13, seed=1, scale=2.0)
    for scale in (0.0, -1.0, -2.5):
        xr = x.clone().requires_grad_(True)
        loss = lsce(xr, y, 0.1, reduction=reduction, backend=backend)
        go = _upstream(loss, g, scale)
        (grad,) = torch.autograd.grad(loss, xr, go)
        if scale == 0.0:
            assert torch.equal(grad, torch.zeros_like(grad))
        ref = _reference_grad(x, y, go, reduction, smoothing=0.1)
        torch.testing.assert_close(grad, ref.float(), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["uniform", "everything"])
def test_gradcheck_loss(backend, reduction, mode):
    """float64 gradcheck (it runs the backward several times on one graph, and checks that
    repeated backwards agree bit for bit)."""
    x, y, kw = make_case(mode, 5, 7, seed=2, scale=2.0)
    x = x.double()
    kw = kw_to(kw, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    torch.autograd.gradcheck(
        lambda t: lsce(t, y, reduction=reduction, backend=backend, **kw), (xr,)
    )


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_fused_head(backend, reduction):
    """The head's input, weight and bias gradients, float64, several chunks (the last one
    partial), an ignored row, z-loss; central differences of step 1e-6 within rtol 1e-6 and
    atol 1e-8."""
    x, w, b, y, _ = make_head(6, 4, 9, seed=3, scale=1.0)  # (row 1 ignored)
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    torch.autograd.gradcheck(
        lambda a, c, d: llsce(
            a,
            c,
            y,
            0.2,
            linear_bias=d,
            reduction=reduction,
            chunk_size=4,
            z_loss=1e-2,
            backend=backend,
        ),
        (x, w, b),
        eps=1e-6,
        atol=1e-8,
        rtol=1e-6,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_head_zero_and_negative_upstream(backend, reduction):
    x, w, _, y, g = make_head(12, 8, 37, torch.float32, seed=4, scale=1.0, bias=False)
    for scale in (0.0, -1.5):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = llsce(xs, ws, y, 0.1, reduction=reduction, chunk_size=5, backend=backend)
        go = _upstream(loss, g, scale)
        dx, dw = torch.autograd.grad(loss, (xs, ws), go)
        xd, wd = x.double().requires_grad_(True), w.double().requires_grad_(True)
        ref = reference.cross_entropy(xd @ wd.t(), y, 0.1, reduction=reduction)
        rx, rw = torch.autograd.grad(ref, (xd, wd), go.double())
        torch.testing.assert_close(dx, rx.float(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dw, rw.float(), rtol=1e-4, atol=1e-6)
        if scale == 0.0:
            assert not dx.any() and not dw.any()


@pytest.mark.parametrize("backend", F64_BACKENDS)  # (Triton left out here too)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compiled_fullgraph_scaled_loss(backend, reduction):
    """torch.compile(fullgraph=True) of a step with a scaled loss: the gradient equals eager's,
    and two backwards through the compiled graph agree."""
    x, y, g = make_data(9, 21, seed=5, scale=2.0)
    w = class_weight(21, g, "cpu")

    def step(t):
        loss = lsce(t, y, 0.1, weight=w, reduction=reduction, backend=backend)
        return (loss.sum() if loss.dim() else loss) * 2.5

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    xc = x.clone().requires_grad_(True)
    out = compiled(xc)
    (gc,) = torch.autograd.grad(out, xc, retain_graph=True)
    (gc2,) = torch.autograd.grad(out, xc)
    xe = x.clone().requires_grad_(True)
    (ge,) = torch.autograd.grad(step(xe), xe)
    torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-8)
    assert torch.equal(gc, gc2)
    go = torch.tensor(2.5) if reduction != "none" else torch.full((9,), 2.5)
    ref = _reference_grad(x, y, go, reduction, smoothing=0.1, weight=w)
    torch.testing.assert_close(gc, ref.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_changed_in_place_after_forward(backend):
    """The forward-time gradient, or autograd's clear error; never a gradient of the new values."""
    x, y, _ = make_data(7, 13, seed=6, scale=2.0)
    leaf = x.clone().requires_grad_(True)
    h = leaf * 1
    loss = lsce(h, y, 0.1, backend=backend)
    with torch.no_grad():
        h.mul_(3.0)
    try:
        loss.backward()
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
    else:
        torch.testing.assert_close(
            leaf.grad, _reference_grad(x, y, torch.tensor(1.0), "mean").float()
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_second_backward_raises_clearly(backend):
    x, y, _ = make_data(7, 13, seed=7, scale=2.0)
    leaf = x.clone().requires_grad_(True)
    h = leaf * 1
    loss = lsce(h, y, 0.1, inplace_backward=True, backend=backend)
    loss.backward(retain_graph=True)
    ref = _reference_grad(x, y, torch.tensor(1.0), "mean", smoothing=0.1)
    torch.testing.assert_close(leaf.grad, ref.float())
    with pytest.raises(RuntimeError, match="inplace_backward=True"):
        loss.backward()


class _Spy:
    """Records the contract calls a backend receives from outside (not those a backend's own
    methods make, e.g. a forward_backward written as forward then backward)."""

    def __init__(self, monkeypatch, backend):
        self.calls = []
        self.depth = 0
        b = fused_ls.backends.get(backend)
        for kind in ("forward", "backward", "forward_backward", "rescale"):
            fn = getattr(b, kind)

            def spy(*args, _fn=fn, _kind=kind):
                if self.depth == 0:
                    self.calls.append(_kind)
                self.depth += 1
                try:
                    return _fn(*args)
                finally:
                    self.depth -= 1

            monkeypatch.setattr(b, kind, spy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pass_when_autograd_needs_the_gradient(monkeypatch, backend):
    """Grad needed: one forward_backward in the forward, and the backward of a unit upstream only
    rescales (a no-op); no grad (no_grad, or logits that do not require grad): forward only."""
    x, y, _ = make_data(7, 13, seed=8, scale=2.0)
    spy = _Spy(monkeypatch, backend)
    xr = x.clone().requires_grad_(True)
    loss = lsce(xr, y, 0.1, backend=backend)
    assert spy.calls == ["forward_backward"]
    loss.backward()
    assert spy.calls == ["forward_backward", "rescale"]
    spy.calls.clear()
    with torch.no_grad():
        lsce(xr, y, 0.1, backend=backend)
    lsce(x, y, 0.1, backend=backend)
    assert spy.calls == ["forward", "forward"]


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled extension")
def test_gradient_buffers_are_reused_once_freed(monkeypatch):
    """The cpp backend's large gradient buffers (≥ 8 MiB) come from a small cache: a buffer goes
    back when its gradient is freed and serves the next call of that size (no page faults), never
    while the gradient lives; the results are those of fresh buffers; empty_cache frees them."""
    monkeypatch.delenv("FUSED_LS_NO_BUFFER_POOL", raising=False)
    fused_ls.empty_cache()
    x, y, _ = make_data(80, 32000, seed=9, scale=2.0)  # 10 MB of fp32 logits
    ref = _reference_grad(x, y, torch.tensor(1.0), "mean", smoothing=0.1).float()
    xr = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(lsce(xr, y, 0.1, backend="cpp"), xr)
    (g2,) = torch.autograd.grad(lsce(xr, y, 0.1, backend="cpp"), xr)
    assert g1.data_ptr() != g2.data_ptr()  # both alive: two buffers
    torch.testing.assert_close(g1, ref, rtol=2e-5, atol=1e-7)
    assert torch.equal(g1, g2)
    ptr = g1.data_ptr()
    del g1
    (g3,) = torch.autograd.grad(lsce(xr, y, 0.1, backend="cpp"), xr)
    assert g3.data_ptr() == ptr  # the freed one, reused
    assert torch.equal(g3, g2)
    del g2, g3
    assert fused_ls.empty_cache() == 2 * x.numel() * 4
    assert fused_ls.empty_cache() == 0
