"""The one-call loss + gradient entry (``fused_ls::forward_backward``) and the split into
statistics and finalisation (``row_stats`` / ``finalize``), on every backend that serves CPU
tensors here (Triton through the interpreter), in the modes that exercise every per-row branch.

forward_backward must give the forward's loss and pack and write the same gradient as the
backward with the same upstream gradient, also into the logits themselves; finalize(row_stats)
must equal forward; and statistics gathered over column slices (a sharded vocabulary), merged
as fused_ls/_problem.py describes, must finalise to the same loss.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import backends, make_case, problem

import fused_ls
from fused_ls._problem import S_ARG, S_D, S_M, S_S

BACKENDS = backends("cpu", interpreted_triton=True)
# the modes that exercise every per-row branch (tests/helpers.py MODES)
MODE_NAMES = ["uniform", "weight_ignore", "mixup_rows_dense", "everything"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("inplace", [False, True])
def test_forward_backward_is_forward_then_backward(backend, mode, reduction, inplace):
    x, y, kw = make_case(mode, 9, 37)
    p = problem(x, y, reduction=reduction, return_stats=True, **kw)
    b = fused_ls.backends.get(backend)
    g = torch.Generator().manual_seed(3)
    go = torch.rand(x.shape[0], generator=g) + 0.5 if reduction == "none" else torch.tensor(0.7)
    loss, pack = b.forward(x, p)
    grad = torch.empty_like(x)
    b.backward(go, x, grad, pack, p)
    xc = x.clone()
    out = xc if inplace else torch.empty_like(x)
    loss2, pack2 = b.forward_backward(xc, out, go, p)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(pack2, pack)
    torch.testing.assert_close(out, grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("inplace", [False, True])
def test_rescale_makes_the_unit_gradient_that_of_grad_loss(backend, mode, reduction, inplace):
    """forward_backward with a unit upstream gradient, then rescale(grad_loss) = backward with
    grad_loss; rows whose upstream is 1 are left bit for bit as they were; with x = out (the
    logits overwritten) the gradient is scaled instead of recomputed."""
    x, y, kw = make_case(mode, 9, 37)
    p = problem(x, y, reduction=reduction, **kw)
    b = fused_ls.backends.get(backend)
    g = torch.Generator().manual_seed(5)
    if reduction == "none":
        go = torch.rand(x.shape[0], generator=g) * 2 - 0.5  # negative ones too
        go[::3] = 1.0
        go[1] = 0.0
    else:
        go = torch.tensor(-1.3)
    loss, pack = b.forward(x, p)
    ref = torch.empty_like(x)
    b.backward(go, x, ref, pack, p)
    xc = x.clone()
    out = xc if inplace else torch.empty_like(x)
    b.forward_backward(xc, out, torch.ones_like(go), p)
    before = out.clone()
    b.rescale(go, out if inplace else xc, out, pack, p)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-7)
    if reduction == "none":
        assert torch.equal(out[go == 1], before[go == 1])
    b.rescale(torch.ones_like(go), out if inplace else xc, out, pack, p)  # a unit upstream
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-7)


def merge_stats(parts: list[torch.Tensor]) -> torch.Tensor:
    """Merge the statistics of disjoint column slices (in class order), as _problem.py says."""
    st = torch.stack(parts)  # [k, N, 8]
    m_k = st[:, :, S_M]
    m = m_k.max(0).values
    base = torch.where(m == float("-inf"), 0, m)
    scale = torch.exp(m_k - base)
    out = st.sum(0)
    out[:, S_M] = m
    out[:, S_D] = (st[:, :, S_D] * scale).sum(0)
    out[:, S_S] = torch.where(scale == 0, 0, st[:, :, S_S] * scale).sum(0)
    first = (m_k == m).int().argmax(0)  # the first slice holding the max
    bits = st.view(torch.int32)[:, :, S_ARG]
    out.view(torch.int32)[:, S_ARG] = bits.gather(0, first[None])[0]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_row_stats_over_column_slices_finalise_to_forward(backend, mode, reduction):
    x, y, kw = make_case(mode, 9, 37, seed=4)
    C = x.shape[1]
    p = problem(x, y, reduction=reduction, return_stats=True, **kw)
    b = fused_ls.backends.get(backend)
    loss, pack = b.forward(x, p)
    torch.testing.assert_close(b.finalize(b.row_stats(x, p), p), (loss, pack))
    bounds = [0, 11, 12, 30, C]  # uneven slices, one of a single class
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        ps = problem(
            x[:, lo:hi], y, num_classes=C, col_offset=lo, reduction=reduction,
            return_stats=True, **kw,
        )  # fmt: skip
        parts.append(b.row_stats(x[:, lo:hi], ps))
    loss_s, pack_s = b.finalize(merge_stats(parts), p)
    torch.testing.assert_close(loss_s, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pack_s, pack, rtol=1e-5, atol=1e-5)
    # and the gradient of each slice is the slice of the gradient
    go = torch.rand(y.shape[0]) if reduction == "none" else torch.tensor(1.3)
    full = torch.empty_like(x)
    b.backward(go, x, full, pack, p)
    for lo, hi in itertools.pairwise(bounds):
        ps = problem(
            x[:, lo:hi], y, num_classes=C, col_offset=lo, reduction=reduction, **kw
        )  # fmt: skip
        xs = x[:, lo:hi].contiguous()
        g = torch.empty_like(xs)
        b.backward(go, xs, g, pack_s, ps)
        torch.testing.assert_close(g, full[:, lo:hi], rtol=1e-5, atol=1e-6)
