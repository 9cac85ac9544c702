"""The main benchmark (`make bench`): forward+backward of label-smoothed cross-entropy.

Compares every backend of fused_ls that can run on the device (and its in-place-backward
variant) with eager ``F.cross_entropy(label_smoothing=0.1)`` and ``torch.compile`` of it, and with
a plain copy of the logits (the memory floor: one read + one write of N×V elements, which is
what a fused forward+backward must at least do), into an existing buffer and as a clone. For
each (N, V, dtype) it reports

- the median time of forward+backward over ``--reps`` runs (after a warm-up run),
- the time as a multiple of a copy into an existing buffer, and on CUDA the bandwidth under the
  byte model "one read of the logits + one write of the gradient" against the measured copy
  bandwidth,
- the extra peak memory above what existed before the call, as a multiple of the logits' bytes
  (CPU: the process's peak resident set, reset through /proc/self/clear_refs; CUDA: the caching
  allocator's peak),
- the max error of the loss and of the gradient against F.cross_entropy in float64 (which the
  test suite shows equal to the dense reference for uniform smoothing).

It prints a markdown table, appends rows to ``bench_out/bench.csv`` (with device, versions and a
timestamp) and draws ``bench_out/bench.png``. The default grid finishes in about 3 minutes on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fused_ls  # noqa: E402
from fused_ls.backends import Request, reasons_for  # noqa: E402

EPS = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_GRID = {
    "cpu": ["4096x32000:fp32", "4096x32000:bf16", "1024x128256:fp32"],
    "cuda": ["16384x32000:bf16", "16384x32000:fp32", "16384x128256:bf16", "8192x128256:fp32"],
}


# ---------------------------------------------------------------------------------------------
# memory: the peak above the baseline while `fn` runs
# ---------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
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


def append_csv(path: str, header: list[str], rows: list) -> None:
    """Append rows (lists in header order) to a CSV file, writing the header when new."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerows(rows)
    print(f"\nrows appended to {path}")


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory above the start while fn() runs (CPU: resident set, with
    mmap_large_allocations in effect; CUDA: the caching allocator's peak)."""
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
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) * 1024


