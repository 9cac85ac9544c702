"""The headline (``make bench``): what fused_ls gains, in a few minutes on a 2-core CPU.

    python benchmarks/headline.py [--device cpu] [--rounds 5] [--out bench_out]

Three measurements, each printed as soon as it is measured (progress lines on stderr), with the
backend that ``backend="auto"`` picks:

(a) the loss at one LM size (CPU: 4096 × 32000 fp32; CUDA: 16384 × 128256 bf16), ``bench.run_loss``:
    fused_ls forward+backward with a fresh gradient buffer and with ``inplace_backward=True``,
    and the forward alone under ``torch.no_grad()``, against eager
    ``F.cross_entropy(label_smoothing=0.1)``, ``torch.compile`` of it and the memory floors
    measured in the same run (a copy of the logits into an existing buffer: one read + one
    write; a read of them: ``x.sum()``); the variants take turns round by round, and the minimum
    of ``--rounds`` rounds is reported (the median beside it);
(b) the fixed cost per call at one classifier size (256 × 1000 fp32, forward+backward:
    time and ops dispatched per call against ``F.cross_entropy``), ``bench_overhead.call_costs``;
(c) the fused LM head at one size (CPU: 4096 × 128 × 32000 fp32; CUDA: 16384 × 4096 × 128256
    bf16) against the three matmuls, eager and ``torch.compile``: time and extra memory,
    ``bench_linear.run_config``.

The markdown is kept in ``<out>/headline.md``; the rows are appended to ``<out>/bench.csv``,
``overhead.csv`` and ``linear.csv`` (the same files as the full sweep, ``make bench-full``), each
row with the machine, the versions, the timestamp and the command line.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench  # noqa: E402
import bench_linear  # noqa: E402
import bench_overhead  # noqa: E402
from common import (  # noqa: E402
    Progress,
    Report,
    append_csv,
    header,
    load_average,
    mmap_large_allocations,
)

from fused_ls.backends import Request, is_small, resolve  # noqa: E402

SIZES = {
    "cpu": {"loss": "4096x32000:fp32", "classifier": (256, 1000), "head": "4096x128x32000:fp32"},
    "cuda": {
        "loss": "16384x128256:bf16",
        "classifier": (256, 1000),
        "head": "16384x4096x128256:bf16",
    },
}
CLASSIFIER_ROUNDS = 100


def auto_backend(device: torch.device, dtype: torch.dtype, n_logits: int) -> str:
    """The backend ``backend="auto"`` picks for uniform smoothing at this size."""
    return resolve("auto", Request(device.type, dtype, False, False, is_small(device, n_logits)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of (a) and (c) (≥ 5)")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    sizes = SIZES[device.type]
    report = Report(os.path.join(args.out, "headline.md"))
    report(header("fused_ls headline (make bench: benchmarks/headline.py)", device))
    clock = Progress()
    summary = []

    # (a) the loss at one LM size
    N, V, dtype, dt = bench.parse_config(sizes["loss"])
    b = auto_backend(device, dtype, N * V)
    rows, nbytes = bench.run_loss(
        N, V, dtype, device, args.rounds, [b], True, False, clock.sub(f"(a) loss {N}x{V} {dt}")
    )
    report(
        f"\n## (a) The loss: N = {N}, V = {V}, {dt} (logits: {nbytes / 2**20:.0f} MiB), "
        f"ε = {bench.EPS}, min of {args.rounds} interleaved rounds\n"
    )
    report(bench.loss_table(rows, device))
    append_csv(os.path.join(args.out, "bench.csv"), rows, device)
    get = {(r["method"], r["step"]): r for r in rows}
    fb, inpl, fwd = (get[(f"fused_ls[{b}]", bench.FB)], get[(f"fused_ls[{b}] inplace", bench.FB)],
                     get[(f"fused_ls[{b}]", bench.FWD)])  # fmt: skip
    summary.append(
        f"- loss {N} × {V} {dt}, `{b}`: forward+backward {fb['min_ms']:.1f} ms = "
        f"{fb['x_floor']:.2f} × copy, speed-up {fb['vs_eager']:.2f}× over eager and "
        f"{fb['vs_compile']:.2f}× over torch.compile; in place {inpl['min_ms']:.1f} ms "
        f"({inpl['x_floor']:.2f} × copy, extra memory {inpl['mem_x']:.2f} × logits vs eager's "
        f"{get[('torch eager', bench.FB)]['mem_x']:.2f}); forward {fwd['min_ms']:.1f} ms = "
        f"{fwd['x_floor']:.2f} × read, speed-up {fwd['vs_eager']:.2f}× over eager's forward"
    )

    # (b) the fixed cost at one classifier size
    N, C = sizes["classifier"]
    b = auto_backend(device, torch.float32, N * C)
    clock.sub("(b) fixed cost")(f"{N} × {C} fp32, {CLASSIFIER_ROUNDS} interleaved rounds")
    res = bench_overhead.call_costs(N, C, device, [b], CLASSIFIER_ROUNDS)
    report(
        f"\n## (b) The fixed cost per call: {N} × {C} fp32, forward+backward, min and median of "
        f"{CLASSIFIER_ROUNDS} interleaved rounds\n"
    )
    report("| N × C | statistic | F.cross_entropy | " + f"fused_ls `{b}` |")
    report("|---|---|---|---|")
    for stat in ("min", "median"):
        line, csv_rows = bench_overhead.size_rows(N, C, res, stat)  # (the same rows each time)
        report(line.replace(f"| {N} × {C} |", f"| {N} × {C} | {stat} |", 1))
    append_csv(os.path.join(args.out, "overhead.csv"), csv_rows, device)
    (tf, of), (tb, ob) = res["F.cross_entropy"], res[b]
    summary.append(
        f"- fixed cost {N} × {C} fp32, `{b}`: {tb.min * 1e3:.3f} ms vs {tf.min * 1e3:.3f} ms "
        f"for F.cross_entropy ({tb.min / tf.min:.2f}×; {ob} ops per call vs {of})"
    )

    # (c) the fused LM head at one size; glibc from now on mmaps every allocation ≥ 64 KiB, so
    # that the head's chunk-sized temporaries show in the peaks (as bench_linear.py; it would make
    # the small tensors of (b) pay page faults on every call, hence not before)
    mmap_large_allocations()
    spec = sizes["head"]
    rows = bench_linear.run_config(
        spec,
        device,
        args.rounds,
        report,
        with_compile=True,
        with_pt=False,
        stat="min",
        progress=clock.sub(f"(c) head {spec}"),
    )
    append_csv(os.path.join(args.out, "linear.csv"), rows, device)
    get = {r["method"]: r for r in rows}
    fl, ea = get["fused_ls"], get["eager"]
    floor, comp = get["3 matmuls"]["min_s"], get["torch.compile"]["min_s"]
    summary.append(
        f"- fused LM head {spec}: {fl['min_s'] * 1e3:.0f} ms = {fl['min_s'] / floor:.2f} × the "
        f"three matmuls, speed-up {ea['min_s'] / fl['min_s']:.2f}× over eager and "
        f"{comp / fl['min_s']:.2f}× over torch.compile; extra memory "
        f"{fl['extra_mem_x_logits']:.3f} × the logits (eager {ea['extra_mem_x_logits']:.2f})"
    )

    report("\n## Summary\n")
    for line in summary:
        report(line)
    report(
        f"\n{clock.elapsed():.0f} s in all; load average at the end (1/5/15 min): {load_average()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
