"""Fused mixup and the fused confidence penalty against plain-PyTorch computations.

Mixup: the loss for the target λ·q(y_a) + (1 − λ)·q(y_b) must equal a soft-target
``F.cross_entropy`` with those mixed smoothed one-hot targets built explicitly (and, by
linearity, λ·CE(y_a) + (1 − λ)·CE(y_b) with PyTorch's own ``label_smoothing``).
Confidence penalty: loss − β·w_y·H(softmax(x)) with H = −Σ p log p computed in plain torch.
Losses and gradients, for every backend that runs on CPU tensors here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, backends, make_data

import fused_ls

BACKENDS = backends("cpu", interpreted_triton=True)


def best_dtype(backend: str, dense=False, sparse=False) -> torch.dtype:
    """float64 where the backend takes it (tightest check), else float32 (e.g. triton)."""
    for dt in (torch.float64, torch.float32):
        req = fused_ls.backends.Request("cpu", dt, dense, sparse)
        if not fused_ls.backends.reasons_for(backend, req):
            return dt
    pytest.skip(f"{backend} cannot serve this case on CPU")


def serves(backend: str, dtype: torch.dtype) -> bool:
    req = fused_ls.backends.Request("cpu", dtype, False, False)
    return not fused_ls.backends.reasons_for(backend, req)


def smoothed_onehot(y: torch.Tensor, C: int, eps, similarity=None, beta=1.0) -> torch.Tensor:
    """q(y) = (1 − ε)·onehot(y) + ε·r(y), r = (1 − β)/C + β·S[y]/ΣS[y], built densely."""
    onehot = F.one_hot(y, C).to(torch.float64)
    r = torch.full_like(onehot, 1.0 / C)
    if similarity is not None:
        S = similarity.to(torch.float64)
        r = (1 - beta) * r + beta * (S / S.sum(1, keepdim=True))[y]
    eps = eps.to(torch.float64)[:, None] if isinstance(eps, torch.Tensor) else eps
    return (1 - eps) * onehot + eps * r


def grad_of(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


def assert_close(ours, ref, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=rtol, atol=atol)


def data(N=13, C=7, dtype=torch.float32, seed=0, scale=3.0):
    """Logits, two targets (no ignored row) and a per-row λ in the logits' dtype."""
    x, ya, g = make_data(N, C, dtype, seed=seed, scale=scale, ignore=False)
    yb = torch.randint(0, C, (N,), generator=g)
    lam = torch.rand(N, generator=g, dtype=torch.float64).to(dtype)
    return x, ya, yb, lam


