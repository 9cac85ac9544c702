"""Vocabulary parallelism: the loss when the classes are sharded across the ranks of a process
group (tensor-parallel LM heads), exact in every mode (docs/design.md §7).

Each rank holds the logits of a contiguous slice of the classes, ``[start, start + C_r)`` of all
``V`` (slices in rank order; sizes may differ). Targets, class weights, similarity, per-sample ε
and mixup are the same on every rank and index the full class space. Because the row statistics
of disjoint column sets merge exactly (``fused_ls._problem``), the sharded loss is the
single-process one with one merge step between the statistics pass and finalisation:

    stats_r = row_stats(x_r)          [N, 8] over the rank's columns (global class ids)
    (1) all_gather m_r                every rank learns every rank's row max: M = max_r m_r (NaN if
                                      any m_r is NaN), and the rank holding the global argmax = the
                                      first r with m_r = M (or m_r NaN): slices are in rank order,
                                      so that rank's first local argmax is the first global one
    (2) all_reduce SUM of [N, k]      d_r·e^(m_r − M) | D_a | z_ya | (s_r·e^(m_r − M)) |
                                      (D_b | z_yb) | (argmax) | target mod 4096
                                      (z at a target is 0 on the ranks that do not hold it; s only
                                      with the confidence penalty, D_b and z_yb only with mixup, the
                                      argmax, as a float, only for ``return_stats``, from the rank
                                      that holds it, 0 elsewhere)
    loss, pack = finalize(merged)     identical on every rank
    backward                          each rank writes its slice of the gradient from the shared
                                      pack with the ordinary backward op: no collective

Per call that is two collectives of (world + k) values per row in the accumulation dtype,
k = 4 (uniform, no stats) to 8 (mixup, confidence penalty and stats): nothing of size N × V.
The last column checks that the ranks were given the same targets: it must sum to
world × (target mod 4096) on every row (exact in fp32 for any world ≤ 4096), otherwise the
ranks raise (CPU) or assert on the device (CUDA, no host sync).

Special values, as in one process: a slice whose row is all −inf adds nothing (its d is not
read); a NaN anywhere in a row makes M NaN, hence every rank's rescale factor and the row's
loss NaN, and the argmax is the first NaN (the first rank holding one). The maxima are
exchanged by a gather, not a MAX reduction, so nothing depends on how a collective library
orders NaN.

The fused LM head (``linear_label_smoothing_cross_entropy(..., process_group=...)``, whose chunk
loops live in ``fused_ls.linear``) takes the replicated input [N, H] and this rank's weight rows
[C_r, H] (bias [C_r]): the row statistics of every chunk, then ``merge`` and one finalisation of
all N rows, then the gradients; the autograd backward sums dX over the group (``sum_input_grad``,
the one collective of the backward), so every rank returns the full input gradient and its own
slice of the weight gradient.

Offsets: a rank knows only its local size. Given a plain ``ProcessGroup``, the sizes (and, as a
cheap consistency check, the row count and a fingerprint of the scalar options) are exchanged
once per (group, local size) by one small all_gather and cached; that first call costs one extra
collective and, on CUDA, one host sync. ``VocabShard(group, start, num_classes)`` gives them
explicitly (no exchange ever). A DTensor sharded on the class dim carries them in its spec.
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._ops import call, save_two_pass, two_pass_backward
from ._problem import (
    S_ARG,
    S_D,
    S_DA,
    S_DB,
    S_M,
    S_S,
    S_ZA,
    S_ZB,
    Problem,
    argmax_bits_dtype,
    check,
)

__all__ = ["VocabShard"]

# The target check column holds target mod CHECK_MOD: exact sums in fp32 for world ≤ 4096.
CHECK_MOD = 4096


@dataclass(frozen=True)
class VocabShard:
    """This rank's classes given explicitly: ``[start, start + C_local)`` of ``num_classes``, the
    slices of the ranks of ``group`` in rank order. Pass it as ``process_group=`` to skip the
    one-time exchange of the local sizes (e.g. Megatron's ``vocab_start_index`` and the global
    vocabulary size)."""

    group: object
    start: int
    num_classes: int


class RankSlice(NamedTuple):
    """A resolved shard: what the merge and the ops need."""

    group: object
    rank: int
    world: int
    start: int  # global index of the local column 0
    num_classes: int  # all classes


# ---- where this rank's classes lie ---------------------------------------------------------------
# group -> {local size: (start, num_classes)}; weak keys so that a destroyed group drops its entry
_OFFSETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _all_gather(out: Tensor, inp: Tensor, group) -> None:
    """``out`` [world, ...] ← every rank's ``inp`` [1, ...] (one collective)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def _columns(p: Problem) -> list[int]:
    """The statistics the sum carries (finalisation reads s only with the confidence penalty or
    for Stats' entropy, D_b and z_yb only with mixup)."""
    cols = [S_D, S_DA, S_ZA]
    if p.confidence_penalty != 0.0 or p.need_stats:
        cols.append(S_S)
    if p.has_mix:
        cols += [S_DB, S_ZB]
    return cols


