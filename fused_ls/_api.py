"""Public API: ``label_smoothing_cross_entropy``, ``FusedLabelSmoothingCE`` and their options."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ops, backends

REDUCTIONS = ("none", "mean", "sum")


class Stats(NamedTuple):
    """Row statistics from the same pass as the loss, each of the target's shape (detached)."""

    lse: Tensor  #: log-sum-exp of the (soft-capped) logits
    confidence: Tensor  #: max softmax probability
    prediction: Tensor  #: argmax class (int64)


class ConfidenceAdaptive:
    """Per-sample adaptive smoothing: ε_i ← min(1, ε_i·factor) where the row's detached confidence
    is below ``threshold``. ``confidence="max"`` uses the max softmax probability, ``"target"``
    the probability of the target class. No gradient flows through ε_i."""

    def __init__(self, threshold: float = 0.8, factor: float = 2.0, confidence: str = "max"):
        if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"ConfidenceAdaptive: threshold must be in [0, 1], got {threshold!r}")
        if not (isinstance(factor, (int, float)) and _finite(factor) and factor >= 0):
            raise ValueError(f"ConfidenceAdaptive: factor must be finite and >= 0, got {factor!r}")
        if confidence not in ("max", "target"):
            raise ValueError(
                f"ConfidenceAdaptive: confidence must be 'max' or 'target', got {confidence!r}"
            )
        self.threshold = float(threshold)
        self.factor = float(factor)
        self.confidence = confidence

    def __repr__(self) -> str:
        return (
            f"ConfidenceAdaptive(threshold={self.threshold}, factor={self.factor}, "
            f"confidence={self.confidence!r})"
        )


class SparseSimilarity:
    """A sparse class-similarity matrix: for each class c, ``k`` neighbour ids ``indices[c]``
    (-1 = padding) with non-negative weights ``values[c]``. Rows are normalised to sum 1 at
    construction (validation happens once, here, not on the training hot path).

    Args:
        indices: int tensor [C, k], entries in [-1, C).
        values: float tensor [C, k], finite and >= 0; each row must have positive mass.
    """

    def __init__(self, indices: Tensor, values: Tensor):
        if not isinstance(indices, Tensor) or indices.dim() != 2 or indices.is_floating_point():
            raise ValueError("SparseSimilarity: indices must be an integer tensor of shape [C, k]")
        if (
            not isinstance(values, Tensor)
            or values.shape != indices.shape
            or not values.is_floating_point()
        ):
            raise ValueError(
                f"SparseSimilarity: values must be a float tensor of indices' shape "
                f"{tuple(indices.shape)}, got "
                f"{tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__}"
            )
        if values.device != indices.device:
            raise ValueError("SparseSimilarity: indices and values must be on the same device")
        C = indices.shape[0]
        idx = indices.long()
        if bool(((idx < -1) | (idx >= C)).any()):
            raise ValueError(f"SparseSimilarity: indices must lie in [-1, {C}) (-1 = padding)")
        # normalised in float64 once; the op rounds to its accumulation dtype
        vals = torch.where(idx >= 0, values.double(), 0)
        if not bool(torch.isfinite(vals).all()) or bool((vals < 0).any()):
            raise ValueError("SparseSimilarity: values must be finite and non-negative")
        sums = vals.sum(1, keepdim=True)
        if bool((sums <= 0).any()):
            row = int((sums[:, 0] <= 0).nonzero()[0, 0])
            raise ValueError(f"SparseSimilarity: row {row} has no positive weight")
        self.indices = idx.contiguous()
        self.values = (vals / sums).contiguous()

    @property
    def num_classes(self) -> int:
        return self.indices.shape[0]

    @classmethod
    def from_dense(cls, similarity: Tensor, k: int) -> SparseSimilarity:
        """Keep the k largest entries of each row of a dense [C, C] similarity."""
        vals, idx = similarity.topk(k, dim=1)
        return cls(idx, vals)

    def to(self, device) -> SparseSimilarity:
        out = object.__new__(SparseSimilarity)
        out.indices, out.values = self.indices.to(device), self.values.to(device)
        return out

    def __repr__(self) -> str:
        return f"SparseSimilarity(num_classes={self.num_classes}, k={self.indices.shape[1]})"


