"""The loss: ``label_smoothing_cross_entropy`` and its module ``FusedLabelSmoothingCE``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, parallel
from ._entry import OptionsModule, make_problem, outputs
from ._ops import LossFunction, call
from ._options import (
    LOSS_KEYWORDS,
    LOSS_MODULE_KEYWORDS,
    LossOptions,
    Stats,
    parse_options,
    takes_keywords,
)

__all__ = ["FusedLabelSmoothingCE", "label_smoothing_cross_entropy"]


def _soft_target_loss(logits, target, opts: LossOptions):
    used = [
        name
        for name, on in (
            ("per-sample smoothing", opts.smoothing_rows is not None),
            ("similarity", opts.similarity is not None or opts.sparse is not None),
            ("adaptive", opts.adaptive is not None),
            ("z_loss", opts.z_loss != 0),
            ("softcap", opts.softcap != 0),
            ("confidence_penalty", opts.confidence_penalty != 0),
            ("mix_target", opts.mix_target is not None),
            ("return_stats", opts.return_stats),
            ("process_group", opts.process_group is not None),
        )
        if on
    ]
    if used:
        raise ValueError(
            "probability (float) targets follow F.cross_entropy exactly and do not "
            f"support: {', '.join(used)}"
        )
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(
            f"probability targets must have the logits' shape {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    return F.cross_entropy(
        logits,
        target,
        weight=opts.weight,
        reduction=opts.reduction,
        label_smoothing=opts.smoothing,
    )


@takes_keywords(LOSS_KEYWORDS)
def label_smoothing_cross_entropy(
    logits: Tensor, target: Tensor, smoothing: float | Tensor = 0.1, **options
) -> Tensor | tuple[Tensor, Stats]:
    """Label-smoothed cross-entropy without a dense smoothed target or an N×C log-softmax.

    Args:
        logits: [N, C], [C] or [N, C, d1, ...] (class dim 1, like ``nn.CrossEntropyLoss``);
            fp32, bf16, fp16 or fp64. With ``process_group``, or as a DTensor sharded on the
            class dim: this rank's contiguous slice of the classes (``fused_ls.parallel``).
        target: class indices of shape [N], [] or [N, d1, ...]; or probabilities of the logits'
            shape (then exactly ``F.cross_entropy`` with ``label_smoothing``).
        smoothing: ε in [0, 1], or a float tensor of the target's shape (per-sample ε).

    The keywords (below) are those of every entry point (``fused_ls._options.KEYWORDS``). With
    ``process_group`` the loss is the single-process loss on the concatenated logits and the
    gradient this rank's slice of it; a group of one rank is the unsharded loss.

    Returns:
        the loss (fp32; fp64 for fp64 logits), and ``Stats`` if ``return_stats`` (the
        prediction is a global class index).
    """
    opts = parse_options(label_smoothing_cross_entropy, dict(options, smoothing=smoothing))
    return loss_with_options(logits, target, opts)


def _rows(logits: Tensor, target: Tensor) -> tuple[Tensor, int]:
    """The logits as [N, C] rows with the classes last, and C; checks the target's shape."""
    d = logits.dim()
    if d == 0:
        raise ValueError("logits must have at least 1 dimension (the classes)")
    C = logits.shape[1] if d >= 2 else logits.shape[0]
    if d == 2:
        x, expected = logits, logits.shape[:1]
    elif d == 1:
        x, expected = logits[None, :], ()
    else:
        x, expected = logits.movedim(1, -1).reshape(-1, C), logits.shape[:1] + logits.shape[2:]
    if target.shape != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape "
            f"{tuple(logits.shape)}: expected {tuple(expected)}"
        )
    if C == 0:
        raise ValueError("logits must have at least one class (dim 1 has size 0)")
    if x.stride(-1) != 1 and C > 1:
        x = x.contiguous()
    return x, C


def loss_with_options(logits: Tensor, target: Tensor, opts: LossOptions):
    """The loss of ``label_smoothing_cross_entropy`` for already-parsed options."""
    if type(logits) is not Tensor and parallel.is_dtensor(logits):
        logits, target, opts = parallel.from_dtensor(logits, target, opts)
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(
            "logits must be a floating-point tensor, got "
            f"{logits.dtype if isinstance(logits, Tensor) else type(logits).__name__}"
        )
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.is_floating_point():
        return _soft_target_loss(logits, target, opts)
    x, C = _rows(logits, target)
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    req = backends.Request(
        x.device.type,
        x.dtype,
        opts.similarity is not None,
        opts.sparse is not None,
        backends.is_small(x.device, x.numel()),
    )
    chosen = backends.resolve(opts.backend, req)
    acc = backends.acc_dtype(x.dtype)
    shard = None
    if opts.process_group is not None:
        shard = parallel.rank_slice(opts, C, x.shape[0], acc, x.device)
    num_classes, offset = (C, 0) if shard is None else (shard.num_classes, shard.start)
    p = make_problem(opts, target, acc, x, num_classes, offset)
    if shard is None:
        if torch.is_grad_enabled() and x.requires_grad:
            loss, pack = LossFunction.apply(x, chosen, opts.inplace_backward, *p)
        else:  # no autograd: one read of the logits, nothing N×C written
            loss, pack = call("forward", chosen, x, p)
    else:
        loss, pack = parallel.ShardedLossFunction.apply(x, chosen, opts.inplace_backward, shard, *p)
    return outputs(loss, pack, opts, target.shape)


class FusedLabelSmoothingCE(OptionsModule):
    """Drop-in for ``nn.CrossEntropyLoss(label_smoothing=...)``; see
    ``label_smoothing_cross_entropy`` for every keyword.

    ``forward(logits, target, smoothing=None, mix_target=None, mix_lambda=None)``: a per-sample
    ``smoothing`` tensor (target's shape) overrides the module's ε for that call. The module's
    ``smoothing`` attribute may be changed between steps (schedules).
    """

    @takes_keywords(LOSS_MODULE_KEYWORDS)
    def __init__(
        self,
        smoothing: float = 0.1,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        **options,
    ):
        """The loss's keywords, validated once here (``smoothing`` a float: a per-sample tensor
        goes to ``forward``)."""
        super().__init__(
            smoothing=smoothing,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            **options,
        )

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        smoothing: Tensor | float | None = None,
        mix_target: Tensor | None = None,
        mix_lambda: float | Tensor | None = None,
    ):
        return loss_with_options(logits, target, self.options(smoothing, mix_target, mix_lambda))
