"""Calibration metrics and reliability diagrams (Guo et al. 2017, "On Calibration of Modern Neural
Networks").

Top-label calibration: for each sample take the confidence ``c_i = max_c p_ic`` and the prediction
``ŷ_i = argmax_c p_ic``; split [0, 1] into ``n_bins`` equal-width bins ``(lo, hi]`` (a confidence
of exactly 0 goes to the first bin) and compare, per bin ``B``, the accuracy
``acc(B) = mean[ŷ_i == y_i]`` with the mean confidence ``conf(B) = mean c_i``:

    ECE = Σ_B |B|/n · |acc(B) − conf(B)|          MCE = max over non-empty B of |acc(B) − conf(B)|

Every function takes either probabilities ``probs`` [N, C] (or [N, C, d1, ...], class dim 1 as in
the loss) or the top-label pair directly: ``confidence=`` / ``prediction=`` tensors of the
target's shape, or a ``fused_ls.Stats`` from ``label_smoothing_cross_entropy(...,
return_stats=True)`` passed in place of ``probs``. The latter two need no N×C softmax, which is
what one wants for large vocabularies.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._options import Stats

__all__ = [
    "CalibrationBins",
    "calibration_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "reliability_diagram",
    "top_label",
]


class CalibrationBins(NamedTuple):
    """Per-bin summary, each a float64 CPU tensor of length ``n_bins`` (``edges``: ``n_bins + 1``).

    Empty bins have ``count`` 0 and ``confidence``/``accuracy`` NaN.
    """

    edges: Tensor  #: bin edges 0 = e_0 < e_1 < ... < e_n = 1; bin b is (e_b, e_{b+1}]
    count: Tensor  #: number of samples in each bin
    confidence: Tensor  #: mean confidence in each bin
    accuracy: Tensor  #: fraction of correct predictions in each bin


def top_label(
    probs: Tensor | Stats | None = None,
    target: Tensor | None = None,
    *,
    confidence: Tensor | None = None,
    prediction: Tensor | None = None,
    ignore_index: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Flattened (confidence, correct) pairs, float64 and bool CPU tensors of length n.

    Args:
        probs: probabilities [N, C] or [N, C, d1, ...] (class dim 1), rows summing to 1; or a
            ``Stats`` (its ``confidence`` and ``prediction`` are used); or None when
            ``confidence`` and ``prediction`` are given.
        target: integer class ids of shape [N] or [N, d1, ...] (the shape of the loss' target).
        confidence: max probability per sample, the target's shape, values in [0, 1].
        prediction: predicted class per sample (integer), the target's shape.
        ignore_index: samples whose target equals it are dropped (e.g. -100 for padding).
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor of class ids, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor of class ids, got {target.dtype}")
    if isinstance(probs, Stats):
        if confidence is not None or prediction is not None:
            raise ValueError("pass either a Stats or confidence=/prediction=, not both")
        confidence, prediction = probs.confidence, probs.prediction
        probs = None
    if probs is not None:
        if confidence is not None or prediction is not None:
            raise ValueError("pass either probs or confidence=/prediction=, not both")
        if not isinstance(probs, Tensor) or not probs.is_floating_point():
            raise TypeError("probs must be a floating-point tensor of probabilities [N, C]")
        if probs.dim() < 2:
            raise ValueError(
                f"probs must be [N, C] or [N, C, d1, ...], got shape {tuple(probs.shape)}"
            )
        expected = probs.shape[:1] + probs.shape[2:]
        if tuple(target.shape) != tuple(expected):
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match probs shape "
                f"{tuple(probs.shape)}: expected {tuple(expected)}"
            )
        C = probs.shape[1]
        if C == 0:
            raise ValueError("probs must have at least one class")
        p = probs.detach().movedim(1, -1).reshape(-1, C).double()
        if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or bool((p > 1).any()):
            raise ValueError(
                "probs must be finite and in [0, 1] (did you pass logits? apply "
                "softmax first, or pass confidence=/prediction= from return_stats)"
            )
        tol = 1e-2 if probs.dtype in (torch.float16, torch.bfloat16) else 1e-4
        sums = p.sum(1)
        if p.shape[0] and float((sums - 1).abs().max()) > tol:
            raise ValueError(
                f"probs rows must sum to 1; row sums range over "
                f"[{float(sums.min()):.4g}, {float(sums.max()):.4g}]"
            )
        conf, pred = p.max(1)
    else:
        if confidence is None or prediction is None:
            raise ValueError("give probs, a Stats, or both confidence= and prediction=")
        for name, t in (("confidence", confidence), ("prediction", prediction)):
            if not isinstance(t, Tensor) or tuple(t.shape) != tuple(target.shape):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"{name} must be a tensor of the target's shape "
                    f"{tuple(target.shape)}, got {shape}"
                )
        if not confidence.is_floating_point():
            raise ValueError(f"confidence must be floating point, got {confidence.dtype}")
        if prediction.is_floating_point() or prediction.dtype == torch.bool:
            raise ValueError(f"prediction must be an integer tensor, got {prediction.dtype}")
        conf = confidence.detach().reshape(-1).double()
        pred = prediction.detach().reshape(-1).long()
        if not bool(((conf >= 0) & (conf <= 1)).all()):  # NaN fails too
            raise ValueError("confidence must lie in [0, 1]")
    y = target.detach().reshape(-1).long().to(pred.device)
    if ignore_index is not None:
        keep = y != ignore_index
        conf, pred, y = conf[keep], pred[keep], y[keep]
    return conf.cpu(), (pred == y).cpu()


def _check_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    return n_bins


def calibration_bins(
    probs: Tensor | Stats | None = None,
    target: Tensor | None = None,
    n_bins: int = 15,
    *,
    confidence: Tensor | None = None,
    prediction: Tensor | None = None,
    ignore_index: int | None = None,
) -> CalibrationBins:
    """Equal-width (lo, hi] bins of top-label confidence; arguments as in ``top_label``."""
    n_bins = _check_bins(n_bins)
    conf, correct = top_label(
        probs, target, confidence=confidence, prediction=prediction, ignore_index=ignore_index
    )
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # bucketize(right=False) returns b with edges[b-1] < c <= edges[b] over the inner edges,
    # i.e. bin b = (e_b, e_{b+1}]; c = 0 lands in bin 0 and c = 1 in the last bin.
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    csum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    asum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct.double())
    nonempty = count > 0
    nan = torch.full_like(count, float("nan"))
    return CalibrationBins(
        edges,
        count,
        torch.where(nonempty, csum / count.clamp_min(1), nan),
        torch.where(nonempty, asum / count.clamp_min(1), nan),
    )


def expected_calibration_error(
    probs: Tensor | Stats | None = None,
    target: Tensor | None = None,
    n_bins: int = 15,
    *,
    confidence: Tensor | None = None,
    prediction: Tensor | None = None,
    ignore_index: int | None = None,
) -> float:
    """Top-label ECE = Σ_B |B|/n · |acc(B) − conf(B)| over equal-width (lo, hi] bins.

    Args:
        probs: [N, C] (or [N, C, d1, ...]) probabilities, or a ``Stats`` from ``return_stats``.
        target: integer class ids, [N] (or [N, d1, ...]).
        n_bins: number of equal-width bins over [0, 1] (15 in Guo et al. 2017).
        confidence, prediction: the top-label pair instead of ``probs`` (target's shape).
        ignore_index: samples with this target are left out.

    Returns:
        ECE as a Python float in [0, 1]; NaN when no sample is left.
    """
    b = calibration_bins(
        probs,
        target,
        n_bins,
        confidence=confidence,
        prediction=prediction,
        ignore_index=ignore_index,
    )
    n = float(b.count.sum())
    if n == 0:
        return float("nan")
    gap = (b.accuracy - b.confidence).abs().nan_to_num(0.0)
    return float((b.count / n * gap).sum())


def maximum_calibration_error(
    probs: Tensor | Stats | None = None,
    target: Tensor | None = None,
    n_bins: int = 15,
    *,
    confidence: Tensor | None = None,
    prediction: Tensor | None = None,
    ignore_index: int | None = None,
) -> float:
    """Top-label MCE = max over non-empty bins of |acc(B) − conf(B)|; arguments as in
    ``expected_calibration_error``. NaN when no sample is left."""
    b = calibration_bins(
        probs,
        target,
        n_bins,
        confidence=confidence,
        prediction=prediction,
        ignore_index=ignore_index,
    )
    gap = (b.accuracy - b.confidence).abs()[b.count > 0]
    return float(gap.max()) if gap.numel() else float("nan")


def reliability_diagram(
    probs: Tensor | Stats | None = None,
    target: Tensor | None = None,
    n_bins: int = 15,
    path=None,
    *,
    confidence: Tensor | None = None,
    prediction: Tensor | None = None,
    ignore_index: int | None = None,
    title: str | None = None,
    ax=None,
):
    """Reliability diagram: per-bin accuracy against confidence, the gap to the diagonal shaded,
    and the share of samples per bin underneath. ECE and MCE in the title.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change).

    Args:
        probs, target, n_bins, confidence, prediction, ignore_index: as in
            ``expected_calibration_error``.
        path: if given, the figure is saved there as a PNG.
        title: text put before the ECE/MCE line.
        ax: draw into this matplotlib Axes (no histogram panel) instead of a new figure.

    Returns:
        the matplotlib ``Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    b = calibration_bins(
        probs,
        target,
        n_bins,
        confidence=confidence,
        prediction=prediction,
        ignore_index=ignore_index,
    )
    n = float(b.count.sum())
    gap = (b.accuracy - b.confidence).abs().nan_to_num(0.0)
    ece = float((b.count / n * gap).sum()) if n else float("nan")
    nonempty = b.count > 0
    mce = float(gap[nonempty].max()) if bool(nonempty.any()) else float("nan")

    if ax is None:
        fig = Figure(figsize=(4.8, 5.4), dpi=110)
        FigureCanvasAgg(fig)
        main, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, main, hist = ax.figure, ax, None
    lo = b.edges[:-1].numpy()
    width = 1.0 / n_bins
    acc = b.accuracy.nan_to_num(0.0).numpy()
    conf = b.confidence.numpy()
    centers = lo + width / 2
    ne = nonempty.numpy()
    main.bar(
        lo[ne],
        acc[ne],
        width=width,
        align="edge",
        color="#4c72b0",
        edgecolor="black",
        linewidth=0.5,
        label="accuracy",
        zorder=1,
    )
    # the gap between each bin's accuracy and its mean confidence, hatched whichever its sign
    main.bar(
        lo[ne],
        (conf - acc)[ne],
        bottom=acc[ne],
        width=width,
        align="edge",
        fill=False,
        edgecolor="#c44e52",
        hatch="///",
        linewidth=0.8,
        label="gap to mean confidence",
        zorder=2,
    )
    main.hlines(
        conf[ne],
        lo[ne],
        lo[ne] + width,
        color="black",
        linewidth=1.5,
        label="mean confidence",
        zorder=3,
    )
    main.plot(
        [0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration", zorder=4
    )
    main.set_xlim(0, 1)
    main.set_ylim(0, 1)
    main.set_ylabel("accuracy")
    main.legend(loc="upper left", fontsize=7, framealpha=0.9)
    head = f"{title}\n" if title else ""
    main.set_title(f"{head}ECE {100 * ece:.2f}%  MCE {100 * mce:.2f}%  (n={int(n)})", fontsize=8)
    if hist is not None:
        share = (b.count / max(n, 1.0)).numpy()
        hist.bar(centers, share, width=width, color="gray", edgecolor="black", linewidth=0.5)
        hist.set_ylabel("share")
        hist.set_xlabel("confidence")
        fig.tight_layout()
    else:
        main.set_xlabel("confidence")
    if path is not None:
        fig.savefig(path, format="png")
    return fig
