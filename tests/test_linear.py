"""The fused LM head: ``linear_label_smoothing_cross_entropy`` against the composition
``label_smoothing_cross_entropy(F.linear(input, W, b), target, ...)`` (itself tested against the
dense reference) and, for uniform smoothing, against ``F.cross_entropy(F.linear(...))``.

Sizes: N = 37 (odd, not a multiple of the chunks used), H = 6, V = 29 (prime). Chunk sizes 1
(one row per chunk), 5 (a partial last chunk), 64 (N smaller than one chunk) and the default.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LOW, MODES, backends, ignore_row, kw_to, make_head

import fused_ls
from fused_ls import reference
from fused_ls.linear import chunk_rows

llsce = fused_ls.linear_label_smoothing_cross_entropy
N, H, V = 37, 6, 29
BACKENDS = backends("cpu")


def _grads(loss, params, go):
    want = [p for p in params if p is not None and p.requires_grad]
    return torch.autograd.grad(loss, want, go) if want else ()


def _both(x, w, b, y, need=(True, True, True), go=None, chunk=None, backend="auto", **kw):
    """(loss, grads) of the fused head and of the composition, from copies of x, w, b."""
    out = []
    for fused in (True, False):
        xs, ws, bs = (
            t.detach().clone().requires_grad_(n) if t is not None else None
            for t, n in zip((x, w, b), need, strict=True)
        )
        if fused:
            loss = llsce(xs, ws, y, linear_bias=bs, chunk_size=chunk, backend=backend, **kw)
        else:
            logits = F.linear(xs, ws, bs)
            # the composition: class dim last → dim 1 for label_smoothing_cross_entropy
            logits = logits.movedim(-1, 1) if logits.dim() > 2 else logits
            loss = fused_ls.label_smoothing_cross_entropy(logits, y, backend=backend, **kw)
        g = go if go is not None else torch.ones_like(loss)
        out.append((loss.detach(), _grads(loss, (xs, ws, bs), g)))
    return out


def _close(a, b, dtype=torch.float64):
    tol = {torch.float64: 1e-10, torch.float32: 2e-5}[dtype]
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_mode_matches_the_composition_fp64(backend, mode, reduction):
    x, w, b, y, g = make_head(N, H, V)
    kw = kw_to(MODES[mode](N, V, g, "cpu"), dtype=torch.float64)
    ignore_row(y, kw)
    go = torch.rand(N, generator=g, dtype=torch.float64) + 0.5 if reduction == "none" else None
    (lf, gf), (lc, gc) = _both(
        x, w, b, y, go=go, chunk=5, backend=backend, reduction=reduction, **kw
    )
    _close(lf, lc)
    for a, c in zip(gf, gc, strict=True):
        _close(a, c)


@pytest.mark.parametrize("chunk", [1, 5, 64, None])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "need", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]
)
def test_chunks_and_requires_grad_subsets(chunk, reduction, need):
    x, w, b, y, g = make_head(N, H, V, seed=1)
    go = torch.rand(N, generator=g, dtype=torch.float64) if reduction == "none" else None
    (lf, gf), (lc, gc) = _both(x, w, b, y, need=need, go=go, chunk=chunk, reduction=reduction)
    _close(lf, lc)
    assert len(gf) == sum(need)
    for a, c in zip(gf, gc, strict=True):
        _close(a, c)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_leading_dims_and_no_bias(reduction):
    x, w, _, y, g = make_head((3, 5), H, V, seed=2, bias=False)
    go = torch.rand(3, 5, generator=g, dtype=torch.float64) if reduction == "none" else None
    (lf, gf), (lc, gc) = _both(x, w, None, y, need=(True, True, False), go=go, chunk=4,
                               reduction=reduction, z_loss=1e-3)  # fmt: skip
    assert lf.shape == lc.shape == ((3, 5) if reduction == "none" else ())
    _close(lf, lc)
    for a, c in zip(gf, gc, strict=True):
        _close(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_uniform_equals_pytorch(backend, reduction):
    x, w, b, y, g = make_head(N, H, V, torch.float32, seed=3)
    cw = torch.rand(V, generator=g) + 0.2
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    loss = llsce(xs, ws, y, 0.1, linear_bias=bs, weight=cw, reduction=reduction, backend=backend)
    loss.sum().backward()
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    ref = F.cross_entropy(
        F.linear(xr, wr, br), y, weight=cw, reduction=reduction, label_smoothing=0.1
    )
    ref.sum().backward()
    torch.testing.assert_close(loss, ref)
    for a, c in ((xs, xr), (ws, wr), (bs, br)):
        torch.testing.assert_close(a.grad, c.grad)


def test_tied_weights_accumulate():
    """The head's weight is also the embedding: both uses' gradients add up."""
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(V, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (N,), generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    grads = []
    for fused in (True, False):
        E = emb.clone().requires_grad_(True)
        h = torch.tanh(E[ids] * 1.5)
        if fused:
            loss = llsce(h, E, y, 0.1, chunk_size=8)
        else:
            loss = F.cross_entropy(F.linear(h, E), y, label_smoothing=0.1)
        loss.backward()
        grads.append(E.grad)
    _close(grads[0], grads[1])


def test_no_grad_computes_the_loss_only(monkeypatch):
    x, w, b, y, _ = make_head(N, H, V, torch.float32, seed=6)
    be = fused_ls.backends.get("cpp" if "cpp" in BACKENDS else "torch")

    def refuse(*a, **k):
        raise AssertionError("a gradient pass ran under torch.no_grad()")

    monkeypatch.setattr(type(be), "forward_backward", refuse)
    monkeypatch.setattr(type(be), "backward", refuse)
    with torch.no_grad():
        loss, st = llsce(x.requires_grad_(True), w, y, 0.1, linear_bias=b, return_stats=True)
    logits = F.linear(x.detach(), w, b)
    ref, rst = fused_ls.label_smoothing_cross_entropy(logits, y, 0.1, return_stats=True)
    torch.testing.assert_close(loss, ref)
    for a, c in zip(st, rst, strict=True):
        torch.testing.assert_close(a, c)
    assert not loss.requires_grad


def test_retain_graph_second_backward():
    """Every reduction: a second backward through a retained graph is exact. "none" recomputes in
    every backward; "mean"/"sum" hand the forward's gradients to the first backward, and a later
    one recomputes them as the forward did: the same upstream gives the same bits."""
    x, w, b, y, g = make_head(N, H, V, seed=7)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    for reduction in ("none", "mean", "sum"):
        loss = llsce(xs, ws, y, 0.1, linear_bias=bs, reduction=reduction, chunk_size=6)
        go = torch.rand_like(loss) + 0.5
        first = torch.autograd.grad(loss, (xs, ws, bs), go, retain_graph=True)
        again = torch.autograd.grad(loss, (xs, ws, bs), go, retain_graph=True)
        doubled = torch.autograd.grad(loss, (xs, ws, bs), go * 2)
        for a, c, d in zip(first, again, doubled, strict=True):
            assert torch.equal(a, c), reduction
            _close(a * 2, d)


@pytest.mark.parametrize("dtype", LOW + (torch.float32,))
def test_low_precision_within_pytorchs_own_error(dtype):
    """bf16/fp16: the error of the loss and of the input and weight gradients against the float64
    composition is at most 2× + atol the error that PyTorch makes computing the composition in
    that dtype (the helpers' rule). Several chunks, so that the weight gradient is accumulated."""
    x, w, b, y, _ = make_head(N, H, V, dtype, seed=8)

    def run(fn, dt):  # fresh leaves (to() returns the tensor itself when the dtype matches)
        xs = x.detach().to(dt).clone().requires_grad_(True)
        ws = w.detach().to(dt).clone().requires_grad_(True)
        loss = fn(xs, ws)
        loss.backward()
        return loss.detach().double(), xs.grad.double(), ws.grad.double()

    ref = run(
        lambda a, v: reference.cross_entropy(F.linear(a, v, b.double()), y, 0.1), torch.float64
    )
    pt = run(lambda a, v: F.cross_entropy(F.linear(a, v, b), y, label_smoothing=0.1), dtype)
    ours = run(lambda a, v: llsce(a, v, y, 0.1, linear_bias=b, chunk_size=8), dtype)
    assert ours[0].dtype == torch.float64 and llsce(x, w, y).dtype == torch.float32
    atol = 2e-2 if dtype in LOW else 1e-5
    for name, o, p, r in zip(("loss", "dX", "dW"), ours, pt, ref, strict=True):
        err, err_pt = float((o - r).abs().max()), float((p - r).abs().max())
        assert err <= 2 * err_pt + atol * (1 if name == "loss" else 0.1), (name, err, err_pt)


def test_fp32_accumulation_and_scaled_rounding():
    """The CPU helpers of the low-precision weight gradient: acc += float(src), and
    out = dtype(src · scale) rounded once (round to nearest even, as PyTorch's conversion)."""
    from fused_ls.backends.cpp_backend import accumulate_, scaled_copy_

    g = torch.Generator().manual_seed(11)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for n in (1, 31, 64, 1000, 70001):  # tails, exact vectors, several threads' blocks
            acc = torch.randn(n, generator=g)
            src = torch.randn(n, generator=g).to(dt)
            want = acc + src.float()
            accumulate_(acc, src)
            assert torch.equal(acc, want), (dt, n)
            scale = torch.tensor(0.37)
            want = (acc * scale).to(dt)  # (scaled_copy_ may consume acc)
            out = torch.empty(n, dtype=dt)
            scaled_copy_(out, acc, scale)
            assert torch.equal(out, want), (dt, n)


def test_no_n_by_v_tensor_is_allocated():
    """The largest allocation of forward + backward is one chunk's block, not [N, V]."""
    from torch.profiler import ProfilerActivity, profile

    n, h, v = 4096, 16, 4000  # 66 MB of fp32 logits: 16 chunks of 256 rows
    g = torch.Generator().manual_seed(9)
    x = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    chunk = chunk_rows(n, h, v, torch.float32, x.device)
    assert chunk < n
    llsce(x, w, y).backward()  # warm-up (lazy initialisation allocates too)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        llsce(x, w, y).backward()
    largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert 0 < largest <= chunk * v * 4 + 4096, (largest, chunk)
    assert largest < n * v * 4 / 4


def test_module_form():
    x, w, b, y, _ = make_head(N, H, V, torch.float32, seed=10)
    crit = fused_ls.FusedLinearLabelSmoothingCE(0.2, reduction="sum", z_loss=1e-3, chunk_size=7)
    a = crit(x, w, y, b)
    c = llsce(x, w, y, 0.2, linear_bias=b, reduction="sum", z_loss=1e-3)
    torch.testing.assert_close(a, c)
    assert crit.chunk_size == 7 and "z_loss" in repr(crit)
    eps = torch.rand(N)
    torch.testing.assert_close(
        crit(x, w, y, b, smoothing=eps),
        llsce(x, w, y, eps, linear_bias=b, reduction="sum", z_loss=1e-3),
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(reduction, dynamic):
    torch._dynamo.reset()

    def step(x, w, y):
        return llsce(torch.tanh(x), w, y, 0.1, reduction=reduction, chunk_size=8).sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for n in (20, 13):
        x, w, _, y, _ = make_head(n, H, V, torch.float32, seed=n)
        xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        xc, wc = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        le, lc = step(xe, we, y), compiled(xc, wc, y)
        le.backward()
        lc.backward()
        torch.testing.assert_close(lc, le)
        torch.testing.assert_close(xc.grad, xe.grad)
        torch.testing.assert_close(wc.grad, we.grad)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x, w, b, y: llsce(x[:, :5], w, y), ValueError, "input has H=5"),
        (lambda x, w, b, y: llsce(x, w[:, None], y), ValueError, "linear_weight must be"),
        (lambda x, w, b, y: llsce(x, w, y, linear_bias=b[:3]), ValueError, "linear_bias"),
        (lambda x, w, b, y: llsce(x, w, y, weight=torch.ones(V + 1)), ValueError, "weight"),
        (lambda x, w, b, y: llsce(x, w, y, similarity=torch.ones(3, 3)), ValueError, "similarity"),
        (lambda x, w, b, y: llsce(x, w, y[:5]), ValueError, "target shape"),
        (lambda x, w, b, y: llsce(x, w.float(), y), ValueError, "linear_weight is"),
        (lambda x, w, b, y: llsce(x, w, y.float()), ValueError, "target"),
        (lambda x, w, b, y: llsce(x, w, y, chunk_size=0), ValueError, "chunk_size"),
        (lambda x, w, b, y: llsce(x, w, torch.full_like(y, V)), IndexError, "target contains"),
        (lambda x, w, b, y: llsce(x.long(), w, y), TypeError, "input"),
        (lambda x, w, b, y: llsce(x, w, y, smoothing=2.0), ValueError, "smoothing"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    x, w, b, y, _ = make_head(N, H, V)
    with pytest.raises(exc, match=match):
        call(x, w, b, y)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input(reduction):
    """No rows: no chunk runs; the gradients are zeros (never an unwritten buffer)."""
    x = torch.randn(0, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    loss = llsce(x, w, y, linear_bias=b, reduction=reduction)
    ref = F.cross_entropy(F.linear(x, w, b), y, label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    loss.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
