"""Compiled C++ CPU backend (``backend="cpp"``): csrc/cpu, math shared with CUDA in
csrc/rowmath.h.

The extension module ``fused_ls._C`` is loaded lazily, on the first use of a compiled backend,
and registers the kernel-level ops ``fused_ls::ext_forward`` / ``ext_backward`` /
``ext_forward_backward`` / ``ext_row_stats`` / ``ext_finalize`` (CPU, and CUDA when it was built
with nvcc; host side in csrc/ext_common.h). They take the logits and the ``Problem``
(``fused_ls._problem``) in the same order as the ``fused_ls::`` ops, and finalise every row inside
the kernel: the forward is one op call, the backward is one op call. When the extension cannot
be loaded, the backend reports why through ``unavailable_reason()`` and one warning is issued; the
pure-torch backend then serves "auto".

Per call on [N, C] logits: the forward reads the logits once; the gradient pass reads them once
and writes the gradient once (into the logits with ``inplace_backward``); forward_backward does
both while a row is in cache. Rows are spread over ``torch.get_num_threads()`` threads; each row
is reduced by one thread in a fixed order, so the results do not depend on the thread count.
``$FUSED_LS_CPU_ISA`` ("default", "avx2", "avx512") forces one of the compiled instruction-set
paths; ``isa()`` says which one runs.
"""

from __future__ import annotations

import warnings

import torch

from .._problem import Problem, fake_loss_pack, fake_stats
from .registry import Backend, Request, register

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_state: dict[str, object] = {}


def load_extension() -> str | None:
    """Load ``fused_ls._C`` once; None on success, else why it is not usable (warned once)."""
    if "error" not in _state:
        # Imported here for start-up cost alone (fused_ls.build and what it imports cost ~7 ms
        # of `import fused_ls`, needed only on first use); build imports nothing of fused_ls, so
        # there is no import circle.
        from .. import build

        try:
            build.load()  # the ahead-of-time or the cached first-use build (compiled if need be)
            _state["error"] = None
            _register_fakes()
        except Exception as e:  # noqa: BLE001 - BuildError (no compiler, ...), OSError, ...
            _state["error"] = f"the compiled extension fused_ls._C is not available: {e}"
            warnings.warn(
                f"fused_ls: {_state['error']}; the pure-torch backend will serve",
                RuntimeWarning,
                stacklevel=2,
            )
    return _state["error"]  # type: ignore[return-value]


def _register_fakes() -> None:
    # The kernel-level ops have the outputs of the fused_ls:: ops (fused_ls._problem's shapes).
    ops = {
        "forward": lambda x, *p: fake_loss_pack(x, x.shape[0], Problem(*p)),
        "backward": lambda grad_loss, x, out, pack, *p: None,
        "forward_backward": lambda x, out, go, *p: fake_loss_pack(x, x.shape[0], Problem(*p)),
        "rescale": lambda grad_loss, x, out, pack, *p: None,
        "row_stats": lambda x, *p: fake_stats(x),
        "finalize": lambda stats, *p: fake_loss_pack(stats, stats.shape[0], Problem(*p)),
    }
    for kind, fake in ops.items():
        torch.library.register_fake(f"fused_ls::ext_{kind}", fake)
    torch.library.register_fake("fused_ls::ext_accumulate_", lambda acc, src, add: None)
    torch.library.register_fake("fused_ls::ext_scaled_copy_", lambda out, src, scale: None)
    torch.library.register_fake("fused_ls::ext_gradient_buffer", torch.empty_like)


def accumulate_(acc, src, add: bool = True) -> None:
    """acc += src (acc = src without ``add``) for a contiguous fp32 ``acc`` and an
    fp32/bf16/fp16 ``src`` of its size; on CPU one vectorised pass (the compiled kernel;
    PyTorch's bf16 → fp32 conversion is scalar) when the extension is available."""
    if acc.device.type == "cpu" and load_extension() is None:
        torch.ops.fused_ls.ext_accumulate_(acc, src, add)
    elif add:
        acc.add_(src)
    else:
        acc.copy_(src)


def scaled_copy_(out, src, scale) -> None:
    """out = src · scale for a contiguous fp32 ``src``, a one-element fp32 ``scale`` and an
    fp32/bf16/fp16 ``out`` of src's size, rounded once. ``src`` is consumed: on CPU one
    vectorised pass (the compiled kernel) when the extension is available; elsewhere ``src`` is
    scaled in place and then converted (no temporary of its size)."""
    if src.device.type == "cpu" and load_extension() is None:
        torch.ops.fused_ls.ext_scaled_copy_(out, src, scale.reshape(1))
    else:
        out.copy_(src.mul_(scale))


def empty_cache() -> int:
    """Free the gradient buffers the CPU kernels keep for reuse (``fused_ls.empty_cache``);
    returns the bytes freed (0 when the extension is not loaded)."""
    if _state.get("error", "not loaded") is not None:
        return 0
    return int(torch.ops.fused_ls.ext_release_buffers())


def _require() -> None:
    why = load_extension()
    if why:
        raise RuntimeError(f"fused_ls: {why}")


def isa() -> str:
    """The CPU instruction-set path the next call takes ("default", "avx2" or "avx512")."""
    _require()
    return torch.ops.fused_ls.ext_cpu_isa()


def isas() -> list[str]:
    """The compiled CPU paths this CPU can run, narrowest first."""
    _require()
    return list(torch.ops.fused_ls.ext_cpu_isas())


class ExtensionBackend(Backend):
    """A backend served by the compiled extension's ops on one device type (cpp: CPU, cuda:
    CUDA); the ops dispatch on the tensors' device."""

    device_type = "?"
    other = "?"  # the sibling backend for the other device type, named in the reason
    traceable = True  # C++ ops with fake kernels: torch.compile traces the calls directly

    def unavailable_reason(self) -> str | None:
        return load_extension()

    def unsupported_reasons(self, req: Request) -> list[str]:
        why = []
        if req.device_type != self.device_type:
            why.append(
                f"{self.name} serves {self.device_type.upper()} tensors only (got "
                f"{req.device_type}; backend='{self.other}' serves the other device)"
            )
        if req.dtype not in _FLOATS:
            why.append(f"{self.name} supports fp32/fp64/bf16/fp16 logits, got {req.dtype}")
        return why

    @property
    def ops(self):
        """The extension's ops (loading the extension on first use)."""
        if _state.get("error", "not loaded") is not None:
            _require()
        return torch.ops.fused_ls

    def forward(self, x, p: Problem):
        return self.ops.ext_forward(x, *p)

    def backward(self, grad_loss, x, out, pack, p: Problem) -> None:
        self.ops.ext_backward(grad_loss, x, out, pack, *p)

    def forward_backward(self, x, out, grad_loss, p: Problem):
        return self.ops.ext_forward_backward(x, out, grad_loss, *p)

    def rescale(self, grad_loss, x, out, pack, p: Problem) -> None:
        self.ops.ext_rescale(grad_loss, x, out, pack, *p)

    def new_gradient(self, x):
        # CPU: large buffers from the extension's cache (no page faults step after step)
        if x.device.type == "cpu":
            return self.ops.ext_gradient_buffer(x)
        return torch.empty_like(x)

    def row_stats(self, x, p: Problem):
        return self.ops.ext_row_stats(x, *p)

    def finalize(self, stats, p: Problem):
        return self.ops.ext_finalize(stats, *p)


class CppBackend(ExtensionBackend):
    name = "cpp"
    device_type = "cpu"
    other = "cuda"


register(CppBackend())
