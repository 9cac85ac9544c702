"""The compiled CUDA backend (``backend="cuda"``, csrc/cuda) against the float64 dense
reference.

The same modes, dtypes and sizes as tests/test_cpp.py (tests/helpers.py ``MODES``,
``KERNEL_SHAPES``) on CUDA tensors, plus the CUDA-specific
layouts: rows split over several thread blocks (few rows, large vocabularies: 128256 and 262144
are real LM vocabularies), unaligned rows (scalar path), and no host sync (CUDA-graph capture).
Marked ``cuda``: skipped where no GPU exists (compile-checked there by ``make cuda-check``).
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, check_backend, kw_to, loss_and_grad, make_case, mode_cases

import fused_ls
from fused_ls.backends import reasons_for

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _needs_cuda_backend():
    why = reasons_for("cuda", None)
    if why:
        pytest.fail("the cuda backend is unavailable on a CUDA machine: " + "; ".join(why))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("mode", "N", "C"), mode_cases())
def test_modes(mode, N, C, dtype):
    logits, target, kw = make_case(mode, N, C, dtype, device="cuda")
    check_backend("cuda", logits, target, reduction="none", **kw)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reductions_weight_ignore(reduction, dtype):
    logits, target, kw = make_case("weight_ignore", 9, 101, dtype, device="cuda", seed=1)
    check_backend("cuda", logits, target, reduction=reduction, **kw)


# (N, C): N = 1..2 rows of a large vocabulary take the split-row statistics path (several blocks
# per row and a merge kernel); 4096 × 32000 the one-block-per-row path.
@pytest.mark.parametrize(("N", "C"), [(1, 128256), (2, 262144), (64, 32000), (4096, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocab_split_rows(N, C, dtype):
    logits, target, kw = make_case(
        "mixup_sparse_all" if C <= 32000 else "confidence_penalty", N, C, dtype, "cuda", seed=2
    )
    check_backend("cuda", logits, target, reduction="none", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_rows_scalar_path(dtype):
    # a row stride that is not a multiple of 16 bytes, and a base pointer off by one element
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(9, 1001 + 7, generator=g).to(dtype).cuda()
    logits = wide[:, 1:1002]
    target = torch.randint(0, 1001, (9,), generator=g).cuda()
    check_backend("cuda", logits, target, smoothing=0.1, reduction="none")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_neg_inf(dtype):
    logits, target, kw = make_case("uniform", 5, 2500, dtype, device="cuda", seed=4)
    logits[2, 2300] = float("nan")
    logits[3, 7] = float("-inf")
    check_backend("cuda", logits, target, reduction="none", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_cpp(dtype):
    # the same math on both devices (rowmath.h): losses, gradients and stats agree to rounding
    if reasons_for("cpp", None):
        pytest.skip("cpp backend not built")
    logits, target, kw = make_case("mixup_sparse_all", 33, 5001, dtype, seed=5)
    lc, gc = loss_and_grad(
        fused_ls.label_smoothing_cross_entropy,
        logits,
        target,
        backend="cpp",
        reduction="none",
        **kw,
    )
    kw_cuda = kw_to(kw, "cuda")
    lg, gg = loss_and_grad(
        fused_ls.label_smoothing_cross_entropy,
        logits.cuda(),
        target.cuda(),
        backend="cuda",
        reduction="none",
        **kw_cuda,
    )
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lg.cpu(), lc, **tol)
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(gg.cpu(), gc, **tol)


@pytest.mark.parametrize("mode", ["uniform", "mixup_sparse_all", "mixup_dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward(mode, dtype):
    logits, target, kw = make_case(mode, 6, 2053, dtype, device="cuda", seed=6)
    base = logits.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(
        fused_ls.label_smoothing_cross_entropy(base, target, backend="cuda", **kw), base
    )
    h = base.clone()
    (got,) = torch.autograd.grad(
        fused_ls.label_smoothing_cross_entropy(
            h, target, backend="cuda", inplace_backward=True, **kw
        ),
        h,
    )
    assert got.data_ptr() == h.data_ptr()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_return_stats_and_argmax():
    logits, target, kw = make_case("uniform", 7, 70000, torch.float32, device="cuda", seed=7)
    logits[0, 100] = logits[0, 65000] = 100.0  # a tie across blocks: the first index wins
    _, st = fused_ls.label_smoothing_cross_entropy(
        logits, target, backend="cuda", return_stats=True, reduction="none", **kw
    )
    torch.testing.assert_close(st.lse, torch.logsumexp(logits.double(), 1).float())
    assert torch.equal(st.prediction, logits.argmax(1))


def test_no_host_sync_cuda_graph():
    # forward + backward capture in a CUDA graph only if nothing syncs with the host
    logits, target, kw = make_case("mixup_dense", 64, 1000, torch.float32, device="cuda", seed=8)
    x = logits.clone().requires_grad_(True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside the graph
            x.grad = None
            fused_ls.label_smoothing_cross_entropy(x, target, backend="cuda", **kw).backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(g):
        loss = fused_ls.label_smoothing_cross_entropy(x, target, backend="cuda", **kw)
        loss.backward()
    g.replay()
    torch.cuda.synchronize()
    ref_l, ref_g = loss_and_grad(
        fused_ls.label_smoothing_cross_entropy, logits, target, backend="cuda", **kw
    )
    torch.testing.assert_close(loss.detach(), ref_l)
    torch.testing.assert_close(x.grad, ref_g)
