"""The loss at LM sizes: fused_ls against eager PyTorch, ``torch.compile`` and the memory floors.

    python benchmarks/bench.py [--device cpu] [--configs 4096x32000:fp32 ...] [--rounds 5]
                               [--backends cpp,torch] [--no-compile] [--out bench_out]

For each (N, V, dtype), interleaved round by round over ``--rounds`` rounds after one untimed
warm-up call of each variant (``torch.compile`` compiles there):

- the memory floors, measured in the same run: a copy of the logits into an existing buffer
  (one read + one write of N×V elements: what a fused forward+backward must at least move), a
  read of them (``x.sum()``: what a forward must at least move), and a clone (a copy into fresh
  memory: what a fresh gradient buffer costs in page faults on the CPU);
- forward+backward (``torch.autograd.grad``: no accumulation into ``.grad``) of eager
  ``F.cross_entropy(label_smoothing=0.1)``, ``torch.compile`` of it, and for each fused_ls
  backend: with a fresh gradient buffer and with ``inplace_backward=True`` (the gradient written
  over the logits, restored untimed before each call);
- the forward alone under ``torch.no_grad()`` of eager and of each fused_ls backend.

Reported per variant: the minimum (and the median) over the rounds, the time as a multiple of
its floor (× copy for forward+backward, × read for the forward), the speed-up over eager (same
pass) and over ``torch.compile`` (forward+backward), the extra peak memory as a multiple of the
logits (CPU: peak resident set; CUDA: the caching allocator's peak), the max error of the loss
and of the gradient against ``F.cross_entropy`` in float64, and on CUDA the bandwidth under the
byte model (2·N·V·b for forward+backward, N·V·b for the forward) against the floor's. Prints
markdown tables (kept in ``<out>/bench.md``), appends rows to ``<out>/bench.csv`` and draws
``<out>/bench.png``. ``make bench-full`` runs the default grid; ``make bench``
(``headline.py``) runs one size of it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import (  # noqa: E402
    Progress,
    Report,
    append_csv,
    device_name,
    header,
    interleaved,
    peak_extra_bytes,
    serving_backends,
)

import fused_ls  # noqa: E402

EPS = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_GRID = {
    "cpu": ["4096x32000:fp32", "4096x32000:bf16", "1024x128256:fp32"],
    "cuda": ["16384x32000:bf16", "16384x32000:fp32", "16384x128256:bf16", "8192x128256:fp32"],
}
FB, FWD = "fwd+bwd", "forward"
COPY, READ = "copy into existing buffer", "read (x.sum())"


def parse_config(spec: str) -> tuple[int, int, torch.dtype, str]:
    shape, dt = spec.split(":")
    N, V = (int(v) for v in shape.split("x"))
    return N, V, DTYPES[dt], dt


def run_loss(
    N: int,
    V: int,
    dtype: torch.dtype,
    device: torch.device,
    rounds: int,
    backends: list[str],
    with_compile: bool = True,
    with_clone: bool = True,
    progress=None,
) -> tuple[list[dict], int]:
    """Measure every variant of the module docstring at one size: (rows, logits' bytes)."""
    progress = progress or Progress()
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 2).to(device=device, dtype=dtype)
    target = torch.randint(0, V, (N,), generator=g).to(device)
    target[::97] = -100  # about 1% ignored rows
    nbytes = logits.numel() * logits.element_size()

    # the reference: F.cross_entropy in float64 (equal to the dense reference for uniform ε)
    progress("reference (float64)")
    x64 = logits.double().requires_grad_(True)
    ref = F.cross_entropy(x64, target, label_smoothing=EPS)
    ref.backward()
    ref_loss, ref_grad = ref.detach(), x64.grad.to(dtype).double()
    del x64, ref
    gc.collect()

    eager = lambda x, y: F.cross_entropy(x, y, label_smoothing=EPS)  # noqa: E731
    losses = {"torch eager": eager}
    if with_compile:
        losses["torch.compile"] = torch.compile(eager)
    for b in backends:
        losses[f"fused_ls[{b}]"] = lambda x, y, b=b: fused_ls.label_smoothing_cross_entropy(
            x, y, EPS, backend=b
        )
        losses[f"fused_ls[{b}] inplace"] = lambda x, y, b=b: fused_ls.label_smoothing_cross_entropy(
            x, y, EPS, backend=b, inplace_backward=True
        )

    buf = logits.clone().requires_grad_(True)  # the non-in-place variants leave it intact
    buf_in = logits.clone().requires_grad_(True)  # overwritten by each in-place backward
    dst = torch.empty_like(logits)

    def restore():
        with torch.no_grad():
            buf_in.copy_(logits)

    def fwd_bwd(loss_fn, x):
        def step():
            loss = loss_fn(x, target)
            (grad,) = torch.autograd.grad(loss, x)
            return loss.detach(), grad

        return step

    def forward(loss_fn):
        def step():
            with torch.no_grad():
                return loss_fn(logits, target), None

        return step

    # (name, pass) → (function, setup or None)
    variants = {(COPY, FB): (lambda: dst.copy_(logits), None), (READ, FWD): (logits.sum, None)}
    if with_clone:
        variants[("clone of logits", FB)] = (logits.clone, None)
    for name, fn in losses.items():
        inplace = name.endswith("inplace")
        x = buf_in if inplace else buf
        variants[(name, FB)] = (fwd_bwd(fn, x), restore if inplace else None)
    variants[("torch eager", FWD)] = (forward(eager), None)
    for b in backends:
        variants[(f"fused_ls[{b}]", FWD)] = (forward(losses[f"fused_ls[{b}]"]), None)

    progress(f"warm-up of {len(variants)} variants" + (" (torch.compile compiles)" * with_compile))
    t = interleaved(
        {k: v[0] for k, v in variants.items()},
        rounds,
        device,
        warmup=1,
        setup={k: v[1] for k, v in variants.items() if v[1]},
        progress=progress,
    )

    progress("peak memory and errors")
    rows = []
    for key, (fn, setup) in variants.items():
        name, kind = key
        if setup:
            setup()
        held: list = []  # the result stays alive through the measurement, as a caller's would
        mem = peak_extra_bytes(lambda fn=fn, held=held: held.append(fn()), device)
        result = held.pop()
        loss_err = grad_err = float("nan")
        if isinstance(result, tuple):  # a loss variant: (loss, gradient or None)
            loss, grad = result
            loss_err = (loss.double() - ref_loss).abs().item()
            if grad is not None:
                grad_err = (grad.double() - ref_grad).abs().max().item()
        floor = t[(COPY, FB)] if kind == FB else t[(READ, FWD)]
        rows.append(
            dict(
                config=f"{N}x{V}",
                dtype=str(dtype).replace("torch.", ""),
                method=name,
                step=kind,
                min_ms=t[key].min * 1e3,
                median_ms=t[key].median * 1e3,
                rounds=rounds,
                x_floor=t[key].min / floor.min,
                floor="copy" if kind == FB else "read",
                gbps=(2 if kind == FB else 1) * nbytes / t[key].min / 1e9,
                mem_x=mem / nbytes,
                loss_err=loss_err,
                grad_err=grad_err,
            )
        )
        del result
        gc.collect()
    for r in rows:  # speed-ups over eager (same pass) and over torch.compile (forward+backward)
        same = {x["method"]: x["min_ms"] for x in rows if x["step"] == r["step"]}
        r["vs_eager"] = same["torch eager"] / r["min_ms"]
        comp = same.get("torch.compile")
        r["vs_compile"] = comp / r["min_ms"] if comp else float("nan")
    return rows, nbytes


