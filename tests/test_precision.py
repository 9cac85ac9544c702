"""The fp32 promise for low-precision logits: whatever the input dtype, the loss is accumulated
in fp32 and the gradient computed in fp32 and rounded once. Checked against a float64 truth on
the same (rounded) inputs, on every CPU backend, for the loss, the row statistics of a vocabulary
shard and the fused head: the loss within fp32 accumulation error, the gradient within one ulp of
the dtype of the correctly rounded float64 gradient (no bf16/fp16 rounding inside).

Soft-capping is where a low-precision input meets an fp32 buffer (z = cap·tanh(x/cap)): x/cap must
not be rounded to the input dtype before tanh."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LOW, backends, make_data, problem

import fused_ls
from fused_ls import reference
from fused_ls._problem import S_DA, S_M, S_ZA

BACKENDS = backends("cpu", interpreted_triton=True)
LOSS_RTOL = 1e-6  # fp32 accumulation over 32000 classes: the kernels measure ~5e-8


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at each value of v (float64)."""
    r = v.to(dtype).abs()
    return (torch.nextafter(r, torch.full_like(r, float("inf"))) - r).double()


def _case(dtype, N=64, C=32000, seed=0):
    x, y, _ = make_data(N, C, dtype, seed=seed, scale=8.0, ignore=False)
    return x, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_loss_and_gradient_keep_fp32(backend, dtype, softcap):
    x, y = _case(dtype, C=4099 if backend == "triton" else 32000)
    xr = x.detach().clone().requires_grad_()
    loss = fused_ls.label_smoothing_cross_entropy(
        xr, y, 0.1, softcap=softcap, reduction="sum", backend=backend
    )
    (g,) = torch.autograd.grad(loss, xr)
    loss = loss.detach()
    xd = x.double().requires_grad_()
    ref = reference.cross_entropy(xd, y, 0.1, softcap=softcap, reduction="sum")
    (ref_g,) = torch.autograd.grad(ref, xd)
    assert abs(float(loss) - float(ref)) <= LOSS_RTOL * abs(float(ref))
    beyond = (g.double() - ref_g.to(dtype).double()).abs() - _ulp(ref_g, dtype)
    assert float(beyond.max()) <= 0, f"gradient {float(beyond.max()):.3g} beyond one ulp"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_shard_statistics_keep_fp32(backend, dtype):
    """row_stats of a vocabulary shard (what the sharded paths merge) with a soft cap."""
    x, y = _case(dtype, N=16, C=4099)
    lo, hi, cap = 1000, 3000, 30.0
    y[:8] = torch.arange(lo, lo + 8)  # targets inside the shard
    p = problem(x[:, lo:hi], y, num_classes=x.shape[1], col_offset=lo, softcap=cap)
    st = fused_ls.backends.get(backend).row_stats(x[:, lo:hi], p).double()
    z = cap * torch.tanh(x[:, lo:hi].double() / cap)
    inside = (y >= lo) & (y < hi)
    z_y = torch.where(inside, z.gather(1, (y - lo).clamp(0, hi - lo - 1)[:, None])[:, 0], 0)
    for got, want in ((st[:, S_M], z.amax(1)), (st[:, S_ZA], z_y), (st[:, S_DA], z.sum(1) / 4099)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_fused_head_keeps_fp32(backend, softcap):
    """bf16 head: the loss of its (bf16) logits block within fp32 accumulation error of float64
    on that same block (one chunk, so that the block is F.linear's)."""
    g = torch.Generator().manual_seed(1)
    N, H, V = 32, 64, 4099 if backend == "triton" else 32000
    x = (torch.randn(N, H, generator=g) * 2).to(torch.bfloat16)
    w = (torch.randn(V, H, generator=g) * 0.5).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), generator=g)
    loss = fused_ls.linear_label_smoothing_cross_entropy(
        x, w, y, 0.1, softcap=softcap, reduction="sum", chunk_size=N, backend=backend
    )
    from fused_ls.linear import in_compute_dtype

    xc, wc, _ = in_compute_dtype(x, w, None)
    block = F.linear(xc, wc)  # the head's logits block (its GEMM dtype)
    ref = reference.cross_entropy(block.double(), y, 0.1, softcap=softcap, reduction="sum")
    assert abs(float(loss.detach()) - float(ref)) <= LOSS_RTOL * abs(float(ref))
