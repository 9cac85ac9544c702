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

    PACK rows < N: lse | ε_i (after adaptive) | Σ p·z | max p | argmax (bits) | loss_i | W_i | 0
    PACK row N:    Σ W_i (the mean's denominator) | Σ loss_i | 0 ...

W_i = w_{y_a} (λ·w_{y_a} + (1 − λ)·w_{y_b} with mixup), 0 on ignored rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# column indices
S_M, S_D, S_S, S_DA, S_DB, S_ZA, S_ZB, S_ARG = range(8)
P_LSE, P_EPS, P_PZ, P_CONF, P_ARG, P_LOSS, P_W = range(7)
T_W, T_LOSS = 0, 1  # columns of the totals row N
WIDTH = 8

R_NONE, R_MEAN, R_SUM = 0, 1, 2


class Problem(NamedTuple):
    """Row inputs of the ``fused_ls::`` ops, in schema order (tensors first)."""

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


N_TENSORS = 9

PROBLEM_SCHEMA = (
    "Tensor target, Tensor? weight, Tensor? R, Tensor mass, Tensor? sp_idx, Tensor? sp_val, "
    "Tensor? eps_rows, Tensor? mix_target, Tensor? mix_rows, float r0, float smoothing, "
    "int ignore_index, float adaptive_threshold, float adaptive_factor, int adaptive_mode, "
    "float z_loss, float softcap, float confidence_penalty, float mix_lambda, int reduction, "
    "int col_offset, int num_classes, bool need_stats"
)


def argmax_bits_dtype(acc: torch.dtype) -> torch.dtype:
    """The integer dtype whose bits the argmax columns hold (same size as the float)."""
    return torch.int64 if acc == torch.float64 else torch.int32


def loss_shape(p: Problem, n: int) -> tuple:
    return (n,) if p.reduction == R_NONE else ()
