"""Triton backend: the two row kernels of ``fused_ls.triton_kernels`` behind the backend contract.

Serves CUDA tensors when triton imports, and CPU tensors only when the kernels were built by the
Triton interpreter (``TRITON_INTERPRET=1`` set before triton was first imported): that is how the
kernels are tested on machines without a GPU. fp64 logits are left to the other backends (the
contract accumulates fp64 in fp64, which these fp32-accumulating kernels do not).

Per call: the stats pass is two launches (row pieces, then the merge of the pieces), the grad pass
one launch. The launch configuration depends only on shapes, and nothing here reads device
values on the host, so both passes can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import Backend, GradTerms, Request, RowStats, register

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
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(k._row_stats_kernel, InterpretedFunction)


def launch_config(C: int) -> tuple[int, int, int, int]:
    """(columns per program, programs per row S, BLOCK, num_warps) for rows of C classes."""
    k, _ = _load()
    cols = k.SPLIT_COLS if C >= k.SPLIT_MIN_C else C
    splits = -(-C // cols)
    block = min(k.BLOCK_MAX, _next_pow2(min(cols, C)))
    return cols, splits, block, k.num_warps_for(block)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


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

    def row_stats(self, x, R, ridx_a, ridx_b, softcap, need_pz):
        k, _ = _load()
        n, c = x.shape
        assert x.stride(1) == 1 or c == 1, "contract: unit stride on the class dim"
        R = R.contiguous()
        cols, splits, block, warps = launch_config(c)
        f32 = dict(dtype=torch.float32, device=x.device)
        part = torch.empty(n, splits, 8, **f32)
        part_arg = torch.empty(n, splits, dtype=torch.int64, device=x.device)
        m, lse, dot_a, dot_b, pz = (torch.empty(n, **f32) for _ in range(5))
        argmax = torch.empty(n, dtype=torch.int64, device=x.device)
        per_row = R.shape[0] > 1
        ra = ridx_a if per_row else argmax  # any int64 [N] tensor when unused
        rb = ridx_b if ridx_b is not None else ra
        if n == 0:
            return RowStats(
                m,
                lse,
                argmax,
                dot_a,
                dot_b if ridx_b is not None else None,
                pz if need_pz else None,
            )
        with _device_guard(x):
            k._row_stats_kernel[(n, splits)](
                x,
                x.stride(0),
                R,
                R.stride(0),
                ra,
                rb,
                part,
                part_arg,
                c,
                splits,
                cols,
                float(softcap),
                BLOCK=block,
                PER_ROW_R=per_row,
                HAS_B=ridx_b is not None,
                NEED_PZ=bool(need_pz),
                HAS_SOFTCAP=softcap > 0,
                num_warps=warps,
            )
            k._merge_stats_kernel[(n,)](
                part,
                part_arg,
                m,
                lse,
                argmax,
                dot_a,
                dot_b,
                pz,
                splits,
                SP=_next_pow2(splits),
                num_warps=1,
            )
        return RowStats(
            m, lse, argmax, dot_a, dot_b if ridx_b is not None else None, pz if need_pz else None
        )

    def grad_rows(
        self,
        x,
        out,
        R,
        ridx_a,
        ridx_b,
        lse,
        pz,
        terms: GradTerms,
        sparse_cols,
        sparse_mass,
        softcap,
    ):
        k, _ = _load()
        n, c = x.shape
        if n == 0:
            return
        assert out.shape == x.shape and (out.stride(1) == 1 or c == 1)
        R = R.contiguous()
        cols, splits, block, warps = launch_config(c)
        zero = torch.zeros_like(terms.coef)
        # One [N, 8] fp32 row of coefficients per sample (O(N) copies): coef, γ, u_a, u_b, t_a, t_b.
        pack = torch.stack(
            [
                terms.coef,
                terms.gamma if terms.gamma is not None else zero,
                terms.u_a,
                terms.u_b if terms.u_b is not None else zero,
                terms.t_a,
                terms.t_b if terms.t_b is not None else zero,
                zero,
                zero,
            ],
            1,
        ).to(torch.float32)
        y_a = terms.y_a.contiguous()
        y_b = terms.y_b.contiguous() if terms.y_b is not None else y_a
        per_row = R.shape[0] > 1
        ra = ridx_a.contiguous() if per_row else y_a
        rb = ridx_b.contiguous() if ridx_b is not None else ra
        if sparse_cols is not None and sparse_cols.shape[1] > 0:
            n_sp = sparse_cols.shape[1]
            sp_cols = sparse_cols.contiguous()
            sp_mass = sparse_mass.to(torch.float32).contiguous()
        else:  # no sparse columns: any valid pointers, never read (K = 0)
            n_sp, sp_cols, sp_mass = 0, y_a, lse
        has_pz = terms.gamma is not None
        with _device_guard(x):
            k._grad_kernel[(n, splits)](
                x,
                x.stride(0),
                out,
                out.stride(0),
                R,
                R.stride(0),
                ra,
                rb,
                lse,
                pz if has_pz else lse,
                pack,
                y_a,
                y_b,
                sp_cols,
                sp_mass,
                n_sp,
                c,
                cols,
                float(softcap),
                BLOCK=block,
                KP=_next_pow2(n_sp + 2),
                PER_ROW_R=per_row,
                HAS_B=ridx_b is not None,
                NEED_PZ=has_pz,
                HAS_SOFTCAP=softcap > 0,
                POINT_CHUNK=k.POINT_CHUNK,
                num_warps=warps,
            )


register(TritonBackend())
