"""Backends and the single dispatch point.

Every backend implements the same two row kernels of DESIGN.md §2; everything else (validation,
the O(N) finalisation of the loss from row statistics, reductions, autograd) is shared code in
``fused_ls._ops``. The kernel contract, for logits ``x`` of shape [N, C] with unit stride on C:

``row_stats(x, R, ridx_a, ridx_b, softcap, need_pz) -> RowStats``
    one streaming pass over each row of ``z = softcap·tanh(x/softcap)`` (identity when softcap
    is 0), gathering

    - ``m``      = max_c z_c and ``argmax`` (first maximal index),
    - ``lse``    = m + log Σ_c exp(z_c − m),
    - ``dot_a``  = Σ_c R[ra_i, c] · z_c, terms with R = 0 contributing 0 even where z = −inf,
    - ``dot_b``  = the same with row ``rb_i`` (only when ``ridx_b`` is given),
    - ``pz``     = Σ_c p_c z_c (only when ``need_pz``; terms with p = 0 contribute 0).

    ``R`` is [1, C] (every row uses row 0; ``ridx_a``/``ridx_b`` are None) or [C, C]
    (``ridx_a``/``ridx_b`` pick a row per sample, already clamped to [0, C)). All outputs are in
    the accumulation dtype (fp32, or fp64 for fp64 logits); ``argmax`` is int64.

``grad_rows(x, out, R, ridx_a, ridx_b, lse, pz, terms, sparse_cols, sparse_mass, softcap)``
    writes, for every row i and column c, in ``out``'s dtype (``out`` may alias ``x``):

        g_ic = ( [coef_i + γ_i (z_c − pz_i)] · p_c − u_a,i R[ra_i, c] − u_b,i R[rb_i, c]
                 − t_a,i [c = y_a,i] − t_b,i [c = y_b,i] − Σ_j mass_ij [c = col_ij] ) · dz_c/dx_c

    with p_c = exp(z_c − lse_i). The target terms must be subtracted in the accumulation dtype
    before rounding (DESIGN.md §3). Optional terms are None when absent. All indices (``y_a``,
    ``y_b``, ``ridx_*``, ``sparse_cols``) are already in [0, C); ignored rows have index 0 and all
    coefficients zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import Tensor

BACKEND_NAMES = ("torch", "cpp", "cuda", "triton")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the contract: fp32 whatever the input dtype; fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


ENV_VAR = "FUSED_LS_BACKEND"


@dataclass
class RowStats:
    m: Tensor
    lse: Tensor
    argmax: Tensor
    dot_a: Tensor
    dot_b: Tensor | None
    pz: Tensor | None


@dataclass
class GradTerms:
    """Per-row coefficients of the gradient formula, already multiplied by the upstream grad."""

    coef: Tensor
    gamma: Tensor | None
    u_a: Tensor
    u_b: Tensor | None
    y_a: Tensor
    t_a: Tensor
    y_b: Tensor | None
    t_b: Tensor | None


@dataclass(frozen=True)
class Request:
    """What a backend needs to know to say whether it can serve a call."""

    device_type: str
    dtype: torch.dtype
    num_classes: int
    dense_similarity: bool
    sparse_similarity: bool


class Backend:
    name = "?"

    def unavailable_reason(self) -> str | None:
        """None when the backend is usable in this process, else why not."""
        return None

    def unsupported_reasons(self, req: Request) -> list[str]:
        """Why this backend cannot serve this particular call (empty list: it can)."""
        return []

    def row_stats(self, x, R, ridx_a, ridx_b, softcap: float, need_pz: bool) -> RowStats:
        raise NotImplementedError

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
        softcap: float,
    ) -> None:
        raise NotImplementedError

    def reasons(self, req: Request) -> list[str]:
        why = self.unavailable_reason()
        return [why] if why else self.unsupported_reasons(req)


_REGISTRY: dict[str, Backend] = {}

# Preference order of "auto" per device type: the first backend with no reasons serves.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    _load_all()
    return _REGISTRY[name]


def _load_all() -> None:
    # Import lazily so that `import fused_ls` never needs a compiler, triton or a GPU.
    if "torch" in _REGISTRY:
        return
    from . import torch_backend  # noqa: F401

    for mod in ("triton_backend", "cpp_backend", "cuda_backend"):
        try:
            __import__(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise


def _missing(name: str) -> str:
    return {
        "cpp": "the compiled C++ extension is not part of this build",
        "cuda": "the compiled CUDA extension is not part of this build",
        "triton": "the Triton backend is not part of this build",
    }.get(name, "unknown")


def reasons_for(name: str, req: Request | None) -> list[str]:
    """Why backend `name` cannot serve `req` (or, with req None, cannot run here at all)."""
    _load_all()
    b = _REGISTRY.get(name)
    if b is None:
        return [_missing(name)]
    if req is None:
        why = b.unavailable_reason()
        return [why] if why else []
    return b.reasons(req)


def resolve(backend: str, req: Request) -> str:
    """The single dispatch point: the name of the backend that will serve `req`.

    ``backend`` is "auto" or a name; the environment variable FUSED_LS_BACKEND overrides "auto".
    An explicit choice that cannot serve raises ValueError with the reasons; "auto" takes the first
    backend of the device's preference order that can, and raises listing every reason otherwise.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(
            f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}"
            + (f" (from ${ENV_VAR})" if os.environ.get(ENV_VAR) == backend else "")
        )
    if backend != "auto":
        why = reasons_for(backend, req)
        if why:
            raise ValueError(f"backend {backend!r} cannot serve this call: " + "; ".join(why))
        return backend
    order = _AUTO_ORDER.get(req.device_type, ("torch",))
    tried = []
    for name in order:
        why = reasons_for(name, req)
        if not why:
            return name
        tried.append(f"{name}: " + "; ".join(why))
    raise ValueError("no backend can serve this call:\n  " + "\n  ".join(tried))