def timed(fn, device: torch.device, reps: int, setup=None) -> float:
    """Median wall time of fn() over `reps` runs after one warm-up; `setup` runs untimed."""
    times = []
    for i in range(reps + 1):
        if setup:
            setup()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(
    fns: dict, rounds: int, device: torch.device, warmup: int = 3, collect: bool = False
) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` rounds in which the functions take turns,
    after ``warmup`` untimed calls of each (torch.compile's compilation among them); ``collect``:
    a garbage-collection pass before each timed call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            if collect:
                gc.collect()
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------
# the contenders
# ---------------------------------------------------------------------------------------------
def methods(device: torch.device, dtype: torch.dtype, V: int, with_compile: bool):
    """(name, loss function, in-place?) for everything that can run here."""
    eager = lambda x, y: F.cross_entropy(x, y, label_smoothing=EPS)  # noqa: E731
    out = [("torch eager", eager, False)]
    if with_compile:
        out.append(("torch.compile", torch.compile(eager), False))
    req = Request(device.type, dtype, False, False)
    for b in fused_ls.BACKEND_NAMES:
        if reasons_for(b, req):
            continue

        def fused(x, y, b=b, inplace=False):
            return fused_ls.label_smoothing_cross_entropy(
                x, y, EPS, backend=b, inplace_backward=inplace
            )

        out.append((f"fused_ls:{b}", fused, False))
        out.append((f"fused_ls:{b} inplace", lambda x, y, f=fused: f(x, y, inplace=True), True))
    return out


def run_config(N, V, dtype, device, reps, with_compile, progress):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 2).to(device=device, dtype=dtype)
    target = torch.randint(0, V, (N,), generator=g).to(device)
    target[::97] = -100
    nbytes = logits.numel() * logits.element_size()

    # reference: F.cross_entropy in float64 (semantics identical for uniform smoothing)
    progress("reference (float64)")
    x64 = logits.double().requires_grad_(True)
    ref_loss = F.cross_entropy(x64, target, label_smoothing=EPS)
    ref_loss.backward()
    ref_grad = x64.grad.to(dtype)  # only the precision of the output dtype is meaningful
    ref_loss = ref_loss.detach()
    del x64
    gc.collect()

    rows = []
    progress("copy")
    # The floor: one read + one write of N×V elements into an existing buffer. A clone also pays
    # for fresh pages (on CPU the kernel's page faults and zeroing), as any fresh gradient does.
    dst = torch.empty_like(logits)
    dst.copy_(logits)
    copy_t = timed(lambda: dst.copy_(logits), device, reps)
    dst = None
    clone_t = timed(lambda: logits.clone(), device, reps)
    for name, t, mem in (
        ("copy into existing buffer", copy_t, 0.0),
        ("clone of logits", clone_t, 1.0),
    ):
        rows.append(
            dict(
                method=name,
                time_ms=t * 1e3,
                x_copy=t / copy_t,
                gbps=2 * nbytes / t / 1e9,
                pct_copy=100 * copy_t / t,
                mem_x=mem,
                loss_err=0.0,
                grad_err=0.0,
            )
        )

    for name, fn, inplace in methods(device, dtype, V, with_compile):
        progress(name)
        buf = logits.clone().requires_grad_(True)
        state = {}

        def setup():
            state.clear()
            if inplace:  # the previous run overwrote the logits with the gradient
                with torch.no_grad():
                    buf.copy_(logits)

        def step():
            # autograd.grad, not .backward(): it measures the loss's own forward+backward, with
            # no gradient accumulation into a .grad buffer (which would copy an aliasing grad)
            loss = fn(buf, target)
            (state["grad"],) = torch.autograd.grad(loss, buf)
            state["loss"] = loss.detach()

        t = timed(step, device, reps, setup)
        setup()
        mem = peak_extra_bytes(step, device)
        loss_err = (state["loss"].double() - ref_loss).abs().item()
        grad_err = (state["grad"].double() - ref_grad.double()).abs().max().item()
        rows.append(
            dict(
                method=name,
                time_ms=t * 1e3,
                x_copy=t / copy_t,
                gbps=2 * nbytes / t / 1e9,
                pct_copy=100 * copy_t / t,
                mem_x=mem / nbytes,
                loss_err=loss_err,
                grad_err=grad_err,
            )
        )
        state.clear()
        buf = None
        gc.collect()
    eager_t = next(r["time_ms"] for r in rows if r["method"] == "torch eager")
    for r in rows:
        r["speedup_vs_eager"] = eager_t / r["time_ms"]
    return rows, nbytes


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def plot(all_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in all_rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.9 + 0.45 * len(all_rows)))
    labels = [f"{r['config']}  {r['method']}" for r in all_rows]
    colors = [f"C{configs.index(r['config'])}" for r in all_rows]
    ys = range(len(all_rows))
    axes[0].barh(ys, [r["time_ms"] for r in all_rows], color=colors)
    axes[0].set_yticks(list(ys), labels, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("forward+backward time (ms, median)")
    axes[1].barh(ys, [r["mem_x"] for r in all_rows], color=colors)
    axes[1].set_yticks(list(ys), [""] * len(all_rows))
    axes[1].invert_yaxis()
    axes[1].set_xlabel("extra peak memory (× logits bytes)")
    fig.suptitle(f"fused_ls benchmark on {all_rows[0]['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--configs", nargs="*", help="NxV:dtype entries, e.g. 4096x32000:fp32")
    ap.add_argument("--reps", type=int, default=None, help="timed runs (default 3 CPU, 20 CUDA)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--out", default="bench_out", help="folder for the CSV and the PNG")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    reps = args.reps or (20 if device.type == "cuda" else 3)
    configs = args.configs or DEFAULT_GRID[device.type]
    os.makedirs(args.out, exist_ok=True)
    dev_name = device_name(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"# fused_ls benchmark — {dev_name}, torch {torch.__version__}, {stamp}")
    print(f"# backends: {fused_ls.available_backends()}")
    all_rows = []
    t_start = time.perf_counter()
    for ci, cfg in enumerate(configs):
        shape, dt = cfg.split(":")
        N, V = map(int, shape.split("x"))
        dtype = DTYPES[dt]

        def progress(what, ci=ci, cfg=cfg):
            el = time.perf_counter() - t_start
            print(
                f"  [{ci + 1}/{len(configs)} {cfg} | {el:5.0f}s] {what} ...",
                file=sys.stderr,
                flush=True,
            )

        rows, nbytes = run_config(N, V, dtype, device, reps, not args.no_compile, progress)
        print(f"\n### N={N}, V={V}, {dt} (logits: {nbytes / 2**20:.0f} MiB)\n")
        gb = device.type == "cuda"
        head = (
            "| method | time (ms) | vs eager | × copy | "
            + ("GB/s | % of copy | " if gb else "")
            + "extra peak mem (× logits) | loss err | grad err |"
        )
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for r in rows:
            r.update(
                config=f"{N}x{V}:{dt}", device=dev_name, torch=torch.__version__, timestamp=stamp
            )
            print(
                f"| {r['method']} | {r['time_ms']:.1f} | {r['speedup_vs_eager']:.2f}× | "
                f"{r['x_copy']:.2f} | "
                + (f"{r['gbps']:.0f} | {r['pct_copy']:.0f}% | " if gb else "")
                + f"{r['mem_x']:.2f} | {r['loss_err']:.1e} | {r['grad_err']:.1e} |"
            )
        all_rows.extend(rows)
    csv_path = os.path.join(args.out, "bench.csv")
    fields = [
        "timestamp",
        "device",
        "torch",
        "config",
        "method",
        "time_ms",
        "speedup_vs_eager",
        "x_copy",
        "gbps",
        "pct_copy",
        "mem_x",
        "loss_err",
        "grad_err",
    ]
    append_csv(csv_path, fields, [[r.get(k, "") for k in fields] for r in all_rows])
    png = os.path.join(args.out, "bench.png")
    plot(all_rows, png)
    print(f"\nwrote {csv_path} and {png} in {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