def loss_table(rows: list[dict], device: torch.device) -> str:
    """The rows of one size as a markdown table."""
    gb = device.type == "cuda"
    head = (
        "| method | pass | time (ms, min) | median | × floor | vs eager | vs compile | "
        + ("GB/s | % of floor | " if gb else "")
        + "extra peak memory (× logits) | loss err | grad err |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    floors = {FB: next(r for r in rows if r["method"] == COPY)}
    floors[FWD] = next(r for r in rows if r["method"] == READ)

    def num(v, fmt):
        return "—" if v != v else format(v, fmt)  # NaN: not applicable

    for r in rows:
        fl = floors[r["step"]]
        lines.append(
            f"| {r['method']} | {r['step']} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | "
            f"{r['x_floor']:.2f} × {r['floor']} | {r['vs_eager']:.2f}× | "
            f"{num(r['vs_compile'], '.2f')}{'×' if r['vs_compile'] == r['vs_compile'] else ''} | "
            + (f"{r['gbps']:.0f} | {100 * fl['min_ms'] / r['min_ms']:.0f}% | " if gb else "")
            + f"{r['mem_x']:.2f} | {num(r['loss_err'], '.1e')} | {num(r['grad_err'], '.1e')} |"
        )
    return "\n".join(lines)


def plot(all_rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in all_rows if r["step"] == FB]
    sizes = [f"{r['config']}:{r['dtype']}" for r in rows]
    configs = list(dict.fromkeys(sizes))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.9 + 0.45 * len(rows)))
    labels = [f"{s}  {r['method']}" for s, r in zip(sizes, rows, strict=True)]
    colors = [f"C{configs.index(s)}" for s in sizes]
    ys = range(len(rows))
    axes[0].barh(ys, [r["min_ms"] for r in rows], color=colors)
    axes[0].set_yticks(list(ys), labels, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("forward+backward time (ms, min of rounds)")
    axes[1].barh(ys, [r["mem_x"] for r in rows], color=colors)
    axes[1].set_yticks(list(ys), [""] * len(rows))
    axes[1].invert_yaxis()
    axes[1].set_xlabel("extra peak memory (× logits bytes)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--configs", nargs="*", help="NxV:dtype entries, e.g. 4096x32000:fp32")
    ap.add_argument("--rounds", type=int, help="timed rounds (default 5 CPU, 20 CUDA)")
    ap.add_argument("--backends", default="", help="comma list (default: every one that serves)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--out", default="bench_out", help="folder for the CSV, markdown and PNG")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    rounds = args.rounds or (20 if device.type == "cuda" else 5)
    configs = args.configs or DEFAULT_GRID[device.type]
    report = Report(os.path.join(args.out, "bench.md"))
    report(header("fused_ls: the loss at LM sizes (benchmarks/bench.py)", device))
    report(f"backends here: {fused_ls.available_backends()}")
    all_rows = []
    clock = Progress()
    for i, cfg in enumerate(configs):
        N, V, dtype, dt = parse_config(cfg)
        backends = [b for b in args.backends.split(",") if b] or serving_backends(device, dtype)
        progress = clock.sub(f"{i + 1}/{len(configs)} {cfg}")
        rows, nbytes = run_loss(
            N, V, dtype, device, rounds, backends, not args.no_compile, True, progress
        )
        report(f"\n## N = {N}, V = {V}, {dt} (logits: {nbytes / 2**20:.0f} MiB), ε = {EPS}\n")
        report(loss_table(rows, device))
        all_rows.extend(rows)
    append_csv(os.path.join(args.out, "bench.csv"), all_rows, device)
    png = os.path.join(args.out, "bench.png")
    plot(all_rows, png, f"fused_ls loss benchmark on {device_name(device)}")
    report(f"\nwrote {png}; {clock.elapsed():.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
