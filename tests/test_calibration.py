"""Calibration metrics against a plain loop over (lo, hi] bins, hand-computed cases, and the
``return_stats`` path against an explicit softmax."""

from __future__ import annotations

import math

import pytest
import torch

import fused_ls
from fused_ls.calibration import (
    calibration_bins,
    expected_calibration_error,
    maximum_calibration_error,
    reliability_diagram,
)


def plain_ece_mce(probs: torch.Tensor, target: torch.Tensor, n_bins: int):
    """Guo et al.'s definition written out: bins (m−1)/M < conf <= m/M, conf 0 in the first."""
    conf, pred = probs.double().max(1)
    correct = (pred == target).double()
    n = len(target)
    ece, mce = 0.0, 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        inb = (conf > lo) & (conf <= hi)
        if m == 0:
            inb |= conf == 0
        k = int(inb.sum())
        if k == 0:
            continue
        gap = abs(float(correct[inb].mean()) - float(conf[inb].mean()))
        ece += k / n * gap
        mce = max(mce, gap)
    return ece, mce


def random_probs(N=500, C=10, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, C, generator=g, dtype=torch.float64) * sharp
    target = torch.randint(0, C, (N,), generator=g)
    # make the model right more often than chance so that bins differ
    target = torch.where(torch.rand(N, generator=g) < 0.6, logits.argmax(1), target)
    return logits, target


@pytest.mark.parametrize("n_bins", [1, 5, 15, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_ece_mce_match_plain_loop(n_bins, seed):
    logits, target = random_probs(seed=seed)
    probs = logits.softmax(1)
    ece, mce = plain_ece_mce(probs, target, n_bins)
    assert expected_calibration_error(probs, target, n_bins) == pytest.approx(ece, abs=1e-12)
    assert maximum_calibration_error(probs, target, n_bins) == pytest.approx(mce, abs=1e-12)


def test_hand_computed_case_and_bin_edges():
    # 4 bins of width 0.25; confidences on the edges go to the bin below: (lo, hi]
    conf = torch.tensor([0.25, 0.5, 0.5, 0.75, 1.0, 0.9])
    pred = torch.tensor([0, 1, 1, 2, 3, 3])
    target = torch.tensor([0, 1, 0, 0, 3, 3])
    b = calibration_bins(confidence=conf, prediction=pred, target=target, n_bins=4)
    assert b.count.tolist() == [1, 2, 1, 2]
    assert b.accuracy.tolist() == [1.0, 0.5, 0.0, 1.0]
    torch.testing.assert_close(
        b.confidence, torch.tensor([0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    )
    # ECE = (1·0.75 + 2·0 + 1·0.75 + 2·0.05) / 6 ; MCE = 0.75
    ece = expected_calibration_error(confidence=conf, prediction=pred, target=target, n_bins=4)
    assert ece == pytest.approx((0.75 + 0.75 + 0.1) / 6, abs=1e-7)
    assert maximum_calibration_error(
        confidence=conf, prediction=pred, target=target, n_bins=4
    ) == pytest.approx(0.75, abs=1e-7)


def test_perfectly_calibrated_and_overconfident():
    # all in one bin, confidence 0.8, 80% right: ECE 0
    conf = torch.full((10,), 0.8)
    pred = torch.zeros(10, dtype=torch.long)
    target = torch.tensor([0] * 8 + [1] * 2)
    assert expected_calibration_error(
        confidence=conf, prediction=pred, target=target
    ) == pytest.approx(0.0, abs=1e-7)
    # confidence 1 and 50% right: ECE = MCE = 0.5
    conf = torch.ones(10)
    target = torch.tensor([0, 1] * 5)
    assert expected_calibration_error(confidence=conf, prediction=pred, target=target) == 0.5
    assert maximum_calibration_error(confidence=conf, prediction=pred, target=target) == 0.5


def test_stats_path_equals_softmax_path():
    """ECE from ``return_stats`` (no N×C softmax) equals ECE from explicit probabilities."""
    logits, target = random_probs(N=300, C=12, seed=2)
    x = logits.float()
    _, stats = fused_ls.label_smoothing_cross_entropy(x, target, 0.1, return_stats=True)
    probs = x.double().softmax(1)
    a = expected_calibration_error(probs, target)
    b = expected_calibration_error(stats, target)
    c = expected_calibration_error(
        confidence=stats.confidence, prediction=stats.prediction, target=target
    )
    assert a == pytest.approx(b, abs=1e-6) and b == c
    assert maximum_calibration_error(probs, target) == pytest.approx(
        maximum_calibration_error(stats, target), abs=1e-5
    )


def test_ignore_index_and_class_dim_1():
    logits, target = random_probs(N=60, C=5, seed=3)
    probs = logits.softmax(1)
    t = target.clone()
    t[::4] = -100
    keep = t != -100
    ref = expected_calibration_error(probs[keep], t[keep])
    assert expected_calibration_error(probs, t, ignore_index=-100) == pytest.approx(ref, abs=1e-12)
    # [N, C, L] layout (class dim 1), as for sequence models
    p3 = probs.reshape(6, 10, 5).transpose(1, 2)  # [6, 5, 10]
    t3 = target.reshape(6, 10)
    assert expected_calibration_error(p3, t3) == pytest.approx(
        expected_calibration_error(probs, target), abs=1e-12
    )


def test_empty_input_gives_nan():
    t = torch.full((3,), -100)
    p = torch.full((3, 4), 0.25)
    assert math.isnan(expected_calibration_error(p, t, ignore_index=-100))
    assert math.isnan(maximum_calibration_error(p, t, ignore_index=-100))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(probs=torch.randn(5, 3)), "in \\[0, 1\\]|sum to 1"),
        (dict(probs=torch.full((5, 3), 0.2)), "sum to 1"),
        (dict(probs=torch.full((4, 3), 1 / 3)), "does not match"),
        (dict(probs=torch.full((5,), 0.2)), "\\[N, C\\]"),
        (dict(confidence=torch.rand(5)), "confidence= and prediction="),
        (
            dict(confidence=torch.rand(5) + 1, prediction=torch.zeros(5, dtype=torch.long)),
            "confidence must lie",
        ),
        (
            dict(confidence=torch.rand(4), prediction=torch.zeros(4, dtype=torch.long)),
            "target's shape",
        ),
        (dict(probs=torch.full((5, 3), 1 / 3), confidence=torch.rand(5)), "not both"),
    ],
)
def test_bad_input_raises_clearly(bad, match):
    target = torch.zeros(5, dtype=torch.long)
    probs = bad.pop("probs", None)
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(probs, target, **bad)


def test_bad_target_and_bins():
    p = torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="integer"):
        expected_calibration_error(p, torch.zeros(2))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(p, torch.zeros(2, dtype=torch.long), n_bins=0)


