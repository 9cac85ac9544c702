"""Vocabulary-parallel loss on this machine: 2 gloo processes over 127.0.0.1 against one process.

    python benchmarks/bench_parallel.py [--reps 5] [--configs 4096x32000:fp32 ...]
                                        [--linear 2048x512x32000:fp32 ...]

Each process uses one thread (the machine has two cores). For each logits configuration N×V it
times, interleaved over ``--reps`` rounds after a warm-up, forward+backward per call of

- ``single, 1 thread`` / ``single, 2 threads``: ``label_smoothing_cross_entropy`` on the whole
  [N, V] logits in one process (rank 0, while rank 1 waits at a barrier),
- ``sharded``: the same with ``process_group=`` on each rank's [N, V/2] slice,
- ``loss_parallel (ε = 0)``: PyTorch's ``F.cross_entropy`` on a DTensor sharded on the class dim
  under ``torch.distributed.tensor.parallel.loss_parallel``. In torch 2.13 it raises for any
  ``label_smoothing > 0`` ("aten.masked_fill_.Scalar got mixed torch.Tensor and DTensor", and
  with a replicated DTensor target "in-place operations that require placement changes are not
  supported"), so it runs plain cross-entropy: the reference for PyTorch's communication,
- ``full_tensor + F.cross_entropy``: what remains for label smoothing on such a DTensor in
  PyTorch: gather the logits (``full_tensor()``), then ``F.cross_entropy(label_smoothing=ε)``,

and, for each ``--linear`` configuration N×H×V, the fused head
``linear_label_smoothing_cross_entropy`` single (2 threads) against sharded (each rank V/2 weight
rows). It reports the median time of a call (a barrier before and after: the slowest rank),
the collectives per call and the values each rank contributes to them (counted by a
TorchDispatchMode on the c10d and functional collective ops, forward and backward), and the
extra peak memory of a call per rank. Rows are appended to ``bench_out/parallel.csv``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import append_csv, device_name, interleaved, peak_extra_bytes  # noqa: E402

import fused_ls  # noqa: E402

EPS = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORLD = 2


# ---- what a call communicates ------------------------------------------------------------------
# op name → index of the tensor (or list of tensors) this rank contributes
_CONTRIBUTED = {
    "allreduce_": 0,
    "_allgather_base_": 1,
    "allgather_": 1,
    "all_reduce": 0,
    "all_gather_into_tensor": 0,
    "reduce_scatter_tensor": 0,
}


class CommCounter(TorchDispatchMode):
    """Counts the collectives run inside it and the bytes this rank contributes to them. DTensor
    ops are passed on (NotImplemented) so that their collectives are seen once desugared."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if ns in ("c10d", "_c10d_functional") and name in _CONTRIBUTED:
            t = args[_CONTRIBUTED[name]]
            ts = t if isinstance(t, (list, tuple)) else [t]
            self.calls.append((name, sum(x.numel() * x.element_size() for x in ts)))
        return out


