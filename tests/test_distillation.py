"""``distillation_loss`` against a dense plain-PyTorch computation (losses and gradients for the
student and the teacher), float64 gradcheck, ignored rows, chunking and the memory contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fused_ls import distillation_loss
from fused_ls.distillation import kl_divergence_rows


def plain(s, t, y, eps, T, alpha, ignore_index=-100, reduction="mean"):
    """Dense: F.cross_entropy(label_smoothing) and F.kl_div on the valid rows, in float64."""
    s, t = s.double(), t.double()
    C = s.shape[1]
    s2 = s.movedim(1, -1).reshape(-1, C) if s.dim() > 2 else s
    t2 = t.movedim(1, -1).reshape(-1, C) if t.dim() > 2 else t
    y1 = y.reshape(-1)
    v = y1 != ignore_index
    ce = F.cross_entropy(s2[v], y1[v], label_smoothing=eps, reduction="none")
    kl = F.kl_div(
        torch.log_softmax(s2[v] / T, 1),
        torch.log_softmax(t2[v] / T, 1),
        log_target=True,
        reduction="none",
    ).sum(1)
    rows_v = alpha * ce + (1 - alpha) * T * T * kl
    rows = torch.zeros(y1.shape, dtype=torch.float64).masked_scatter(v, rows_v)
    if reduction == "none":
        return rows.reshape(y.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / v.sum()


def make(N=12, C=9, seed=0, dtype=torch.float64, ignore=(), shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (N, C)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    yshape = shape[:1] + shape[2:]
    y = torch.randint(0, C, yshape, generator=g)
    y.view(-1)[list(ignore)] = -100
    return s, t, y


def loss_grads(fn, s, t):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    out = fn(s, t)
    gs, gt = torch.autograd.grad(out.sum(), (s, t))
    return out.detach(), gs, gt


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "T, alpha, eps", [(2.0, 0.5, 0.1), (1.0, 0.0, 0.0), (4.0, 1.0, 0.2), (0.5, 0.3, 0.05)]
)
@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_matches_plain_pytorch(reduction, T, alpha, eps, chunk):
    s, t, y = make(ignore=(2, 7))
    ours = loss_grads(
        lambda a, b: distillation_loss(
            a, b, y, eps, T, alpha, reduction=reduction, chunk_size=chunk
        ),
        s,
        t,
    )
    ref = loss_grads(lambda a, b: plain(a, b, y, eps, T, alpha, reduction=reduction), s, t)
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)
    # ignored rows: no gradient to either input
    assert torch.all(ours[1][[2, 7]] == 0) and torch.all(ours[2][[2, 7]] == 0)


def test_float32_and_a_lower_precision_teacher():
    s, t, y = make(N=40, C=50, seed=1, dtype=torch.float32, ignore=(0,))
    ours = loss_grads(lambda a, b: distillation_loss(a, b, y, chunk_size=7), s, t)
    ref = loss_grads(lambda a, b: plain(a, b, y, 0.1, 2.0, 0.5), s, t)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r.float(), rtol=2e-5, atol=2e-6)
    # a bf16 teacher (typical when the teacher runs in low precision), no teacher gradient
    tb = t.bfloat16()
    sg = s.clone().requires_grad_(True)
    loss = distillation_loss(sg, tb, y)
    loss.backward()
    sr = s.clone().requires_grad_(True)
    ref_loss = plain(sr, tb.float(), y, 0.1, 2.0, 0.5)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.float(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(sg.grad, sr.grad.float(), rtol=2e-5, atol=2e-6)


def test_class_dim_1_layout():
    s, t, y = make(C=6, shape=(3, 6, 5), ignore=(4,))
    for red in ("mean", "none"):
        ours = loss_grads(lambda a, b: distillation_loss(a, b, y, reduction=red), s, t)
        ref = loss_grads(lambda a, b: plain(a, b, y, 0.1, 2.0, 0.5, reduction=red), s, t)
        assert ours[0].shape == ref[0].shape
        for o, r in zip(ours, ref, strict=True):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    s, t, y = make(N=6, C=5, seed=3, ignore=(1,))
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: distillation_loss(a, b, y, 0.1, 1.7, 0.4, chunk_size=4), (s, t)
    )
    assert torch.autograd.gradcheck(
        lambda a, b: kl_divergence_rows(a, b, 3.0, chunk_size=2), (s, t)
    )


def test_masked_teacher_classes_and_parts():
    """A teacher −inf class contributes 0 to the KL; return_parts reports the two terms."""
    s, t, y = make(N=8, C=6, seed=4)
    t = t.clone()
    t[:, 5] = float("-inf")
    T, alpha = 2.0, 0.25

    def ref(a, b):  # F.kl_div gives NaN for a −inf log-target, so sum over the live classes
        ls = torch.log_softmax(a / T, 1)
        lt = torch.log_softmax(b[:, :5] / T, 1)
        kl = (lt.exp() * (lt - ls[:, :5])).sum(1)
        ce = F.cross_entropy(a, y, label_smoothing=0.1, reduction="none")
        return (alpha * ce + (1 - alpha) * T * T * kl).mean()

    ours = loss_grads(lambda a, b: distillation_loss(a, b, y, 0.1, T, alpha), s, t)
    refs = loss_grads(ref, s, t)
    assert all(torch.isfinite(o).all() for o in ours)
    for o, r in zip(ours, refs, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)
    loss, ce, kl = distillation_loss(s, t, y, 0.1, T, alpha, return_parts=True)
    torch.testing.assert_close(ce, F.cross_entropy(s, y, label_smoothing=0.1))
    torch.testing.assert_close(loss, alpha * ce + (1 - alpha) * T * T * kl)


def test_all_rows_ignored_gives_nan_mean_and_zero_sum():
    s, t, y = make(N=3, C=4, ignore=(0, 1, 2))
    assert math.isnan(float(distillation_loss(s, t, y)))
    assert float(distillation_loss(s, t, y, reduction="sum")) == 0.0


def test_backward_keeps_no_n_by_c_buffer():
    """Everything autograd saves is either one of the two inputs (by reference) or O(N)."""
    N, C = 64, 300
    s, t, y = make(N=N, C=C, dtype=torch.float32)
    s.requires_grad_(True)
    saved = []

    def pack(x):
        saved.append((x.numel(), x.untyped_storage().data_ptr()))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = distillation_loss(s, t, y, chunk_size=16)
    inputs = {s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    big = [(n, p) for n, p in saved if n >= N * C and p not in inputs]
    assert saved and not big, big
    loss.backward()
    assert s.grad.shape == (N, C)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    s, t, y = make(N=4, C=3)
    with pytest.raises(exc, match=match):
        distillation_loss(s, t, y, **kwargs)


def test_shape_mismatch_and_float_target():
    s, t, y = make(N=4, C=3)
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(s, t[:, :2], y)
    with pytest.raises(ValueError, match="integer"):
        distillation_loss(s, t, y.double())
