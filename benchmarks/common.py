"""What every benchmark shares: the machine, timing, peak memory, and the CSV and markdown outputs.

Used by ``headline.py`` (``make bench``), ``bench.py``, ``bench_overhead.py``, ``bench_linear.py``
(``make bench-full``), ``bench_parallel.py``, ``bench_transformers.py``, ``gpu_check.py`` and
``examples/train_causal_lm.py``; importing it does not import fused_ls.

- **Machine**: ``device_name`` (the GPU's name, or the CPU model and the thread count),
  ``versions`` (python, torch, fused_ls, triton, transformers: those importable),
  ``load_average``, ``utc_stamp``; ``serving_backends`` (the fused_ls backends that serve a
  device and dtype: the one function that imports fused_ls, when called).
- **Timing**: ``interleaved`` runs several variants in turn, round by round (so that the drift
  of a shared machine hits them alike), after untimed warm-up calls (``torch.compile``'s
  compilation among them), with an untimed ``setup`` per variant (e.g. restoring logits that an
  in-place backward overwrote); it returns a ``Timing`` (min, median, every round) per variant.
  On CUDA a call is timed by CUDA events, on the CPU by ``time.perf_counter``.
- **Memory**: ``peak_extra_bytes`` (CPU: peak resident set above the start, reset through
  ``/proc/self/clear_refs``; CUDA: the caching allocator's peak), with
  ``mmap_large_allocations`` so that freed heap pages cannot hide a temporary.
- **Outputs**: ``append_csv`` appends dict rows with the timestamp, device, versions and command
  line in every row; ``Report`` prints markdown as it is measured and keeps it in a ``.md``
  file; ``Progress`` prints ``[step | elapsed] what ...`` lines on stderr.
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import gc
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch


# ---- the machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    """Versions of python, torch, and of fused_ls, triton and transformers when installed (read
    from their metadata: nothing is imported)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("fused_ls", "triton", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def load_average() -> str:
    """The 1/5/15-minute load averages (what else ran on a shared machine), or '?'."""
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """The command that runs this process, as typed (relative script path)."""
    return "python " + shlex.join(sys.argv)


def serving_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """The fused_ls backends that can serve uniform smoothing (no similarity) on tensors of this
    device and dtype in this process, in ``fused_ls.BACKEND_NAMES`` order. (fused_ls is imported
    here, not at the top: importing this module does not import it.)"""
    import fused_ls
    from fused_ls.backends import Request, reasons_for

    req = Request(torch.device(device).type, dtype)
    return [b for b in fused_ls.BACKEND_NAMES if not reasons_for(b, req)]


# ---- timing ------------------------------------------------------------------------------------
class Timing(NamedTuple):
    """Seconds of one variant over the timed rounds."""

    min: float
    median: float
    runs: tuple[float, ...]


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function that runs ``fn()`` once and returns its seconds: CUDA events on CUDA (the
    device's time, synchronised), ``perf_counter`` on the CPU."""
    if device.type == "cuda":

        def run_cuda(fn) -> float:
            torch.cuda.synchronize(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3

        return run_cuda

    def run_cpu(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run_cpu


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    warmup: int = 1,
    setup: dict[str, Callable[[], object]] | None = None,
    collect: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """The ``Timing`` of each function over ``rounds`` rounds in which the functions take turns,
    after ``warmup`` untimed calls of each. ``setup[name]()`` runs untimed before every call of
    ``fns[name]``; ``collect``: a garbage-collection pass before each timed call; ``progress``
    is told the round being timed."""
    setup = setup or {}
    timer = _timer(device)
    for name, f in fns.items():
        for _ in range(warmup):
            if name in setup:
                setup[name]()
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        if progress:
            progress(f"round {r + 1}/{rounds}")
        for name, f in fns.items():
            if name in setup:
                setup[name]()
            if collect:
                gc.collect()
            times[name].append(timer(f))
    return {k: Timing(min(v), statistics.median(v), tuple(v)) for k, v in times.items()}


def timed(
    fn: Callable[[], object],
    device: torch.device,
    rounds: int,
    setup: Callable[[], object] | None = None,
    warmup: int = 1,
) -> Timing:
    """The ``Timing`` of one function (``interleaved`` with one variant)."""
    setups = {"fn": setup} if setup else None
    return interleaved({"fn": fn}, rounds, device, warmup, setup=setups)["fn"]


# ---- memory ------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def mmap_large_allocations(threshold: int = 1 << 16) -> None:
    """glibc: allocations ≥ threshold get their own mmap, returned to the OS when freed. Without
    this a call's temporaries can reuse heap pages an earlier call left resident, and the peak
    resident set does not see them (the fused head's chunk buffers measured 0)."""
    M_MMAP_THRESHOLD = -3
    try:
        ok = ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
    except OSError:
        ok = 0
    if not ok:
        warnings.warn(
            "mallopt unavailable (not glibc): freed heap pages may hide peaks", stacklevel=2
        )


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory above the start while fn() runs (CPU: resident set, with
    ``mmap_large_allocations`` in effect; CUDA: the caching allocator's peak)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


# ---- outputs -----------------------------------------------------------------------------------
def append_csv(path: str, rows: list[dict], device: torch.device) -> None:
    """Append ``rows`` (dicts with the same keys) to the CSV file ``path``, each row prefixed
    with the timestamp, the device, the versions and the command line. A file whose header
    differs (an older layout) is kept aside as ``<path>.<its mtime>.csv`` and a new one begun."""
    if not rows:
        return
    meta = {"timestamp": utc_stamp(), "device": device_name(device)}
    meta.update(versions())
    meta["command"] = command_line()
    header = list(meta) + [k for k in rows[0] if k not in meta]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        with open(path, newline="") as f:
            old = next(csv.reader(f), None)
        if old != header:
            mtime = time.strftime("%Y%m%dT%H%M%S", time.gmtime(os.path.getmtime(path)))
            aside = f"{os.path.splitext(path)[0]}.{mtime}.csv"
            os.replace(path, aside)
            print(f"(the CSV layout changed: the old {path} is kept as {aside})")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        if new:
            w.writeheader()
        w.writerows({**meta, **r} for r in rows)
    print(f"\n{len(rows)} rows appended to {path}", flush=True)


class Report:
    """Markdown printed as soon as it is measured, and kept in ``path`` (rewritten per run)."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w"):
                pass

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(text + "\n")


class Progress:
    """``[label | elapsed s] what ...`` lines on stderr, the clock started at construction."""

    def __init__(self, label: str = ""):
        self.t0 = time.perf_counter()
        self.label = label

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, what: str) -> None:
        tag = f"{self.label} | " if self.label else ""
        print(f"  [{tag}{self.elapsed():5.0f}s] {what} ...", file=sys.stderr, flush=True)

    def sub(self, label: str) -> Progress:
        """The same clock, another label."""
        p = Progress(label)
        p.t0 = self.t0
        return p


def header(title: str, device: torch.device) -> str:
    """The first lines of a benchmark's markdown: what, where, versions, load, when, command."""
    v = ", ".join(f"{k} {val}" for k, val in versions().items())
    return (
        f"# {title}\n\n"
        f"- machine: {device_name(device)}\n"
        f"- versions: {v}\n"
        f"- load average (1/5/15 min) at the start: {load_average()}\n"
        f"- date: {utc_stamp()}\n"
        f"- command: `{command_line()}`\n"
    )
