"""fused_ls: fused label-smoothing cross-entropy for PyTorch.

    loss = fused_ls.label_smoothing_cross_entropy(logits, target, smoothing=0.1)
    crit = fused_ls.FusedLabelSmoothingCE(smoothing=0.1)

See README.md for the exact semantics and ``python -m fused_ls.info`` for the available backends.
"""

from . import _ops  # noqa: F401  (registers the fused_ls:: custom ops)
from ._api import (
    ConfidenceAdaptive,
    FusedLabelSmoothingCE,
    SparseSimilarity,
    Stats,
    label_smoothing_cross_entropy,
)
from .backends import BACKEND_NAMES, reasons_for

__version__ = "0.1.0"


def available_backends() -> dict[str, list[str]]:
    """{backend name: reasons it cannot run in this process (empty list: available)}."""
    return {name: reasons_for(name, None) for name in BACKEND_NAMES}


__all__ = [
    "ConfidenceAdaptive",
    "FusedLabelSmoothingCE",
    "SparseSimilarity",
    "Stats",
    "available_backends",
    "label_smoothing_cross_entropy",
]
