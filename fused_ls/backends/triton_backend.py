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

import torch

from .._problem import R_MEAN, R_NONE, WIDTH, Problem
from . import FORWARD_BACKWARD_MEAN, Backend, Request, register
from .torch_backend import validate

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


class _Args:
    """The kernel arguments shared by the launches of one call (absent tensors → any valid
    pointer of the right type, never read)."""

    def __init__(self, x: torch.Tensor, p: Problem):
        f32 = torch.float32
        self.p = p
        self.dummy = p.mass
        self.y_a = p.target
        self.y_b = p.mix_target if p.mix_target is not None else p.target
        self.w = p.weight if p.weight is not None else p.mass
        self.R = p.R if p.R is not None else p.mass
        self.stride_r = p.R.stride(0) if p.R is not None else 0
        self.K = p.sp_idx.shape[1] if p.sp_idx is not None else 0
        self.sp_idx = p.sp_idx if p.sp_idx is not None else p.target
        self.sp_val = p.sp_val if p.sp_val is not None else p.mass
        self.eps_rows = p.eps_rows.to(f32) if p.eps_rows is not None else p.mass
        self.lam_rows = p.mix_rows.to(f32) if p.mix_rows is not None else p.mass
        self.r_mode = 2 if p.R is not None else (1 if p.weight is not None else 0)
        self.kp = _next_pow2(2 * self.K + 2)
        self.cols, self.splits, self.block, self.warps = launch_config(x.shape[1])
        self.common = dict(
            num_warps=self.warps,
            # device-side asserts for the target / per-sample checks (CUDA; the interpreter is
            # checked in Python); integer-overflow sanitising stays off
            debug=True,
            sanitize_overflow=False,
        )

    def flags(self):
        p = self.p
        return dict(
            R_MODE=self.r_mode,
            HAS_B=p.R is not None and p.mix_target is not None,
            NEED_PZ=p.confidence_penalty != 0.0,
            HAS_SOFTCAP=p.softcap > 0,
        )


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
    def _rows(self, x, a: _Args, *, pack, loss, stats, part, out, go, finalize, grad, stats_out):
        k, _ = _load()
        p = a.p
        n, c = x.shape
        k._rows_kernel[(n, a.splits)](
            x, x.stride(0),
            out if out is not None else x, out.stride(0) if out is not None else 0,
            a.y_a, a.y_b, a.w, a.R, a.stride_r, p.mass, a.sp_idx, a.sp_val, a.K,
            a.eps_rows, a.lam_rows, go if go is not None else a.dummy,
            pack if pack is not None else a.dummy,
            loss if loss is not None else a.dummy,
            stats if stats is not None else a.dummy,
            part if part is not None else a.dummy,
            c, p.col_offset, p.num_classes, p.ignore_index,
            p.r0, p.smoothing, p.mix_lambda, p.adaptive_threshold, p.adaptive_factor,
            p.z_loss, p.confidence_penalty, p.softcap,
            int(p.eps_rows is not None), int(p.mix_rows is not None), int(p.mix_target is not None),
            int(p.weight is not None), p.adaptive_mode,
            int(p.reduction == R_NONE), int(p.reduction == R_NONE), a.splits, a.cols,
            BLOCK=a.block, KP=a.kp, POINT_CHUNK=k.POINT_CHUNK,
            FINALIZE=finalize, GRAD=grad, STATS_OUT=stats_out, NEED_STATS=p.need_stats,
            **a.flags(), **a.common,
        )  # fmt: skip

    def _partials(self, x, a: _Args):
        """The per-split statistics [N, splits, 8] of rows split over programs (merged next)."""
        part = torch.zeros(x.shape[0], a.splits, WIDTH, dtype=torch.float32, device=x.device)
        self._rows(
            x, a, pack=None, loss=None, stats=None, part=part, out=None, go=None,
            finalize=False, grad=False, stats_out=False,
        )  # fmt: skip
        return part

    def _merge(self, x, a: _Args, part, splits, *, pack, loss, stats, gather, finalize):
        k, _ = _load()
        p = a.p
        n = part.shape[0]
        k._merge_kernel[(n,)](
            x if x is not None else part, x.stride(0) if x is not None else 0, part, splits,
            a.y_a, a.y_b, a.w, p.mass, a.sp_idx, a.sp_val, a.K,
            a.eps_rows, a.lam_rows,
            pack if pack is not None else a.dummy,
            loss if loss is not None else a.dummy,
            stats if stats is not None else a.dummy,
            x.shape[1] if x is not None else 0, p.col_offset, p.num_classes, p.ignore_index,
            p.smoothing, p.mix_lambda, p.adaptive_threshold, p.adaptive_factor, p.z_loss,
            p.confidence_penalty, p.softcap,
            int(p.eps_rows is not None), int(p.mix_rows is not None), int(p.mix_target is not None),
            int(p.weight is not None), p.adaptive_mode, int(p.reduction == R_NONE),
            SP=_next_pow2(splits), KP=a.kp, DENSE=p.R is not None,
            NEED_PZ=p.confidence_penalty != 0.0, HAS_SOFTCAP=p.softcap > 0,
            GATHER=gather, FINALIZE=finalize, num_warps=1, debug=True, sanitize_overflow=False,
        )  # fmt: skip

    def _reduce(self, pack, loss, p: Problem):
        k, _ = _load()
        k._reduce_kernel[(1,)](
            pack, loss, pack.shape[0] - 1, p.reduction, BLOCK=k.REDUCE_BLOCK, num_warps=4
        )

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
            self._reduce(pack, loss, p)
            return loss, pack
        a = _Args(x, p)
        with _device_guard(x):
            if a.splits == 1:
                self._rows(
                    x, a, pack=pack, loss=loss, stats=None, part=None, out=out, go=go,
                    finalize=True, grad=out is not None, stats_out=False,
                )  # fmt: skip
            else:
                self._merge(
                    x, a, self._partials(x, a), a.splits, pack=pack, loss=loss, stats=None,
                    gather=True, finalize=True,
                )  # fmt: skip
                if out is not None:
                    self._grad(x, out, go, pack, p, a, mean=False)
            self._reduce(pack, loss, p)
        return loss, pack

    def forward(self, x, p: Problem):
        return self._finalised(x, p)

    def forward_backward(self, x, out, grad_loss, p: Problem):
        if p.reduction == R_MEAN:
            raise ValueError(FORWARD_BACKWARD_MEAN)
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
        a = _Args(x, p)
        with _device_guard(x):
            if a.splits == 1:
                self._rows(
                    x, a, pack=None, loss=None, stats=stats, part=None, out=None, go=None,
                    finalize=False, grad=False, stats_out=True,
                )  # fmt: skip
            else:
                self._merge(
                    x, a, self._partials(x, a), a.splits, pack=None, loss=None, stats=stats,
                    gather=True, finalize=False,
                )  # fmt: skip
        return stats

    def finalize(self, stats, p: Problem):
        if stats.device.type == "cpu":
            validate(p)
        loss, pack = self._outputs(stats, p)
        if stats.shape[0]:
            a = _Args(stats[:, :1], p)
            with _device_guard(stats):
                self._merge(
                    None, a, stats.contiguous(), 1, pack=pack, loss=loss, stats=None,
                    gather=False, finalize=True,
                )  # fmt: skip
        with _device_guard(stats):
            self._reduce(pack, loss, p)
        return loss, pack

    def _grad(self, x, out, go, pack, p: Problem, a: _Args, mean: bool):
        k, _ = _load()
        n, c = x.shape
        k._grad_kernel[(n, a.splits)](
            x, x.stride(0), out, out.stride(0),
            a.y_a, a.y_b, a.w, a.R, a.stride_r, p.mass, a.sp_idx, a.sp_val, a.K,
            a.lam_rows, go, pack,
            c, p.col_offset, p.ignore_index, p.r0, p.mix_lambda, p.z_loss,
            p.confidence_penalty, p.softcap,
            int(p.mix_rows is not None), int(p.mix_target is not None), int(p.weight is not None),
            int(p.reduction == R_NONE), int(mean), n,
            a.cols,
            BLOCK=a.block, KP=a.kp, POINT_CHUNK=k.POINT_CHUNK, **a.flags(),
            num_warps=a.warps,
        )  # fmt: skip

    def backward(self, grad_loss, x, out, pack, p: Problem) -> None:
        n = x.shape[0]
        if n == 0:
            return
        assert out.shape == x.shape and (out.stride(1) == 1 or x.shape[1] == 1)
        go = grad_loss.to(torch.float32).reshape(-1).contiguous()
        with _device_guard(x):
            self._grad(x, out, go, pack, p, _Args(x, p), mean=p.reduction == R_MEAN)


register(TritonBackend())
