"""Vocabulary parallelism (fused_ls.parallel) with real processes: gloo over 127.0.0.1.

Each test spawns ``world`` processes (2 and 3) that run a batch of checks: every rank builds the
same full problem from one seed, computes the single-process loss and gradient on the whole
logits itself, and compares them with what the sharded call gives for its slice. V = 1003 in
uneven slices (for world 3 one slice holds a single class), with targets on every slice boundary
and inside every slice. Tolerances: fp32 1e-5 relative, fp64 1e-12 (the issue's targets).

A test stops by itself: ``init_process_group``'s timeout bounds every collective, and the parent
kills its processes at the test's deadline.
"""

from __future__ import annotations

import copy
import datetime
import importlib
import itertools
import os
import socket
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import MODES, backends, device_under_test, ignore_row, kw_to, make_data

import fused_ls
from fused_ls import VocabShard
from fused_ls.backends import Request, reasons_for, registry

V = 1003  # not divisible by 2 or 3
H = 16
BOUNDS = {2: (0, 401, V), 3: (0, 350, 351, V)}  # uneven; world 3 has a one-class slice
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-7},
    torch.float64: {"rtol": 1e-12, "atol": 1e-15},
}
DTYPES = (torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = backends("cpu", among=("torch", "cpp"))  # Triton: check_triton, on its own device
# Triton serves CUDA tensors where a GPU is present, else CPU tensors through the interpreter
# (conftest.py sets TRITON_INTERPRET=1 there; the spawned ranks inherit it).
TRITON_DEVICE = device_under_test(gpu_if_present=True)
TRITON = backends(TRITON_DEVICE, interpreted_triton=True, among=("triton",))
TRITON_WHY = (
    "; ".join(reasons_for("triton", Request(TRITON_DEVICE.type, torch.float32)))
    or "FUSED_LS_TEST_BACKENDS leaves it out"
)
COLLECTIVE_TIMEOUT_S = 60
lsce = fused_ls.label_smoothing_cross_entropy


# ---- the launcher ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, checks: tuple[str, ...], log: str) -> None:
    def reached(stage: str) -> None:  # where this rank got to, for the parent's failure message
        with open(f"{log}.{rank}", "a") as f:
            f.write(stage + "\n")

    torch.set_num_threads(1)  # the processes share the machine's cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    reached("init_process_group")
    try:
        for name in checks:
            _check(name)(rank, world)
            reached(name)
        # No rank tears its connections down while a peer may still be sending to it.
        dist.barrier()
        reached("barrier")
    finally:
        dist.destroy_process_group()
    reached("destroy_process_group")
    # Every check passed. Leave without the interpreter's teardown: a gloo group that is still
    # alive then (torch.compile's graphs hold it as an example value) has a worker thread that
    # can release its last work's tensors during finalisation and abort the process ("terminate
    # called without an active exception", a PyTorch teardown race, not a result of the checks).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _check(name: str):
    """A check by name: this module's ``CHECKS[name]``, or ``"module:function"`` of another test
    module (tests/ is on the path of the spawned processes)."""
    if ":" not in name:
        return CHECKS[name]
    module, _, fn = name.partition(":")
    return getattr(importlib.import_module(module), fn)


def _launch(world: int, *checks: str, timeout: float = 240) -> None:
    """Run the named checks on ``world`` gloo processes; a failure on any rank fails the test
    with that rank's traceback, or, when a process dies without one, with the stage every rank
    had reached."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "stage")
        ctx = mp.start_processes(
            _worker,
            args=(world, _free_port(), checks, log),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"{checks} on {world} processes did not finish in {timeout} s; stages "
                        f"reached: {_stages(log, world)}"
                    )
        except mp.ProcessExitedException as e:
            raise AssertionError(f"{e}; stages reached: {_stages(log, world)}") from e
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()


def _stages(log: str, world: int) -> dict[int, str]:
    out = {}
    for rank in range(world):
        try:
            with open(f"{log}.{rank}") as f:
                out[rank] = f.read().split()[-1]
        except (OSError, IndexError):
            out[rank] = "nothing"
    return out


# ---- shared pieces of the checks ------------------------------------------------------------
def _slice(rank: int, world: int) -> tuple[int, int]:
    return BOUNDS[world][rank], BOUNDS[world][rank + 1]


def _problem(world: int, dtype: torch.dtype, seed: int = 0, scale: float = 3.0):
    """Logits [N, V], targets on every slice's first and last class and inside every slice, one
    ignored row (the second last) and a last row of class 0; the generator for the mode's
    tensors. The same on every rank."""
    x, y, g = make_data(3 * world + 2, V, dtype, seed=seed, scale=scale, ignore=False)
    for i, (lo, hi) in enumerate(itertools.pairwise(BOUNDS[world])):
        y[3 * i : 3 * i + 3] = torch.tensor(
            [lo, hi - 1, int(torch.randint(lo, hi, (1,), generator=g))]
        )
    y[-1] = 0
    return x, ignore_row(y, row=-2), g


def _case(world: int, mode: str, dtype: torch.dtype, seed: int = 0):
    """``_problem`` and the keywords of ``MODES[mode]`` (the ignored row with its ignore_index)."""
    x, y, g = _problem(world, dtype, seed)
    kw = MODES[mode](len(y), V, g, "cpu")
    return x, ignore_row(y, kw, row=-2), kw, g


def _upstream(n: int) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, n, dtype=torch.float64)


def _loss_grads(fn, tensors, reduction, *args, **kw):
    """(loss, stats, grads of ``tensors``) of fn(*tensors, *args, return_stats=True, **kw); a
    per-row upstream gradient for "none"."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss, stats = fn(*leaves, *args, reduction=reduction, return_stats=True, **kw)
    up = _upstream(loss.numel()).to(loss.device, loss.dtype)
    total = (loss * up).sum() if loss.dim() else loss
    grads = torch.autograd.grad(total, leaves)
    return loss.detach(), stats, grads


def _close(actual, expected, dtype, what, whole=False):
    """Elementwise within TOL; with ``whole``, relative to the tensor's largest element (GEMM
    results: an element that cancels out carries the round-off of its terms)."""
    tol = dict(TOL[dtype])
    if whole:
        tol["atol"] = max(tol["atol"], tol["rtol"] * float(expected.abs().max()))
    torch.testing.assert_close(
        actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}", **tol
    )


