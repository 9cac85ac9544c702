"""The backend contract, the registry and the single dispatch point.

Every backend serves the same row-level contract (docs/design.md §2). For logits ``x`` of shape
[N, C] (unit stride on C) and a ``Problem`` (targets, the prepared smoothing of
``fused_ls._smoothing``, per-sample tensors and the scalar options, see ``fused_ls._problem``):

``forward(x, p) -> (loss, pack)``
    statistics of every row, finalised per row into the loss; ``loss`` is reduced as
    ``p.reduction`` says ([N] for "none", [] for "mean"/"sum") and ``pack`` is the [N + 1, 8]
    accumulation-dtype row pack of ``fused_ls._problem.PACK`` (lse, effective ε, Σpz,
    confidence, argmax, loss_i, W_i; the last row holds ΣW and Σloss).
``backward(grad_loss, x, out, pack, p)``
    writes d(grad_loss · loss)/dx into ``out`` (which may be ``x`` itself).
``forward_backward(x, out, grad_loss, p) -> (loss, pack)``
    both in one pass over each row, for an upstream gradient ``grad_loss`` known in advance
    (every reduction: "mean"'s denominator Σ W_i depends only on the targets and class weights,
    so it is known before the rows are read): what the loss's forward uses when autograd will
    need the gradient, and the fused linear head per chunk.
``rescale(grad_loss, x, out, pack, p)``
    ``out`` holds the gradient for a unit upstream gradient (forward_backward's); make it that of
    ``grad_loss``: rows (or all, for a scalar) whose upstream is 1 are left untouched (decided on
    the device), the others are recomputed from ``x`` in one pass, or, when ``x`` is ``out``
    itself (the logits were overwritten), scaled in place in the accumulation dtype.
``row_stats(x, p) -> stats``
    the unfinalised statistics of ``fused_ls._problem.STATS`` ([N, 8]), for the logits' columns
    ``[p.col_offset, p.col_offset + C)`` of ``p.num_classes``: what vocabulary sharding merges.
``finalize(stats, p) -> (loss, pack)``
    the loss from (merged) statistics.

The pure-torch backend implements the two passes in Python and keeps the readable
finalisation: it is the reference the compiled backends (``cpp``, ``cuda``: one C++ op per
pass, ``triton``) are tested against; those finalise inside their kernels.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .._problem import acc_dtype

__all__ = ["BACKEND_NAMES", "Backend", "Request", "acc_dtype", "get", "is_small", "reasons_for"]

BACKEND_NAMES = ("torch", "cpp", "cuda", "triton")
ENV_VAR = "FUSED_LS_BACKEND"
GRAD_IN_FORWARD_ENV = "FUSED_LS_GRAD_IN_FORWARD"


@dataclass(frozen=True)
class Request:
    """What a backend needs to know to say whether it can serve a call."""

    device_type: str
    dtype: torch.dtype
    dense_similarity: bool = False
    sparse_similarity: bool = False
    # fewer logits than SMALL_LOGITS (CUDA only): the host's fixed cost per call is the time
    small: bool = False


class Backend:
    name = "?"
    # The Python-implemented backends are opaque to torch.compile only through the fused_ls::
    # custom ops; the compiled ones call their own (C++) ops and can be traced directly.
    traceable = False

    def unavailable_reason(self) -> str | None:
        """None when the backend is usable in this process, else why not."""
        return None

    def unsupported_reasons(self, req: Request) -> list[str]:
        """Why this backend cannot serve this particular call (empty list: it can)."""
        return []

    def reasons(self, req: Request) -> list[str]:
        why = self.unavailable_reason()
        return [why] if why else self.unsupported_reasons(req)

    # -- the contract (see the module docstring) -------------------------------------------------
    def row_stats(self, x, p):
        raise NotImplementedError

    def finalize(self, stats, p):
        raise NotImplementedError

    def forward(self, x, p):
        return self.finalize(self.row_stats(x, p), p)

    def backward(self, grad_loss, x, out, pack, p) -> None:
        raise NotImplementedError

    def forward_backward(self, x, out, grad_loss, p):
        loss, pack = self.forward(x, p)
        self.backward(grad_loss, x, out, pack, p)
        return loss, pack

    def rescale(self, grad_loss, x, out, pack, p) -> None:
        # (the portable form; the compiled backends do it in one kernel pass, skipping unit rows)
        n = out.shape[0]
        if n == 0:
            return
        go = grad_loss.reshape(-1)
        if go.device.type == "cpu" and bool((go == 1).all()):  # no host sync on CPU
            return
        if x.data_ptr() != out.data_ptr():  # the logits are here: recompute, rounded once
            self.backward(grad_loss, x, out, pack, p)
            return
        step = max(1, (1 << 20) // max(out.shape[1], 1))  # fp32 chunks of ~4 MiB
        for s in range(0, n, step):
            blk = out[s : s + step]
            blk.copy_(scaled(blk, go[s : s + step] if go.numel() > 1 else go, pack.dtype))

    def new_gradient(self, x):
        """A buffer of the logits' shape and dtype for a gradient that will be written in full."""
        return torch.empty_like(x)

    def grad_in_forward(self, device: torch.device) -> bool:
        """Whether the loss computes the gradient in its forward on this device (fused_ls._ops):
        on CPU always; on a GPU once this backend's path has been measured there
        (``gpu_grad_in_forward``); ``$FUSED_LS_GRAD_IN_FORWARD`` = 1 / 0 forces it on / off."""
        env = os.environ.get(GRAD_IN_FORWARD_ENV, "")
        if env in ("0", "1"):
            return env == "1"
        return device.type == "cpu" or self.gpu_grad_in_forward

    # measured on a GPU with the gradient in the forward (the defaults on CUDA follow)
    gpu_grad_in_forward = False


