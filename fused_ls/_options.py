"""The keywords every entry point shares: defined once here, parsed and validated once, here.

``KEYWORDS`` is the one table of the user-facing keywords (name, default, type, meaning). Each
entry point (the loss and its module, the fused head and its module, the dense reference, the
transformers integration) takes ``**options`` and declares which of them it accepts with
``takes_keywords``, which also gives the function its full signature (``inspect.signature``,
``help``) and documents the keywords from the table. ``parse_options`` turns the keywords of one
call into an immutable ``LossOptions`` (scalar checks only: no tensor op, no host sync), and
``LossOptions.bind`` checks the tensors against a concrete problem (number of classes, target
shape, device). Data-dependent checks (target range, per-sample values, similarity entries)
happen where the data is read: in the kernels, or once per similarity tensor in
``fused_ls._smoothing``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
ADAPTIVE_MODES = {None: 0, "max": 1, "target": 2}


class Stats(NamedTuple):
    """Row statistics from the same pass as the loss, each of the target's shape (detached)."""

    lse: Tensor  #: log-sum-exp of the (soft-capped) logits
    confidence: Tensor  #: max softmax probability
    prediction: Tensor  #: argmax class (int64)
    entropy: Tensor  #: H(p) = lse − Σ p·z of the softmax distribution (nats)
    logprob: Tensor  #: log p at the target class, z_y − lse (0 on ignored rows)


class ConfidenceAdaptive:
    """Per-sample adaptive smoothing: ε_i ← min(1, ε_i·factor) where the row's detached confidence
    is below ``threshold``. ``confidence="max"`` uses the max softmax probability, ``"target"``
    the probability of the target class. No gradient flows through ε_i."""

    def __init__(self, threshold: float = 0.8, factor: float = 2.0, confidence: str = "max"):
        if not (_is_real_scalar(threshold) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"ConfidenceAdaptive: threshold must be in [0, 1], got {threshold!r}")
        if not (_is_real_scalar(factor) and _finite(factor) and factor >= 0):
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


def _parse_smoothing(v) -> tuple[float, Tensor | None]:
    """(scalar ε, per-sample ε tensor or None)."""
    if isinstance(v, Tensor):
        return 0.0, v
    return _unit_interval("smoothing", v), None


def _parse_mix(mix_target, mix_lambda) -> tuple[float, Tensor | None]:
    """(scalar λ, per-sample λ tensor or None) of mixup; λ = 1 without mixup."""
    if mix_target is None:
        if mix_lambda is not None:
            raise ValueError("mix_lambda given without mix_target")
        return 1.0, None
    if not isinstance(mix_target, Tensor):
        raise ValueError("mix_target must be an integer tensor of the target's shape")
    if mix_lambda is None:
        raise ValueError("mix_lambda is required with mix_target")
    if isinstance(mix_lambda, Tensor):
        return 1.0, mix_lambda
    return _unit_interval("mix_lambda", mix_lambda), None


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
    v = v.detach()
    return v if v.dim() == 1 else v.reshape(-1)


def _check_device(name: str, t: Tensor, device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}")


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def class_indices(name: str, t: Tensor) -> Tensor:
    """[N] int64 class ids from a target-shaped integer tensor (no copy when already int64)."""
    if t.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be an integer tensor of class indices, got {t.dtype}")
    if t.dim() != 1:
        t = t.reshape(-1)
    return t if t.dtype == torch.int64 else t.long()