def _same_stats(st, ref, dtype, what):
    _close(st.lse, ref.lse, dtype, f"{what} lse")
    _close(st.confidence, ref.confidence, dtype, f"{what} confidence")
    # H = lse − Σp·z cancels: its round-off is that of lse (and Σp·z), not of H
    tol = dict(TOL[dtype])
    tol["atol"] = max(tol["atol"], tol["rtol"] * float(ref.lse.abs().max()))
    torch.testing.assert_close(st.entropy, ref.entropy, equal_nan=True, **tol)
    torch.testing.assert_close(st.logprob, ref.logprob, equal_nan=True, **tol)
    assert torch.equal(st.prediction, ref.prediction), f"{what}: prediction differs"


# ---- the checks (run on every rank) -----------------------------------------------------------
def check_modes(rank, world):
    """Every mode × backend × dtype × reduction: the loss, the stats and the rank's slice of
    the gradient equal the single-process ones on the whole logits."""
    lo, hi = _slice(rank, world)
    group = dist.group.WORLD
    for backend, dtype, mode in itertools.product(BACKENDS, DTYPES, MODES):
        x, y, kw, _ = _case(world, mode, dtype, seed=len(mode))
        for red in REDUCTIONS:
            what = f"{mode}/{backend}/{dtype}/{red}"
            ref_l, ref_st, (ref_g,) = _loss_grads(lsce, [x], red, y, backend=backend, **kw)
            loss, st, (grad,) = _loss_grads(
                lsce, [x[:, lo:hi]], red, y, backend=backend, process_group=group, **kw
            )
            _close(loss, ref_l, dtype, f"{what} loss")
            _close(grad, ref_g[:, lo:hi], dtype, f"{what} grad")
            _same_stats(st, ref_st, dtype, what)