# ---- contenders (every rank builds all of them; "single" runs on rank 0 only) -------------------
def logits_contenders(N: int, V: int, dtype, rank: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    lo, hi = rank * ((V + 1) // 2), min(V, (rank + 1) * ((V + 1) // 2))
    xs = x[:, lo:hi].contiguous()
    mesh = init_device_mesh("cpu", (WORLD,))
    xd = distribute_tensor(x, mesh, [Shard(1)])
    group = dist.group.WORLD

    def step(t, **kw):
        t = t.detach().requires_grad_(True)
        fused_ls.label_smoothing_cross_entropy(t, y, EPS, **kw).backward()

    def pt_loss_parallel():
        t = xd.detach().requires_grad_(True)
        with loss_parallel():
            F.cross_entropy(t, y).backward()  # label_smoothing > 0 raises (module docstring)

    def pt_gathered():
        t = xd.detach().requires_grad_(True)
        F.cross_entropy(t.full_tensor(), y, label_smoothing=EPS).backward()

    return {
        "single, 1 thread": ("rank0", 1, lambda: step(x)),
        "single, 2 threads": ("rank0", 2, lambda: step(x)),
        "sharded": ("all", 1, lambda: step(xs, process_group=group)),
        "loss_parallel (ε = 0)": ("all", 1, pt_loss_parallel),
        "full_tensor + F.cross_entropy": ("all", 1, pt_gathered),
    }


def linear_contenders(N: int, H: int, V: int, dtype, rank: int):
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(N, H, generator=g)).to(dtype)
    w = (torch.randn(V, H, generator=g) * H**-0.5).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    lo, hi = rank * ((V + 1) // 2), min(V, (rank + 1) * ((V + 1) // 2))
    ws = w[lo:hi].contiguous()
    group = dist.group.WORLD

    def step(weight, **kw):
        hh, ww = h.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        fused_ls.linear_label_smoothing_cross_entropy(hh, ww, y, EPS, **kw).backward()

    return {
        "head single, 2 threads": ("rank0", 2, lambda: step(w)),
        "head sharded": ("all", 1, lambda: step(ws, process_group=group)),
    }


# ---- measurement --------------------------------------------------------------------------------
def _run(rank: int, who: str, threads: int, fn) -> None:
    """One call of fn where it runs (rank 0 only for "rank0"), between barriers."""
    dist.barrier()
    if who == "all" or rank == 0:
        torch.set_num_threads(threads)
        fn()
        torch.set_num_threads(1)
    dist.barrier()


def measure(rank: int, contenders: dict, reps: int) -> dict:
    """{name: (median seconds, collectives per call, bytes contributed per call, peak extra)};
    the contenders take turns round by round after one warm-up call each (which also makes the
    one-time size exchange), every rank running the same sequence of barriers."""
    cpu = torch.device("cpu")
    calls = {
        name: (lambda w=who, t=threads, f=fn: _run(rank, w, t, f))
        for name, (who, threads, fn) in contenders.items()
    }
    times = interleaved(calls, reps, cpu, warmup=1)
    out = {}
    for name, call in calls.items():
        counter = CommCounter()
        with counter:
            call()
        out[name] = (times[name].median, counter.calls, peak_extra_bytes(call, cpu))
    return out


def _worker(rank: int, port: int, args, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=600),
    )
    results = []
    for spec in args.configs:
        shape, dt = spec.split(":")
        N, V = (int(v) for v in shape.split("x"))
        res = measure(rank, logits_contenders(N, V, DTYPES[dt], rank), args.reps)
        results.append((spec, N, res))
    for spec in args.linear:
        shape, dt = spec.split(":")
        N, H, V = (int(v) for v in shape.split("x"))
        res = measure(rank, linear_contenders(N, H, V, DTYPES[dt], rank), args.reps)
        results.append((spec, N, res))
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--configs", nargs="*", default=["4096x32000:fp32", "1024x128256:fp32"])
    ap.add_argument("--linear", nargs="*", default=["2048x512x32000:fp32"])
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(_free_port(), args, queue), nprocs=WORLD, start_method="spawn"
    )
    results = queue.get()
    where = f"{device_name(torch.device('cpu'))}, {WORLD} gloo processes × 1 thread"
    print(f"\n{where}; torch {torch.__version__}; ε = {EPS}; forward+backward per call\n")
    print(
        "| config | contender | ms | × single (2 thr) | collectives | bytes per call "
        "(per row) | extra peak MiB/rank |"
    )
    print("|---|---|---:|---:|---|---:|---:|")
    rows = []
    for spec, N, res in results:
        base_name = next(n for n in res if n.endswith("single, 2 threads"))
        base = res[base_name][0]
        for name, (t, calls, peak) in res.items():
            nbytes = sum(b for _, b in calls)
            kinds = ", ".join(f"{n}" for n, _ in calls) or "—"
            print(
                f"| {spec} | {name} | {t * 1e3:.1f} | {t / base:.2f}× | {len(calls)}: {kinds} | "
                f"{nbytes} ({nbytes / N:.0f}) | {peak / 2**20:.0f} |"
            )
            rows.append(
                dict(
                    setup=f"{WORLD} gloo processes x 1 thread",
                    config=spec,
                    contender=name,
                    median_s=t,
                    collectives=len(calls),
                    bytes_per_rank=nbytes,
                    extra_peak_bytes=peak,
                )
            )
    append_csv(os.path.join(args.out, "parallel.csv"), rows, torch.device("cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
