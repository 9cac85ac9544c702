"""The comparison machinery of tests/helpers.py, tested itself: a check that cannot fail checks
nothing. Every case here is a wrong result that the oracle comparison must reject (or a right
one it must accept), on both of its paths: low precision (``_within``, an allowance measured
from PyTorch's own error) and fp32/fp64 (``torch.testing.assert_close``)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import _err, _finite_err, _within, check_backend, make_data

import fused_ls

INF, NAN = math.inf, math.nan


@pytest.mark.parametrize(
    ("ours", "ref"),
    [
        ([1.0, INF], [1.0, 2.0]),  # +inf where the reference is finite
        ([1.0, -INF], [1.0, 2.0]),  # −inf where the reference is finite
        ([1.0, 2.0], [1.0, INF]),  # finite where the reference is +inf
        ([1.0, -INF], [1.0, INF]),  # infinities of opposite sign
        ([INF, 2.0], [-INF, 2.0]),
        ([NAN, 2.0], [1.0, 2.0]),  # NaN where the reference is finite
        ([1.0, 2.0], [1.0, NAN]),  # finite where the reference is NaN
        ([1.0, 2.5], [1.0, 2.0]),  # a plain finite error beyond the allowance
    ],
)
def test_within_rejects_every_mismatch(ours, ref):
    with pytest.raises(AssertionError):
        _within(torch.tensor(ours), torch.tensor(ref), 0.1, "loss")


def test_within_accepts_equal_non_finite_values():
    """NaN where the reference has NaN, and the same infinity, agree; the finite rest is
    measured."""
    ours = torch.tensor([1.05, INF, -INF, NAN])
    ref = torch.tensor([1.0, INF, -INF, NAN], dtype=torch.float64)
    _within(ours, ref, 0.1, "loss")
    assert _err(ours, ref) == pytest.approx(0.05, rel=1e-6)
    with pytest.raises(AssertionError):
        _within(ours, ref, 0.01, "loss")


def test_err_of_a_non_finite_mismatch_is_infinite():
    for ours, ref in (([INF], [0.0]), ([0.0], [-INF]), ([INF], [-INF]), ([NAN], [0.0])):
        assert _err(torch.tensor(ours), torch.tensor(ref)) == INF, (ours, ref)
    assert _err(torch.tensor([INF, NAN]), torch.tensor([INF, NAN])) == 0.0
    assert _err(torch.empty(0), torch.empty(0)) == 0.0


def test_allowance_ignores_where_pytorch_itself_is_not_finite():
    """The low-precision allowance is PyTorch's own error where PyTorch is finite: an overflow of
    PyTorch in bf16 must not make the allowance infinite (which would accept anything)."""
    pt = torch.tensor([INF, 1.25, NAN])
    ref = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    assert _finite_err(pt, ref) == 0.25


class _InfGrad(torch.autograd.Function):
    """Identity whose backward puts +inf at [0, 0]: a backend with a broken gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[0, 0] = INF
        return g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("broken", ["loss", "grad"])
def test_check_backend_rejects_inf_where_the_reference_is_finite(monkeypatch, dtype, broken):
    real = fused_ls.label_smoothing_cross_entropy

    def backend_with_a_bug(x, y, **kw):
        if broken == "grad":
            return real(_InfGrad.apply(x), y, **kw)
        loss = real(x, y, **kw)
        return loss + torch.where(torch.arange(loss.numel()) == 2, INF, 0.0)

    x, y, _ = make_data(6, 11, dtype)
    check_backend("torch", x, y, reduction="none")  # the real backend passes
    monkeypatch.setattr(fused_ls, "label_smoothing_cross_entropy", backend_with_a_bug)
    with pytest.raises(AssertionError):
        check_backend("torch", x, y, reduction="none")
