"""Smoothing schedules and the scheduler: values, the criterion it drives (the loss then equals
PyTorch's ``label_smoothing`` at the scheduled ε, gradients included), state_dict round trips."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fused_ls
from fused_ls.schedules import (
    SmoothingScheduler,
    constant_smoothing,
    cosine_decay_smoothing,
    linear_decay_smoothing,
    off_switch_smoothing,
    warmup_smoothing,
)


def test_warmup_values():
    # 10 epochs, 20% warm-up: 2 epochs from 0.05 to 0.1, then 0.1
    vals = [warmup_smoothing(e, 10) for e in range(12)]
    assert vals[0] == pytest.approx(0.05)
    assert vals[1] == pytest.approx(0.075)
    assert all(v == pytest.approx(0.1) for v in vals[2:])
    assert warmup_smoothing(0.5, 10) == pytest.approx(0.0625)  # fractional epochs (per step)
    assert warmup_smoothing(3, 10, start=0.0, end=0.2, warmup_frac=0.0) == 0.2
    assert warmup_smoothing(5, 10, start=0.3, end=0.1, warmup_frac=1.0) == pytest.approx(0.2)


def test_decay_and_off_switch_values():
    assert linear_decay_smoothing(0, 4) == pytest.approx(0.1)
    assert linear_decay_smoothing(1, 4) == pytest.approx(0.075)
    assert linear_decay_smoothing(4, 4) == pytest.approx(0.0)
    assert linear_decay_smoothing(9, 4) == pytest.approx(0.0)  # past the end: the end value
    assert cosine_decay_smoothing(0, 10, 0.2, 0.0) == pytest.approx(0.2)
    assert cosine_decay_smoothing(5, 10, 0.2, 0.0) == pytest.approx(0.1)
    assert cosine_decay_smoothing(10, 10, 0.2, 0.05) == pytest.approx(0.05)
    for e in range(10):
        t = e / 10
        assert cosine_decay_smoothing(e, 10, 0.2, 0.0) == pytest.approx(
            0.1 * (1 + math.cos(math.pi * t))
        )
    assert [off_switch_smoothing(e, 10, 0.1, 0.5) for e in range(10)] == [0.1] * 5 + [0.0] * 5
    assert constant_smoothing(3, 10, 0.25) == 0.25


@pytest.mark.parametrize(
    "call",
    [
        lambda: warmup_smoothing(-1, 10),
        lambda: warmup_smoothing(1, 0),
        lambda: warmup_smoothing(1, 10, start=1.5),
        lambda: warmup_smoothing(1, 10, warmup_frac=-0.1),
        lambda: off_switch_smoothing(1, 10, off_frac=2),
        lambda: linear_decay_smoothing(float("nan"), 10),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_scheduler_drives_the_criterion_and_the_loss():
    """Each epoch's loss (and gradient) is PyTorch's label_smoothing loss at the scheduled ε."""
    crit = fused_ls.FusedLabelSmoothingCE()
    sched = SmoothingScheduler(crit, "warmup", total=5, start=0.0, end=0.2, warmup_frac=0.4)
    expected = [0.0, 0.1, 0.2, 0.2, 0.2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (16,), generator=g)
    for epoch in range(5):
        assert crit.smoothing == pytest.approx(expected[epoch])
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        la = crit(xa, y)
        lb = F.cross_entropy(xb, y, label_smoothing=expected[epoch])
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
        assert sched.step() == crit.smoothing


def test_scheduler_per_step_and_jump():
    crit = fused_ls.FusedLabelSmoothingCE(smoothing=0.3)
    sched = SmoothingScheduler(crit, "off_switch", total=100, smoothing=0.1, off_frac=0.7)
    assert crit.smoothing == 0.1  # construction applies step 0
    for _ in range(69):
        sched.step()
    assert crit.smoothing == 0.1
    sched.step()
    assert crit.smoothing == 0.0
    sched.step(10)
    assert crit.smoothing == 0.1 and sched.last_step == 10


def test_scheduler_state_dict_round_trip():
    a = fused_ls.FusedLabelSmoothingCE()
    s1 = SmoothingScheduler(a, "cosine_decay", total=20, start=0.3, end=0.0)
    for _ in range(7):
        s1.step()
    state = s1.state_dict()
    b = fused_ls.FusedLabelSmoothingCE()
    s2 = SmoothingScheduler(b, "cosine_decay", total=20, start=0.3, end=0.0)
    s2.load_state_dict(state)
    assert b.smoothing == a.smoothing == pytest.approx(cosine_decay_smoothing(7, 20, 0.3, 0.0))
    s1.step()
    s2.step()
    assert a.smoothing == b.smoothing
    with pytest.raises(ValueError, match="schedule"):
        SmoothingScheduler(b, "warmup", total=20).load_state_dict(state)


def test_scheduler_with_callable_and_errors():
    crit = fused_ls.FusedLabelSmoothingCE()
    sched = SmoothingScheduler(crit, lambda step, total: 0.01 * step, total=10)
    sched.step()
    sched.step()
    assert crit.smoothing == pytest.approx(0.02)
    bad = SmoothingScheduler(crit, lambda step, total: 0.6 * step, total=10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bad.step(2)
    with pytest.raises(ValueError, match="unknown schedule"):
        SmoothingScheduler(crit, "nope", total=3)
    with pytest.raises(TypeError, match="smoothing"):
        SmoothingScheduler(torch.nn.Linear(2, 2), total=3)
    with pytest.raises(ValueError, match="total"):
        SmoothingScheduler(crit, total=0)