def check_special_values(rank, world):
    """−inf slices, NaN and +inf in one slice, max ties across slices (the first wins), NaN in
    two slices (the first NaN wins), an all −inf row: as in one process."""
    lo, hi = _slice(rank, world)
    x, y, g = _problem(world, torch.float32, seed=5)
    x, y = x[:7].clone(), y[:7].clone()
    weight = torch.rand(V, generator=g)
    b = BOUNDS[world]
    x[0, b[1] : b[2]] = float("-inf")  # rank 1's whole slice
    x[1, V - 3] = float("nan")
    x[2, b[1]] = float("inf")
    x[3, 3] = x[3, V - 2] = 50.0  # tied max in the first and the last slice
    x[4, 10] = x[4, V - 1] = float("nan")
    x[5] = float("-inf")
    x[6, V - 1] = 40.0  # the max in the last slice only
    for backend, kw in itertools.product(
        BACKENDS, ({}, {"confidence_penalty": 0.2, "z_loss": 1e-3, "weight": weight})
    ):
        what = f"special/{backend}/{sorted(kw)}"
        ref_l, ref_st, (ref_g,) = _loss_grads(lsce, [x], "none", y, backend=backend, **kw)
        loss, st, (grad,) = _loss_grads(
            lsce, [x[:, lo:hi]], "none", y, backend=backend, process_group=dist.group.WORLD, **kw
        )
        _close(loss, ref_l, torch.float32, f"{what} loss")
        _close(grad, ref_g[:, lo:hi], torch.float32, f"{what} grad")
        _same_stats(st, ref_st, torch.float32, what)
        assert int(st.prediction[3]) == 3 and int(st.prediction[4]) == 10


def check_group_of_one(rank, world):
    """A group of one rank (plain or as VocabShard) gives exactly the unsharded result."""
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    mine = singles[rank]
    x, y, kw, g = _case(world, "everything", torch.float32, seed=11)
    w = torch.randn(V, H, generator=g, dtype=torch.float64).float()
    h = torch.randn(len(y), H, generator=g)
    for backend, pg in itertools.product(BACKENDS, (mine, VocabShard(mine, 0, V))):
        ref = _loss_grads(lsce, [x], "mean", y, backend=backend, **kw)
        got = _loss_grads(lsce, [x], "mean", y, backend=backend, process_group=pg, **kw)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[2][0], ref[2][0])
        assert all(torch.equal(a, b) for a, b in zip(got[1], ref[1], strict=True))
        lin = fused_ls.linear_label_smoothing_cross_entropy
        ref = _loss_grads(lin, [h, w], "mean", y, backend=backend, **kw)
        got = _loss_grads(lin, [h, w], "mean", y, backend=backend, process_group=pg, **kw)
        assert torch.equal(got[0], ref[0])
        assert all(torch.equal(a, b) for a, b in zip(got[2], ref[2], strict=True))


def _head(h, w, bias, y, **kw):
    return fused_ls.linear_label_smoothing_cross_entropy(h, w, y, linear_bias=bias, **kw)


def check_linear(rank, world):
    """The fused head over this rank's weight rows: the loss and stats of the single-process
    head, the full input gradient on every rank, the rank's rows of the weight and bias
    gradients; several chunks; loss only under no_grad."""
    lo, hi = _slice(rank, world)
    group = dist.group.WORLD
    modes = ("uniform", "weight", "sparse_sim", "per_sample_eps", "mixup_rows_dense", "everything")
    for backend, dtype, mode in itertools.product(BACKENDS, DTYPES, modes):
        _, y, kw, g = _case(world, mode, dtype, seed=len(mode) + 1)
        n = len(y)
        h = torch.randn(n, H, generator=g, dtype=torch.float64).to(dtype)
        w = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype)
        bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
        for red in REDUCTIONS:
            what = f"linear/{mode}/{backend}/{dtype}/{red}"
            ref_l, ref_st, ref_g = _loss_grads(
                _head, [h, w, bias], red, y, backend=backend, chunk_size=4, **kw
            )
            loss, st, grads = _loss_grads(
                _head, [h, w[lo:hi], bias[lo:hi]], red, y, backend=backend, chunk_size=4,
                process_group=group, **kw,
            )  # fmt: skip
            _close(loss, ref_l, dtype, f"{what} loss")
            _same_stats(st, ref_st, dtype, what)
            _close(grads[0], ref_g[0], dtype, f"{what} input grad", whole=True)
            _close(grads[1], ref_g[1][lo:hi], dtype, f"{what} weight grad", whole=True)
            _close(grads[2], ref_g[2][lo:hi], dtype, f"{what} bias grad", whole=True)
            with torch.no_grad():
                nog = _head(
                    h, w[lo:hi], bias[lo:hi], y, reduction=red, backend=backend,
                    process_group=group, **kw,
                )  # fmt: skip
            _close(nog, ref_l, dtype, f"{what} no_grad loss")