def test_reliability_diagram_writes_png(tmp_path):
    logits, target = random_probs(N=200, seed=4)
    path = tmp_path / "rel.png"
    fig = reliability_diagram(logits.softmax(1), target, n_bins=10, path=path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ece = expected_calibration_error(logits.softmax(1), target, 10)
    assert f"ECE {100 * ece:.2f}%" in fig.axes[0].get_title()
    # drawing into given axes
    from matplotlib.figure import Figure

    f2 = Figure()
    ax = f2.subplots()
    assert reliability_diagram(logits.softmax(1), target, ax=ax) is f2


# ----------------------------------------------------------------------- example scripts (smoke)

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"


def _load_example(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoothing_table_script(tmp_path, capsys):
    mod = _load_example("smoothing_table")
    png = tmp_path / "targets.png"
    rows = mod.main(["--classes", "8", "--out", str(png)])
    C = 8
    for r in rows:
        e = r["eps"]
        assert r["target"] == pytest.approx(1 - e + e / C)
        assert r["other"] == pytest.approx(e / C)
        assert r["sum"] == pytest.approx(1.0)
        if e > 0:
            assert r["gap"] == pytest.approx(math.log((1 - e + e / C) / (e / C)))
            q = torch.full((C,), e / C, dtype=torch.float64)
            q[0] += 1 - e
            # the minimum of the smoothed loss is H(q), reached by logits log q
            loss = torch.nn.functional.cross_entropy(
                q.log()[None], torch.tensor([0]), label_smoothing=e
            )
            assert r["entropy"] == pytest.approx(float(loss), abs=1e-9)
    out = capsys.readouterr().out
    assert "| 0.10 | 0.9125 | 0.0125 |" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_calibration_experiment_tiny_budget(tmp_path, capsys):
    mod = _load_example("calibration_experiment")
    threads = torch.get_num_threads()
    results = mod.main(
        [
            "--seeds",
            "1",
            "--epochs",
            "2",
            "--noise",
            "0.2",
            "--out",
            str(tmp_path),
            "--threads",
            str(threads),
        ]
    )
    assert set(results) == set(mod.METHODS)
    for m, r in results.items():
        # 2 epochs already reach ~80% on digits; far less means the loss does not train
        assert 0.3 < r["acc"][0] <= 1.0 and r["nll"][0] > 0 and 0 <= r["ece"][0] <= 1, (m, r)
    out = capsys.readouterr().out
    assert "| similarity |" in out and "mean ± std over 1 seeds" in out
    for name in ["reliability.png", "curves.png", "reliability_adaptive.png", "results.md"]:
        assert (tmp_path / name).stat().st_size > 0