@dataclass(frozen=True)
class LossOptions:
    """The validated keywords (see ``label_smoothing_cross_entropy`` for their meaning)."""

    smoothing: float = 0.1
    smoothing_rows: Tensor | None = None  # per-sample ε (a tensor of the target's shape)
    weight: Tensor | None = None
    ignore_index: int = -100
    reduction: str = "mean"
    similarity: Tensor | None = None  # dense [C, C]
    sparse: SparseSimilarity | None = None
    similarity_mix: float = 1.0
    adaptive: ConfidenceAdaptive | None = None
    z_loss: float = 0.0
    softcap: float = 0.0  # 0: none
    confidence_penalty: float = 0.0
    mix_target: Tensor | None = None
    mix_lambda: float = 1.0
    mix_rows: Tensor | None = None  # per-sample λ
    return_stats: bool = False
    backend: str = "auto"
    inplace_backward: bool = False
    process_group: object | None = None
    chunk_size: int | None = None  # the fused head's rows per chunk (None: its rule)

    def __deepcopy__(self, memo) -> LossOptions:
        """A deep copy that shares the process group: a communicator cannot be copied (a model
        holding a loss module with ``process_group=`` stays deep-copyable)."""
        memo.setdefault(id(self.process_group), self.process_group)
        fields = dataclasses.fields(self)
        return LossOptions(**{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields})

    def replace(self, **kw) -> LossOptions:
        """A copy with ``smoothing`` and/or the mixup keywords changed, validated like the
        originals (the module's per-call overrides and its settable ``smoothing``)."""
        fields = {}
        if "smoothing" in kw:
            fields["smoothing"], fields["smoothing_rows"] = _parse_smoothing(kw.pop("smoothing"))
        if "mix_target" in kw or "mix_lambda" in kw:
            mt, ml = kw.pop("mix_target", None), kw.pop("mix_lambda", None)
            fields["mix_target"] = mt
            fields["mix_lambda"], fields["mix_rows"] = _parse_mix(mt, ml)
        if kw:
            raise TypeError(f"LossOptions.replace: unexpected keyword(s) {sorted(kw)}")
        return dataclasses.replace(self, **fields)

    def bind(self, num_classes: int, target_shape, device: torch.device) -> tuple:
        """Check the tensors against a problem with ``num_classes`` classes (all of them, also
        when the logits hold a vocabulary shard), targets of ``target_shape`` on ``device``, and
        return the tensor arguments of the ``fused_ls::`` ops that come after ``(x, target)``:
        ``(weight, eps_rows, similarity, sparse_idx, sparse_val, mix_target, mix_rows)``."""
        C = num_classes
        w = self.weight
        if w is not None:
            if w.shape[0] != C:
                raise ValueError(f"weight must have C={C} elements, got {w.shape[0]}")
            _check_device("weight", w, device)
        eps_rows = self.smoothing_rows
        if eps_rows is not None:
            eps_rows = _per_sample("smoothing", eps_rows, target_shape, device)
        dense = self.similarity
        if dense is not None:
            if tuple(dense.shape) != (C, C):
                raise ValueError(
                    f"similarity must be [C, C] = [{C}, {C}], got {tuple(dense.shape)}"
                )
            _check_device("similarity", dense, device)
            # (kept as given: the prepared form is cached by the tensor itself; see _smoothing)
        sp_idx = sp_val = None
        if self.sparse is not None:
            sp = self.sparse
            if sp.num_classes != C:
                raise ValueError(f"similarity has {sp.num_classes} classes, logits have {C}")
            if sp.indices.device != device:
                sp = sp.to(device)
            sp_idx, sp_val = sp.indices, sp.values
        mix_y = mix_rows = None
        if self.mix_target is not None:
            mt = self.mix_target
            if tuple(mt.shape) != tuple(target_shape) or mt.is_floating_point():
                raise ValueError(
                    "mix_target must be an integer tensor of the target's shape "
                    f"{tuple(target_shape)}"
                )
            _check_device("mix_target", mt, device)
            mix_y = class_indices("mix_target", mt)
            if self.mix_rows is not None:
                mix_rows = _per_sample("mix_lambda", self.mix_rows, target_shape, device)
        return w, eps_rows, dense, sp_idx, sp_val, mix_y, mix_rows

    def scalars(self) -> tuple:
        """The scalar arguments of the ``fused_ls::`` ops that come from the options, in schema
        order (``fused_ls._problem.Problem``): smoothing, ignore_index, adaptive_threshold,
        adaptive_factor, adaptive_mode, z_loss, softcap, confidence_penalty, mix_lambda,
        reduction. (similarity_mix is folded into the prepared smoothing.)"""
        a = self.adaptive
        return (
            self.smoothing,
            self.ignore_index,
            a.threshold if a is not None else 0.0,
            a.factor if a is not None else 1.0,
            ADAPTIVE_MODES[a.confidence if a is not None else None],
            self.z_loss,
            self.softcap,
            self.confidence_penalty,
            self.mix_lambda,
            REDUCTIONS[self.reduction],
        )


# ---- the one table of keywords ------------------------------------------------------------------
class Keyword(NamedTuple):
    name: str
    default: Any
    annotation: str
    doc: str