def scaled(g: Tensor, grad_loss: Tensor, acc: torch.dtype) -> Tensor:
    """grad_loss · g for a gradient g [n, C] and an upstream grad_loss (a scalar, or [n]: per
    row), computed in the accumulation dtype ``acc`` and returned in it: the caller rounds it to
    g's dtype once. Zero entries stay zero whatever the upstream (as the kernels' scaled
    coefficients)."""
    go = grad_loss.to(acc)
    go = go[:, None] if go.dim() == 1 else go
    v = g.to(acc)
    return torch.where(v == 0, 0, v * go)


_REGISTRY: dict[str, Backend] = {}

# Preference order of "auto" per device type: the first backend with no reasons serves. On CUDA
# the Triton kernels move the logits 1.5-2.3x faster than the CUDA C++ ones, but a call costs
# ~550 us of host time against ~190 us for the C++ op (H200, torch 2.11, triton 3.6: docs/
# bench_gpu_h200.md): below SMALL_LOGITS elements the C++ op comes first (1024 x 32000 bf16
# forward + backward: 280 us vs 756 us, F.cross_entropy 416 us; 4096 x 32000: 777 vs 785 us).
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
_AUTO_ORDER_SMALL = {"cuda": ("cuda", "triton", "torch")}
SMALL_LOGITS = 1 << 26


def is_small(device: torch.device, n_logits: int) -> bool:
    """``Request.small`` for a call on ``n_logits`` logits on ``device`` (CUDA only)."""
    return device.type == "cuda" and n_logits < SMALL_LOGITS


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    return _REGISTRY[name]


def reasons_for(name: str, req: Request | None) -> list[str]:
    """Why backend `name` cannot serve `req` (or, with req None, cannot run here at all)."""
    b = _REGISTRY.get(name)
    if b is None:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if req is None:
        why = b.unavailable_reason()
        return [why] if why else []
    return b.reasons(req)


@functools.lru_cache(maxsize=256)
def _resolve(
    backend: str,
    device_type: str,
    dtype: torch.dtype,
    dense: bool,
    sparse: bool,
    small: bool,
    env: str,
) -> str:
    if backend == "auto":
        backend = env or "auto"
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(
            f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}"
            + (f" (from ${ENV_VAR})" if env == backend else "")
        )
    req = Request(device_type, dtype, dense, sparse, small)
    if backend != "auto":
        why = reasons_for(backend, req)
        if why:
            raise ValueError(f"backend {backend!r} cannot serve this call: " + "; ".join(why))
        return backend
    tried = []
    order = (_AUTO_ORDER_SMALL if small else _AUTO_ORDER).get(device_type)
    for name in order or _AUTO_ORDER.get(device_type, ("torch",)):
        why = reasons_for(name, req)
        if not why:
            return name
        tried.append(f"{name}: " + "; ".join(why))
    raise ValueError("no backend can serve this call:\n  " + "\n  ".join(tried))


@torch.compiler.assume_constant_result
def resolve_name(
    backend: str, device_type: str, dtype: torch.dtype, dense: bool, sparse: bool, small: bool
):
    """``resolve`` on plain values (memoised per value of $FUSED_LS_BACKEND). torch.compile runs
    it eagerly while tracing and keeps the result as a constant, so backend discovery (imports,
    loading the extension) never happens inside traced code."""
    env = os.environ.get(ENV_VAR, "") if backend == "auto" else ""
    return _resolve(backend, device_type, dtype, dense, sparse, small, env)


def resolve(backend: str, req: Request) -> str:
    """The single dispatch point: the name of the backend that will serve `req`.

    ``backend`` is "auto" or a name; the environment variable FUSED_LS_BACKEND overrides "auto".
    An explicit choice that cannot serve raises ValueError with the reasons; "auto" takes the first
    backend of the device's preference order that can, and raises listing every reason otherwise.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    return resolve_name(
        backend, req.device_type, req.dtype, req.dense_similarity, req.sparse_similarity, req.small
    )