# ------------------------------------------------------------------------------------------ mixup


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("lam_kind", ["scalar", "tensor"])
def test_mixup_equals_soft_target_ce(backend, dtype, reduction, lam_kind):
    if not serves(backend, dtype):
        pytest.skip(f"{backend} does not take {dtype}")
    x, ya, yb, lam_t = data(dtype=dtype)
    C, eps = x.shape[1], 0.15
    lam = 0.3 if lam_kind == "scalar" else lam_t
    lam64 = lam_t.double()[:, None] if lam_kind == "tensor" else lam
    q = lam64 * smoothed_onehot(ya, C, eps) + (1 - lam64) * smoothed_onehot(yb, C, eps)
    ours_l, ours_g = grad_of(
        lambda z: fused_ls.label_smoothing_cross_entropy(
            z, ya, eps, mix_target=yb, mix_lambda=lam, reduction=reduction, backend=backend
        ),
        x,
    )
    ref_l, ref_g = grad_of(lambda z: F.cross_entropy(z.double(), q, reduction=reduction), x)
    assert_close(ours_l, ref_l, dtype)
    assert_close(ours_g, ref_g, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixup_is_the_lambda_mix_of_two_pytorch_losses(backend):
    """Classic mixup: λ·CE(y_a) + (1 − λ)·CE(y_b), with PyTorch's own label_smoothing."""
    dt = best_dtype(backend)
    x, ya, yb, lam = data(N=32, C=11, dtype=dt, seed=3)
    ours_l, ours_g = grad_of(
        lambda z: fused_ls.label_smoothing_cross_entropy(
            z, ya, 0.1, mix_target=yb, mix_lambda=lam, reduction="none", backend=backend
        ),
        x,
    )
    lam64 = lam.double()
    ref_l, ref_g = grad_of(
        lambda z: (
            lam64 * F.cross_entropy(z.double(), ya, label_smoothing=0.1, reduction="none")
            + (1 - lam64) * F.cross_entropy(z.double(), yb, label_smoothing=0.1, reduction="none")
        ),
        x,
    )
    assert_close(ours_l, ref_l, dt)
    assert_close(ours_g, ref_g, dt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_mixup_with_class_weights(backend, reduction):
    """Weighted mixup = λ·CE_w(y_a) + (1 − λ)·CE_w(y_b); "mean" divides by Σ (λ w_a + (1−λ) w_b)."""
    dt = best_dtype(backend)
    x, ya, yb, lam = data(N=20, C=6, dtype=dt, seed=4)
    w = (torch.rand(6, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.2).to(
        dt
    )

    def ref(z):
        z, w, lam = z.double(), w_.double(), lam_.double()
        la = F.cross_entropy(z, ya, weight=w, label_smoothing=0.2, reduction="none")
        lb = F.cross_entropy(z, yb, weight=w, label_smoothing=0.2, reduction="none")
        rows = lam * la + (1 - lam) * lb
        if reduction == "none":
            return rows
        if reduction == "sum":
            return rows.sum()
        return rows.sum() / (lam * w[ya] + (1 - lam) * w[yb]).sum()

    w_, lam_ = w, lam
    ours_l, ours_g = grad_of(
        lambda z: fused_ls.label_smoothing_cross_entropy(
            z,
            ya,
            0.2,
            weight=w,
            mix_target=yb,
            mix_lambda=lam,
            reduction=reduction,
            backend=backend,
        ),
        x,
    )
    ref_l, ref_g = grad_of(ref, x)
    assert_close(ours_l, ref_l, dt)
    assert_close(ours_g, ref_g, dt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [1.0, 0.4])
@pytest.mark.parametrize("sparse", [False, True])
def test_mixup_with_similarity(backend, beta, sparse):
    dt = best_dtype(backend, dense=not sparse, sparse=sparse)
    x, ya, yb, lam = data(N=17, C=8, dtype=dt, seed=5)
    lam = lam.double()
    g = torch.Generator().manual_seed(6)
    S = torch.rand(8, 8, generator=g, dtype=torch.float64).to(dt)
    S.fill_diagonal_(0)
    if sparse:  # keep 3 neighbours per class; the dense oracle uses the same kept entries
        vals, idx = S.topk(3, dim=1)
        sim = fused_ls.SparseSimilarity(idx, vals)
        S = torch.zeros_like(S).scatter_(1, idx, vals)
    else:
        sim = S
    eps = 0.25
    q = lam[:, None] * smoothed_onehot(ya, 8, eps, S, beta) + (1 - lam[:, None]) * smoothed_onehot(
        yb, 8, eps, S, beta
    )
    ours_l, ours_g = grad_of(
        lambda z: fused_ls.label_smoothing_cross_entropy(
            z,
            ya,
            eps,
            similarity=sim,
            similarity_mix=beta,
            mix_target=yb,
            mix_lambda=lam,
            reduction="sum",
            backend=backend,
        ),
        x,
    )
    ref_l, ref_g = grad_of(lambda z: F.cross_entropy(z.double(), q, reduction="sum"), x)
    assert_close(ours_l, ref_l, dt)
    assert_close(ours_g, ref_g, dt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_mixup_ignored_rows(backend, reduction):
    """Ignored rows give 0 loss and 0 gradient and are not counted; the rest is soft-target CE."""
    dt = best_dtype(backend)
    x, ya, yb, lam = data(N=15, C=5, dtype=dt, seed=7)
    lam = lam.double()
    ya = ya.clone()
    ya[[0, 4, 9]] = -100
    yb = yb.clone()
    yb[4] = 99  # mix_target of an ignored row is never looked at
    v = ya != -100
    q = lam[v, None] * smoothed_onehot(ya[v], 5, 0.1) + (1 - lam[v, None]) * smoothed_onehot(
        yb[v], 5, 0.1
    )

    def ref(z):
        rows = torch.zeros(15, dtype=torch.float64).masked_scatter(
            v, F.cross_entropy(z.double()[v], q, reduction="none")
        )
        return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / v.sum()}[reduction]

    ours_l, ours_g = grad_of(
        lambda z: fused_ls.label_smoothing_cross_entropy(
            z, ya, 0.1, mix_target=yb, mix_lambda=lam, reduction=reduction, backend=backend
        ),
        x,
    )
    ref_l, ref_g = grad_of(ref, x)
    assert_close(ours_l, ref_l, dt)
    assert_close(ours_g, ref_g, dt)
    assert torch.all(ours_g[~v] == 0)


def test_mixup_through_the_module():
    x, ya, yb, lam = data(N=9, C=4, dtype=torch.float64, seed=8)
    crit = fused_ls.FusedLabelSmoothingCE(smoothing=0.1)
    q = 0.6 * smoothed_onehot(ya, 4, 0.1) + 0.4 * smoothed_onehot(yb, 4, 0.1)
    torch.testing.assert_close(
        crit(x, ya, mix_target=yb, mix_lambda=0.6), F.cross_entropy(x, q), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_mixup_endpoints_are_plain_losses(lam):
    x, ya, yb, _ = data(N=10, C=6, dtype=torch.float64, seed=9)
    ours = fused_ls.label_smoothing_cross_entropy(x, ya, 0.1, mix_target=yb, mix_lambda=lam)
    plain = F.cross_entropy(x, ya if lam == 1.0 else yb, label_smoothing=0.1)
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- confidence penalty


def entropy(z: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) = −Σ p log p, with 0·log 0 = 0 in value and in gradient (log p is masked
    before the product, so that no 0·(−inf) appears in autograd's backward either)."""
    logp = torch.log_softmax(z, dim=-1)
    safe = torch.where(logp.isneginf(), 0, logp)
    return -(logp.exp() * safe).sum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_confidence_penalty_is_ce_minus_beta_entropy(backend, dtype, reduction, eps):
    if not serves(backend, dtype):
        pytest.skip(f"{backend} does not take {dtype}")
    x, y, _, _ = data(N=21, C=9, dtype=dtype, seed=10)
    beta = 0.3

    def ref(z):
        z = z.double()
        rows = F.cross_entropy(z, y, label_smoothing=eps, reduction="none") - beta * entropy(z)
        return {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]

    ours_l, ours_g = grad_of(
        lambda z: fused_ls.label_smoothing_cross_entropy(
            z, y, eps, confidence_penalty=beta, reduction=reduction, backend=backend
        ),
        x,
    )
    ref_l, ref_g = grad_of(ref, x)
    assert_close(ours_l, ref_l, dtype)
    assert_close(ours_g, ref_g, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_confidence_penalty_weights_and_ignored_rows(backend, reduction):
    dt = best_dtype(backend)
    x, y, _, _ = data(N=18, C=6, dtype=dt, seed=11)
    y = y.clone()
    y[[1, 2, 17]] = -1
    w = (torch.rand(6, generator=torch.Generator().manual_seed(11), dtype=torch.float64) + 0.5).to(
        dt
    )
    w64 = w.double()
    v = y != -1
    beta = 0.7

    def ref(z):
        z = z.double()
        rows = torch.zeros(18, dtype=torch.float64).masked_scatter(
            v,
            F.cross_entropy(z[v], y[v], weight=w64, label_smoothing=0.1, reduction="none")
            - beta * w64[y[v]] * entropy(z[v]),
        )
        return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / w64[y[v]].sum()}[reduction]

    ours_l, ours_g = grad_of(
        lambda z: fused_ls.label_smoothing_cross_entropy(
            z,
            y,
            0.1,
            weight=w,
            ignore_index=-1,
            confidence_penalty=beta,
            reduction=reduction,
            backend=backend,
        ),
        x,
    )
    ref_l, ref_g = grad_of(ref, x)
    assert_close(ours_l, ref_l, dt)
    assert_close(ours_g, ref_g, dt)
    assert torch.all(ours_g[~v] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_confidence_penalty_with_mixup(backend):
    """Both fused: soft-target CE of the mixed target − β·H (no class weights: W = 1)."""
    dt = best_dtype(backend)
    x, ya, yb, lam = data(N=12, C=5, dtype=dt, seed=12)
    lam = lam.double()
    q = lam[:, None] * smoothed_onehot(ya, 5, 0.1) + (1 - lam[:, None]) * smoothed_onehot(
        yb, 5, 0.1
    )
    ours_l, ours_g = grad_of(
        lambda z: fused_ls.label_smoothing_cross_entropy(
            z,
            ya,
            0.1,
            confidence_penalty=0.5,
            mix_target=yb,
            mix_lambda=lam,
            reduction="none",
            backend=backend,
        ),
        x,
    )
    ref_l, ref_g = grad_of(
        lambda z: F.cross_entropy(z.double(), q, reduction="none") - 0.5 * entropy(z.double()), x
    )
    assert_close(ours_l, ref_l, dt)
    assert_close(ours_g, ref_g, dt)


def _penalty_vs_plain(backend, x, y, beta=0.2):
    dt = best_dtype(backend)
    x = x.to(dt)
    ours_l, ours_g = grad_of(
        lambda z: fused_ls.label_smoothing_cross_entropy(
            z, y, 0.0, confidence_penalty=beta, reduction="none", backend=backend
        ),
        x,
    )
    ref_l, ref_g = grad_of(
        lambda z: F.cross_entropy(z.double(), y, reduction="none") - beta * entropy(z.double()), x
    )
    assert torch.isfinite(ours_l).all()
    assert_close(ours_l, ref_l, dt)
    assert torch.isfinite(ours_g).all(), ours_g
    assert_close(ours_g, ref_g, dt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_confidence_penalty_underflowing_probabilities(backend):
    """A row so confident that the other probabilities underflow to 0: finite and exact."""
    x, y, _, _ = data(N=8, C=6, dtype=torch.float64, seed=13, scale=1.0)
    x, y = x.clone(), y.clone()
    x[0] = torch.tensor([800.0, 0, -5, 3, 1, 2], dtype=torch.float64)
    y[0] = 0
    x[3] = torch.tensor([-900.0, 0, 1, 0.5, 2, -1], dtype=torch.float64)
    _penalty_vs_plain(backend, x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_confidence_penalty_masked_class(backend):
    """ε = 0 and a masked (−inf) class: the loss is finite, and so must be the gradient."""
    x, y, _, _ = data(N=8, C=6, dtype=torch.float64, seed=13, scale=1.0)
    x, y = x.clone(), y.clone()
    x[1, 3] = float("-inf")
    y[1] = 2
    _penalty_vs_plain(backend, x, y)


def test_confidence_penalty_lowers_loss_by_beta_entropy():
    """The penalty's sign: with β > 0 the loss is lower by exactly β·mean entropy."""
    x, y, _, _ = data(N=30, C=10, dtype=torch.float64, seed=14)
    base = fused_ls.label_smoothing_cross_entropy(x, y, 0.1)
    pen = fused_ls.label_smoothing_cross_entropy(x, y, 0.1, confidence_penalty=0.25)
    torch.testing.assert_close(base - pen, 0.25 * entropy(x).mean(), rtol=1e-12, atol=1e-12)
    assert float(base - pen) > 0