KEYWORDS: dict[str, Keyword] = {
    k.name: k
    for k in (
        Keyword(
            "smoothing",
            0.1,
            "float | Tensor",
            "ε in [0, 1], or a float tensor of the target's shape (per-sample ε).",
        ),
        Keyword("weight", None, "Tensor | None", "[C] class weights (as in ``F.cross_entropy``)."),
        Keyword(
            "ignore_index",
            -100,
            "int",
            'rows whose target equals it give 0 loss and are not counted by "mean".',
        ),
        Keyword(
            "reduction",
            "mean",
            "str",
            '"none" (the target\'s shape), "mean" (Σ loss / Σ w[y] over counted rows) or "sum".',
        ),
        Keyword(
            "similarity",
            None,
            "Tensor | SparseSimilarity | None",
            "None (uniform smoothing), a non-negative [C, C] tensor, or ``SparseSimilarity``; "
            "rows are normalised to sum 1.",
        ),
        Keyword(
            "similarity_mix",
            1.0,
            "float",
            "β; the smoothing distribution is (1 − β)·uniform + β·S̃[y].",
        ),
        Keyword(
            "adaptive",
            None,
            "ConfidenceAdaptive | None",
            "``ConfidenceAdaptive`` for confidence-dependent per-sample ε.",
        ),
        Keyword("z_loss", 0.0, "float", "λ of the auxiliary λ·w[y]·lse² term."),
        Keyword(
            "softcap",
            None,
            "float | None",
            "if given, logits are replaced by softcap·tanh(logits/softcap) first.",
        ),
        Keyword(
            "confidence_penalty",
            0.0,
            "float",
            "β_cp of the −β_cp·w[y]·H(p) term (Pereyra et al. 2017).",
        ),
        Keyword(
            "mix_target",
            None,
            "Tensor | None",
            "mixup: the target becomes λ·q(target) + (1 − λ)·q(mix_target) (class indices of "
            "the target's shape).",
        ),
        Keyword(
            "mix_lambda",
            None,
            "float | Tensor | None",
            "mixup's λ: a float, or a tensor of the target's shape (required with mix_target).",
        ),
        Keyword(
            "return_stats",
            False,
            "bool",
            "also return ``Stats`` (lse, confidence, prediction, entropy, logprob) of the target's "
            "shape.",
        ),
        Keyword(
            "backend",
            "auto",
            "str",
            '"auto", "torch", "cpp", "cuda" or "triton"; "auto" honours $FUSED_LS_BACKEND.',
        ),
        Keyword(
            "inplace_backward",
            False,
            "bool",
            "write the gradient into the logits' storage (no extra N×C memory); the logits must "
            "not be used afterwards, and autograd raises if another op saved them.",
        ),
        Keyword(
            "process_group",
            None,
            "ProcessGroup | VocabShard | None",
            "vocabulary parallelism (``fused_ls.parallel``): a ``torch.distributed`` group whose "
            "ranks hold the class slices in rank order, or ``fused_ls.VocabShard(group, start, "
            "num_classes)``; every other argument is the same on every rank and indexes all "
            "classes.",
        ),
        Keyword(
            "chunk_size",
            None,
            "int | None",
            "the fused head's rows per chunk (default: ``fused_ls.linear.chunk_rows``'s rule).",
        ),
    )
}

_DEFAULTS = {n: k.default for n, k in KEYWORDS.items()}

# Which entry point takes which keywords (``takes_keywords``).
_MATH = (
    "smoothing",
    "weight",
    "ignore_index",
    "reduction",
    "similarity",
    "similarity_mix",
    "adaptive",
    "z_loss",
    "softcap",
    "confidence_penalty",
)
_PER_CALL = ("mix_target", "mix_lambda")
_RUN = ("return_stats", "backend", "process_group")
LOSS_KEYWORDS = (*_MATH, *_PER_CALL, *_RUN, "inplace_backward")
HEAD_KEYWORDS = (*_MATH, *_PER_CALL, *_RUN, "chunk_size")
# modules: per-call tensors are arguments of forward, not of the constructor
LOSS_MODULE_KEYWORDS = tuple(k for k in LOSS_KEYWORDS if k not in _PER_CALL)
HEAD_MODULE_KEYWORDS = tuple(k for k in HEAD_KEYWORDS if k not in _PER_CALL)
# the dense reference computes the loss: no output or execution keywords
REFERENCE_KEYWORDS = (*_MATH, *_PER_CALL)
assert set(LOSS_KEYWORDS + HEAD_KEYWORDS) == set(KEYWORDS)


