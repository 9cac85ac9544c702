"""Shared test machinery: run a backend and compare it with the dense reference.

Tolerances are data (``TOL``). For bf16/fp16 the allowed error is relative to what plain PyTorch
makes in the same precision (the dense reference computed in that dtype), as in flash-attention's
tests: error(ours) <= 2 · error(pytorch_lowp) + atol, both measured against float64.
"""

from __future__ import annotations

import math

import torch

import fused_ls
from fused_ls import reference

# dtype -> (rtol, atol) for fp32/fp64 direct comparison; (factor, atol) for low precision.
TOL = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2.0, 1e-2),
    torch.float16: (2.0, 2e-3),
}
LOW = (torch.bfloat16, torch.float16)


def available_cpu_backends() -> list[str]:
    """Backends that can run on CPU tensors in this process (triton only via the interpreter)."""
    return [
        b
        for b, why in fused_ls.available_backends().items()
        if not why and fused_ls.backends.reasons_for(b, _cpu_req()) == []
    ]


def _cpu_req():
    return fused_ls.backends.Request("cpu", torch.float32, False, False)


def loss_and_grad(fn, logits, target, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target, **kw)
    if isinstance(loss, tuple):
        loss = loss[0]
    (g,) = torch.autograd.grad(loss.sum(), x) if loss.numel() else (torch.zeros_like(x),)
    return loss.detach(), g


def check_backend(
    backend: str, logits: torch.Tensor, target: torch.Tensor, *, grad: bool = True, **kw
) -> None:
    """Loss and gradient of `backend` on `logits` (any dtype) against the float64 reference."""
    dtype = logits.dtype
    ours_l, ours_g = loss_and_grad(
        fused_ls.label_smoothing_cross_entropy, logits, target, backend=backend, **kw
    )
    ref_l, ref_g = loss_and_grad(reference.cross_entropy, logits, target, **kw)
    assert ours_l.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ours_g.dtype == dtype and ours_g.shape == logits.shape
    if dtype in LOW:
        factor, atol = TOL[dtype]
        pt_l, pt_g = loss_and_grad(
            reference.cross_entropy, logits, target, compute_dtype=dtype, **kw
        )
        _within(ours_l, ref_l, factor * _finite_err(pt_l, ref_l) + atol, "loss")
        if grad:
            _within(ours_g, ref_g, factor * _finite_err(pt_g, ref_g) + atol * 0.1, "grad")
    else:
        rtol, atol = TOL[dtype]
        # The loss combines terms of the size of the logits (M·lse − ⟨r ⊙ w, z⟩ and lse − z_y),
        # so its achievable absolute error grows with max|z| (a loss of exactly 0 from logits of
        # ~92 in fp32 comes out as ~1 ulp(92)); the gradient is made of probabilities and is not.
        finite = logits[torch.isfinite(logits)]
        scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
        torch.testing.assert_close(
            ours_l, ref_l.to(ours_l.dtype), rtol=rtol, atol=atol * scale, equal_nan=True
        )
        if grad:
            torch.testing.assert_close(
                ours_g, ref_g.to(dtype), rtol=rtol, atol=atol, equal_nan=True
            )


def _err(ours, ref) -> float:
    """max |ours − ref| in float64. A NaN where the reference has NaN and the same infinity on
    both sides agree (0); every other non-finite pair (an infinity or NaN where the reference is
    finite, a finite value where it is not, infinities of opposite sign) is an error of inf."""
    a, b = ours.double(), ref.double()
    agree = (torch.isnan(a) & torch.isnan(b)) | (torch.isinf(a) & (a == b))
    d = torch.where(agree, 0.0, (a - b).abs())
    d = torch.where(torch.isnan(d), math.inf, d)  # NaN on one side only
    return float(d.max()) if d.numel() else 0.0


def _finite_err(pt, ref) -> float:
    """max |pt − ref| over the elements where both are finite: PyTorch's own error in low
    precision, the scale of the allowance. Where PyTorch itself overflows it allows nothing
    (counting it would make the allowance inf, and any result pass)."""
    d = (pt.double() - ref.double()).abs()
    d = d[torch.isfinite(d)]
    return float(d.max()) if d.numel() else 0.0


def _within(ours, ref, tol, what):
    same_nan = torch.equal(torch.isnan(ours.double()), torch.isnan(ref.double()))
    assert same_nan, f"{what}: NaN pattern differs from the reference"
    err = _err(ours, ref)
    assert err <= tol, f"{what}: max error {err:.3g} > allowed {tol:.3g}"


def problem(x: torch.Tensor, target: torch.Tensor, num_classes=None, col_offset=0, **kw):
    """The ``Problem`` (fused_ls._problem) of the keywords ``kw`` for logits x [N, C] that hold
    the columns [col_offset, col_offset + C) of ``num_classes`` (default: all of them)."""
    from fused_ls._entry import make_problem
    from fused_ls._options import parse_options

    opts = parse_options(fused_ls.label_smoothing_cross_entropy, kw)
    C = num_classes if num_classes is not None else x.shape[1]
    acc = fused_ls.backends.acc_dtype(x.dtype)
    return make_problem(opts, target, target.shape, acc, x, C, col_offset)
