"""The gradient in the forward on CUDA tensors (marked ``cuda``: run by benchmarks/gpu_check.py
on a GPU machine; skipped elsewhere). On CUDA it is opt-in until measured
(``FUSED_LS_GRAD_IN_FORWARD=1``), and the CUDA C++ backend's sm_90 cluster kernel, which holds
each row in the shared memory of a thread-block cluster, is opt-in too
(``FUSED_LS_CUDA_CLUSTER=1``): both are switched on here and checked against the float64
reference, for every reduction, a scaled upstream gradient, a retained graph's second backward,
rows that need one CTA, several and more than eight, and no host synchronisation."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import SIMILARITY_MAX_C, SIMILARITY_MODES, kw_to, make_case

import fused_ls
from fused_ls import reference
from fused_ls.backends import Request, reasons_for

pytestmark = pytest.mark.cuda

# (backend, environment): the one-pass path of each backend, and CUDA C++'s cluster kernel
PATHS = [
    ("triton", {}),
    ("cuda", {}),
    ("cuda", {"FUSED_LS_CUDA_CLUSTER": "1"}),
]


@pytest.fixture(params=PATHS, ids=lambda p: p[0] + ("-cluster" if p[1] else ""))
def path(request, monkeypatch):
    backend, env = request.param
    why = reasons_for(backend, Request("cuda", torch.float32))
    if why:  # (as tests/test_cuda.py: on a CUDA machine a backend that cannot serve is a failure)
        pytest.fail(f"{backend} cannot serve CUDA tensors on a CUDA machine: " + "; ".join(why))
    if env and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the cluster kernel needs sm_90")
    monkeypatch.setenv("FUSED_LS_GRAD_IN_FORWARD", "1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return backend


# (N, C): one CTA's worth of a row, rows of several CTAs (V = 128256: 4 of 64 KB in bf16) and of
# more than 8 (262144 fp32: 16 of 64 KB), a small problem
SHAPES = [(33, 64), (257, 32000), (64, 128256), (3, 262144)]
# tests/helpers.py MODES: plain, class weights with a class id as ignore_index, per-row mixup, the
# soft cap with the confidence penalty's Σpz, and everything at once (small C: a [C, C] similarity)
MODE_NAMES = [
    "uniform",
    "weight_ignore",
    "mixup_rows",
    "softcap",
    "confidence_penalty",
    "everything",
]


@functools.cache
def _reference(N, C, dtype, mode, reduction):
    """(loss, gradient for the upstream go, go, max |x|) in float64 on the CPU, once per case
    (every path is compared with the same one)."""
    x, y, kw = make_case(mode, N, C, dtype)
    xd = x.double().requires_grad_(True)
    ref = reference.cross_entropy(xd, y, reduction=reduction, **kw)
    g = torch.Generator().manual_seed(1)
    go = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5
    (rg,) = torch.autograd.grad(ref, xd, go)
    return ref.detach(), rg, go, float(x.abs().max())


@pytest.mark.parametrize(("N", "C"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_one_pass_equals_reference(path, N, C, dtype, reduction, mode):
    if mode in SIMILARITY_MODES and C > SIMILARITY_MAX_C:
        pytest.skip("a [C, C] similarity at this C")
    x, y, kw = make_case(mode, N, C, dtype)
    ref, rg, go, xmax = _reference(N, C, dtype, mode, reduction)
    xr = x.cuda().requires_grad_(True)
    loss = fused_ls.label_smoothing_cross_entropy(
        xr, y.cuda(), reduction=reduction, backend=path, **kw_to(kw, "cuda")
    )
    go_c = go.to(device="cuda", dtype=loss.dtype)
    (g1,) = torch.autograd.grad(loss, xr, go_c, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, xr, go_c)
    assert torch.equal(g1, g2)
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(
        loss.detach().cpu().double(), ref, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, xmax)
    )
    torch.testing.assert_close(g1.cpu().double(), rg.to(dtype).double(), **tol)


@pytest.mark.parametrize("inplace", [False, True])
def test_no_host_sync(path, inplace):
    """Forward and backward (unit and scaled upstream) under sync_debug_mode("error")."""
    x, y, _ = make_case("uniform", 1024, 32000, torch.bfloat16)
    xc, yc = x.cuda(), y.cuda()
    for scale in (1.0, 2.0):
        h = xc.clone().requires_grad_(True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = h * 1
            loss = fused_ls.label_smoothing_cross_entropy(
                logits, yc, 0.1, backend=path, inplace_backward=inplace
            )
            (loss * scale).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        assert torch.isfinite(h.grad).all()
