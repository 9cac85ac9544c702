"""Public API: ``label_smoothing_cross_entropy``, ``FusedLabelSmoothingCE`` and their options."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _smoothing, backends, parallel
from ._ops import LossFunction
from ._options import (
    ConfidenceAdaptive,
    LossOptions,
    SparseSimilarity,
    Stats,
    class_indices,
    parse_options,
)
from ._problem import P_ARG, P_CONF, P_LSE, Problem, argmax_bits_dtype

__all__ = [
    "ConfidenceAdaptive",
    "FusedLabelSmoothingCE",
    "SparseSimilarity",
    "Stats",
    "label_smoothing_cross_entropy",
]


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


def label_smoothing_cross_entropy(
    logits: Tensor,
    target: Tensor,
    smoothing: float | Tensor = 0.1,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    similarity: Tensor | SparseSimilarity | None = None,
    similarity_mix: float = 1.0,
    adaptive: ConfidenceAdaptive | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    confidence_penalty: float = 0.0,
    mix_target: Tensor | None = None,
    mix_lambda: float | Tensor | None = None,
    inplace_backward: bool = False,
    return_stats: bool = False,
    backend: str = "auto",
    process_group=None,
) -> Tensor | tuple[Tensor, Stats]:
    """Label-smoothed cross-entropy without a dense smoothed target or an N×C log-softmax.

    Args:
        logits: [N, C], [C] or [N, C, d1, ...] (class dim 1, like ``nn.CrossEntropyLoss``);
            fp32, bf16, fp16 or fp64. With ``process_group``, or as a DTensor sharded on the
            class dim: this rank's contiguous slice of the classes (``fused_ls.parallel``).
        target: class indices of shape [N], [] or [N, d1, ...]; or probabilities of the logits'
            shape (then exactly ``F.cross_entropy`` with ``label_smoothing``).
        smoothing: ε in [0, 1], or a float tensor of the target's shape (per-sample ε).
        weight: [C] class weights (as in ``F.cross_entropy``).
        ignore_index: rows whose target equals it give 0 loss and are not counted by "mean".
        reduction: "none" (target's shape), "mean" (Σ loss / Σ w[y] over counted rows) or "sum".
        similarity: None (uniform smoothing), a non-negative [C, C] tensor, or
            ``SparseSimilarity``; rows are normalised to sum 1.
        similarity_mix: β; the smoothing distribution is (1 − β)·uniform + β·S̃[y].
        adaptive: ``ConfidenceAdaptive`` for confidence-dependent per-sample ε.
        z_loss: λ of the auxiliary λ·w[y]·lse² term.
        softcap: if given, logits are replaced by softcap·tanh(logits/softcap) first.
        confidence_penalty: β_cp of the −β_cp·w[y]·H(p) term (Pereyra et al. 2017).
        mix_target, mix_lambda: mixup; the target becomes λ·q(target) + (1 − λ)·q(mix_target),
            λ a float or a tensor of the target's shape.
        inplace_backward: write the gradient into the logits' storage (no extra N×C memory).
            The logits must not be used afterwards; autograd raises if another op saved them.
        return_stats: also return ``Stats`` (lse, confidence, prediction) of the target's shape.
        backend: "auto", "torch", "cpp", "cuda" or "triton"; "auto" honours $FUSED_LS_BACKEND.
        process_group: vocabulary parallelism: a ``torch.distributed`` group whose ranks hold
            the class slices in rank order (their sizes are exchanged once and cached), or
            ``fused_ls.VocabShard(group, start, num_classes)``. Every other argument is the same
            on every rank and indexes all classes; the loss is the single-process loss on the
            concatenated logits, the gradient this rank's slice of it. A group of one rank is
            the unsharded loss.

    Returns:
        the loss (fp32; fp64 for fp64 logits), and ``Stats`` if ``return_stats`` (the
        prediction is a global class index).
    """
    opts = parse_options(
        smoothing,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        similarity=similarity,
        similarity_mix=similarity_mix,
        adaptive=adaptive,
        z_loss=z_loss,
        softcap=softcap,
        confidence_penalty=confidence_penalty,
        mix_target=mix_target,
        mix_lambda=mix_lambda,
        return_stats=return_stats,
        backend=backend,
        inplace_backward=inplace_backward,
        process_group=process_group,
    )
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


def make_problem(
    opts: LossOptions,
    target: Tensor,
    target_shape,
    acc: torch.dtype,
    device_like: Tensor,
    num_classes: int,
    col_offset: int = 0,
) -> Problem:
    """The ``Problem`` of these options for class-index targets (any shape, flattened here)."""
    dev = device_like.device
    w, eps_rows, dense, sp_idx, sp_val, mix_y, mix_rows = opts.bind(num_classes, target_shape, dev)
    sm = _smoothing.prepare_traceable(
        w, dense, sp_idx, sp_val, opts.similarity_mix, num_classes, acc, device_like
    )
    return Problem(
        class_indices("target", target),
        sm.weight,
        sm.R,
        sm.mass,
        sm.sp_idx,
        sm.sp_val,
        eps_rows,
        mix_y,
        mix_rows,
        sm.r0,
        *opts.scalars(),
        col_offset,
        num_classes,
        opts.return_stats,
    )


def stats_from_pack(pack: Tensor, shape) -> Stats:
    """``Stats`` (lse, confidence, prediction) of the target's shape from a row pack."""
    n = pack.shape[0] - 1
    arg = pack.view(argmax_bits_dtype(pack.dtype))[:n, P_ARG].long()
    return Stats(
        pack[:n, P_LSE].reshape(shape), pack[:n, P_CONF].reshape(shape), arg.reshape(shape)
    )


def outputs(loss: Tensor, pack: Tensor, opts: LossOptions, shape):
    """What an entry point returns: the loss ("none": of the target's ``shape``), and with
    ``return_stats`` the ``Stats`` from the row pack."""
    if opts.reduction == "none" and loss.shape != shape:
        loss = loss.reshape(shape)
    if not opts.return_stats:
        return loss
    return loss, stats_from_pack(pack.detach(), shape)


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
    if shard is None:
        p = make_problem(opts, target, target.shape, acc, x, C)
        loss, pack = LossFunction.apply(x, chosen, opts.inplace_backward, *p)
    else:
        p = make_problem(opts, target, target.shape, acc, x, shard.num_classes, shard.start)
        loss, pack = parallel.ShardedLossFunction.apply(x, chosen, opts.inplace_backward, shard, *p)
    return outputs(loss, pack, opts, target.shape)


# Keywords the module forms take at construction (besides smoothing, weight, ignore_index,
# reduction); per-call tensors (per-sample ε, mixup) are arguments of forward.
MODULE_KEYWORDS = frozenset(
    {
        "similarity",
        "similarity_mix",
        "adaptive",
        "z_loss",
        "softcap",
        "confidence_penalty",
        "inplace_backward",
        "return_stats",
        "backend",
        "process_group",
    }
)


class OptionsModule(nn.Module):
    """The options of a loss module: parsed once at construction, class weights and a dense
    similarity held as buffers (so that ``.to(device)`` moves them), ``smoothing`` settable
    between steps (schedules) and validated when set."""

    def __init__(self, smoothing, weight, ignore_index, reduction, extra: frozenset, kwargs):
        super().__init__()
        unknown = set(kwargs) - MODULE_KEYWORDS - extra
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword(s) {sorted(unknown)}")
        if isinstance(smoothing, Tensor):
            raise ValueError(
                "smoothing must be a float in [0, 1]; pass a per-sample tensor to forward"
            )
        own = {k: kwargs.pop(k) for k in list(kwargs) if k not in MODULE_KEYWORDS}
        opts = parse_options(
            smoothing, weight=weight, ignore_index=ignore_index, reduction=reduction, **kwargs
        )
        self.register_buffer("weight", weight)
        self.register_buffer("similarity", opts.similarity)
        self._opts = opts
        self._own = own

    @property
    def smoothing(self) -> float:
        return self._opts.smoothing

    @smoothing.setter
    def smoothing(self, value: float) -> None:
        if isinstance(value, Tensor):
            raise ValueError("smoothing must be a float in [0, 1]; pass tensors to forward")
        self._opts = self._opts.replace(smoothing=value)

    @property
    def ignore_index(self) -> int:
        return self._opts.ignore_index

    @property
    def reduction(self) -> str:
        return self._opts.reduction

    def options(self, smoothing=None, mix_target=None, mix_lambda=None) -> LossOptions:
        """The options of one call: the module's, with its current buffers and the call's
        per-sample overrides."""
        opts = self._opts
        if opts.weight is not self.weight or opts.similarity is not self.similarity:
            opts = self._opts = dataclasses.replace(
                opts, weight=self.weight, similarity=self.similarity
            )
        over = {}
        if smoothing is not None:
            over["smoothing"] = smoothing
        if mix_target is not None or mix_lambda is not None:
            over.update(mix_target=mix_target, mix_lambda=mix_lambda)
        return opts.replace(**over) if over else opts

    def extra_repr(self) -> str:
        o = self._opts
        out = f"smoothing={o.smoothing}, ignore_index={o.ignore_index}, reduction={o.reduction!r}"
        defaults = LossOptions()
        for name in ("similarity_mix", "adaptive", "z_loss", "softcap", "confidence_penalty"):
            if getattr(o, name) != getattr(defaults, name):
                out += f", {name}={getattr(o, name)!r}"
        if o.sparse is not None:
            out += f", similarity={o.sparse!r}"
        if o.backend != "auto":
            out += f", backend={o.backend!r}"
        return out + "".join(f", {k}={v!r}" for k, v in self._own.items())


class FusedLabelSmoothingCE(OptionsModule):
    """Drop-in for ``nn.CrossEntropyLoss(label_smoothing=...)``; see
    ``label_smoothing_cross_entropy`` for every keyword.

    ``forward(logits, target, smoothing=None, mix_target=None, mix_lambda=None)``: a per-sample
    ``smoothing`` tensor (target's shape) overrides the module's ε for that call. The module's
    ``smoothing`` attribute may be changed between steps (schedules).
    """

    def __init__(
        self,
        smoothing: float = 0.1,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        **kwargs,
    ):
        super().__init__(smoothing, weight, ignore_index, reduction, frozenset(), kwargs)

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        smoothing: Tensor | float | None = None,
        mix_target: Tensor | None = None,
        mix_lambda: float | Tensor | None = None,
    ):
        return loss_with_options(logits, target, self.options(smoothing, mix_target, mix_lambda))
