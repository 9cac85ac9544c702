"""The LM head fused with the loss: ``linear_label_smoothing_cross_entropy`` without the [N, V]
logits (docs/design.md §7).

The loss of ``label_smoothing_cross_entropy(F.linear(input, W, b), target, ...)``, computed over
row chunks of ``input`` [N, H]. Per chunk of n rows, with a reused [n, V] block buffer:

    block  = input_c @ Wᵀ + b                 (the chunk's logits; GEMM accumulates in fp32)
    block ← d loss_c / d block                 (fused_ls::forward_backward: statistics,
                                                finalisation and gradient in one call, written
                                                over the logits while each row is in cache)
    dX_c   = block @ W                         dW += blockᵀ @ input_c        db += Σ_rows block

so the extra memory is one block (the chunk rule below), never [N, V]. For "mean" and "sum" the
forward computes the gradients of Σ_i loss_i with those three matmuls, and the backward only
scales them by the upstream gradient (÷ Σ W_i for "mean"); with ``torch.no_grad()`` or no input
requiring grad, only the loss is computed (one matmul per chunk). For "none" the upstream gradient
differs per row and the weight gradient Σ_i go_i g_iᵀ x_i cannot be rescaled afterwards, so the
forward computes the loss alone and the backward recomputes each block (four matmuls in all).

Precision: fp32 and fp64 compute in their own dtype; bf16 and fp16 use the GEMMs of their own
dtype on CUDA, and on CPU wherever PyTorch's low-precision GEMM is the fast path (bf16 with
AVX512-BF16 or AMX, fp16 with AMX-FP16), else fp32 (the inputs are converted per call: an extra
fp32 copy of W). The logits block has the compute dtype (bf16 logits like ``F.linear``'s); the
loss is accumulated in fp32 as everywhere; the weight and bias gradients are accumulated over
chunks in fp32 and rounded once.

Chunk rule (``chunk_rows``): at least 256 rows on CPU (512 when the fp32 weight gradient V·H·4
exceeds 32 MiB: every chunk streams it once, and out of cache that costs), 4096 on CUDA, or
N·H/V rows when that is more (a block the size of the hidden states the caller already holds);
capped by a block of 128 MiB on CPU (1 GiB on CUDA) and by N. ``chunk_size`` overrides it.
On a GPU each chunk reads and writes the fp32 weight gradient (8·V·H bytes) while its GEMMs do
6·rows·V·H flops, so the share of that traffic falls as 1/rows whatever V and H are (about
245/rows on an H200: 790 TFLOP/s over 4.3 TB/s). Measured on the H200, N=16384, H=4096,
V=128256, bf16, Triton backend, against the three full-size matmuls (77.4 ms): 523 rows 1.39×,
1024 rows 1.14×, 2048 rows 1.08×, 4096 rows 1.06×, 8192 rows 1.02×; a second run (75.2 ms):
4096 rows 1.01×, 8192 rows 1.00× (benchmarks/gpu_check.py --head-chunks). Measured on the
2-core CPU against the three full-size matmuls (the whole head, loss included): one thread,
fp32, N=1024, H=512, V=128256: 32 rows 1.45×, 64 rows 1.20×, 128 rows 1.08×; two threads:
130 rows 1.13×, 256 rows 1.06×, 512 rows 1.05×; N=4096, H=512, V=32000: 256 rows 1.09×,
512 rows 1.01×; N=4096, H=128, V=32000: 256 rows 0.93×.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import backends, parallel
from ._entry import OptionsModule, make_problem, outputs
from ._options import (
    HEAD_KEYWORDS,
    HEAD_MODULE_KEYWORDS,
    LossOptions,
    Stats,
    parse_options,
    takes_keywords,
)
from ._problem import PROBLEM_SCHEMA, R_MEAN, R_NONE, R_SUM, T_LOSS, T_W, WIDTH, Problem, acc_dtype
from .backends.cpp_backend import accumulate_, scaled_copy_

# (minimum rows, maximum block bytes) per device type
_CHUNK = {"cpu": (256, 128 << 20), "cuda": (4096, 1 << 30)}
_CPU_CACHED_DW = 32 << 20  # a weight gradient above this streams from memory every chunk


def chunk_rows(N: int, H: int, V: int, compute: torch.dtype, device: torch.device) -> int:
    """Rows per chunk (the module docstring's rule)."""
    min_rows, max_bytes = _CHUNK.get(device.type, _CHUNK["cuda"])
    if device.type == "cpu" and V * H * 4 > _CPU_CACHED_DW:
        min_rows *= 2
    row_bytes = max(1, V * (torch.finfo(compute).bits // 8))
    rows = min(max(min_rows, N * H // max(V, 1)), max_bytes // row_bytes)
    return max(1, min(N, rows))


def _fast_cpu_gemm_dtypes() -> frozenset:
    """The low-precision dtypes whose CPU GEMM is a fast path on this CPU (oneDNN with
    AVX512-BF16 or AMX for bf16, AMX-FP16 for fp16); measured here: bf16 with AVX512-BF16 ~3×
    faster than fp32, fp16 without AMX-FP16 ~15× slower."""
    cpu = torch.cpu
    fast = set()
    if cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported():
        fast.add(torch.bfloat16)
    if cpu._is_amx_fp16_supported():
        fast.add(torch.float16)
    return frozenset(fast)


_FAST_CPU = _fast_cpu_gemm_dtypes()


def compute_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype of the chunk GEMMs for inputs of `dtype` (the module docstring)."""
    if device_type != "cpu" or dtype in (torch.float32, torch.float64) or dtype in _FAST_CPU:
        return dtype
    return torch.float32


@functools.cache
def _fp32_addmm_ok(device: torch.device) -> bool:
    """Whether this CUDA device's addmm accumulates low-precision products into an fp32 tensor
    (``out_dtype``, PyTorch ≥ 2.8); probed once with 1×1 matrices."""
    if device.type != "cuda":
        return False
    try:
        acc = torch.zeros(1, 1, device=device)
        one = torch.ones(1, 1, device=device, dtype=torch.bfloat16)
        torch.mm(one, one, out_dtype=torch.float32, out=acc)
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
        return bool(acc.item() == 2.0)
    except (RuntimeError, TypeError):
        return False


def _accumulate(acc: Tensor, a: Tensor, b: Tensor, tmp: Tensor | None, first: bool) -> None:
    """acc += a @ b (acc = a @ b for the first chunk: no zero-filled accumulator): in place when
    the dtypes agree; for low-precision a, b into an fp32 acc, through the GEMM's own fp32 output
    on CUDA, else via the product in ``tmp`` (a reused buffer of a, b's dtype) added by one
    vectorised pass (cpp_backend.accumulate_)."""
    if acc.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif _fp32_addmm_ok(acc.device):
        if first:
            torch.mm(a, b, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        torch.mm(a, b, out=tmp)
        accumulate_(acc, tmp, add=not first)


def _scaled(g: Tensor, scale: Tensor, dtype: torch.dtype, in_place: bool = True) -> Tensor:
    """g · scale in ``dtype``: without ``in_place`` a new tensor; else in place when g has it,
    or (g an fp32 accumulator, consumed) into a new tensor by cpp_backend.scaled_copy_. The 0-dim
    fp32 factor is applied in fp32 and the product rounded once."""
    if not in_place:
        return (g * scale).to(dtype)
    if g.dtype == dtype:
        return g.mul_(scale)
    out = torch.empty_like(g, dtype=dtype)
    scaled_copy_(out, g, scale.to(torch.float32))
    return out


def in_compute_dtype(x: Tensor, weight: Tensor, bias: Tensor | None):
    """(x, weight, bias) in the chunk GEMMs' dtype (``compute_dtype``): themselves when they
    have it, else converted copies."""
    cd = compute_dtype(x.dtype, x.device.type)
    return tuple(t if t is None or t.dtype == cd else t.to(cd) for t in (x, weight, bias))


def logit_blocks(x: Tensor, weight: Tensor, bias: Tensor | None, chunk: int):
    """For each chunk of rows [s, e): (s, e, block) with block = x[s:e]·Wᵀ + b, written into one
    reused [chunk, V] buffer (overwritten by the next chunk); x, weight and bias in the compute
    dtype (``in_compute_dtype``)."""
    N = x.shape[0]
    buf = x.new_empty(min(chunk, N), weight.shape[0])
    wt = weight.t()
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        blk = buf[: e - s]
        if bias is None:
            torch.mm(x[s:e], wt, out=blk)
        else:
            torch.addmm(bias, x[s:e], wt, out=blk)
        yield s, e, blk


def _chunk_problem(p: Problem, s: int, e: int, reduction: int) -> Problem:
    """The Problem of rows [s, e) with another reduction."""
    return p._replace(
        target=p.target[s:e],
        eps_rows=p.eps_rows[s:e] if p.eps_rows is not None else None,
        mix_target=p.mix_target[s:e] if p.mix_target is not None else None,
        mix_rows=p.mix_rows[s:e] if p.mix_rows is not None else None,
        reduction=reduction,
    )


def linear_rows(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    grad_rows: Tensor | None,
    fwd_pack: Tensor | None,
    p: Problem,
    chunk: int,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunk loop (module docstring): (loss, pack, dX, dW, db); gradients not asked for are
    empty. Without ``grad_rows`` the gradients are those of Σ_i loss_i (the forward of "mean" and
    "sum"); with it and the forward's pack ``fwd_pack`` (the backward of "none") they are those
    of Σ_i grad_rows_i · loss_i, and the loss is not returned."""
    N, H = x.shape
    V = weight.shape[0]
    dev = x.device
    xc_all, w, bias_c = in_compute_dtype(x, weight, bias)
    cd = w.dtype
    acc = acc_dtype(cd)
    b = backends.get(backend)
    grads = grad_input or grad_weight or grad_bias
    recompute = grad_rows is not None
    pack = fwd_pack if recompute else x.new_empty(N + 1, WIDTH, dtype=acc)
    none = p.reduction == R_NONE
    loss = x.new_zeros(N if none and not recompute else 0, dtype=acc)
    total = x.new_zeros(2, dtype=acc)  # Σ W_i, Σ loss_i
    dX = x.new_empty(N if grad_input else 0, H if grad_input else 0, dtype=x.dtype)
    # the weight and bias gradients: accumulated over chunks, in fp32 when the GEMMs are not
    exact = cd in (torch.float32, torch.float64)
    # (written by the first chunk, accumulated by the others: not zero-filled)
    dW = x.new_empty(*((V, H) if grad_weight else (0, 0)), dtype=cd if exact else torch.float32)
    # the low-precision product's buffer, where the fp32 accumulation goes through one
    tmp = None
    if grad_weight and not exact and not _fp32_addmm_ok(dev):
        tmp = x.new_empty(V, H, dtype=cd)
    db = x.new_zeros(V if grad_bias else 0, dtype=dW.dtype)
    one = x.new_ones((), dtype=acc)
    chunk_red = R_NONE if (none or recompute) else R_SUM
    for s, e, blk in logit_blocks(xc_all, w, bias_c, chunk):
        xc = xc_all[s:e]
        pc = _chunk_problem(p, s, e, chunk_red)
        if recompute:  # the gradient from the forward's pack, with each row's upstream grad
            b.backward(grad_rows[s:e], blk, blk, pack[s : e + 1], pc)
        elif grads:
            loss_c, pack_c = b.forward_backward(blk, blk, one, pc)
        else:
            loss_c, pack_c = b.forward(blk, pc)
        if not recompute:
            pack[s:e] = pack_c[:-1]
            total += pack_c[-1, :2]
            if none:
                loss[s:e] = loss_c
        if grad_input:
            if cd == x.dtype:
                torch.mm(blk, w, out=dX[s:e])
            else:
                dX[s:e] = torch.mm(blk, w)
        if grad_weight:
            _accumulate(dW, blk.t(), xc, tmp, first=s == 0)
        if grad_bias:
            db += blk.sum(0, dtype=db.dtype)
    if N == 0:
        dW.zero_()  # (no chunk wrote it)
    if recompute:
        return loss, pack, dX, dW, db
    pack[N, :2] = total
    pack[N, 2:] = 0
    if p.reduction == R_MEAN:
        loss = total[T_LOSS] / total[T_W]
    elif p.reduction == R_SUM:
        loss = total[T_LOSS].clone()
    return loss, pack, dX, dW, db


# ---- the same loop as an opaque op, for torch.compile -------------------------------------------
_lib = torch.library.Library("fused_ls", "FRAGMENT")  # noqa: TOR901
_lib.define(
    "linear_rows(Tensor x, Tensor lin_weight, Tensor? lin_bias, Tensor? grad_rows, "
    f"Tensor? fwd_pack, {PROBLEM_SCHEMA}, int chunk, bool grad_input, bool grad_weight, "
    "bool grad_bias, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

_N_PROBLEM = len(Problem._fields)


def _split(args):
    x, weight, bias, grad_rows, fwd_pack, *rest = args
    p = Problem(*rest[:_N_PROBLEM])
    return x, weight, bias, grad_rows, fwd_pack, p, *rest[_N_PROBLEM:]


def _impl(*args):
    return linear_rows(*_split(args))


def _fake(*args):
    x, weight, bias, grad_rows, fwd_pack, p, chunk, gi, gw, gb, backend = _split(args)
    N, H = x.shape
    V = weight.shape[0]
    cd = compute_dtype(x.dtype, x.device.type)
    acc = acc_dtype(cd)
    wdt = cd if cd in (torch.float32, torch.float64) else torch.float32
    recompute = grad_rows is not None
    if recompute:
        shape = (0,)
    else:
        shape = (N,) if p.reduction == R_NONE else ()
    return (
        x.new_empty(shape, dtype=acc),
        x.new_empty(N + 1, WIDTH, dtype=acc),
        x.new_empty(N if gi else 0, H if gi else 0, dtype=x.dtype),
        x.new_empty(*((V, H) if gw else (0, 0)), dtype=wdt),
        x.new_empty(V if gb else 0, dtype=wdt),
    )


_lib.impl("linear_rows", _impl, "CompositeExplicitAutograd")
torch.library.register_fake("fused_ls::linear_rows", _fake, lib=_lib)


def _run(*args):
    """``linear_rows`` directly in eager mode, through the opaque op under torch.compile (the
    chunk loop has a data-dependent length under dynamic shapes)."""
    if not torch.compiler.is_compiling():
        return linear_rows(*args)
    x, weight, bias, grad_rows, fwd_pack, p, *rest = args
    return torch.ops.fused_ls.linear_rows(x, weight, bias, grad_rows, fwd_pack, *p, *rest)


# ---- the head over a sharded vocabulary (fused_ls.parallel) --------------------------------------
# To keep the two collectives per forward, it makes two passes over row chunks: pass 1 computes
# each chunk's logits and their row statistics (kept: [N, 8]); the merge and one finalisation
# cover all N rows; pass 2 recomputes each chunk's logits and turns them into the gradient with
# the backward op (``linear_rows`` with the merged pack): dX_r = G_r·W_r, dW_r += G_rᵀ·X_c,
# db_r += Σ G_r. That is four GEMMs per chunk instead of three.
def _chunk_stats(x, weight, bias, p: Problem, chunk: int, backend: str) -> Tensor:
    """Pass 1: the row statistics of x·Wᵀ + b over this rank's columns, chunk by chunk."""
    xc, w, bias_c = in_compute_dtype(x, weight, bias)
    b = backends.get(backend)
    stats = x.new_empty(x.shape[0], WIDTH, dtype=acc_dtype(w.dtype))
    for s, e, blk in logit_blocks(xc, w, bias_c, chunk):
        stats[s:e] = b.row_stats(blk, _chunk_problem(p, s, e, p.reduction))
    return stats


def sharded_linear_rows(
    shard: parallel.RankSlice, x, weight, bias, grad_rows, fwd_pack, p, chunk, gi, gw, gb, backend
):
    """``linear_rows`` (the forward: ``grad_rows`` and ``fwd_pack`` None) for this rank's weight
    rows: pass 1, the merge, one finalisation, and pass 2 for the gradients of Σ_i loss_i when any
    is asked. Returns (loss, pack, dX_r, dW_r, db_r); dX_r is this rank's partial input gradient
    (the autograd backward sums it over the group)."""
    stats = parallel.merge(_chunk_stats(x, weight, bias, p, chunk, backend), p, shard)
    loss, pack = backends.get(backend).finalize(stats, p)
    if not (gi or gw or gb):
        empty = x.new_empty(0)
        return loss, pack, empty, empty, empty
    ones = pack.new_ones(x.shape[0])
    _, _, dX, dW, db = linear_rows(x, weight, bias, ones, pack, p, chunk, gi, gw, gb, backend)
    return loss, pack, dX, dW, db


def _runner(shard):
    """The forward's chunk loop: ``_run``, or over a vocabulary shard (``shard`` a
    ``fused_ls.parallel.RankSlice``) ``sharded_linear_rows``."""
    return _run if shard is None else functools.partial(sharded_linear_rows, shard)


class LinearLossFunction(torch.autograd.Function):
    """loss, pack = LinearLossFunction.apply(x, weight, bias, chunk, backend, shard, *problem);
    ``shard`` None, or a ``fused_ls.parallel.RankSlice`` (the backward then sums dX over it).

    "mean" and "sum": the forward computes the gradients of Σ_i loss_i (each chunk's logits turned
    into dlogits in place by forward_backward, then dX_c = G·W, dW += Gᵀ·X_c), and the first
    backward scales these small results by the upstream gradient (÷ Σ W_i for "mean") in place:
    they are its own from then on (no second [V, H] weight gradient in memory). A later backward
    through a retained graph recomputes them from the saved inputs, as the forward did (bit for
    bit). Under torch.compile they are saved like activations and scaled out of place.
    "none": the upstream gradient differs per row, and Σ_i go_i G_iᵀ X_i cannot be rescaled once
    summed: the forward computes the loss only and every backward recomputes the logits."""

    @staticmethod
    def forward(ctx, x, weight, bias, chunk, backend, shard, *problem):
        p = Problem(*problem)
        rows = _runner(shard)
        gi, gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gb = bias is not None and ctx.needs_input_grad[2]
        ctx.set_materialize_grads(False)
        ctx.chunk, ctx.backend, ctx.scalars, ctx.shard = chunk, backend, p.scalars(), shard
        ctx.wants = (gi, gw, gb)
        ctx.reduction = p.reduction
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.grads = []  # the forward's gradients and pack, until the first backward takes them
        ctx.compiled = False
        if p.reduction == R_NONE:
            loss, pack, *_ = rows(
                x, weight, bias, None, None, p, chunk, False, False, False, backend
            )
            ctx.save_for_backward(x, weight, bias, pack, *p.tensors())
        else:
            loss, pack, dX, dW, db = rows(
                x, weight, bias, None, None, p, chunk, gi, gw, gb, backend
            )
            if torch.compiler.is_compiling():
                ctx.compiled = True
                ctx.save_for_backward(dX, dW, db, pack)
            else:
                ctx.grads.append((dX, dW, db, pack))
                ctx.save_for_backward(x, weight, bias, *p.tensors())
        ctx.mark_non_differentiable(pack)
        return loss, pack

    @staticmethod
    def backward(ctx, grad_loss, _grad_pack):
        gi, gw, gb = ctx.wants
        none = (None,) * len(Problem._fields)
        if grad_loss is None or not (gi or gw or gb):
            return (None,) * 6 + none
        if ctx.reduction == R_NONE:
            x, weight, bias, pack, *tensors = ctx.saved_tensors
            p = Problem(*tensors, *ctx.scalars)
            go = grad_loss.to(pack.dtype).contiguous()
            _, _, *grads = _run(x, weight, bias, go, pack, p, ctx.chunk, gi, gw, gb, ctx.backend)
            grads = [
                g.to(dt) if want else None
                for g, want, dt in zip(grads, ctx.wants, ctx.dtypes, strict=True)
            ]
        else:
            if ctx.compiled:
                *grads, pack = ctx.saved_tensors
            elif ctx.grads:
                *grads, pack = ctx.grads.pop()  # ours alone now: scaled in place below
            else:  # a later backward (retain_graph): the forward's computation again
                x, weight, bias, *tensors = ctx.saved_tensors
                p = Problem(*tensors, *ctx.scalars)
                _, pack, *grads = _runner(ctx.shard)(
                    x, weight, bias, None, None, p, ctx.chunk, gi, gw, gb, ctx.backend
                )
            scale = grad_loss.to(pack.dtype)
            if ctx.reduction == R_MEAN:
                # a mean over no counted rows (0/0) has zero gradients, as in PyTorch
                total = pack[-1, T_W]
                scale = torch.where(total != 0, scale / total, 0)
            grads = [
                _scaled(g, scale, dt, in_place=not ctx.compiled) if want else None
                for g, want, dt in zip(grads, ctx.wants, ctx.dtypes, strict=True)
            ]
        dX, dW, db = grads
        if ctx.shard is not None and gi:
            dX = parallel.sum_input_grad(dX, ctx.shard)
        return (dX, dW, db, None, None, None) + none


@takes_keywords(HEAD_KEYWORDS)
def linear_label_smoothing_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    smoothing: float | Tensor = 0.1,
    *,
    linear_bias: Tensor | None = None,
    **options,
) -> Tensor | tuple[Tensor, Stats]:
    """``label_smoothing_cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``
    without ever holding the [N, V] logits (see the module docstring for how).

    Args:
        input: [..., H] hidden states (leading dims flattened); fp32, bf16, fp16 or fp64.
        linear_weight: [V, H] the head's weight (the model's parameter: tied embeddings work).
        target: class indices of the leading shape of ``input``.
        smoothing: as ``label_smoothing_cross_entropy``.
        linear_bias: optional [V] bias.

    The keywords (below) are those of ``label_smoothing_cross_entropy`` (``weight`` is the [V]
    class weights) and ``chunk_size``. With ``process_group`` (vocabulary parallelism,
    ``fused_ls.parallel``), ``linear_weight`` and ``linear_bias`` hold this rank's rows of the
    head and ``input`` is the same on every rank; the input gradient is the full one on every
    rank (summed over the group in the backward), the weight and bias gradients are this rank's
    rows.

    Returns:
        the loss (fp32; fp64 for fp64 inputs; "none": the target's shape), and ``Stats`` if
        ``return_stats``.
    """
    opts = parse_options(linear_label_smoothing_cross_entropy, dict(options, smoothing=smoothing))
    return linear_loss_with_options(input, linear_weight, target, opts, linear_bias)


def _check_linear(input, linear_weight, linear_bias, target):
    for name, t in (("input", input), ("linear_weight", linear_weight)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if input.dim() < 1:
        raise ValueError("input must be [..., H], got a 0-d tensor")
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be [V, H], got {tuple(linear_weight.shape)}")
    V, H = linear_weight.shape
    if input.shape[-1] != H:
        raise ValueError(
            f"input has H={input.shape[-1]} features but linear_weight is [V, H] = "
            f"{tuple(linear_weight.shape)}"
        )
    if V == 0:
        raise ValueError("linear_weight must have at least one row (class)")
    if linear_weight.dtype != input.dtype:
        raise ValueError(
            f"linear_weight is {linear_weight.dtype} but input is {input.dtype} (as F.linear, "
            "both must have the same dtype)"
        )
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor) or tuple(linear_bias.shape) != (V,):
            got = tuple(linear_bias.shape) if isinstance(linear_bias, Tensor) else linear_bias
            raise ValueError(f"linear_bias must be [V] = [{V}], got {got}")
        if linear_bias.dtype != input.dtype:
            raise ValueError(f"linear_bias is {linear_bias.dtype} but input is {input.dtype}")
    for name, t in (
        ("linear_weight", linear_weight),
        ("linear_bias", linear_bias),
        ("target", target),
    ):
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if target.is_floating_point():
        raise ValueError(f"target must be an integer tensor of class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input {tuple(input.shape)}: "
            f"expected the leading shape {tuple(input.shape[:-1])}"
        )
    return V, H


def linear_loss_with_options(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    opts: LossOptions,
    linear_bias: Tensor | None = None,
):
    """``linear_label_smoothing_cross_entropy`` for already-parsed options."""
    V, H = _check_linear(input, linear_weight, linear_bias, target)
    x = input.reshape(-1, H)
    N = x.shape[0]
    dev = x.device
    cd = compute_dtype(x.dtype, dev.type)
    chunk = opts.chunk_size or chunk_rows(N, H, V, cd, dev)
    if N == 0:
        chunk = 1
    req = backends.Request(
        dev.type,
        cd,
        opts.similarity is not None,
        opts.sparse is not None,
        backends.is_small(dev, min(chunk, N) * V),  # the backend serves one chunk's logits
    )
    chosen = backends.resolve(opts.backend, req)
    shard = None
    if opts.process_group is not None:
        shard = parallel.rank_slice(opts, V, N, acc_dtype(cd), dev)
    C, offset = (V, 0) if shard is None else (shard.num_classes, shard.start)
    p = make_problem(opts, target, acc_dtype(cd), x, C, offset)
    grad = torch.is_grad_enabled() and (
        input.requires_grad
        or linear_weight.requires_grad
        or (linear_bias is not None and linear_bias.requires_grad)
    )
    if grad:
        loss, pack = LinearLossFunction.apply(
            x, linear_weight, linear_bias, chunk, chosen, shard, *p
        )
    else:
        loss, pack, *_ = _runner(shard)(
            x, linear_weight, linear_bias, None, None, p, chunk, False, False, False, chosen
        )
    return outputs(loss, pack, opts, target.shape)


class FusedLinearLabelSmoothingCE(OptionsModule):
    """The module form of ``linear_label_smoothing_cross_entropy``: the loss keywords at
    construction (and ``chunk_size``); ``forward(input, linear_weight, target, linear_bias=None,
    smoothing=None, mix_target=None, mix_lambda=None)`` takes the head's weight from the model, so
    tied embeddings and FSDP keep working."""

    @takes_keywords(HEAD_MODULE_KEYWORDS)
    def __init__(
        self,
        smoothing: float = 0.1,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        **options,
    ):
        """The head's keywords (the loss's and ``chunk_size``), validated once here
        (``smoothing`` a float: a per-sample tensor goes to ``forward``)."""
        super().__init__(
            smoothing=smoothing,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            **options,
        )

    @property
    def chunk_size(self) -> int | None:
        return self._opts.chunk_size

    def forward(
        self,
        input: Tensor,
        linear_weight: Tensor,
        target: Tensor,
        linear_bias: Tensor | None = None,
        smoothing: Tensor | float | None = None,
        mix_target: Tensor | None = None,
        mix_lambda: float | Tensor | None = None,
    ):
        opts = self.options(smoothing, mix_target, mix_lambda)
        return linear_loss_with_options(input, linear_weight, target, opts, linear_bias)


__all__ = [
    "FusedLinearLabelSmoothingCE",
    "chunk_rows",
    "linear_label_smoothing_cross_entropy",
]
