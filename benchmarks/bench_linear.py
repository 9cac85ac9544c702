"""The fused LM head: forward+backward of the linear layer plus label-smoothed cross-entropy.

    python benchmarks/bench_linear.py [--device cpu] [--reps 3] [--configs 4096x128x32000:fp32 ...]

For each (N, H, V, dtype) it runs, interleaved over ``--reps`` rounds after a warm-up, the
forward+backward (gradients for the input and the weight) of

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
Rows are appended to ``bench_out/linear.csv`` with the machine and versions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import (  # noqa: E402
    append_csv,
    interleaved,
    mmap_large_allocations,
    peak_extra_bytes,
)
from bench_overhead import machine, modes  # noqa: E402

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


def contenders(y, with_compile: bool):
    def eager(x, w):
        return F.cross_entropy(F.linear(x, w), y, label_smoothing=EPS)

    out = {"eager": eager}
    if with_compile:
        out["torch.compile"] = torch.compile(eager)
    opts = torch.nn.LinearCrossEntropyOptions()

    def pt_chunked(eps):
        def f(x, w):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return F.linear_cross_entropy(x, w, y, label_smoothing=eps, options=opts)

        return f

    out["F.linear_cross_entropy ε=0.1"] = pt_chunked(EPS)
    out["F.linear_cross_entropy ε=0 (chunked)"] = pt_chunked(0.0)
    out["fused_ls"] = lambda x, w: fused_ls.linear_label_smoothing_cross_entropy(x, w, y, EPS)
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


def run_config(spec, device, reps, with_compile, with_modes, rows, stamp, where):
    N, H, V, dt = parse(spec)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, H, generator=g) / H**0.5).to(device, dt)
    w = (torch.randn(V, H, generator=g)).to(device, dt)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    logits_bytes = N * V * 4
    grad_bytes = (N * H + V * H) * x.element_size()
    fns = {"3 matmuls": three_matmuls(x, w)}
    fns.update({k: fwd_bwd(f, x, w) for k, f in contenders(y, with_compile).items()})
    t = interleaved(fns, reps, device, warmup=1, collect=True)
    mem = {k: max(0, peak_extra_bytes(f, device) - grad_bytes) for k, f in fns.items()}
    floor, comp = t["3 matmuls"], t.get("torch.compile")
    print(f"\n### N = {N}, H = {H}, V = {V}, {str(dt).replace('torch.', '')}\n")
    print("| method | time (ms) | × 3 matmuls | × torch.compile | extra peak memory (× N×V fp32) |")
    print("|---|---|---|---|---|")
    for k in fns:
        vs_c = f"{t[k] / comp:.2f}" if comp else "—"
        m = "—" if k == "3 matmuls" else f"{mem[k] / logits_bytes:.3f}"
        print(f"| {k} | {t[k] * 1e3:.0f} | {t[k] / floor:.2f} | {vs_c} | {m} |")
        rows.append([stamp, where, torch.__version__, spec, k, t[k], mem[k] / logits_bytes])
    if not with_modes:
        return
    print(f"\nfused_ls modes at N = {N}, H = {H}, V = {V}: time / uniform\n")
    print("| mode | time (ms) | × uniform |")
    print("|---|---|---|")
    fn_modes = {}
    for name, kw in modes(V, N, device, dense=False).items():
        kw = dict(kw)
        eps = kw.pop("smoothing", EPS)

        def f(xs, ws, kw=kw, eps=eps):
            return fused_ls.linear_label_smoothing_cross_entropy(xs, ws, y, eps, **kw)

        fn_modes[name] = fwd_bwd(f, x, w)
    tm = interleaved(fn_modes, reps, device, warmup=1, collect=True)
    for name, v in tm.items():
        print(f"| {name} | {v * 1e3:.0f} | {v / tm['uniform']:.2f} |")
        rows.append([stamp, where, torch.__version__, spec, f"fused_ls {name}", v, ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--configs", nargs="*")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--csv", default="bench_out/linear.csv")
    args = ap.parse_args()
    dev = torch.device(args.device)
    mmap_large_allocations()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    where = machine(dev)
    print(f"# fused LM head — {where}, torch {torch.__version__}, {stamp}")
    rows: list = []
    for i, spec in enumerate(args.configs or DEFAULT[dev.type]):
        run_config(spec, dev, args.reps, not args.no_compile, i == 0, rows, stamp, where)
    header = ["timestamp", "machine", "torch", "config", "method", "seconds", "extra_mem_x_logits"]
    append_csv(args.csv, header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