def _fingerprint(opts) -> int:
    """The scalar options as an int64: a hash of numbers only (strings hash differently in every
    process)."""
    key = (*opts.scalars(), opts.similarity_mix, opts.mix_target is not None, opts.return_stats)
    return hash(key) & ((1 << 63) - 1)


def _exchanged(group, world: int, rank: int, local: int, rows: int, opts, device) -> tuple:
    """(start, num_classes) from every rank's local size: one all_gather on the first call per
    (group, local size), cached. It also checks, on every rank alike, that the ranks agree on
    the number of rows and the scalar options."""
    per_group = _OFFSETS.setdefault(group, {})
    hit = per_group.get(local)
    if hit is not None:
        return hit
    mine = torch.tensor([[local, rows, _fingerprint(opts)]], dtype=torch.int64, device=device)
    every = mine.new_empty(world, 3)
    _all_gather(every, mine, group)
    sizes, ns, prints = zip(*every.tolist(), strict=True)  # the one host sync
    if len(set(ns)) > 1:
        raise ValueError(
            f"process_group: the ranks passed different numbers of rows {list(ns)}; the rows "
            "(and targets) must be the same on every rank, only the classes are sharded"
        )
    if len(set(prints)) > 1:
        raise ValueError(
            "process_group: the ranks passed different keyword values (smoothing, reduction, "
            "mixup, return_stats, ...); they must be the same on every rank"
        )
    out = (sum(sizes[:rank]), sum(sizes))
    per_group[local] = out
    return out


def rank_slice(opts, local: int, rows: int, acc: torch.dtype, device) -> RankSlice | None:
    """Where this rank's ``local`` classes lie in the group of ``opts.process_group``; None for
    a group of one rank (the unsharded loss, exactly)."""
    pg = opts.process_group
    group, start, total = (
        (pg.group, pg.start, pg.num_classes) if isinstance(pg, VocabShard) else (pg, None, None)
    )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed ProcessGroup or fused_ls.VocabShard, "
            f"got {type(pg).__name__}"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("process_group: this process is not a member of the group")
    if start is None:
        if world == 1:
            return None
        start, total = _exchanged(group, world, rank, local, rows, opts, device)
    elif not (0 <= start and start + local <= total):
        raise ValueError(
            f"VocabShard: the local classes [{start}, {start + local}) do not lie in [0, {total})"
        )
    if world == 1:
        if (start, total) != (0, local):
            raise ValueError("VocabShard: a group of one rank must hold every class")
        return None
    if opts.return_stats and acc == torch.float32 and total > 1 << 24:
        raise ValueError(
            "process_group with return_stats: more than 2**24 classes do not fit the fp32 "
            "argmax exchange"
        )
    return RankSlice(group, rank, world, start, total)


# ---- the merge: two collectives between the statistics and the finalisation --------------------
@torch.compiler.disable  # eager under torch.compile: a graph break at the collectives
def merge(stats: Tensor, p: Problem, shard: RankSlice) -> Tensor:
    """The statistics of the whole rows from this rank's ``stats`` ([N, 8], its slice of the
    columns): the same result on every rank of the group (the module docstring)."""
    n = stats.shape[0]
    if n == 0:
        return stats
    acc = stats.dtype
    m = stats[:, S_M]
    # (1) every rank's row maxima
    m_all = stats.new_empty(shard.world, n)
    _all_gather(m_all, m[None].contiguous(), shard.group)
    M = m_all.amax(0)  # NaN-propagating
    first = ((m_all == M) | m_all.isnan()).to(torch.uint8).argmax(0)  # the first rank holding M
    # (2) one packed sum
    cols = _columns(p)
    j = len(cols)
    buf = stats.new_empty(n, j + 1 + p.need_stats)
    buf[:, :j] = stats[:, cols]
    # a slice whose row is all −inf adds nothing (and exp(m − M) is NaN when M is −inf too)
    live = m != float("-inf")
    scale = torch.exp(m - M)
    buf[:, 0] = torch.where(live, stats[:, S_D] * scale, 0)
    if S_S in cols:
        k = cols.index(S_S)
        buf[:, k] = torch.where(live, stats[:, S_S] * scale, 0)
    bits = argmax_bits_dtype(acc)
    if p.need_stats:  # a float index: exact below 2**24 in fp32 (rank_slice checks)
        arg = stats.view(bits)[:, S_ARG].to(acc)
        buf[:, j] = torch.where(first == shard.rank, arg, 0)
    mod = torch.remainder(p.target, CHECK_MOD).to(acc)
    buf[:, -1] = mod
    dist.all_reduce(buf, group=shard.group)
    check(
        buf[:, -1] != mod * shard.world,
        ValueError,
        "process_group: the ranks were given different targets; the rows and targets must be "
        "the same on every rank, only the classes are sharded",
    )
    out = torch.zeros_like(stats)
    out[:, S_M] = M
    out[:, cols] = buf[:, :j]
    if p.need_stats:
        out.view(bits)[:, S_ARG] = buf[:, j].to(bits)
    return out


