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

from .cpp_backend import ExtensionBackend, load_extension
from .registry import register


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registered CUDA kernels (it was built with nvcc)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_ls::ext_forward", "CUDA")


class CudaBackend(ExtensionBackend):
    name = "cuda"
    device_type = "cuda"
    other = "cpp"

    def unavailable_reason(self) -> str | None:
        why = load_extension()
        if why:
            return why
        if not has_cuda_kernels():
            return (
                "the compiled extension was built without CUDA kernels (they need nvcc and a "
                "CUDA build of torch when the extension is built: at first use, by "
                "`python -m fused_ls.build`, or at install)"
            )
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None


register(CudaBackend())
