"""Triton backend: the kernels of ``fused_ls.triton_kernels`` behind the backend contract.

Serves CUDA tensors when triton imports, and CPU tensors only when the kernels were built by the
Triton interpreter (``TRITON_INTERPRET=1`` set before triton was first imported): that is how the
kernels are tested on machines without a GPU. fp64 logits are left to the other backends (the
contract accumulates fp64 in fp64, which these fp32-accumulating kernels do not).

Launches per call: forward one (rows of < SPLIT_MIN_C classes: statistics and finalisation in
the same program) or two (split rows: pieces, then merge + finalisation), plus the reduction of
"mean"/"sum"; backward one; forward_backward one (+ the reduction) for unsplit rows. The launch
configuration depends only on shapes and nothing here reads device values on the host, so the
calls can be captured in a CUDA graph. Targets and per-sample values are checked by device-side
asserts on CUDA (the kernels that read them are launched with ``debug=True``) and by the same
Python checks as the torch backend under the interpreter.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from .._problem import R_MEAN, R_NONE, WIDTH, Problem, validate
from .registry import Backend, Request, register

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def _load():
    """(kernels module, None) or (None, why it cannot be imported). Imported on first use only,
    so that ``import fused_ls`` never imports triton."""
    try:
        from .. import triton_kernels
    except ImportError as e:  # triton missing or broken
        return None, f"triton is not importable ({type(e).__name__}: {e})"
    return triton_kernels, None


def _interpreted(k) -> bool:
    """Whether the kernels were built by the Triton interpreter (they then run on CPU tensors)."""
    try:  # the interpreter module needs numpy, which a CUDA-only install may lack
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(k._rows_kernel, InterpretedFunction)


def launch_config(C: int) -> tuple[int, int, int, int]:
    """(columns per program, programs per row S, BLOCK, num_warps) for rows of C classes."""
    k, _ = _load()
    cols = k.SPLIT_COLS if C >= k.SPLIT_MIN_C else max(C, 1)
    splits = max(1, -(-C // cols))
    block = min(k.BLOCK_MAX, _next_pow2(min(cols, max(C, 1))))
    return cols, splits, block, k.num_warps_for(block)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# The Problem's scalars, passed to the kernels under their own names (the kernels' parameters of
# these names are the Problem's fields).
_PROBLEM_SCALARS = (
    "r0",
    "smoothing",
    "ignore_index",
    "adaptive_threshold",
    "adaptive_factor",
    "adaptive_mode",
    "z_loss",
    "softcap",
    "confidence_penalty",
    "mix_lambda",
    "col_offset",
    "num_classes",
)


@functools.cache
def _param_names(kernel) -> tuple[str, ...]:
    return tuple(inspect.signature(kernel.fn).parameters)


def _launch(kernel, grid, values: dict, **options) -> None:
    """``kernel[grid]`` with every parameter passed by keyword, taken by name from ``values`` (the
    arguments of one call: a superset of what any one kernel takes); a parameter that ``values``
    lacks raises a TypeError naming it instead of shifting the others."""
    try:
        args = {n: values[n] for n in _param_names(kernel)}
    except KeyError as e:  # the host path of every call: no second scan for the missing name
        raise TypeError(f"{kernel.fn.__name__}: no value for parameter {e.args[0]!r}") from None
    kernel[grid](**args, **options)


def _call_values(x: torch.Tensor, p: Problem) -> dict:
    """The kernel arguments shared by the launches of one call, by parameter name (absent tensors
    → any valid pointer of the right type, never read)."""
    f32 = torch.float32
    cols, splits, block, warps = launch_config(x.shape[1])
    K = p.sp_idx.shape[1] if p.sp_idx is not None else 0
    v = {f: getattr(p, f) for f in _PROBLEM_SCALARS}
    v.update(
        X=x,
        stride_x=x.stride(0),
        C=x.shape[1],
        Y_A=p.target,
        Y_B=p.mix_target if p.mix_target is not None else p.target,
        W=p.weight if p.weight is not None else p.mass,
        R=p.R if p.R is not None else p.mass,
        stride_r=p.R.stride(0) if p.R is not None else 0,
        MASS=p.mass,
        SP_IDX=p.sp_idx if p.sp_idx is not None else p.target,
        SP_VAL=p.sp_val if p.sp_val is not None else p.mass,
        K=K,
        EPS_ROWS=p.eps_rows.to(f32) if p.eps_rows is not None else p.mass,
        LAM_ROWS=p.mix_rows.to(f32) if p.mix_rows is not None else p.mass,
        eps_rows_on=int(p.eps_rows is not None),
        lam_rows_on=int(p.mix_rows is not None),
        has_mix=int(p.mix_target is not None),
        has_w=int(p.weight is not None),
        go_per_row=int(p.reduction == R_NONE),
        loss_rows_on=int(p.reduction == R_NONE),
        S=splits,
        cols_per_split=cols,
        BLOCK=block,
        KP=_next_pow2(2 * K + 2),
        R_MODE=2 if p.R is not None else (1 if p.weight is not None else 0),
        HAS_B=p.R is not None and p.mix_target is not None,
        DENSE=p.R is not None,
        NEED_S=p.confidence_penalty != 0.0 or p.need_stats,
        NEED_PZ=p.confidence_penalty != 0.0,
        HAS_SOFTCAP=p.softcap > 0,
        NEED_STATS=p.need_stats,
    )
    # outputs and optional inputs of the launches: a valid pointer unless a launch sets them
    for name in ("OUT", "GO", "PACK", "LOSS", "STATS", "PART"):
        v[name] = p.mass
    v.update(stride_o=0, go_mean=0, skip_unit=0, N=x.shape[0])
    v["num_warps"] = warps
    return v


# device-side asserts for the target / per-sample checks (CUDA; the interpreter is checked in
# Python); integer-overflow sanitising stays off
_ASSERTS = dict(debug=True, sanitize_overflow=False)


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self) -> str | None:
        k, why = _load()
        if why:
            return why
        if torch.cuda.is_available() or _interpreted(k):
            return None
        return (
            "no CUDA device (triton kernels run on CUDA tensors; on CPU only under "
            "TRITON_INTERPRET=1, set before triton is imported, for testing)"
        )

    def unsupported_reasons(self, req: Request) -> list[str]:
        reasons = []
        k, why = _load()
        if why:
            return [why]
        if req.device_type == "cpu":
            if not _interpreted(k):
                reasons.append(
                    "CPU tensors run only under the Triton interpreter "
                    "(TRITON_INTERPRET=1 before triton is imported)"
                )
        elif req.device_type != "cuda":
            reasons.append(f"triton kernels serve CUDA tensors, not {req.device_type}")
        if req.dtype not in _DTYPES:
            reasons.append(
                f"triton kernels take fp32/bf16/fp16 logits, not {req.dtype} "
                "(fp64 accumulates in fp64 on the other backends)"
            )
        return reasons

    # ---- launches ----------------------------------------------------------------------------
    def _rows(self, v: dict, *, finalize=False, grad=False, stats_out=False, **outs) -> None:
        """_rows_kernel over grid (N, S) with the call's values ``v`` and the outputs ``outs``."""
        k, _ = _load()
        n = v["X"].shape[0]
        args = {**v, **outs, "FINALIZE": finalize, "GRAD": grad, "STATS_OUT": stats_out}
        args["POINT_CHUNK"] = k.POINT_CHUNK
        if "OUT" in outs:
            args["stride_o"] = outs["OUT"].stride(0)
        _launch(k._rows_kernel, (n, v["S"]), args, num_warps=v["num_warps"], **_ASSERTS)

    def _partials(self, v: dict):
        """The per-split statistics [N, splits, 8] of rows split over programs (merged next)."""
        x = v["X"]
        part = torch.zeros(x.shape[0], v["S"], WIDTH, dtype=torch.float32, device=x.device)
        self._rows(v, PART=part)
        return part

    def _merge(self, v: dict, part, splits, *, gather, finalize, **outs) -> None:
        """_merge_kernel over the rows: the ``splits`` partials of each row in ``part`` (the
        statistics themselves with splits = 1 and ``gather`` off)."""
        k, _ = _load()
        args = {**v, **outs, "PART": part, "S": splits, "SP": _next_pow2(splits)}
        args.update(GATHER=gather, FINALIZE=finalize)
        if not gather:  # no logits: the statistics hold the target and sparse terms
            args.update(X=part, stride_x=0, C=0)
        _launch(k._merge_kernel, (part.shape[0],), args, num_warps=1, **_ASSERTS)

    def _reduce(self, pack, loss, reduction: int):
        k, _ = _load()
        args = dict(PACK=pack, LOSS=loss, N=pack.shape[0] - 1, reduction=reduction)
        _launch(k._reduce_kernel, (1,), {**args, "BLOCK": k.REDUCE_BLOCK}, num_warps=4)

    def _weights(self, v: dict, pack, loss) -> None:
        """Σ W_i into the pack's totals row before the rows are read ("mean" in forward_backward),
        summed as the final reduction sums the finalised W_i. The first kernel of the call to read
        the targets (W[y]): launched with the device asserts that check them."""
        k, _ = _load()
        args = {**v, "PACK": pack}
        _launch(k._weights_kernel, (v["X"].shape[0],), args, num_warps=1, **_ASSERTS)
        self._reduce(pack, loss, R_NONE)

    def _outputs(self, x, p: Problem):
        n = x.shape[0]
        f32 = dict(dtype=torch.float32, device=x.device)
        loss = torch.empty(n, **f32) if p.reduction == R_NONE else torch.empty((), **f32)
        pack = torch.zeros(n + 1, WIDTH, **f32)
        return loss, pack

    def _finalised(self, x, p, out=None, go=None):
        """(loss, pack), with the gradient written into `out` when given."""
        if x.device.type == "cpu":
            validate(p)
        loss, pack = self._outputs(x, p)
        n = x.shape[0]
        if n == 0:
            self._reduce(pack, loss, p.reduction)
            return loss, pack
        v = _call_values(x, p)
        mean = out is not None and p.reduction == R_MEAN
        with _device_guard(x):
            if mean:
                self._weights(v, pack, loss)
            if v["S"] == 1:
                grad = {} if out is None else {"OUT": out, "GO": go, "go_mean": int(mean)}
                self._rows(v, finalize=True, grad=out is not None, PACK=pack, LOSS=loss, **grad)
            else:
                self._merge(
                    v, self._partials(v), v["S"], gather=True, finalize=True, PACK=pack, LOSS=loss
                )
                if out is not None:
                    self._grad(v, out, go, pack, mean=mean)
            self._reduce(pack, loss, p.reduction)
        return loss, pack

    def forward(self, x, p: Problem):
        return self._finalised(x, p)

    def forward_backward(self, x, out, grad_loss, p: Problem):
        return self._finalised(
            x, p, out=out, go=grad_loss.to(torch.float32).reshape(-1).contiguous()
        )

    def row_stats(self, x, p: Problem):
        if x.device.type == "cpu":
            validate(p)
        n = x.shape[0]
        stats = torch.zeros(n, WIDTH, dtype=torch.float32, device=x.device)
        if n == 0:
            return stats
        v = _call_values(x, p)
        with _device_guard(x):
            if v["S"] == 1:
                self._rows(v, stats_out=True, STATS=stats)
            else:
                self._merge(v, self._partials(v), v["S"], gather=True, finalize=False, STATS=stats)
        return stats

    def finalize(self, stats, p: Problem):
        if stats.device.type == "cpu":
            validate(p)
        loss, pack = self._outputs(stats, p)
        if stats.shape[0]:
            v = _call_values(stats[:, :1], p)
            with _device_guard(stats):
                self._merge(
                    v, stats.contiguous(), 1, gather=False, finalize=True, PACK=pack, LOSS=loss
                )
        with _device_guard(stats):
            self._reduce(pack, loss, p.reduction)
        return loss, pack

    def _grad(self, v: dict, out, go, pack, mean: bool, skip_unit: bool = False):
        k, _ = _load()
        x = v["X"]
        args = {**v, "OUT": out, "stride_o": out.stride(0), "GO": go, "PACK": pack}
        args.update(go_mean=int(mean), skip_unit=int(skip_unit), POINT_CHUNK=k.POINT_CHUNK)
        _launch(k._grad_kernel, (x.shape[0], v["S"]), args, num_warps=v["num_warps"])

    def rescale(self, grad_loss, x, out, pack, p: Problem) -> None:
        n = x.shape[0]
        if n == 0:
            return
        go = grad_loss.to(torch.float32).reshape(-1).contiguous()
        v = _call_values(x, p)
        with _device_guard(x):
            if x.data_ptr() == out.data_ptr():  # the logits are gone: scale in place
                k, _ = _load()
                args = {**v, "OUT": out, "stride_o": out.stride(0), "GO": go}
                _launch(k._scale_kernel, (n, v["S"]), args, num_warps=v["num_warps"])
            else:  # recompute the rows whose upstream is not 1, from the logits
                self._grad(v, out, go, pack, mean=p.reduction == R_MEAN, skip_unit=True)

    def backward(self, grad_loss, x, out, pack, p: Problem) -> None:
        n = x.shape[0]
        if n == 0:
            return
        assert out.shape == x.shape and (out.stride(1) == 1 or x.shape[1] == 1)
        go = grad_loss.to(torch.float32).reshape(-1).contiguous()
        with _device_guard(x):
            self._grad(_call_values(x, p), out, go, pack, mean=p.reduction == R_MEAN)


register(TritonBackend())
