"""Smoothing schedules: ε as a function of training progress, and a scheduler that applies one to
a ``FusedLabelSmoothingCE`` (or anything with a ``smoothing`` attribute).

Every schedule is a plain function ``f(epoch, max_epochs, ...) -> ε`` of the progress
``t = epoch / max_epochs`` (``epoch`` may be fractional, e.g. ``step / steps_per_epoch``, and
may run past ``max_epochs``: the value at ``t = 1`` is kept):

- ``warmup_smoothing``: linear ramp from ``start`` to ``end`` over the first ``warmup_frac`` of
  training, then constant ``end``.
- ``linear_decay_smoothing`` / ``cosine_decay_smoothing``: from ``start`` at t = 0 to ``end`` at
  t = 1.
- ``off_switch_smoothing``: ``smoothing`` until ``off_frac`` of training, then 0 (two-stage label
  smoothing, Xu et al. 2020, "Towards Understanding Label Smoothing").
- ``constant_smoothing``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "SCHEDULES",
    "SmoothingScheduler",
    "constant_smoothing",
    "cosine_decay_smoothing",
    "linear_decay_smoothing",
    "off_switch_smoothing",
    "warmup_smoothing",
]


def _real(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _eps(name: str, v) -> float:
    v = _real(name, v)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    return v


def _progress(epoch, max_epochs) -> float:
    epoch, max_epochs = _real("epoch", epoch), _real("max_epochs", max_epochs)
    if max_epochs <= 0:
        raise ValueError(f"max_epochs must be > 0, got {max_epochs!r}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch!r}")
    return min(epoch / max_epochs, 1.0)


def constant_smoothing(epoch: float, max_epochs: float, smoothing: float = 0.1) -> float:
    """ε = ``smoothing`` throughout."""
    _progress(epoch, max_epochs)
    return _eps("smoothing", smoothing)


def warmup_smoothing(
    epoch: float, max_epochs: float, start: float = 0.05, end: float = 0.1, warmup_frac: float = 0.2
) -> float:
    """Linear warm-up of ε from ``start`` (at epoch 0) to ``end`` (at ``warmup_frac·max_epochs``),
    then constant ``end``. ``warmup_frac = 0`` gives ``end`` from the start."""
    t = _progress(epoch, max_epochs)
    start, end = _eps("start", start), _eps("end", end)
    warmup_frac = _eps("warmup_frac", warmup_frac)
    if warmup_frac == 0.0 or t >= warmup_frac:
        return end
    return start + (end - start) * (t / warmup_frac)


def linear_decay_smoothing(
    epoch: float, max_epochs: float, start: float = 0.1, end: float = 0.0
) -> float:
    """ε falls linearly from ``start`` at epoch 0 to ``end`` at ``max_epochs``."""
    t = _progress(epoch, max_epochs)
    start, end = _eps("start", start), _eps("end", end)
    return start + (end - start) * t


def cosine_decay_smoothing(
    epoch: float, max_epochs: float, start: float = 0.1, end: float = 0.0
) -> float:
    """ε follows a half cosine from ``start`` at epoch 0 to ``end`` at ``max_epochs``."""
    t = _progress(epoch, max_epochs)
    start, end = _eps("start", start), _eps("end", end)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def off_switch_smoothing(
    epoch: float, max_epochs: float, smoothing: float = 0.1, off_frac: float = 0.5
) -> float:
    """ε = ``smoothing`` while ``epoch < off_frac·max_epochs``, then 0 (two-stage smoothing)."""
    t = _progress(epoch, max_epochs)
    smoothing, off_frac = _eps("smoothing", smoothing), _eps("off_frac", off_frac)
    return smoothing if t < off_frac else 0.0


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant_smoothing,
    "warmup": warmup_smoothing,
    "linear_decay": linear_decay_smoothing,
    "cosine_decay": cosine_decay_smoothing,
    "off_switch": off_switch_smoothing,
}


class SmoothingScheduler:
    """Sets ``criterion.smoothing`` from a schedule, like a learning-rate scheduler.

    Args:
        criterion: a ``FusedLabelSmoothingCE`` (anything with a float ``smoothing`` attribute).
        schedule: a name in ``SCHEDULES`` ("warmup", "linear_decay", "cosine_decay",
            "off_switch", "constant") or a callable ``f(step, total, **kwargs) -> ε``.
        total: the length of training in units of ``step()`` calls: epochs if you call
            ``step()`` once per epoch, iterations if once per batch.
        **kwargs: the schedule's own parameters (e.g. ``start=0.05, end=0.1, warmup_frac=0.2``).

    Construction sets ε = f(0, total); each ``step()`` advances the counter by one (or sets it to
    ``step(epoch)``) and sets ε = f(counter, total). Typical use::

        crit = FusedLabelSmoothingCE()
        sched = SmoothingScheduler(crit, "warmup", total=epochs, start=0.0, end=0.1)
        for epoch in range(epochs):
            train_one_epoch(model, crit)   # uses ε = warmup_smoothing(epoch, epochs, 0.0, 0.1)
            sched.step()

    ``state_dict()`` / ``load_state_dict()`` save and restore the counter (and, for named
    schedules, the name, total and parameters) for checkpoint resumption.
    """

    def __init__(
        self,
        criterion: Any,
        schedule: str | Callable[..., float] = "warmup",
        *,
        total: float,
        **kwargs,
    ):
        if not hasattr(criterion, "smoothing"):
            raise TypeError(
                f"criterion must have a 'smoothing' attribute, got {type(criterion).__name__}"
            )
        if isinstance(schedule, str):
            if schedule not in SCHEDULES:
                raise ValueError(f"unknown schedule {schedule!r}; choose from {sorted(SCHEDULES)}")
            self.name: str | None = schedule
            self.fn = SCHEDULES[schedule]
        elif callable(schedule):
            self.name, self.fn = None, schedule
        else:
            raise TypeError(f"schedule must be a name or a callable, got {type(schedule).__name__}")
        self.criterion = criterion
        self.total = _real("total", total)
        if self.total <= 0:
            raise ValueError(f"total must be > 0, got {total!r}")
        self.kwargs = dict(kwargs)
        self.last_step = 0.0
        self._apply()

    def get_smoothing(self, step: float | None = None) -> float:
        """ε at ``step`` (default: the current counter), validated to lie in [0, 1]."""
        v = self.fn(self.last_step if step is None else step, self.total, **self.kwargs)
        return _eps("the schedule's value", v)

    def _apply(self) -> None:
        self.criterion.smoothing = self.get_smoothing()

    def step(self, epoch: float | None = None) -> float:
        """Advance by one (or jump to ``epoch``), set the criterion's ε and return it."""
        self.last_step = self.last_step + 1 if epoch is None else _real("epoch", epoch)
        self._apply()
        return self.criterion.smoothing

    def state_dict(self) -> dict:
        return {
            "last_step": self.last_step,
            "total": self.total,
            "name": self.name,
            "kwargs": dict(self.kwargs),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") is not None and state["name"] != self.name:
            raise ValueError(
                f"state is for schedule {state['name']!r}, this scheduler runs {self.name!r}"
            )
        self.total = _real("total", state["total"])
        self.kwargs = dict(state.get("kwargs", self.kwargs))
        self.last_step = _real("last_step", state["last_step"])
        self._apply()

    def __repr__(self) -> str:
        what = self.name or getattr(self.fn, "__name__", "callable")
        return (
            f"SmoothingScheduler({what}, total={self.total}, step={self.last_step}, "
            f"smoothing={self.criterion.smoothing})"
        )
