"""The fused LM head on CUDA tensors, on every backend that serves them (cuda, triton, torch).

tests/test_linear.py checks the head on CPU in float64 against the composition; this file checks
what only a GPU exercises: the CUDA chunk rule, the fp32 weight-gradient accumulation through
``addmm(out_dtype=float32)``, the in-place gradient of each GPU backend inside the chunk loop, and
that neither the loss nor the head synchronises with the host. Marked ``cuda``: skipped where no
GPU exists.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LOW, MODES, backends, ignore_row, make_head

import fused_ls
from fused_ls import reference
from fused_ls.linear import _fp32_addmm_ok, chunk_rows

pytestmark = pytest.mark.cuda

llsce = fused_ls.linear_label_smoothing_cross_entropy
DEV = torch.device("cuda")
BACKENDS = backends(DEV)


def _case(n, h, v, dtype, seed=0, bias=True):
    """Inputs of unit-variance logits: x and W scaled by h^(-1/4)."""
    return make_head(n, h, v, dtype, DEV, seed=seed, scale=h**-0.25, bias=bias)


def _run(fn, x, w, b, go=None):
    xs, ws = (t.detach().clone().requires_grad_(True) for t in (x, w))
    bs = None if b is None else b.detach().clone().requires_grad_(True)
    loss = fn(xs, ws, bs)
    loss.backward(go if go is not None else torch.ones_like(loss))
    grads = [xs.grad, ws.grad] + ([] if bs is None else [bs.grad])
    return [loss.detach()] + grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_mode_fp32_matches_the_composition(backend, mode, reduction):
    """Every mode, chunks of 5 rows (a partial last chunk), against the composition computed by
    the same backend on the full logits."""
    n, h, v = 37, 6, 29
    x, w, b, y, g = _case(n, h, v, torch.float32)
    kw = MODES[mode](n, v, g, DEV)
    ignore_row(y, kw)
    go = (torch.rand(n, generator=g) + 0.5).to(DEV) if reduction == "none" else None
    fused = _run(
        lambda a, c, d: llsce(
            a, c, y, linear_bias=d, chunk_size=5, backend=backend, reduction=reduction, **kw
        ),
        x,
        w,
        b,
        go,
    )
    comp = _run(
        lambda a, c, d: fused_ls.label_smoothing_cross_entropy(
            F.linear(a, c, d), y, backend=backend, reduction=reduction, **kw
        ),
        x,
        w,
        b,
        go,
    )
    for name, f, c in zip(("loss", "dX", "dW", "db"), fused, comp, strict=True):
        torch.testing.assert_close(f, c, rtol=2e-5, atol=2e-5, msg=lambda m, k=name: f"{k}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_lm_sizes(backend, dtype):
    """N = 1500 (several 512-row chunks and a partial one), V = 50257 (odd), H = 256: the error of
    the loss and of the three gradients against the float64 composition is at most 2× + atol the
    error PyTorch makes computing ``F.cross_entropy(F.linear(...))`` in that dtype."""
    n, h, v = 1500, 256, 50257
    x, w, b, y, _ = _case(n, h, v, dtype, seed=3)
    ref = _run(
        lambda a, c, d: reference.cross_entropy(F.linear(a, c, d), y, 0.1),
        x.double(),
        w.double(),
        b.double(),
    )
    pt = _run(lambda a, c, d: F.cross_entropy(F.linear(a, c, d), y, label_smoothing=0.1), x, w, b)
    ours = _run(
        lambda a, c, d: llsce(a, c, y, 0.1, linear_bias=d, chunk_size=512, backend=backend),
        x,
        w,
        b,
    )
    assert ours[2].dtype == dtype and ours[1].dtype == dtype
    for name, o, p, r in zip(("loss", "dX", "dW", "db"), ours, pt, ref, strict=True):
        err = float((o.double() - r).abs().max())
        err_pt = float((p.double() - r).abs().max())
        atol = 2e-2 if name == "loss" else 2e-3
        assert err <= 2 * err_pt + atol, (name, err, err_pt)


def test_fp32_accumulation_probe():
    """PyTorch ≥ 2.8 accumulates a bf16 product into an fp32 buffer directly on CUDA."""
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    assert _fp32_addmm_ok(DEV) == ((major, minor) >= (2, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_peak_memory_is_one_chunk(backend):
    """Forward + backward allocate one chunk's logits (plus the weight gradient and its fp32
    accumulator), never [N, V]. The pure-torch backend's readable row code makes fp32
    temporaries of the block: a few blocks (here of 1024 rows), still less than the logits."""
    n, h, v = 32768, 64, 32000  # bf16 logits would be 2 GiB; a 4096-row chunk is 250 MiB
    x, w, _, y, _ = _case(n, h, v, torch.bfloat16, seed=4, bias=False)
    x.requires_grad_(True)
    w.requires_grad_(True)
    chunk = 1024 if backend == "torch" else None
    llsce(x, w, y, backend=backend, chunk_size=chunk).backward()  # warm-up
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    llsce(x, w, y, backend=backend, chunk_size=chunk).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    if backend == "torch":
        assert extra < n * v * 2 / 2, extra
    else:
        chunk = chunk_rows(n, h, v, torch.bfloat16, DEV)
        grads = x.numel() * 2 + w.numel() * (2 + 4)  # dX, dW and the fp32 accumulator
        assert extra <= chunk * v * 2 + grads + (4 << 20), (extra, chunk)
        assert extra < n * v * 2 / 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", [False, True], ids=["loss", "linear_head"])
def test_no_host_sync(backend, head):
    """Neither the loss nor the head waits for the device (torch's sync debug mode raises on any
    synchronising call)."""
    n, h, v = 1024, 32, 5000
    x, w, b, y, _ = _case(n, h, v, torch.bfloat16, seed=5)
    eps = torch.rand(n, device=DEV)  # per-sample smoothing: a tensor the code must not read back
    if head:
        fn = lambda a, c, d: llsce(a, c, y, eps, linear_bias=d, chunk_size=512, backend=backend)  # noqa: E731
    else:
        fn = lambda a, c, d: fused_ls.label_smoothing_cross_entropy(  # noqa: E731
            F.linear(a, c, d), y, eps, backend=backend
        )
    _run(fn, x, w, b)  # warm-up: first-use compilation and caches may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(fn, x, w, b)
    finally:
        torch.cuda.set_sync_debug_mode(0)
