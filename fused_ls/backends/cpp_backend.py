"""Compiled C++ CPU backend (``backend="cpp"``): fused_ls/csrc/cpu, math shared with CUDA in
fused_ls/csrc/rowmath.h.

The extension module ``fused_ls._C`` is loaded lazily, the first time a backend is looked up, and
registers the kernel-level ops ``fused_ls::ext_row_stats`` / ``fused_ls::ext_grad_rows`` (CPU, and
CUDA when it was built with nvcc). When it cannot be loaded (not built, or built against another
torch), the backend reports why through ``unavailable_reason()`` and one warning is issued; the
pure-torch backend then serves "auto".

Per call on [N, C] logits: the statistics pass reads the logits once; the gradient pass reads them
once and writes the gradient once (into the logits with ``inplace_backward``). Rows are spread
over ``torch.get_num_threads()`` threads; each row is reduced by one thread in a fixed order, so
the results do not depend on the thread count. ``$FUSED_LS_CPU_ISA`` ("default", "avx2",
"avx512") forces one of the compiled instruction-set paths; ``isa()`` says which one runs.
"""

from __future__ import annotations

import warnings

import torch

from . import Backend, Request, RowStats, acc_dtype, register

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_state: dict[str, object] = {}


def load_extension() -> str | None:
    """Load ``fused_ls._C`` once; None on success, else why it is not usable (warned once)."""
    if "error" not in _state:
        try:
            from fused_ls import build

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
    # Shapes of the kernel-level ops for tracing (the Python ops are what users trace; these make
    # the kernel ops traceable on their own too).
    @torch.library.register_fake("fused_ls::ext_row_stats")
    def _(x, R, ridx_a, ridx_b, softcap, need_pz):
        n = x.shape[0]
        acc = acc_dtype(x.dtype)
        row = lambda k=n: x.new_empty(k, dtype=acc)  # noqa: E731
        return (
            row(),
            row(),
            x.new_empty(n, dtype=torch.int64),
            row(),
            row(n if ridx_b is not None else 0),
            row(n if need_pz else 0),
        )

    @torch.library.register_fake("fused_ls::ext_grad_rows")
    def _(
        x,
        out,
        R,
        ridx_a,
        ridx_b,
        lse,
        pz,
        coef,
        gamma,
        u_a,
        u_b,
        y_a,
        t_a,
        y_b,
        t_b,
        sparse_cols,
        sparse_mass,
        softcap,
    ):
        return None


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


def ext_row_stats(x, R, ridx_a, ridx_b, softcap, need_pz) -> RowStats:
    m, lse, am, dot_a, dot_b, pz = torch.ops.fused_ls.ext_row_stats(
        x, R, ridx_a, ridx_b, float(softcap), bool(need_pz)
    )
    return RowStats(
        m, lse, am, dot_a, dot_b if ridx_b is not None else None, pz if need_pz else None
    )


def ext_grad_rows(
    x, out, R, ridx_a, ridx_b, lse, pz, terms, sparse_cols, sparse_mass, softcap
) -> None:
    torch.ops.fused_ls.ext_grad_rows(
        x,
        out,
        R,
        ridx_a,
        ridx_b,
        lse,
        pz if terms.gamma is not None else None,
        terms.coef,
        terms.gamma,
        terms.u_a,
        terms.u_b,
        terms.y_a,
        terms.t_a,
        terms.y_b,
        terms.t_b,
        sparse_cols,
        sparse_mass,
        float(softcap),
    )


class ExtensionBackend(Backend):
    """A backend served by the compiled extension's ops on one device type (cpp: CPU, cuda:
    CUDA); the ops dispatch on the tensors' device."""

    device_type = "?"
    other = "?"  # the sibling backend for the other device type, named in the reason

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

    def row_stats(self, x, R, ridx_a, ridx_b, softcap, need_pz):
        return ext_row_stats(x, R, ridx_a, ridx_b, softcap, need_pz)

    def grad_rows(
        self, x, out, R, ridx_a, ridx_b, lse, pz, terms, sparse_cols, sparse_mass, softcap
    ):
        ext_grad_rows(x, out, R, ridx_a, ridx_b, lse, pz, terms, sparse_cols, sparse_mass, softcap)


class CppBackend(ExtensionBackend):
    name = "cpp"
    device_type = "cpu"
    other = "cuda"


register(CppBackend())
# The registry imports this module on first use of any backend (never at `import fused_ls`); load
# the library then, so that a missing build warns once, early.
load_extension()
