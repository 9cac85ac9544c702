"""The fused LM head: forward+backward of the linear layer plus label-smoothed cross-entropy.

    python benchmarks/bench_linear.py [--device cpu] [--rounds 3] [--configs 4096x128x32000:fp32]

For each (N, H, V, dtype) it runs, interleaved over ``--rounds`` rounds after a warm-up
(``common.interleaved``, a garbage-collection pass before each call), the forward+backward
(gradients for the input and the weight) of

- ``3 matmuls``: X·Wᵀ, G·W and Gᵀ·X at full size (the floor: what any method must compute),
- ``eager``: ``F.cross_entropy(F.linear(x, W), y, label_smoothing=0.1)``,
- ``torch.compile`` of the same,
- ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()`` at ε = 0.1 (PyTorch's chunked
  path requires ε = 0: it warns and falls back to the full logits) and at ε = 0 (its chunked
  path runs; another loss, shown as the memory reference of a chunked head),
- ``fused_ls``: ``linear_label_smoothing_cross_entropy(x, W, y, 0.1)``,

and reports the median time, the time over the 3 matmuls and over torch.compile, and the extra
peak memory beyond the inputs and their gradients (peak resident set above the start, minus the
gradients' bytes; CUDA: the caching allocator's peak) as a multiple of the N×V fp32 logits. The
first configuration also times every smoothing mode of fused_ls against its uniform mode (dense
[V, V] similarity is left out: at V = 32000 it is 4 GB; sparse similarity is the LM form).
The markdown is kept in ``<out>/linear.md`` and the rows are appended to ``<out>/linear.csv`` with
the machine and versions. ``make bench`` (``headline.py``) runs 4096×128×32000 fp32 against the
three matmuls, eager and ``torch.compile`` (``run_config``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_overhead import modes  # noqa: E402
from common import (  # noqa: E402
    Progress,
    Report,
    append_csv,
    header,
    interleaved,
    mmap_large_allocations,
    peak_extra_bytes,
)

import fused_ls  # noqa: E402

EPS = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT = {
    "cpu": [
        "4096x128x32000:fp32",
        "4096x512x32000:fp32",
        "1024x512x128256:fp32",
        "4096x128x32000:bf16",
        "4096x512x32000:bf16",
        "1024x512x128256:bf16",
    ],
    "cuda": ["16384x4096x128256:bf16", "8192x4096x128256:fp32"],
}


def parse(spec: str):
    shape, dt = spec.split(":")
    N, H, V = (int(v) for v in shape.split("x"))
    return N, H, V, DTYPES[dt]


def contenders(y, with_compile: bool, with_pt: bool, backend: str):
    def eager(x, w):
        return F.cross_entropy(F.linear(x, w), y, label_smoothing=EPS)

    out = {"eager": eager}
    if with_compile:
        out["torch.compile"] = torch.compile(eager)
    if with_pt:
        opts = torch.nn.LinearCrossEntropyOptions()

        def pt_chunked(eps):
            def f(x, w):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return F.linear_cross_entropy(x, w, y, label_smoothing=eps, options=opts)

            return f

        out["F.linear_cross_entropy ε=0.1"] = pt_chunked(EPS)
        out["F.linear_cross_entropy ε=0 (chunked)"] = pt_chunked(0.0)
    out["fused_ls"] = lambda x, w: fused_ls.linear_label_smoothing_cross_entropy(
        x, w, y, EPS, backend=backend
    )
    return out


def fwd_bwd(fn, x, w):
    def run():
        xs = x.detach().requires_grad_(True)
        ws = w.detach().requires_grad_(True)
        fn(xs, ws).backward()
        return xs.grad, ws.grad

    return run


def three_matmuls(x, w):
    def run():
        logits = x @ w.t()
        dx = logits @ w
        dw = logits.t() @ x
        return dx, dw

    return run


def run_config(
    spec: str,
    device: torch.device,
    rounds: int,
    report,
    with_compile: bool = True,
    with_pt: bool = True,
    with_modes: bool = False,
    backend: str = "auto",
    stat: str = "median",
    progress=None,
) -> list[dict]:
    """Measure one N×H×V:dtype (module docstring); print its table (``stat``: "min" or "median"
    of the rounds) through ``report``; return the CSV rows."""
    progress = progress or Progress()
    N, H, V, dt = parse(spec)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, H, generator=g) / H**0.5).to(device, dt)
    w = (torch.randn(V, H, generator=g)).to(device, dt)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    logits_bytes = N * V * 4
    grad_bytes = (N * H + V * H) * x.element_size()
    fns = {"3 matmuls": three_matmuls(x, w)}
    fns.update(
        {k: fwd_bwd(f, x, w) for k, f in contenders(y, with_compile, with_pt, backend).items()}
    )
    progress(f"warm-up of {len(fns)} variants" + (" (torch.compile compiles)" * with_compile))
    t = interleaved(fns, rounds, device, warmup=1, collect=True, progress=progress)
    progress("peak memory")
    mem = {k: max(0, peak_extra_bytes(f, device) - grad_bytes) for k, f in fns.items()}
    val = {k: getattr(v, stat) for k, v in t.items()}
    floor, comp = val["3 matmuls"], val.get("torch.compile")
    report(f"\n## N = {N}, H = {H}, V = {V}, {str(dt).replace('torch.', '')}\n")
    report(
        f"| method | time (ms, {stat} of {rounds}) | × 3 matmuls | × torch.compile "
        "| extra peak memory (× N×V fp32) |"
    )
    report("|---|---|---|---|---|")
    rows = []
    for k in fns:
        vs_c = f"{val[k] / comp:.2f}" if comp else "—"
        m = "—" if k == "3 matmuls" else f"{mem[k] / logits_bytes:.3f}"
        report(f"| {k} | {val[k] * 1e3:.0f} | {val[k] / floor:.2f} | {vs_c} | {m} |")
        rows.append(csv_row(spec, k, t[k], mem[k] / logits_bytes))
    if not with_modes:
        return rows
    report(f"\nfused_ls modes at N = {N}, H = {H}, V = {V}: time / uniform\n")
    report(f"| mode | time (ms, {stat}) | × uniform |")
    report("|---|---|---|")
    fn_modes = {}
    for name, kw in modes(V, N, device, dense=False).items():
        kw = dict(kw)
        eps = kw.pop("smoothing", EPS)

        def f(xs, ws, kw=kw, eps=eps):
            return fused_ls.linear_label_smoothing_cross_entropy(
                xs, ws, y, eps, backend=backend, **kw
            )

        fn_modes[name] = fwd_bwd(f, x, w)
    progress("every smoothing mode")
    tm = interleaved(fn_modes, rounds, device, warmup=1, collect=True)
    for name, v in tm.items():
        report(f"| {name} | {getattr(v, stat) * 1e3:.0f} | "
               f"{getattr(v, stat) / getattr(tm['uniform'], stat):.2f} |")  # fmt: skip
        rows.append(csv_row(spec, f"fused_ls {name}", v, float("nan")))
    return rows


def csv_row(spec: str, method: str, t, mem_x: float) -> dict:
    return dict(config=spec, method=method, min_s=t.min, median_s=t.median, rounds=len(t.runs),
                extra_mem_x_logits=mem_x)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", nargs="*")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    dev = torch.device(args.device)
    mmap_large_allocations()
    report = Report(os.path.join(args.out, "linear.md"))
    report(header("fused_ls: the fused LM head (benchmarks/bench_linear.py)", dev))
    rows: list = []
    specs = args.configs or DEFAULT[dev.type]
    clock = Progress()
    for i, spec in enumerate(specs):
        rows += run_config(
            spec,
            dev,
            args.rounds,
            report,
            with_compile=not args.no_compile,
            with_modes=i == 0,
            progress=clock.sub(f"{i + 1}/{len(specs)} {spec}"),
        )
    append_csv(os.path.join(args.out, "linear.csv"), rows, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