def sharded_forward(x: Tensor, p: Problem, backend: str, shard: RankSlice):
    """(loss, pack) of the whole rows from this rank's logits slice x."""
    stats = merge(call("row_stats", backend, x, p), p, shard)
    return call("finalize", backend, stats, p)


class ShardedLossFunction(torch.autograd.Function):
    """loss, pack = ShardedLossFunction.apply(x, backend, inplace_backward, shard, *problem):
    the statistics, the merge and the finalisation in the forward; the backward writes the rank's
    slice of the gradient from the shared pack with the ordinary backward op (no collective).
    (The gradient needs the merged statistics, so it cannot come from the statistics pass.)"""

    @staticmethod
    def forward(ctx, x, backend, inplace, shard, *problem):
        p = Problem(*problem)
        loss, pack = sharded_forward(x, p, backend, shard)
        ctx.mark_non_differentiable(pack)
        ctx.set_materialize_grads(False)  # no zero gradient for the pack
        save_two_pass(ctx, x, pack, p, backend, inplace)
        return loss, pack

    @staticmethod
    def backward(ctx, grad_loss, _grad_pack):
        return two_pass_backward(ctx, grad_loss, 3 + len(Problem._fields))


# ---- the fused LM head over a sharded vocabulary (its chunk loops: fused_ls.linear) -------------
def sum_input_grad(dX: Tensor, shard: RankSlice) -> Tensor:
    """The full input gradient from every rank's partial one (the backward's one collective)."""
    dist.all_reduce(dX, group=shard.group)
    return dX


# ---- DTensor logits -----------------------------------------------------------------------------
def is_dtensor(t) -> bool:
    """Whether t is a DTensor (without importing torch.distributed.tensor when nothing has)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def from_dtensor(logits, target, opts):
    """(local logits, local target, options with the shard) of DTensor logits: sharded on the
    class dim of a 1-D mesh → this rank's slice with ``VocabShard`` from the spec (no exchange);
    replicated → the local tensor, unsharded. ``to_local`` is differentiable, so the gradient
    flows back to the DTensor with its placement."""
    from torch.distributed.tensor import Shard

    if opts.process_group is not None:
        raise ValueError("logits is a DTensor: its mesh gives the group; pass no process_group")
    if is_dtensor(target):
        if not all(pl.is_replicate() for pl in target.placements):
            raise ValueError(f"a DTensor target must be replicated, got {target.placements}")
        target = target.to_local()
    mesh, placements = logits.device_mesh, logits.placements
    class_dim = 1 if logits.dim() >= 2 else 0
    if mesh.ndim == 1 and placements[0].is_replicate():
        return logits.to_local(), target, opts
    pl = placements[0]
    if mesh.ndim != 1 or not (pl.is_shard() and pl.dim % logits.dim() == class_dim):
        raise ValueError(
            "DTensor logits must be sharded on the class dim (Shard(1), or Shard(-1) of [N, V]) "
            f"or replicated, on a 1-D mesh; got {tuple(placements)} on a {mesh.ndim}-D mesh. "
            "Redistribute them first, e.g. logits.redistribute(mesh, [Shard(1)])"
        )
    V, world = logits.shape[class_dim], mesh.size()
    sizes = [Shard.local_shard_size_and_offset(V, world, r) for r in range(world)]
    if any(size == 0 for size, _ in sizes):  # every rank sees it: all raise alike
        raise ValueError(
            f"DTensor logits: {V} classes over {world} ranks leave a rank without classes"
        )
    start = sizes[mesh.get_local_rank()][1]
    shard = VocabShard(mesh.get_group(), start, V)
    return logits.to_local(), target, dataclasses.replace(opts, process_group=shard)
