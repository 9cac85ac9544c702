"""Knowledge distillation with a label-smoothed hard-label term (Hinton et al. 2015).

For rows i with target y_i != ignore_index (the set V, n = |V|), temperature T and weight α:

    ce_i   = label-smoothed cross-entropy of the student at y_i (``label_smoothing_cross_entropy``
             with ``smoothing``, reduction "none"; no class weights)
    kl_i   = KL(softmax(t_i / T) ‖ softmax(s_i / T)) = Σ_c p^t_ic (log p^t_ic − log p^s_ic)
    loss_i = α · ce_i + (1 − α) · T² · kl_i                       (0 for ignored rows)

    reduction "mean": Σ_{i∈V} loss_i / n   (NaN when n = 0, like ``F.cross_entropy``)
    reduction "sum":  Σ_{i∈V} loss_i;      "none": loss_i in the target's shape.

So the "mean" is α · (the LS-CE "mean") + (1 − α) · T² · (mean KL over the same rows): ignored
rows are excluded from both terms and from the count. The T² factor keeps the soft term's
gradient scale independent of T (Hinton et al.).

The KL term streams both logit tensors in row chunks inside a custom autograd Function: forward
keeps only the inputs (by reference) and kl_i; backward recomputes both softmaxes chunk by chunk.
Workspace is a few chunk × C buffers, never an N × C softmax. Gradients (u = logits / T):

    ∂kl_i/∂s_ic = (p^s_ic − p^t_ic) / T
    ∂kl_i/∂t_ic = p^t_ic (log p^t_ic − log p^s_ic − kl_i) / T    (only if the teacher needs grad)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._problem import acc_dtype
from .loss import label_smoothing_cross_entropy

__all__ = ["distillation_loss", "kl_divergence_rows"]

_CHUNK_ELEMS = 1 << 20  # default chunk: about 1M logits per temporary (4 MiB in fp32)


def _rows(x: Tensor) -> Tensor:
    """[C] -> [1, C]; [N, C] as is; [N, C, d1, ...] -> [N·d1·..., C] (class dim last)."""
    if x.dim() == 1:
        return x[None]
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


class _ChunkedKL(torch.autograd.Function):
    """Per-row KL(softmax(t/T) ‖ softmax(s/T)) over [N, C] inputs, 0 on rows where ~valid."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, valid: Tensor, inv_t: float, chunk: int) -> Tensor:
        acc = acc_dtype(s.dtype)
        N = s.shape[0]
        kl = torch.zeros(N, dtype=acc, device=s.device)
        for i0 in range(0, N, chunk):
            sl = slice(i0, min(i0 + chunk, N))
            ls = torch.log_softmax(s[sl].to(acc) * inv_t, dim=-1)
            lt = torch.log_softmax(t[sl].to(acc) * inv_t, dim=-1)
            pt = lt.exp()
            # classes the teacher gives probability 0 contribute 0 (even where ls = −inf)
            kl[sl] = torch.where(pt > 0, pt * (lt - ls), 0).sum(-1)
        kl = torch.where(valid, kl, 0)
        ctx.save_for_backward(s, t, valid, kl)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl: Tensor):
        s, t, valid, kl = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = kl.dtype
        inv_t, chunk, N = ctx.inv_t, ctx.chunk, s.shape[0]
        gs = torch.empty_like(s) if need_s else None
        gt = torch.empty_like(t) if need_t else None
        for i0 in range(0, N, chunk):
            sl = slice(i0, min(i0 + chunk, N))
            ls = torch.log_softmax(s[sl].to(acc) * inv_t, dim=-1)
            lt = torch.log_softmax(t[sl].to(acc) * inv_t, dim=-1)
            pt = lt.exp()
            g = (grad_kl[sl].to(acc) * inv_t)[:, None]
            keep = valid[sl][:, None]
            if need_s:
                gs[sl] = torch.where(keep, g * (ls.exp() - pt), 0).to(s.dtype)
            if need_t:
                d = torch.where(pt > 0, pt * (lt - ls - kl[sl][:, None]), 0)
                gt[sl] = torch.where(keep, g * d, 0).to(t.dtype)
        return gs, gt, None, None, None


