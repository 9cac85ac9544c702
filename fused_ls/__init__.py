"""fused_ls: fused label-smoothing cross-entropy for PyTorch.

    loss = fused_ls.label_smoothing_cross_entropy(logits, target, smoothing=0.1)
    crit = fused_ls.FusedLabelSmoothingCE(smoothing=0.1)
    loss = fused_ls.linear_label_smoothing_cross_entropy(hidden, lm_head.weight, target)

See the docs (docs/, ``make docs``) for the exact semantics and ``python -m fused_ls.info`` for the
available backends.
"""

from . import _ops  # noqa: F401  (registers the fused_ls:: custom ops)
from ._options import ConfidenceAdaptive, SparseSimilarity, Stats
from ._version import __version__
from .backends import BACKEND_NAMES, cpp_backend, reasons_for
from .calibration import (
    expected_calibration_error,
    maximum_calibration_error,
    reliability_diagram,
)
from .distillation import distillation_loss
from .linear import FusedLinearLabelSmoothingCE, linear_label_smoothing_cross_entropy
from .loss import FusedLabelSmoothingCE, label_smoothing_cross_entropy
from .parallel import VocabShard
from .schedules import (
    SmoothingScheduler,
    cosine_decay_smoothing,
    linear_decay_smoothing,
    off_switch_smoothing,
    warmup_smoothing,
)


def empty_cache() -> int:
    """Free the gradient buffers the CPU kernels keep for reuse between calls of the same size
    (fresh buffers of that size would cost page faults every step); returns the bytes freed.
    ``$FUSED_LS_NO_BUFFER_POOL=1`` disables the reuse."""
    return cpp_backend.empty_cache()


def available_backends() -> dict[str, list[str]]:
    """{backend name: reasons it cannot run in this process (empty list: available)}."""
    return {name: reasons_for(name, None) for name in BACKEND_NAMES}


__all__ = [
    "ConfidenceAdaptive",
    "FusedLabelSmoothingCE",
    "FusedLinearLabelSmoothingCE",
    "SparseSimilarity",
    "SmoothingScheduler",
    "Stats",
    "VocabShard",
    "__version__",
    "available_backends",
    "empty_cache",
    "calibration",
    "cosine_decay_smoothing",
    "distillation",
    "distillation_loss",
    "expected_calibration_error",
    "label_smoothing_cross_entropy",
    "linear_label_smoothing_cross_entropy",
    "linear_decay_smoothing",
    "maximum_calibration_error",
    "off_switch_smoothing",
    "reliability_diagram",
    "schedules",
    "warmup_smoothing",
]