def takes_keywords(names: tuple[str, ...]):
    """Declare that ``fn(..., **options)`` takes the shared keywords ``names``: records them
    (``parse_options`` and ``keyword_values`` accept exactly these), gives ``fn`` the full
    signature (its own parameters, then the shared ones with their defaults; ``inspect`` and
    ``help`` show it) and appends their meaning, from ``KEYWORDS``, to its docstring."""

    def wrap(fn):
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
            raise TypeError(f"{fn.__qualname__} must take **options")
        explicit = {p.name for p in params}
        positional = [p for p in params if p.kind < inspect.Parameter.KEYWORD_ONLY]
        own = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        shared = [
            inspect.Parameter(
                n,
                inspect.Parameter.KEYWORD_ONLY,
                default=KEYWORDS[n].default,
                annotation=KEYWORDS[n].annotation,
            )
            for n in names
            if n not in explicit
        ]
        fn.__signature__ = sig.replace(parameters=positional + own + shared)
        fn.__fused_ls_keywords__ = tuple(names)
        documented = [n for n in names if n != "smoothing"]
        lines = [f"    {n}: {KEYWORDS[n].doc}" for n in documented]
        # (a summary line first: a docstring that began with the section would lose the items'
        # indentation to a second cleandoc, as documentation tools apply)
        doc = inspect.cleandoc(fn.__doc__ or f"{fn.__qualname__}: the shared keywords below.")
        fn.__doc__ = doc + "\n\nOther Parameters:\n" + "\n".join(lines) + "\n"
        return fn

    return wrap


def keyword_values(fn, options: dict) -> dict:
    """Every keyword that ``fn`` takes (``takes_keywords``), from ``options`` or its default;
    TypeError naming the function for a keyword it does not take."""
    names = fn.__fused_ls_keywords__
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(
            f"{fn.__qualname__}() got unexpected keyword argument(s) {unknown}; it takes "
            f"{', '.join(names)}"
        )
    return {n: options.get(n, KEYWORDS[n].default) for n in names}


def parse_options(fn, options: dict) -> LossOptions:
    """Validate the keywords of one call of the entry point ``fn`` (everything that needs no
    logits) into ``LossOptions``."""
    # every keyword, the entry point's from the call or their defaults, the others their defaults
    kw = {**_DEFAULTS, **keyword_values(fn, options)}
    reduction = kw["reduction"]
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    smoothing, eps_rows = _parse_smoothing(kw["smoothing"])
    weight = kw["weight"]
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.dim() != 1 or not weight.is_floating_point():
            raise ValueError("weight must be a 1-D floating-point tensor of C class weights")
    ignore_index = kw["ignore_index"]
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    similarity = kw["similarity"]
    dense = sparse = None
    if isinstance(similarity, SparseSimilarity):
        sparse = similarity
    elif isinstance(similarity, Tensor):
        if similarity.dim() != 2 or not similarity.is_floating_point():
            raise ValueError(
                "similarity must be [C, C] floating point, got "
                f"{tuple(similarity.shape)} {similarity.dtype}"
            )
        dense = similarity
    elif similarity is not None:
        raise TypeError(
            "similarity must be None, a [C, C] tensor or SparseSimilarity, got "
            f"{type(similarity).__name__}"
        )
    beta = _unit_interval("similarity_mix", kw["similarity_mix"])
    adaptive = kw["adaptive"]
    if adaptive is not None and not isinstance(adaptive, ConfidenceAdaptive):
        raise TypeError(
            f"adaptive must be None or ConfidenceAdaptive, got {type(adaptive).__name__}"
        )
    for name in ("z_loss", "confidence_penalty"):
        v = kw[name]
        if not _is_real_scalar(v) or not _finite(v):
            raise ValueError(f"{name} must be a finite float, got {v!r}")
    softcap = kw["softcap"]
    if softcap is not None and not (_is_real_scalar(softcap) and _finite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive finite float, got {softcap!r}")
    mix_target = kw["mix_target"]
    lam, mix_rows = _parse_mix(mix_target, kw["mix_lambda"])
    backend = kw["backend"]
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    chunk_size = kw["chunk_size"]
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return LossOptions(
        smoothing=smoothing,
        smoothing_rows=eps_rows,
        weight=weight,
        ignore_index=int(ignore_index),
        reduction=reduction,
        similarity=dense,
        sparse=sparse,
        similarity_mix=beta,
        adaptive=adaptive,
        z_loss=float(kw["z_loss"]),
        softcap=float(softcap or 0.0),
        confidence_penalty=float(kw["confidence_penalty"]),
        mix_target=mix_target,
        mix_lambda=lam,
        mix_rows=mix_rows,
        return_stats=bool(kw["return_stats"]),
        backend=backend,
        inplace_backward=bool(kw["inplace_backward"]),
        process_group=kw["process_group"],
        chunk_size=chunk_size,
    )
