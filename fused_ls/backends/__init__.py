"""The backends: the contract and the dispatch point (``registry``), and the four
implementations, each registered when its module is imported (importing them is cheap: the
compiled extension and triton load on a backend's first use)."""

from . import cpp_backend, cuda_backend, torch_backend, triton_backend  # noqa: F401 (registration)
from .registry import (
    BACKEND_NAMES,
    ENV_VAR,
    Backend,
    Request,
    acc_dtype,
    get,
    is_small,
    reasons_for,
    resolve,
)

__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "Backend",
    "Request",
    "acc_dtype",
    "get",
    "is_small",
    "reasons_for",
    "resolve",
]