def check_triton(rank, world):
    """The Triton backend on the device it serves (CPU tensors through the interpreter: slow,
    so two modes). Scheduled only where it can serve (test_triton_equals_single_process)."""
    lo, hi = _slice(rank, world)
    for mode, red in itertools.product(("uniform", "everything"), ("mean", "none")):
        x, y, kw, _ = _case(world, mode, torch.float32, seed=13)
        x, y, kw = x.to(TRITON_DEVICE), y.to(TRITON_DEVICE), kw_to(kw, TRITON_DEVICE)
        ref_l, ref_st, (ref_g,) = _loss_grads(lsce, [x], red, y, backend="triton", **kw)
        loss, st, (grad,) = _loss_grads(
            lsce, [x[:, lo:hi]], red, y, backend="triton", process_group=dist.group.WORLD, **kw
        )
        what = f"triton/{mode}/{red}"
        _close(loss, ref_l, torch.float32, f"{what} loss")
        _close(grad, ref_g[:, lo:hi], torch.float32, f"{what} grad")
        _same_stats(st, ref_st, torch.float32, what)


def check_modules(rank, world):
    """FusedLabelSmoothingCE and FusedLinearLabelSmoothingCE with process_group=; a deep copy
    (it shares the group); the loss under torch.compile (the merge runs eagerly: a graph
    break)."""
    lo, hi = _slice(rank, world)
    x, y, g = _problem(world, torch.float32, seed=3)
    weight = torch.rand(V, generator=g) + 0.2
    group = dist.group.WORLD
    crit = fused_ls.FusedLabelSmoothingCE(0.2, weight=weight, process_group=group)
    ref = fused_ls.FusedLabelSmoothingCE(0.2, weight=weight)
    _close(crit(x[:, lo:hi], y), ref(x, y), torch.float32, "FusedLabelSmoothingCE")
    twin = copy.deepcopy(crit)  # e.g. an EMA copy of a model holding the loss: the group is shared
    assert twin._opts.process_group is group
    _close(twin(x[:, lo:hi], y), ref(x, y), torch.float32, "deep copy")
    compiled = torch.compile(crit, backend="eager")
    _close(compiled(x[:, lo:hi], y), ref(x, y), torch.float32, "compiled FusedLabelSmoothingCE")
    h = torch.randn(len(y), H, generator=g)
    w = torch.randn(V, H, generator=g)
    crit = fused_ls.FusedLinearLabelSmoothingCE(0.2, weight=weight, process_group=group)
    ref = fused_ls.FusedLinearLabelSmoothingCE(0.2, weight=weight)
    _close(crit(h, w[lo:hi], y), ref(h, w, y), torch.float32, "FusedLinearLabelSmoothingCE")


