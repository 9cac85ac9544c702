"""Compiled CUDA backend (``backend="cuda"``): csrc/cuda/kernels.cu, math shared with the CPU
kernel in csrc/rowmath.h.

The same extension module as the cpp backend (``fused_ls._C``, loaded lazily); its CUDA kernels
exist only when it was built with nvcc against a CUDA build of torch. Per call on [N, C] logits:
the statistics pass reads the logits once (rows split over several thread blocks when N is small
and C large, merged by a second small kernel); the gradient pass reads them once and writes the
gradient once. No host synchronisation.
"""

from __future__ import annotations

import torch

from . import Backend, Request, register
from .cpp_backend import ext_grad_rows, ext_row_stats, load_extension

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registered CUDA kernels (it was built with nvcc)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_ls::ext_row_stats", "CUDA")


class CudaBackend(Backend):
    name = "cuda"

    def unavailable_reason(self) -> str | None:
        why = load_extension()
        if why:
            return why
        if not has_cuda_kernels():
            return (
                "the compiled extension was built without CUDA kernels (building them needs "
                "nvcc and a CUDA build of torch at install time)"
            )
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None

    def unsupported_reasons(self, req: Request) -> list[str]:
        why = []
        if req.device_type != "cuda":
            why.append(
                f"cuda serves CUDA tensors only (got {req.device_type}; the CPU kernel is "
                "backend='cpp')"
            )
        if req.dtype not in _FLOATS:
            why.append(f"cuda supports fp32/fp64/bf16/fp16 logits, got {req.dtype}")
        return why

    def row_stats(self, x, R, ridx_a, ridx_b, softcap, need_pz):
        return ext_row_stats(x, R, ridx_a, ridx_b, softcap, need_pz)

    def grad_rows(
        self, x, out, R, ridx_a, ridx_b, lse, pz, terms, sparse_cols, sparse_mass, softcap
    ):
        ext_grad_rows(x, out, R, ridx_a, ridx_b, lse, pz, terms, sparse_cols, sparse_mass, softcap)


register(CudaBackend())
