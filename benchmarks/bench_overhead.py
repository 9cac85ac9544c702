"""The op's fixed cost: forward+backward time at classifier sizes, against F.cross_entropy.

    python benchmarks/bench_overhead.py [--device cpu] [--rounds 200] [--out bench_out]

Two tables, each the median over interleaved rounds (``common.interleaved``: every variant runs
once per round, in turn, so that drift of a shared machine hits them alike; ``--rounds`` at
256×100, fewer at larger sizes):

1. uniform smoothing (ε = 0.1) at 64×10, 256×100, 256×1000, 1024×1000 and 8192×1000 for every
   backend that serves the device, as time and as a ratio to F.cross_entropy(label_smoothing=0.1)
   in the same rounds;
2. every mode at 256×100 (weights, dense and sparse similarity, per-sample and adaptive ε,
   z-loss, softcap, confidence penalty, mixup), as the ratio to the same uniform
   F.cross_entropy, for every backend.

Beside each, the number of op dispatches per forward+backward call, counted with the torch
profiler: events named ``aten::*`` or ``fused_ls::*`` (nested ones included: an op that calls
another counts twice; the autograd engine's own events do not count). On CUDA these are the
kernel launches' upper bound. The markdown is kept in ``<out>/overhead.md`` and the rows are
appended to ``<out>/overhead.csv`` with the machine and versions. ``make bench`` (``headline.py``)
runs the 256×1000 row (``call_costs``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import (  # noqa: E402
    Report,
    Timing,
    append_csv,
    header,
    interleaved,
    serving_backends,
)

import fused_ls  # noqa: E402
from fused_ls import ConfidenceAdaptive, SparseSimilarity  # noqa: E402

EPS = 0.1
SIZES = [(64, 10), (256, 100), (256, 1000), (1024, 1000), (8192, 1000)]
MODE_SIZE = (256, 100)


def modes(C: int, N: int, device, dense: bool = True) -> dict[str, dict]:
    """Keywords of every smoothing mode for C classes and N rows (also used by bench_linear.py);
    dense similarity ([C, C]) only when ``dense``, else the sparse neighbours are drawn directly."""
    g = torch.Generator().manual_seed(0)
    out = {
        "uniform": {},
        "class weights": {"weight": (torch.rand(C, generator=g) + 0.5).to(device)},
    }
    if dense:
        S = torch.rand(C, C, generator=g)
        out["dense similarity"] = {"similarity": S.to(device), "similarity_mix": 0.5}
        sparse = SparseSimilarity.from_dense(S, 8)
    else:
        idx = torch.randint(0, C, (C, 8), generator=g)
        sparse = SparseSimilarity(idx, torch.rand(C, 8, generator=g) + 0.1)
    out["sparse similarity (k=8)"] = {"similarity": sparse.to(device), "similarity_mix": 0.5}
    out.update(
        {
            "per-sample ε": {"smoothing": (torch.rand(N, generator=g) * 0.2).to(device)},
            "adaptive ε": {"adaptive": ConfidenceAdaptive(0.5, 2.0)},
            "z-loss": {"z_loss": 1e-4},
            "softcap": {"softcap": 30.0},
            "confidence penalty": {"confidence_penalty": 0.1},
            "mixup": {
                "mix_target": torch.randint(0, C, (N,), generator=g).to(device),
                "mix_lambda": 0.7,
            },
        }
    )
    return out


def step_fn(x, y, backend: str | None, kw: dict):
    """One forward+backward; backend None is F.cross_entropy."""
    if backend is None:

        def step():
            x.grad = None
            F.cross_entropy(x, y, label_smoothing=EPS).backward()

    else:
        kw = dict(kw)
        eps = kw.pop("smoothing", EPS)

        def step():
            x.grad = None
            fused_ls.label_smoothing_cross_entropy(x, y, eps, backend=backend, **kw).backward()

    return step


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native code prints two lines per session on file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def op_count(fn) -> int:
    fn()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith(("aten::", "fused_ls::")))


def call_costs(
    N: int, C: int, dev, names: list[str], rounds: int, kw: dict | None = None, seed: int = 1
) -> dict[str, tuple[Timing, int]]:
    """{"F.cross_entropy" or backend: (Timing, ops per call)} of one forward+backward at N × C,
    interleaved over ``rounds`` rounds: F.cross_entropy with uniform ε, each backend with the
    keywords ``kw`` of a mode (default: uniform ε); the logits and targets drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(dev).requires_grad_(True)
    y = torch.randint(0, C, (N,), generator=g).to(dev)
    fns = {"F.cross_entropy": step_fn(x, y, None, {})}
    fns.update({b: step_fn(x, y, b, kw or {}) for b in names})
    t = interleaved(fns, rounds, dev, warmup=3)
    return {k: (t[k], op_count(f)) for k, f in fns.items()}


def csv_row(mode: str, N: int, C: int, method: str, t: Timing, ops: int) -> dict:
    return dict(mode=mode, N=N, C=C, method=method, min_s=t.min, median_s=t.median,
                rounds=len(t.runs), ops_per_call=ops)  # fmt: skip


def size_rows(N: int, C: int, res: dict, stat: str) -> tuple[str, list[dict]]:
    """A markdown table row of ``call_costs``'s result for uniform ε (``stat``: "min" or
    "median") and the CSV rows."""
    base = getattr(res["F.cross_entropy"][0], stat)
    cells = [f"{base * 1e3:.3f} ms ({res['F.cross_entropy'][1]} ops)"]
    rows = []
    for name, (t, ops) in res.items():
        v = getattr(t, stat)
        if name != "F.cross_entropy":
            cells.append(f"{v * 1e3:.3f} ms ({v / base:.2f}×, {ops} ops)")
        rows.append(csv_row("uniform", N, C, name, t, ops))
    return f"| {N} × {C} | " + " | ".join(cells) + " |", rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    dev = torch.device(args.device)
    names = serving_backends(dev, torch.float32)
    report = Report(os.path.join(args.out, "overhead.md"))
    report(header("fused_ls: the fixed cost per call (benchmarks/bench_overhead.py)", dev))
    rows = []

    report("## uniform ε = 0.1, forward+backward (median of interleaved rounds)\n")
    report("| N × C | F.cross_entropy | " + " | ".join(f"`{b}`" for b in names) + " |")
    report("|" + "---|" * (2 + len(names)))
    for N, C in SIZES:
        rounds = max(5, args.rounds * 256 * 100 // max(N * C, 256 * 100))
        line, r = size_rows(N, C, call_costs(N, C, dev, names, rounds), "median")
        report(line)
        rows += r

    N, C = MODE_SIZE
    report(f"\n## every mode at {N} × {C}: time / uniform F.cross_entropy (ops per call)\n")
    report("| mode | " + " | ".join(f"`{b}`" for b in names) + " |")
    report("|" + "---|" * (1 + len(names)))
    for mode, kw in modes(C, N, dev).items():
        res = call_costs(N, C, dev, names, args.rounds, kw, seed=2)
        base = res["F.cross_entropy"][0].median
        cells = []
        for b in names:
            t, n_ops = res[b]
            cells.append(f"{t.median / base:.2f}× ({n_ops})")
            rows.append(csv_row(mode, N, C, b, t, n_ops))
        report(f"| {mode} | " + " | ".join(cells) + " |")

    append_csv(os.path.join(args.out, "overhead.csv"), rows, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