def check_collectives(rank, world):
    """Two collectives per forward (an all_gather of [world, N] and an all_reduce of [N, k]),
    none in the backward of the logits form, one all_reduce of dX in the fused head's backward;
    (world + k) ≤ 16 values per row. The first call on a new group adds one size exchange."""
    calls = []
    real = {name: getattr(dist, name) for name in ("all_reduce", "all_gather_single")}

    def spy(name):
        def f(tensor, *args, **kw):
            t = tensor if name == "all_reduce" else args[0]  # the sent tensor
            calls.append((name, tuple(t.shape), t.dtype))
            return real[name](tensor, *args, **kw)

        return f

    group = dist.new_group(list(range(world)))  # fresh: its first call exchanges the sizes
    lo, hi = _slice(rank, world)
    x, y, g = _problem(world, torch.float32, seed=2)
    n = len(y)
    everything = MODES["everything"](n, V, g, "cpu")
    everything["confidence_penalty"] = 0.1
    for name in real:
        setattr(dist, name, spy(name))
    try:
        lsce(x[:, lo:hi], y, process_group=group)
        assert [c[0] for c in calls] == ["all_gather_single"] * 2 + ["all_reduce"], calls
        assert calls[0][1] == (1, 3) and calls[0][2] == torch.int64  # (size, rows, options)
        # k = 4: d, D_a, z_ya, the target check; k = 8 with s, D_b, z_yb and the argmax
        for kw, dtype, k in (({}, torch.float32, 4), (everything, torch.float64, 8)):
            calls.clear()
            xr = x[:, lo:hi].to(dtype).requires_grad_(True)
            loss = lsce(xr, y, process_group=group, return_stats=bool(kw), **kw)
            loss = loss[0] if isinstance(loss, tuple) else loss
            assert calls == [
                ("all_gather_single", (1, n), dtype),
                ("all_reduce", (n, k), dtype),
            ], calls
            assert world + k <= 16
            calls.clear()
            loss.backward()
            assert calls == [], calls
        h = torch.randn(n, H, generator=g, requires_grad=True)
        w = torch.randn(hi - lo, H, generator=g, requires_grad=True)
        calls.clear()
        loss = fused_ls.linear_label_smoothing_cross_entropy(h, w, y, process_group=group)
        assert [c[0] for c in calls] == ["all_gather_single", "all_reduce"], calls
        calls.clear()
        loss.backward()
        assert calls == [("all_reduce", (n, H), torch.float32)], calls
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def check_dtensor(rank, world):
    """DTensor logits sharded on the class dim (as ColwiseParallel(output_layouts=Shard(-1))
    makes them) give the single-process loss, a plain tensor, and a sharded DTensor gradient;
    replicated logits work; other placements raise."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    x, y, kw, g = _case(world, "everything", torch.float32, seed=7)
    ref_l, ref_st, (ref_g,) = _loss_grads(lsce, [x], "mean", y, **kw)
    for placement in (Shard(1), Shard(-1), Replicate()):
        dt = distribute_tensor(x, mesh, [placement]).requires_grad_(True)
        loss, st = lsce(dt, y, return_stats=True, **kw)
        assert type(loss) is torch.Tensor
        loss.backward()
        assert isinstance(dt.grad, DTensor) and dt.grad.placements == dt.placements
        _close(loss.detach(), ref_l, torch.float32, f"dtensor {placement} loss")
        _close(dt.grad.full_tensor(), ref_g, torch.float32, f"dtensor {placement} grad")
        _same_stats(st, ref_st, torch.float32, f"dtensor {placement}")
    with pytest.raises(ValueError, match="sharded on the class dim"):
        lsce(distribute_tensor(x, mesh, [Shard(0)]), y)
    # [B, S, V] logits sharded on the last dim, flattened to [B·S, V] rows (the LM layout)
    kw8 = {k: v[:8] if torch.is_tensor(v) and v.shape == y.shape else v for k, v in kw.items()}
    x3 = distribute_tensor(x[:8].reshape(2, 4, V), mesh, [Shard(2)]).requires_grad_(True)
    loss = lsce(x3.flatten(0, 1), y[:8], **kw8)
    loss.backward()
    ref_l, _, (ref_g,) = _loss_grads(lsce, [x[:8]], "mean", y[:8], **kw8)
    _close(loss.detach(), ref_l, torch.float32, "dtensor [B, S, V] loss")
    _close(x3.grad.full_tensor().reshape(8, V), ref_g, torch.float32, "dtensor [B, S, V] grad")
    # a tensor-parallel LM head: nn.Linear with ColwiseParallel(output_layouts=Shard(-1))
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False)
    ref_head = copy.deepcopy(head)
    tp_head = parallelize_module(
        head, mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    )
    h = torch.randn(len(y), H, generator=g)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    loss = lsce(tp_head(h1), y, 0.1)
    loss.backward()
    ref = lsce(ref_head(h2), y, 0.1)
    ref.backward()
    _close(loss.detach(), ref.detach(), torch.float32, "ColwiseParallel loss")
    _close(h1.grad, h2.grad, torch.float32, "ColwiseParallel input grad")
    wg = tp_head.weight.grad.full_tensor()
    _close(wg, ref_head.weight.grad, torch.float32, "ColwiseParallel weight grad")


def check_errors(rank, world):
    """Inputs that differ across ranks raise a clear error on every rank (no hang), as do bad
    groups and shards; the group keeps working afterwards."""
    group = dist.new_group(list(range(world)))  # fresh: its first call exchanges the sizes
    lo, hi = _slice(rank, world)
    x, y, _ = _problem(world, torch.float32, seed=9)
    xs = x[:, lo:hi]
    with pytest.raises(ValueError, match="different numbers of rows"):
        lsce(xs[rank:], y[rank:], process_group=group)
    with pytest.raises(ValueError, match="different keyword values"):
        lsce(xs, y, 0.1 + 0.1 * rank, process_group=group)
    lsce(xs, y, process_group=group)  # exchanges and caches the offsets
    y2 = y.clone()
    y2[0] += rank == 0  # only rank 0's first target differs
    with pytest.raises(ValueError, match="different targets"):
        lsce(xs, y2, process_group=group)
    with pytest.raises(ValueError, match="weight must have C=1003"):
        lsce(xs, y, weight=torch.ones(hi - lo), process_group=group)
    with pytest.raises(TypeError, match="ProcessGroup or fused_ls.VocabShard"):
        lsce(xs, y, process_group="world")
    with pytest.raises(ValueError, match="do not lie in"):
        lsce(xs, y, process_group=VocabShard(group, V, V))
    with pytest.raises(ValueError, match="do not support: process_group"):
        lsce(xs, torch.softmax(xs, 1), process_group=group)
    explicit = lsce(xs, y, process_group=VocabShard(group, lo, V))
    exchanged = lsce(xs, y, process_group=group)
    assert torch.equal(explicit, exchanged)
    _close(exchanged, lsce(x, y), torch.float32, "after the errors")


CHECKS = {
    f.__name__: f
    for f in (
        check_modes,
        check_special_values,
        check_group_of_one,
        check_linear,
        check_modules,
        check_triton,
        check_collectives,
        check_dtensor,
        check_errors,
    )
}


# ---- the tests --------------------------------------------------------------------------------
pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)
# The checks loop over BACKENDS: with none (FUSED_LS_TEST_BACKENDS naming neither), they would
# pass having checked nothing, so their tests are skipped instead, saying why.
needs_backends = pytest.mark.skipif(
    not BACKENDS, reason="FUSED_LS_TEST_BACKENDS names neither torch nor cpp"
)


@needs_backends
@pytest.mark.parametrize("world", [2, 3])
def test_every_mode_equals_single_process(world):
    _launch(world, "check_modes", "check_special_values")


@needs_backends
@pytest.mark.parametrize("world", [2, 3])
def test_fused_linear_head(world):
    _launch(world, "check_linear", "check_modules")


@pytest.mark.skipif(not TRITON, reason=f"triton is not tested here: {TRITON_WHY}")
def test_triton_equals_single_process():
    _launch(2, "check_triton")  # slow through the interpreter: one world size


@needs_backends
@pytest.mark.parametrize("world", [2, 3])
def test_collectives_dtensor_errors(world):
    _launch(world, "check_collectives", "check_dtensor", "check_errors", "check_group_of_one")


def test_the_triton_check_fails_where_triton_cannot_serve(monkeypatch):
    """Where Triton cannot serve, its check raises (and its test is skipped at the pytest level,
    saying why): it never returns having checked nothing. The check's first step (the
    single-process reference) needs no process group."""
    triton = type(fused_ls.backends.get("triton"))
    monkeypatch.setattr(triton, "unavailable_reason", lambda self: "made unavailable by the test")
    registry._resolve.cache_clear()  # a cached earlier resolution would still pick it
    try:
        with pytest.raises(ValueError, match="made unavailable by the test"):
            CHECKS["check_triton"](0, 2)
    finally:
        registry._resolve.cache_clear()