def kl_divergence_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    valid: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-row KL(softmax(teacher/T) ‖ softmax(student/T)), streamed in row chunks.

    Args:
        student_logits, teacher_logits: [N, C] of the same shape (any float dtypes).
        temperature: T > 0.
        valid: optional bool [N]; rows where it is False give 0 and no gradient.
        chunk_size: rows per chunk (default: about 2**20 / C).

    Returns:
        [N] fp32 (fp64 for fp64 student logits), differentiable w.r.t. both inputs.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must both be [N, C], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    N, C = student_logits.shape
    if valid is None:
        valid = torch.ones(N, dtype=torch.bool, device=student_logits.device)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMS // max(C, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    T = float(temperature)
    return _ChunkedKL.apply(student_logits, teacher_logits, valid, 1.0 / T, chunk_size)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    smoothing: float = 0.1,
    temperature: float = 2.0,
    alpha: float = 0.5,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
    return_parts: bool = False,
):
    """α · LS-CE(student, target) + (1 − α) · T² · KL(softmax(t/T) ‖ softmax(s/T)).

    See the module docstring for the exact per-row definition and the reductions.

    Args:
        student_logits: [N, C], [C] or [N, C, d1, ...] (class dim 1, as in the loss).
        teacher_logits: the student's shape. Usually computed under ``torch.no_grad()``; if it
            requires grad, the KL term's gradient flows to it too.
        target: class ids of the loss' target shape ([N], [] or [N, d1, ...]).
        smoothing: ε of the hard-label term.
        temperature: T > 0 of the soft term.
        alpha: weight α in [0, 1] of the hard-label term.
        ignore_index: rows with this target are excluded from both terms and from the mean.
        reduction: "mean", "sum" or "none".
        chunk_size: rows per chunk of the KL term (default about 2**20 / C).
        backend: backend of the LS-CE term (see ``label_smoothing_cross_entropy``).
        return_parts: also return the (detached) LS-CE and KL terms, each reduced like the loss
            (KL without the T² factor).

    Returns:
        the loss (fp32, fp64 for fp64 student logits), or ``(loss, ce, kl)``.
    """
    if not isinstance(student_logits, Tensor) or not student_logits.is_floating_point():
        raise TypeError("student_logits must be a floating-point tensor")
    if not isinstance(teacher_logits, Tensor) or not teacher_logits.is_floating_point():
        raise TypeError("teacher_logits must be a floating-point tensor")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} differs from "
            f"student_logits shape {tuple(student_logits.shape)}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits is on {teacher_logits.device} but student_logits on "
            f"{student_logits.device}"
        )
    if not isinstance(target, Tensor) or target.is_floating_point():
        raise ValueError(
            "target must be an integer tensor of class ids (soft targets: use the teacher's logits)"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if student_logits.dim() == 0:
        raise ValueError("logits must have at least 1 dimension (the classes)")

    # The hard-label term validates shapes, devices and class ids.
    ce = label_smoothing_cross_entropy(
        student_logits,
        target,
        smoothing,
        ignore_index=ignore_index,
        reduction="none",
        backend=backend,
    ).reshape(-1)
    valid = target.reshape(-1) != ignore_index
    kl = kl_divergence_rows(
        _rows(student_logits),
        _rows(teacher_logits),
        temperature,
        valid=valid,
        chunk_size=chunk_size,
    )
    T2 = float(temperature) ** 2
    rows = alpha * ce + (1.0 - alpha) * T2 * kl.to(ce.dtype)

    def reduce(v: Tensor) -> Tensor:
        if reduction == "none":
            return v.reshape(target.shape)
        if reduction == "sum":
            return v.sum()
        return v.sum() / valid.sum()  # stays a device tensor (no host sync)

    loss = reduce(rows)
    if return_parts:
        return loss, reduce(ce.detach()), reduce(kl.detach())
    return loss
