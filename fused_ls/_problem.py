"""What the row passes of every backend read besides the logits, and the layouts they write.

A ``Problem`` holds the targets, the prepared smoothing (``fused_ls._smoothing``), the per-sample
tensors and the scalar options, in exactly the order of the ops' schema (``PROBLEM_SCHEMA``), so
that ``op(x, *problem)`` is the call of every ``fused_ls::`` op and of the compiled kernels.

Row statistics (``row_stats``; what vocabulary sharding merges), [N, 8] accumulation dtype, for
the columns [col_offset, col_offset + C) of a row of z = softcap·tanh(x/softcap):

    STATS: m = max z | d = Σ exp(z − m) | s = Σ exp(z − m)·z | D_a | D_b | z_ya | z_yb | argmax

with D_a = Σ_c R_{y_a,c} z_c + Σ_j rw_{a,j} z_{col_j} (dense part and sparse neighbours; zero-mass
terms are 0 even where z = −inf), D_b the same for the mixup target (the dense part equals D_a's
unless the similarity is dense), z at a target 0 when the target is not in these columns, and
the argmax a global class index stored as integer bits (int32 in fp32, int64 in fp64). Merging
column sets: m by max, d and s rescaled by exp(m_k − m) and summed, the rest summed, argmax from
the first set holding m.

Row pack (``forward``/``finalize``; saved for backward), [N + 1, 8] accumulation dtype:

    PACK rows < N: lse | ε_i (adaptive) | Σ p·z | max p | argmax (bits) | loss_i | W_i | logp_y

(Σ p·z, and s in the statistics, only with the confidence penalty or need_stats; else 0.)
    PACK row N:    Σ W_i (the mean's denominator) | Σ loss_i | 0 ...

W_i = w_{y_a} (λ·w_{y_a} + (1 − λ)·w_{y_b} with mixup), 0 on ignored rows; log p_y = z_{y_a} − lse,
the log-probability of the target (0 on ignored rows).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# column indices
S_M, S_D, S_S, S_DA, S_DB, S_ZA, S_ZB, S_ARG = range(8)
P_LSE, P_EPS, P_PZ, P_CONF, P_ARG, P_LOSS, P_W, P_LOGP = range(8)
T_W, T_LOSS = 0, 1  # columns of the totals row N
WIDTH = 8

R_NONE, R_MEAN, R_SUM = 0, 1, 2


class Problem(NamedTuple):
    """Row inputs of the ``fused_ls::`` ops, in schema order (tensors first).

    This is the one definition of the ops' arguments after the logits: ``PROBLEM_SCHEMA`` (the
    custom-op schema) is derived from these annotations, the C++ side (csrc/ext_common.h) and
    the Triton launches (fused_ls/backends/triton_backend.py) are checked against it by
    tests/test_schema.py."""

    target: Tensor  # [N] int64, global class ids
    weight: Tensor | None  # [num_classes] accumulation dtype
    R: Tensor | None  # [num_classes, num_classes] folded dense similarity rows
    mass: Tensor  # [1] or [num_classes]: M_y without the sparse part
    sp_idx: Tensor | None  # [num_classes, K] int64 (padding → 0 with value 0)
    sp_val: Tensor | None  # [num_classes, K] β·S̃
    eps_rows: Tensor | None  # [N] per-sample ε
    mix_target: Tensor | None  # [N] int64
    mix_rows: Tensor | None  # [N] per-sample λ
    r0: float  # uniform mass per class (before the class weight)
    smoothing: float
    ignore_index: int
    adaptive_threshold: float
    adaptive_factor: float
    adaptive_mode: int  # 0 none, 1 max p, 2 p at the target
    z_loss: float
    softcap: float  # 0: none
    confidence_penalty: float
    mix_lambda: float  # 1 without mixup
    reduction: int  # R_NONE, R_MEAN, R_SUM
    col_offset: int  # global index of the logits' column 0 (vocabulary shard)
    num_classes: int  # all classes (the logits may hold a shard)
    need_stats: bool

    @property
    def dense(self) -> bool:
        return self.R is not None

    @property
    def has_mix(self) -> bool:
        return self.mix_target is not None

    @property
    def has_sparse(self) -> bool:
        return self.sp_idx is not None

    def tensors(self) -> tuple:
        return tuple(self[:N_TENSORS])

    def scalars(self) -> tuple:
        return tuple(self[N_TENSORS:])


# The custom-op schema types of the annotations above (``from __future__ import annotations``
# keeps them unevaluated: strings, or ForwardRefs of them).
_SCHEMA_TYPES = {
    "Tensor": "Tensor",
    "Tensor | None": "Tensor?",
    "float": "float",
    "int": "int",
    "bool": "bool",
}


def _schema_type(name: str) -> str:
    annotation = Problem.__annotations__[name]
    return _SCHEMA_TYPES[getattr(annotation, "__forward_arg__", annotation)]


# "Tensor target, Tensor? weight, ..., bool need_stats": the Problem part of every op's schema
PROBLEM_SCHEMA = ", ".join(f"{_schema_type(f)} {f}" for f in Problem._fields)
# the tensors come first: the number of leading tensor fields
N_TENSORS = next(i for i, f in enumerate(Problem._fields) if "Tensor" not in _schema_type(f))
assert all("Tensor" not in _schema_type(f) for f in Problem._fields[N_TENSORS:])


def argmax_bits_dtype(acc: torch.dtype) -> torch.dtype:
    """The integer dtype whose bits the argmax columns hold (same size as the float)."""
    return torch.int64 if acc == torch.float64 else torch.int32


def loss_shape(p: Problem, n: int) -> tuple:
    return (n,) if p.reduction == R_NONE else ()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the contract: fp32 whatever the input dtype; fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- output shapes (the fake kernels of the ops) ------------------------------------------------
def fake_loss_pack(rows_like: Tensor, n: int, p: Problem) -> tuple[Tensor, Tensor]:
    """Empty (loss, pack) of the finalisation of n rows (their dtype from ``rows_like``'s)."""
    acc = acc_dtype(rows_like.dtype)
    return rows_like.new_empty(loss_shape(p, n), dtype=acc), rows_like.new_empty(
        n + 1, WIDTH, dtype=acc
    )


def fake_stats(x: Tensor) -> Tensor:
    """Empty statistics [N, 8] of logits x."""
    return x.new_empty(x.shape[0], WIDTH, dtype=acc_dtype(x.dtype))


# ---- data-dependent checks ----------------------------------------------------------------------
def check(bad: Tensor, exc: type, message) -> None:
    """Raise `exc` if any element of `bad` is set: on CPU now; on CUDA a device-side assert,
    never a host sync. ``message`` may be a callable (formatted only when raising)."""
    if bad.numel() == 0:
        return
    if bad.device.type == "cpu":
        if bool(bad.any()):
            raise exc(message() if callable(message) else message)
    else:
        msg = message if not callable(message) else "fused_ls: invalid input (see CPU message)"
        torch._assert_async(~bad.any(), msg)


def validate(p: Problem) -> None:
    """The data-dependent checks of a Problem (targets in range, per-sample values in [0, 1]):
    what the compiled kernels check in their statistics pass, for the Python backends."""
    C, y = p.num_classes, p.target
    valid = y != p.ignore_index
    bad = valid & ((y < 0) | (y >= C))
    check(
        bad,
        IndexError,
        lambda: (
            f"target contains {int(y[bad][0])}, outside [0, {C}) and not "
            f"ignore_index={p.ignore_index}"
        ),
    )
    if p.mix_target is not None:
        yb = p.mix_target
        bad = valid & ((yb < 0) | (yb >= C))
        check(
            bad,
            IndexError,
            lambda: f"mix_target contains {int(yb[bad][0])} on a non-ignored row, outside [0, {C})",
        )
    for name, t in (("smoothing", p.eps_rows), ("mix_lambda", p.mix_rows)):
        if t is not None:
            bad = ~((t >= 0) & (t <= 1))  # NaN is bad too
            check(
                bad,
                ValueError,
                lambda t=t, bad=bad, name=name: (
                    f"{name} (per-sample tensor) must lie in [0, 1]; found {float(t[bad][0])}"
                ),
            )
