"""The smoothing distribution r ⊙ w, prepared once for the kernels (docs/design.md §2).

For target y the kernels need, per class c, the folded mass ``R_y,c = r_y,c · w_c`` and its row
sum ``M_y = ⟨r_y, w⟩``. With ``uni = 1 − β`` when a similarity is given (else 1):

    no dense similarity:  R_y,c = r0 · w_c            r0 = uni / C     (w_c = 1 without weights)
                          M_y   = r0 · Σ_c w_c
    dense similarity S:   R_y,c = r0 · w_c + β · S̃_y,c · w_c,   S̃ = S / rowsum(S)   ([C, C])
                          M_y   = Σ_c R_y,c                                            ([C])
    sparse similarity:    k point masses per target on top: rw_j = β · S̃_y,j · w_col_j, added to
                          M_y and to the smoothing dot by the kernels (O(k) per row).

These depend only on (weight, similarity, β, C, dtype, device), not on the logits, so they are
computed once and cached, keyed by the tensors' identity and version counter (an in-place update
of the weight or similarity invalidates the entry). The dense similarity is validated here, once
per version: rows must be finite, non-negative and not all zero.

Under ``torch.compile`` the same function runs inside the ``fused_ls::prepare_smoothing`` custom
op, so the cache and the data-dependent validation stay out of the traced graph.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._problem import check


class Smoothing(NamedTuple):
    r0: float  # uniform mass per class, before the class weight
    weight: Tensor | None  # [C] accumulation dtype
    R: Tensor | None  # [C, C] folded rows (dense similarity only)
    mass: Tensor  # [1] (every target) or [C] (per target): M_y without the sparse part
    sp_idx: Tensor | None  # [C, K] int64, padding (−1) replaced by column 0 ...
    sp_val: Tensor | None  # [C, K] β · S̃, ... whose value is 0


def uniform_r0(num_classes: int, beta: float, has_similarity: bool) -> float:
    return ((1.0 - beta) if has_similarity else 1.0) / num_classes


_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 16


def _key_part(t: Tensor | None):
    if t is None:
        return None
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter: not cacheable
        return False
    return (id(t), version, t.data_ptr(), t.dtype, tuple(t.shape))


def prepare(
    weight: Tensor | None,
    similarity: Tensor | None,
    sparse_idx: Tensor | None,
    sparse_val: Tensor | None,
    beta: float,
    num_classes: int,
    acc: torch.dtype,
    device: torch.device,
) -> Smoothing:
    """The prepared smoothing for these inputs, from the cache when they have not changed."""
    parts = tuple(_key_part(t) for t in (weight, similarity, sparse_idx, sparse_val))
    if False in parts:
        return _compute(weight, similarity, sparse_idx, sparse_val, beta, num_classes, acc, device)
    key = (parts, beta, num_classes, acc, device)
    hit = _CACHE.get(key)
    if hit is not None:
        refs, value = hit
        if all(r is None or r() is not None for r in refs):
            _CACHE.move_to_end(key)
            return value
    value = _compute(weight, similarity, sparse_idx, sparse_val, beta, num_classes, acc, device)
    refs = tuple(
        weakref.ref(t) if t is not None else None
        for t in (weight, similarity, sparse_idx, sparse_val)
    )
    _CACHE[key] = (refs, value)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def _compute(weight, similarity, sparse_idx, sparse_val, beta, C, acc, device) -> Smoothing:
    has_sim = similarity is not None or sparse_idx is not None
    r0 = uniform_r0(C, beta, has_sim)
    w = weight.detach().to(device=device, dtype=acc) if weight is not None else None
    R = None
    if similarity is not None:
        S = similarity.detach().to(device=device, dtype=acc)
        ssum = S.sum(1, keepdim=True)
        bad = ~torch.isfinite(S).all(1) | (S < 0).any(1) | ~(ssum[:, 0] > 0)
        check(
            bad,
            ValueError,
            lambda: (
                "similarity rows must be finite, non-negative and not all zero; row "
                f"{int(bad.nonzero()[0, 0])} is not"
            ),
        )
        R = S / ssum * beta + r0
        if w is not None:
            R = R * w[None, :]
        mass = R.sum(1)
    elif w is not None:
        mass = (w.sum() * r0).reshape(1)
    else:
        mass = torch.full((1,), r0 * C, dtype=acc, device=device)
    sp_idx = sp_val = None
    if sparse_idx is not None:
        sp_idx = sparse_idx.clamp_min(0).contiguous()
        sp_val = (sparse_val.to(acc) * beta).contiguous()  # 0 at padding (SparseSimilarity)
    return Smoothing(r0, w, R, mass, sp_idx, sp_val)


# ---- the same, as an opaque op for torch.compile ------------------------------------------------
_ACC = {0: torch.float32, 1: torch.float64}


@torch.library.custom_op("fused_ls::prepare_smoothing", mutates_args=())
def prepare_op(
    weight: Optional[Tensor],
    similarity: Optional[Tensor],
    sparse_idx: Optional[Tensor],
    sparse_val: Optional[Tensor],
    beta: float,
    num_classes: int,
    acc64: bool,
    device_like: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(weight or [0], R or [0, 0], mass, sparse_idx or [0, 0], sparse_val or [0, 0]): the cached
    tensors of ``prepare`` (copies: a custom op may not return its cache's storage)."""
    acc = _ACC[int(acc64)]
    s = prepare(
        weight, similarity, sparse_idx, sparse_val, beta, num_classes, acc, device_like.device
    )

    def copy(t, *empty_shape, dtype=acc):
        return t.clone() if t is not None else device_like.new_empty(empty_shape, dtype=dtype)

    return (
        copy(s.weight, 0),
        copy(s.R, 0, 0),
        s.mass.clone(),
        copy(s.sp_idx, 0, 0, dtype=torch.int64),
        copy(s.sp_val, 0, 0),
    )


@prepare_op.register_fake
def _(weight, similarity, sparse_idx, sparse_val, beta, num_classes, acc64, device_like):
    acc = _ACC[int(acc64)]
    C = num_classes
    new = device_like.new_empty
    K = sparse_idx.shape[1] if sparse_idx is not None else 0
    sp = (C, K) if sparse_idx is not None else (0, 0)
    return (
        new(C if weight is not None else 0, dtype=acc),
        new(*((C, C) if similarity is not None else (0, 0)), dtype=acc),
        new(C if similarity is not None else 1, dtype=acc),
        new(*sp, dtype=torch.int64),
        new(*sp, dtype=acc),
    )


def _no_grad(ctx, *grads):
    # Class weights and similarities are constants of the loss: no gradient flows through them
    # (and the op takes them as they are, not detached, so that the cache keeps its key).
    return (None,) * 8


prepare_op.register_autograd(_no_grad)


def prepare_traceable(weight, similarity, sparse_idx, sparse_val, beta, C, acc, device_like):
    """``prepare`` in eager mode; under torch.compile, the same through the opaque op."""
    if not torch.compiler.is_compiling():
        return prepare(weight, similarity, sparse_idx, sparse_val, beta, C, acc, device_like.device)
    w, R, mass, si, sv = prepare_op(
        weight, similarity, sparse_idx, sparse_val, beta, C, acc == torch.float64, device_like
    )
    has_sim = similarity is not None or sparse_idx is not None
    return Smoothing(
        uniform_r0(C, beta, has_sim),
        w if weight is not None else None,
        R if similarity is not None else None,
        mass,
        si if sparse_idx is not None else None,
        sv if sparse_idx is not None else None,
    )