def _is_real_scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    # written without math.isfinite so that torch.compile(dynamic=True) can trace symbolic floats
    return v - v == 0


def _unit_interval(name: str, v) -> float:
    if not _is_real_scalar(v) or not (0.0 <= v <= 1.0):  # NaN fails the comparison
        raise ValueError(
            f"{name} must be a float in [0, 1] or a tensor of the target's shape, got {v!r}"
        )
    return float(v)


def _per_sample(name: str, v: Tensor, target_shape, device) -> Tensor:
    if tuple(v.shape) != tuple(target_shape):
        raise ValueError(
            f"{name} tensor must have the target's shape {tuple(target_shape)}, "
            f"got {tuple(v.shape)}"
        )
    if not v.is_floating_point():
        raise ValueError(f"{name} tensor must be floating point, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but logits are on {device}")
    return v.detach().reshape(-1)


def _soft_target_loss(logits, target, smoothing, weight, reduction, extras):
    used = [k for k, v in extras.items() if v]
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
        logits, target, weight=weight, reduction=reduction, label_smoothing=smoothing
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
) -> Tensor | tuple[Tensor, Stats]:
    """Label-smoothed cross-entropy without a dense smoothed target or an N×C log-softmax.

    Args:
        logits: [N, C], [C] or [N, C, d1, ...] (class dim 1, like ``nn.CrossEntropyLoss``);
            fp32, bf16, fp16 or fp64.
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

    Returns:
        the loss (fp32; fp64 for fp64 logits), and ``Stats`` if ``return_stats``.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(
            "logits must be a floating-point tensor, got "
            f"{logits.dtype if isinstance(logits, Tensor) else type(logits).__name__}"
        )
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    eps_t = smoothing if isinstance(smoothing, Tensor) else None
    smoothing = 0.0 if eps_t is not None else _unit_interval("smoothing", smoothing)
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.dim() != 1 or not weight.is_floating_point():
            raise ValueError("weight must be a 1-D floating-point tensor of C class weights")
    if logits.dim() == 0:
        raise ValueError("logits must have at least 1 dimension (the classes)")

    if target.is_floating_point():
        return _soft_target_loss(
            logits,
            target,
            smoothing if eps_t is None else eps_t,
            weight,
            reduction,
            {
                "per-sample smoothing": eps_t is not None,
                "similarity": similarity is not None,
                "adaptive": adaptive is not None,
                "z_loss": z_loss != 0,
                "softcap": softcap is not None,
                "confidence_penalty": confidence_penalty != 0,
                "mix_target": mix_target is not None,
                "return_stats": return_stats,
            },
        )

    C = logits.shape[1] if logits.dim() >= 2 else logits.shape[0]
    if logits.dim() == 1:
        expected = ()
        x = logits[None, :]
    elif logits.dim() == 2:
        expected = logits.shape[:1]
        x = logits
    else:
        expected = logits.shape[:1] + logits.shape[2:]
        x = logits.movedim(1, -1).reshape(-1, C)
    if tuple(target.shape) != tuple(expected):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape "
            f"{tuple(logits.shape)}: expected {tuple(expected)}"
        )
    if C == 0:
        raise ValueError("logits must have at least one class (dim 1 has size 0)")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"class-index targets must be an integer tensor, got {target.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = target.reshape(-1).long()
    dev = logits.device

    if weight is not None:
        if weight.shape[0] != C:
            raise ValueError(f"weight must have C={C} elements, got {weight.shape[0]}")
        if weight.device != dev:
            raise ValueError(f"weight is on {weight.device} but logits are on {dev}")
    eps_rows = _per_sample("smoothing", eps_t, target.shape, dev) if eps_t is not None else None

    dense = sparse = None
    if isinstance(similarity, SparseSimilarity):
        if similarity.num_classes != C:
            raise ValueError(f"similarity has {similarity.num_classes} classes, logits have {C}")
        sparse = similarity if similarity.indices.device == dev else similarity.to(dev)
    elif isinstance(similarity, Tensor):
        if tuple(similarity.shape) != (C, C):
            raise ValueError(
                f"similarity must be [C, C] = [{C}, {C}], got {tuple(similarity.shape)}"
            )
        if similarity.device != dev:
            raise ValueError(f"similarity is on {similarity.device} but logits are on {dev}")
        dense = similarity.detach()
    elif similarity is not None:
        raise TypeError(
            "similarity must be None, a [C, C] tensor or SparseSimilarity, got "
            f"{type(similarity).__name__}"
        )
    beta = _unit_interval("similarity_mix", similarity_mix)
    if adaptive is not None and not isinstance(adaptive, ConfidenceAdaptive):
        raise TypeError(
            f"adaptive must be None or ConfidenceAdaptive, got {type(adaptive).__name__}"
        )
    for name, v in (("z_loss", z_loss), ("confidence_penalty", confidence_penalty)):
        if not _is_real_scalar(v) or not _finite(v):
            raise ValueError(f"{name} must be a finite float, got {v!r}")
    if softcap is not None and not (_is_real_scalar(softcap) and _finite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive finite float, got {softcap!r}")

    mix_y = mix_rows = None
    mix_scalar = 1.0
    if mix_target is not None:
        if (
            not isinstance(mix_target, Tensor)
            or tuple(mix_target.shape) != tuple(target.shape)
            or mix_target.is_floating_point()
        ):
            raise ValueError(
                f"mix_target must be an integer tensor of the target's shape {tuple(target.shape)}"
            )
        if mix_target.device != dev:
            raise ValueError(f"mix_target is on {mix_target.device} but logits are on {dev}")
        if mix_lambda is None:
            raise ValueError("mix_lambda is required with mix_target")
        mix_y = mix_target.reshape(-1).long()
        if isinstance(mix_lambda, Tensor):
            mix_rows = _per_sample("mix_lambda", mix_lambda, target.shape, dev)
        else:
            mix_scalar = _unit_interval("mix_lambda", mix_lambda)
    elif mix_lambda is not None:
        raise ValueError("mix_lambda given without mix_target")

    req = backends.Request(dev.type, logits.dtype, C, dense is not None, sparse is not None)
    chosen = backends.resolve(backend, req)
    outs = torch.ops.fused_ls.forward(
        x,
        y,
        weight,
        eps_rows,
        dense,
        sparse.indices if sparse is not None else None,
        sparse.values if sparse is not None else None,
        mix_y,
        mix_rows,
        smoothing,
        beta,
        int(ignore_index),
        adaptive.threshold if adaptive else 0.0,
        adaptive.factor if adaptive else 1.0,
        _ops.ADAPTIVE_MODES[adaptive.confidence if adaptive else None],
        float(z_loss),
        float(softcap or 0.0),
        float(confidence_penalty),
        mix_scalar,
        chosen,
        bool(inplace_backward),
    )
    loss_rows, row_w, lse, conf, pred = outs[:5]
    if reduction == "none":
        loss = loss_rows.reshape(target.shape)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / row_w.detach().sum()
    if not return_stats:
        return loss
    shape = target.shape
    return loss, Stats(
        lse.detach().reshape(shape), conf.detach().reshape(shape), pred.reshape(shape)
    )


class FusedLabelSmoothingCE(nn.Module):
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
        super().__init__()
        _unit_interval("smoothing", smoothing)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        allowed = {
            "similarity",
            "similarity_mix",
            "adaptive",
            "z_loss",
            "softcap",
            "confidence_penalty",
            "inplace_backward",
            "return_stats",
            "backend",
        }
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"FusedLabelSmoothingCE got unexpected keyword(s) {sorted(unknown)}")
        self.smoothing = float(smoothing)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.register_buffer("weight", weight)
        sim = kwargs.pop("similarity", None)
        if isinstance(sim, Tensor):
            self.register_buffer("similarity", sim)
        else:
            self.similarity = sim
        self.options = kwargs

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        smoothing: Tensor | float | None = None,
        mix_target: Tensor | None = None,
        mix_lambda: float | Tensor | None = None,
    ):
        return label_smoothing_cross_entropy(
            logits,
            target,
            self.smoothing if smoothing is None else smoothing,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            similarity=self.similarity,
            mix_target=mix_target,
            mix_lambda=mix_lambda,
            **self.options,
        )

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (
            f"smoothing={self.smoothing}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}{opts}"
        )
