"""Triton kernels of the fused label-smoothing cross-entropy (docs/design.md §2), finalising every
row inside the kernel.

Notation, for row i of the logits x [N, C] (unit stride on C), which hold the classes
[col_offset, col_offset + C) of num_classes (all of them unless the vocabulary is sharded):

    z_c   = softcap · tanh(x_c / softcap)          (identity without softcap)
    m     = max_c z_c,  d = Σ_c exp(z_c − m),  lse = m + log d,  p_c = exp(z_c − lse)
    D     = Σ_c R_{y,c} · z_c + Σ_j rw_j z_{col_j}   (smoothing dot: dense row + sparse neighbours)
    s     = Σ_c exp(z_c − m) z_c                    (Σ p z = s / d, for the confidence penalty)

    L(y)   = w_y (1 − ε)(lse − z_y) + ε (M_y · lse − D_y)
    loss_i = λ L(y_a) + (1 − λ) L(y_b) + λ_z W lse² − β_cp W (lse − Σpz)
    g_c    = ( [coef + γ (z_c − Σpz)] p_c − u_a R_{a,c} − u_b R_{b,c} − Σ point masses at c )
             · dz_c/dx_c

where R_{y,c} is r0·w_c (``R_MODE`` 0: r0, 1: r0·w_c) or a folded dense-similarity row (2), and
the point masses are t_a at y_a, t_b at y_b and the sparse neighbours' masses. The per-row math
(``_finalize``, ``_grad_coefs``) mirrors csrc/rowmath.h and the readable Python finalisation of
fused_ls/backends/torch_backend.py, which the tests use as the reference.

Kernels (all fp32 accumulation; x and the gradient fp32, bf16 or fp16):

    _rows_kernel        grid (N, S): the statistics of a row piece. With S = 1 the program
                        finalises the row (FINALIZE: pack row, loss_i) and can go on to write its
                        gradient (GRAD: forward_backward, the row is still in L2), or writes the
                        row's statistics (STATS_OUT: vocabulary sharding). With S > 1 it writes
                        partial statistics for _merge_kernel.
    _weights_kernel     grid (N,): W_i from the targets, for forward_backward of "mean" (Σ W_i by
                        _reduce_kernel before the rows are read).
    _scale_kernel       grid (N, S): rescale of a gradient written over the logits.
    _merge_kernel       grid (N,): merges the S partials of a row (online-softmax merge), gathers
                        the target and sparse terms, then finalises or writes the statistics; with
                        GATHER off it finalises statistics given from outside (ext_finalize).
    _grad_kernel        grid (N, S): the gradient from the pack (lse, ε, Σpz) and the upstream
                        gradient; coefficients computed in the program.
    _reduce_kernel      grid (1,): Σ W_i and Σ loss_i over the rows in a fixed order (totals row
                        of the pack and the "sum"/"mean" loss).

Switches that change the hot loops are constexpr (``R_MODE``, ``HAS_B``: a second dense row for
mixup, ``NEED_S``: gather Σ exp(z − m)·z, ``NEED_PZ``: the confidence penalty's terms,
``HAS_SOFTCAP``) as are the phases; the per-row options (per-sample ε and λ,
adaptive ε, z-loss, mixup, ignore_index) are runtime values read once per row.

Bytes moved (b = bytes per logit): forward N·C·b (+ the R rows from L2), backward 2·N·C·b,
forward_backward with S = 1 2·N·C·b from HBM when a row's second read hits L2 (rows of up to
~64k bf16 logits per program). Targets are validated with device-side asserts (``debug=True``
launches of the kernels that read them), never a host sync.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Row split: rows with at least SPLIT_MIN_C columns are cut into pieces of SPLIT_COLS columns,
# one program each. 32768 columns of bf16 are 64 KiB of reads per program: long enough that the
# per-program setup is noise, short enough that C = 128256 gives 4 programs per row and a single
# row of 262144 classes still spreads over 8 SMs. Tests lower both to exercise the split path.
SPLIT_MIN_C = 65536
SPLIT_COLS = 32768

# Columns per loop iteration. On an H100 (132 SMs; per SM 64K registers, 228 KB shared memory,
# 2048 threads) 2048 columns with 8 warps are 8 values per thread: one 16-byte load of bf16 (two
# of fp32) per thread and iteration. Block sizes are chosen from the H100's numbers and the
# register counts ptxas reports (`make triton-check`), not yet tuned on a GPU.
BLOCK_MAX = 2048

# Point-mass columns per chunk in the grad pass's pair-sum (bounds its registers for large k).
POINT_CHUNK = 16

# Rows per step of the reduction.
REDUCE_BLOCK = 1024

# Pack / stats columns (fused_ls/_problem.py).
WIDTH = 8


def num_warps_for(block: int) -> int:
    """Warps per program: 8 columns per thread at the largest block, at least one warp."""
    return max(1, min(8, block // 256))


# (Helpers are called once per row, outside the hot loops: the interpreter re-patches
# triton.language on every nested call, which dominates test time.)
@triton.jit
def _tanh(u):
    # tanh without libdevice (which the interpreter cannot run): (1 − e)/(1 + e) with
    # e = exp(−2|u|) is exact to a few ulp for |u| ≥ 1/8; below that 1 − e cancels, so use the odd
    # Taylor series u − u³/3 + 2u⁵/15 − 17u⁷/315 (next term 62u⁹/2835 < 2e-9 relative).
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    a2 = a * a
    poly = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.125, poly, t)
    return tl.where(u < 0, -t, t)


@triton.jit
def _wmul(a, b):
    # a·b where a zero coefficient times ±inf gives 0 (zero-mass terms); NaN stays NaN
    return tl.where((a == 0.0) & (tl.abs(b) == float("inf")), 0.0, a * b)


@triton.jit
def _scaled(c, go):
    # c·go where c = 0 stays 0 even for an infinite or NaN upstream gradient
    return tl.where(c == 0.0, 0.0, c * go)


@triton.jit
def _target_mass(y, W, MASS, SP_IDX, SP_VAL, K, HAS_W, DENSE, KP: tl.constexpr):
    # M_y = ⟨r_y, w⟩: the precomputed dense part plus the sparse neighbours' masses
    if DENSE:
        M = tl.load(MASS + y)
    else:
        M = tl.load(MASS)
    j = tl.arange(0, KP)
    ok = j < K
    col = tl.load(SP_IDX + y * K + j, mask=ok, other=0)
    rw = tl.load(SP_VAL + y * K + j, mask=ok, other=0.0)
    if HAS_W != 0:
        rw = rw * tl.load(W + col, mask=ok, other=0.0)
    return M + tl.sum(rw, 0)


@triton.jit
def _row_weight(y_a, y_b, has_mix, lam, W, HAS_W):
    # (W_i, w_a, w_b): the targets' class weights and the row's weight W_i = w_a, or
    # λ·w_a + (1 − λ)·w_b with mixup (w_b = w_a without), the one definition of W_i for the
    # loss, the gradient and Σ W_i of "mean". The targets must have been checked (_targets).
    # The fma is explicit so that every kernel rounds W_i alike (LLVM contracts a·b + c·d
    # either way round depending on the code around it): Σ W_i of _weights_kernel is then
    # exactly the Σ of the finalised W_i. It is the form the kernels compiled to before.
    if HAS_W != 0:
        w_a = tl.load(W + y_a)
    else:
        w_a = 1.0
    w_b = w_a
    Wt = w_a
    if has_mix != 0:
        if HAS_W != 0:
            w_b = tl.load(W + y_b)
        Wt = tl.fma(lam, w_a, (1.0 - lam) * w_b)
    return Wt, w_a, w_b


@triton.jit
def _sparse_dot(
    x_row,
    y,
    lo,
    C,
    W,
    SP_IDX,
    SP_VAL,
    K,
    HAS_W,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    KP: tl.constexpr,
):
    # Σ_j rw_j z_{col_j} over the sparse neighbours of y held here; zero-mass terms give 0
    j = tl.arange(0, KP)
    ok = j < K
    col = tl.load(SP_IDX + y * K + j, mask=ok, other=0)
    rw = tl.load(SP_VAL + y * K + j, mask=ok, other=0.0)
    if HAS_W != 0:
        rw = rw * tl.load(W + col, mask=ok, other=0.0)
    here = ok & (col >= lo) & (col < lo + C)
    z = tl.load(x_row + (col - lo), mask=here, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return tl.sum(tl.where(here & (rw != 0.0), rw * z, 0.0), 0)


@triton.jit
def _z_at(x_row, y, lo, C, softcap, HAS_SOFTCAP: tl.constexpr):
    # z at global class y when it is one of the columns held here, else 0
    here = (y >= lo) & (y < lo + C)
    z = tl.load(x_row + (y - lo), mask=here, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return tl.where(here, z, 0.0)


@triton.jit
def _target_stats(
    x_row, y_a, y_b, valid, has_mix, dense_a, dense_b, lo, C, W, SP_IDX, SP_VAL, K, has_w,
    softcap, HAS_SOFTCAP: tl.constexpr, KP: tl.constexpr,
):  # fmt: skip
    # (z_ya, z_yb, D_a, D_b): z at the targets held here and the dense dots plus the sparse
    # neighbours' terms (csrc/rowmath.h target_stats); zeros for what a row does not have
    za = tl.where(valid, _z_at(x_row, y_a, lo, C, softcap, HAS_SOFTCAP), 0.0)
    Da = dense_a + _sparse_dot(x_row, y_a, lo, C, W, SP_IDX, SP_VAL, K, has_w, softcap,
                               HAS_SOFTCAP, KP)  # fmt: skip
    zb = 0.0
    Db = 0.0
    if has_mix != 0:
        zb = tl.where(valid, _z_at(x_row, y_b, lo, C, softcap, HAS_SOFTCAP), 0.0)
        Db = dense_b + _sparse_dot(x_row, y_b, lo, C, W, SP_IDX, SP_VAL, K, has_w, softcap,
                                   HAS_SOFTCAP, KP)  # fmt: skip
    return za, zb, Da, Db


@triton.jit
def _upstream(GO, row, go_per_row):
    # the row's upstream gradient: GO[row] ("none") or the scalar GO[0]
    if go_per_row != 0:
        go = tl.load(GO + row)
    else:
        go = tl.load(GO)
    return go


@triton.jit
def _row_eps_lam(row, EPS_ROWS, eps, eps_rows_on, LAM_ROWS, lam, lam_rows_on):
    if eps_rows_on != 0:
        eps = tl.load(EPS_ROWS + row)
    if lam_rows_on != 0:
        lam = tl.load(LAM_ROWS + row)
    return eps, lam


@triton.jit
def _finalize(
    m, d, s, Da, Db, za, zb, row, valid, y_a, y_b, has_mix,
    W, MASS, SP_IDX, SP_VAL, K, HAS_W, DENSE,
    EPS_ROWS, eps, eps_rows_on, LAM_ROWS, lam, lam_rows_on,
    adaptive_mode, adaptive_threshold, adaptive_factor, z_loss, cp,
    NEED_S: tl.constexpr, NEED_PZ: tl.constexpr, KP: tl.constexpr,
):  # fmt: skip
    # (loss, W, lse, ε, max p, Σpz) of one row from its statistics (csrc/rowmath.h finalize_row)
    lse = m + tl.log(d)
    conf = tl.where(d > 0, 1.0 / d, tl.exp(m - lse))  # max p = exp(m − lse) = 1/d
    if NEED_S:
        pz = s / d
    else:
        pz = 0.0
    eps, lam = _row_eps_lam(row, EPS_ROWS, eps, eps_rows_on, LAM_ROWS, lam, lam_rows_on)
    # the row's own detached confidence (max p, or p at the target) against the threshold
    c = tl.where(adaptive_mode == 1, conf, tl.exp(za - lse))
    raised = tl.minimum(eps * adaptive_factor, 1.0)
    eps = tl.where((adaptive_mode != 0) & (c < adaptive_threshold), raised, eps)
    Wt, w_a, w_b = _row_weight(y_a, y_b, has_mix, lam, W, HAS_W)
    M_a = _target_mass(y_a, W, MASS, SP_IDX, SP_VAL, K, HAS_W, DENSE, KP)
    loss = _wmul(w_a * (1.0 - eps), lse - za) + _wmul(eps, M_a * lse - Da)
    if has_mix != 0:
        M_b = _target_mass(y_b, W, MASS, SP_IDX, SP_VAL, K, HAS_W, DENSE, KP)
        loss_b = _wmul(w_b * (1.0 - eps), lse - zb) + _wmul(eps, M_b * lse - Db)
        loss = _wmul(lam, loss) + _wmul(1.0 - lam, loss_b)
    loss += tl.where(z_loss != 0.0, z_loss * Wt * lse * lse, 0.0)
    if NEED_PZ:
        loss -= cp * Wt * (lse - pz)
    loss = tl.where(valid, loss, 0.0)
    Wt = tl.where(valid, Wt, 0.0)
    eps = tl.where(valid, eps, 0.0)
    return loss, Wt, lse, eps, conf, pz


@triton.jit
def _grad_coefs(
    lse, eps, go, row, valid, y_a, y_b, has_mix,
    W, MASS, SP_IDX, SP_VAL, K, HAS_W, DENSE,
    LAM_ROWS, lam, lam_rows_on, z_loss, cp, KP: tl.constexpr,
):  # fmt: skip
    # coef, γ, u_a, u_b, t_a, t_b (× go) and the sparse factors sp_a, sp_b (csrc/rowmath.h)
    if lam_rows_on != 0:
        lam = tl.load(LAM_ROWS + row)
    Wt, w_a, w_b = _row_weight(y_a, y_b, has_mix, lam, W, HAS_W)
    M_a = _target_mass(y_a, W, MASS, SP_IDX, SP_VAL, K, HAS_W, DENSE, KP)
    if has_mix != 0:
        M_b = _target_mass(y_b, W, MASS, SP_IDX, SP_VAL, K, HAS_W, DENSE, KP)
        coef = lam * (w_a * (1.0 - eps) + eps * M_a) + (1.0 - lam) * (w_b * (1.0 - eps) + eps * M_b)
        t_a = lam * w_a * (1.0 - eps)
        t_b = (1.0 - lam) * w_b * (1.0 - eps)
        # one R row for both targets unless the similarity is dense: λ + (1 − λ) = 1
        if DENSE:
            u_a = eps * lam
            u_b = eps * (1.0 - lam)
        else:
            u_a = eps
            u_b = 0.0
        sp_a = eps * lam
        sp_b = eps * (1.0 - lam)
    else:
        coef = w_a * (1.0 - eps) + eps * M_a
        t_a = w_a * (1.0 - eps)
        t_b = 0.0
        u_a = eps
        u_b = 0.0
        sp_a = eps
        sp_b = 0.0
    coef += tl.where(z_loss != 0.0, 2.0 * z_loss * Wt * lse, 0.0)
    gamma = cp * Wt
    z = 0.0
    coef = tl.where(valid, _scaled(coef, go), z)
    gamma = tl.where(valid, _scaled(gamma, go), z)
    u_a = tl.where(valid, _scaled(u_a, go), z)
    u_b = tl.where(valid, _scaled(u_b, go), z)
    t_a = tl.where(valid, _scaled(t_a, go), z)
    t_b = tl.where(valid, _scaled(t_b, go), z)
    return coef, gamma, u_a, u_b, t_a, t_b, sp_a, sp_b


@triton.jit
def _point_masses(y_a, y_b, t_a, t_b, sp_a, sp_b, go, j, W, SP_IDX, SP_VAL, K, HAS_W):
    # (global column, mass, valid) of point masses j (a vector of indices, any length):
    # j = 0 → (y_a, t_a), 1 → (y_b, t_b), 2 .. K+1 → a's sparse neighbours, K+2 .. 2K+1 → b's.
    # Without mixup y_b = y_a and t_b = sp_b = 0: b's points then repeat a's columns with zero
    # mass, which changes no sum and writes the same values.
    jj = j - 2
    is_b = jj >= K
    k = tl.where(is_b, jj - K, jj)
    ok = (jj >= 0) & (k < K) & (k >= 0)
    y = tl.where(is_b, y_b, y_a)
    col = tl.load(SP_IDX + y * K + k, mask=ok, other=0)
    rw = tl.load(SP_VAL + y * K + k, mask=ok, other=0.0)
    if HAS_W != 0:
        rw = rw * tl.load(W + col, mask=ok, other=0.0)
    sp_mass = _scaled(rw * tl.where(is_b, sp_b, sp_a), go)
    col = tl.where(j == 0, y_a, tl.where(j == 1, y_b, col))
    mass = tl.where(j == 0, t_a, tl.where(j == 1, t_b, sp_mass))
    return col, mass, (j < 2) | ok


@triton.jit
def _grad_row(
    x_row, o_row, lo, hi, C, col_lo, ra_row, rb_row, r_scale_a,
    lse, pz, coef, gamma, u_a, u_b, t_a, t_b, sp_a, sp_b, go,
    y_a, y_b, has_mix, W, SP_IDX, SP_VAL, K, HAS_W, softcap,
    R_MODE: tl.constexpr, HAS_B: tl.constexpr, NEED_PZ: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr,
    POINT_CHUNK: tl.constexpr,
):  # fmt: skip
    # The gradient of the local columns [lo, hi) of one row: dense part, one read of x and one
    # write of g per element, in fp32 and rounded once. The point masses (targets and sparse
    # neighbours) are not subtracted in the dense loop: the complete fp32 gradient of each point
    # column this program owns (all masses at that column summed: targets and neighbours may
    # coincide) is computed before the dense loop and stored after it, behind a barrier, so
    # that the fix-up lands after the dense store of the same column. The point logits are loaded
    # before any store because `out` may alias `x` (in-place backward, forward_backward).
    j = tl.arange(0, KP)
    col_j, mass_j, ok_j = _point_masses(
        y_a, y_b, t_a, t_b, sp_a, sp_b, go, j, W, SP_IDX, SP_VAL, K, HAS_W
    )
    loc_j = col_j - col_lo
    own_j = ok_j & (loc_j >= lo) & (loc_j < hi)
    summed = tl.zeros([KP], tl.float32)  # Σ of the masses of all points at col_j
    for j0 in range(0, 2 * K + 2, POINT_CHUNK):
        i = j0 + tl.arange(0, POINT_CHUNK)
        col_i, mass_i, ok_i = _point_masses(
            y_a, y_b, t_a, t_b, sp_a, sp_b, go, i, W, SP_IDX, SP_VAL, K, HAS_W
        )
        hit = (col_j[:, None] == col_i[None, :]) & ok_i[None, :]
        summed += tl.sum(tl.where(hit, mass_i[None, :], 0.0), 1)
    x_j = tl.load(x_row + loc_j, mask=own_j, other=0.0).to(tl.float32)
    z_j = x_j
    if HAS_SOFTCAP:
        z_j = softcap * _tanh(x_j / softcap)
    p_j = tl.exp(z_j - lse)
    k_j = coef
    if NEED_PZ:
        k_j = coef + gamma * (z_j - pz)
    g_j = tl.where(p_j == 0, 0.0, k_j * p_j)
    if R_MODE == 0:
        g_j -= u_a * r_scale_a
    else:
        g_j -= u_a * r_scale_a * tl.load(ra_row + loc_j, mask=own_j, other=0.0)
    if HAS_B:
        g_j -= u_b * tl.load(rb_row + loc_j, mask=own_j, other=0.0)
    g_j -= summed
    if HAS_SOFTCAP:
        t_j = z_j / softcap
        g_j *= 1.0 - t_j * t_j

    cols = tl.arange(0, BLOCK)
    for start in range(lo, hi, BLOCK):
        c = start + cols
        mask = c < hi
        x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
        z = x
        if HAS_SOFTCAP:
            z = softcap * _tanh(x / softcap)
        p = tl.exp(z - lse)
        if NEED_PZ:
            g = tl.where(p == 0, 0.0, (coef + gamma * (z - pz)) * p)
        else:
            g = coef * p
        if R_MODE == 0:
            g -= u_a * r_scale_a
        else:
            g -= u_a * r_scale_a * tl.load(ra_row + c, mask=mask, other=0.0)
        if HAS_B:
            g -= u_b * tl.load(rb_row + c, mask=mask, other=0.0)
        if HAS_SOFTCAP:
            t = z / softcap
            g *= 1.0 - t * t
        tl.store(o_row + c, g.to(o_row.dtype.element_ty), mask=mask)

    # All threads' dense stores of this row piece precede the fix-up stores.
    tl.debug_barrier()
    tl.store(o_row + loc_j, g_j.to(o_row.dtype.element_ty), mask=own_j)


@triton.jit
def _targets(Y_A, Y_B, row, ignore_index, num_classes):
    """The row's targets (0 where it is ignored) and whether it counts; the range checks are
    device-side asserts."""
    y_a = tl.load(Y_A + row)
    valid = y_a != ignore_index
    tl.device_assert(
        ~valid | ((y_a >= 0) & (y_a < num_classes)), "fused_ls: target out of [0, num_classes)"
    )
    y_a = tl.where(valid, y_a, 0)
    y_b = tl.where(valid, tl.load(Y_B + row), 0)
    tl.device_assert(
        (y_b >= 0) & (y_b < num_classes), "fused_ls: mix_target out of [0, num_classes)"
    )
    return y_a, y_b, valid


@triton.jit
def _store_pack(PACK, LOSS, row, lse, eps_i, pz, conf, arg_bits, loss, Wt, logp, loss_rows_on):
    """A finished row: its pack row (fused_ls/_problem.py's layout) and, if asked, loss_i."""
    out = PACK + row * 8
    tl.store(out + 0, lse)
    tl.store(out + 1, eps_i)
    tl.store(out + 2, pz)
    tl.store(out + 3, conf)
    tl.store(out + 4, arg_bits)
    tl.store(out + 5, loss)
    tl.store(out + 6, Wt)
    tl.store(out + 7, logp)
    if loss_rows_on != 0:
        tl.store(LOSS + row, loss)


@triton.jit
def _store_stats(STATS, row, m, d, s, Da, Db, za, zb, arg_bits):
    """A row's statistics row (fused_ls/_problem.py's layout), for vocabulary sharding."""
    out = STATS + row * 8
    tl.store(out + 0, m)
    tl.store(out + 1, d)
    tl.store(out + 2, s)
    tl.store(out + 3, Da)
    tl.store(out + 4, Db)
    tl.store(out + 5, za)
    tl.store(out + 6, zb)
    tl.store(out + 7, arg_bits)


@triton.jit
def _rows_kernel(
    X, stride_x,  # *x dtype [N, C] logits (unit stride on C) and its row stride
    OUT, stride_o,  # *x dtype [N, C] gradient (GRAD only; may be X itself)
    Y_A, Y_B,  # *i64 [N] targets (Y_B = Y_A without mixup)
    W, R, stride_r, MASS,  # class weights [num_classes], dense rows [nc, nc], masses [1 | nc]
    SP_IDX, SP_VAL, K,  # sparse neighbours [nc, K] (K = 0: none)
    EPS_ROWS, LAM_ROWS, GO,  # per-sample ε / λ [N], upstream gradient [N | 1] (GRAD)
    PACK, LOSS, STATS, PART,  # outputs: pack [N+1, 8], loss [N], stats [N, 8], partials [N, S, 8]
    C, col_offset, num_classes, ignore_index,  # (scalars named as fused_ls._problem.Problem's)
    r0, smoothing, mix_lambda, adaptive_threshold, adaptive_factor, z_loss, confidence_penalty,
    softcap, eps_rows_on, lam_rows_on, has_mix, has_w, adaptive_mode, go_per_row, loss_rows_on,
    S, cols_per_split,
    go_mean, N,  # GRAD of "mean": go / Σ W_i, which _weights_kernel put in the pack's row N
    BLOCK: tl.constexpr, KP: tl.constexpr, POINT_CHUNK: tl.constexpr,
    R_MODE: tl.constexpr,  # 0: R = r0, 1: R = r0·w, 2: dense rows R[y]
    HAS_B: tl.constexpr,  # a second dense row R[y_b] (mixup with a dense similarity)
    NEED_S: tl.constexpr,  # gather s = Σ exp(z − m)·z (confidence penalty; the entropy of Stats)
    NEED_PZ: tl.constexpr,  # the confidence penalty's terms (loss and γ in the gradient)
    HAS_SOFTCAP: tl.constexpr,  # z = softcap · tanh(x / softcap)
    FINALIZE: tl.constexpr,  # S = 1: finalise the row here (pack row, loss_i)
    GRAD: tl.constexpr,  # and then write its gradient (forward_backward)
    STATS_OUT: tl.constexpr,  # S = 1: write the row's statistics (vocabulary sharding)
    NEED_STATS: tl.constexpr,  # gather the argmax (return_stats)
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride overflows int32 at N·C ≥ 2³¹
    split = tl.program_id(1)
    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, C)
    x_row = X + row * stride_x
    y_a, y_b, valid = _targets(Y_A, Y_B, row, ignore_index, num_classes)
    if R_MODE == 2:
        ra_row = R + y_a * stride_r + col_offset
        r_scale_a = 1.0
    elif R_MODE == 1:
        ra_row = W + col_offset
        r_scale_a = r0
    else:
        ra_row = W
        r_scale_a = r0
    if HAS_B:
        rb_row = R + y_b * stride_r + col_offset
    else:
        rb_row = ra_row
    cols = tl.arange(0, BLOCK)

    # Online softmax over blocks of columns. After each block b with block max m_b:
    #     m' = max(m, m_b),  d' = d · exp(m − m') + Σ_{c∈b} exp(z_c − m'),  s likewise · z_c
    # one exp per element plus one per block; the exponent base m' is replaced by 0 while the
    # row is still all −inf, so that −inf − (−inf) never makes NaN. d, s and the dots are kept
    # per lane, so an iteration has a single cross-thread reduction (the block max). argmax
    # keeps the first maximal index.
    m = tl.full([], float("-inf"), tl.float32)
    arg = lo.to(tl.int64)
    d = tl.zeros([BLOCK], tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    dot_a = tl.zeros([BLOCK], tl.float32)
    dot_b = tl.zeros([BLOCK], tl.float32)
    for start in range(lo, hi, BLOCK):
        c = start + cols
        mask = c < hi
        x = tl.load(x_row + c, mask=mask, other=float("-inf")).to(tl.float32)
        z = x
        if HAS_SOFTCAP:  # tanh(−inf) = −1: re-mask the padding
            z = tl.where(mask, softcap * _tanh(x / softcap), float("-inf"))
        m_b = tl.max(z, 0)
        if NEED_STATS:
            if m_b > m:  # rare after the first blocks: the first column holding the new max
                arg = tl.min(tl.where(z == m_b, c, hi), 0).to(tl.int64)
        m_new = tl.maximum(m, m_b)
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - base)
        e = tl.exp(z - base)
        d = d * alpha + e
        if NEED_S:
            s = s * alpha + tl.where(e == 0, 0.0, e * z)
        if R_MODE == 0:
            dot_a += tl.where(mask, z, 0.0)
        else:
            ra = tl.load(ra_row + c, mask=mask, other=0.0)
            dot_a += tl.where(ra != 0, ra * z, 0.0)
        if HAS_B:
            rb = tl.load(rb_row + c, mask=mask, other=0.0)
            dot_b += tl.where(rb != 0, rb * z, 0.0)
        m = m_new
    d_row = tl.sum(d, 0)
    s_row = tl.sum(s, 0)
    Da = tl.where(r_scale_a != 0.0, r_scale_a * tl.sum(dot_a, 0), 0.0)
    if HAS_B:
        Db = tl.sum(dot_b, 0)
    else:
        Db = Da  # one dense row for both targets

    if FINALIZE or STATS_OUT:
        # the whole row is here (S = 1): target and sparse terms, then finish
        za, zb, Da, Db = _target_stats(
            x_row, y_a, y_b, valid, has_mix, Da, Db, col_offset, C, W, SP_IDX, SP_VAL, K, has_w,
            softcap, HAS_SOFTCAP, KP,
        )  # fmt: skip
        arg = arg + col_offset
        if STATS_OUT:
            _store_stats(
                STATS, row, m, d_row, s_row, Da, Db, za, zb,
                arg.to(tl.int32).to(tl.float32, bitcast=True),
            )  # fmt: skip
        if FINALIZE:
            loss, Wt, lse, eps_i, conf, pz = _finalize(
                m, d_row, s_row, Da, Db, za, zb, row, valid, y_a, y_b, has_mix,
                W, MASS, SP_IDX, SP_VAL, K, has_w, R_MODE == 2,
                EPS_ROWS, smoothing, eps_rows_on, LAM_ROWS, mix_lambda, lam_rows_on,
                adaptive_mode, adaptive_threshold, adaptive_factor, z_loss, confidence_penalty,
                NEED_S, NEED_PZ, KP,
            )  # fmt: skip
            _store_pack(
                PACK, LOSS, row, lse, eps_i, pz, conf,
                arg.to(tl.int32).to(tl.float32, bitcast=True), loss, Wt,
                tl.where(valid, za - lse, 0.0), loss_rows_on,
            )  # fmt: skip
            if GRAD:
                go = _upstream(GO, row, go_per_row)
                if go_mean != 0:
                    go = go / tl.load(PACK + N * 8)
                coef, gamma, u_a, u_b, t_a, t_b, sp_a, sp_b = _grad_coefs(
                    lse, eps_i, go, row, valid, y_a, y_b, has_mix,
                    W, MASS, SP_IDX, SP_VAL, K, has_w, R_MODE == 2,
                    LAM_ROWS, mix_lambda, lam_rows_on, z_loss, confidence_penalty, KP,
                )  # fmt: skip
                _grad_row(
                    x_row, OUT + row * stride_o, lo, hi, C, col_offset, ra_row, rb_row,
                    r_scale_a, lse, pz, coef, gamma, u_a, u_b, t_a, t_b, sp_a, sp_b, go,
                    y_a, y_b, has_mix, W, SP_IDX, SP_VAL, K, has_w, softcap,
                    R_MODE, HAS_B, NEED_PZ, HAS_SOFTCAP, BLOCK, KP, POINT_CHUNK,
                )  # fmt: skip
    else:
        part = PART + (row * S + split) * 8
        tl.store(part + 0, m)
        tl.store(part + 1, d_row)
        tl.store(part + 2, s_row)
        tl.store(part + 3, Da)
        tl.store(part + 4, Db)
        tl.store(part + 7, (arg + col_offset).to(tl.int32).to(tl.float32, bitcast=True))


@triton.jit
def _merge_kernel(
    X, stride_x, PART, S,  # logits (GATHER) and the partials [N, S, 8] (the stats when S = 1)
    Y_A, Y_B, W, MASS, SP_IDX, SP_VAL, K,
    EPS_ROWS, LAM_ROWS, PACK, LOSS, STATS,
    C, col_offset, num_classes, ignore_index,
    smoothing, mix_lambda, adaptive_threshold, adaptive_factor, z_loss, confidence_penalty,
    softcap, eps_rows_on, lam_rows_on, has_mix, has_w, adaptive_mode, loss_rows_on,
    SP: tl.constexpr,  # S rounded up to a power of two
    KP: tl.constexpr,
    DENSE: tl.constexpr,  # dense similarity (D_b has its own dense part)
    NEED_S: tl.constexpr,  # the partials hold s (Σpz is finalised)
    NEED_PZ: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    GATHER: tl.constexpr,  # gather the target and sparse terms from X (else the stats hold them)
    FINALIZE: tl.constexpr,  # finalise (else write the merged statistics)
):  # fmt: skip
    # m = max_k m_k, d = Σ_k d_k exp(m_k − m), s likewise; dots summed; argmax from the first
    # split holding m. Bytes: N·S·8·4 read, ≤ 8·N·4 written.
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, SP)
    mask = k < S
    part = PART + (row * S + k) * 8
    m_k = tl.load(part + 0, mask=mask, other=float("-inf"))
    d_k = tl.load(part + 1, mask=mask, other=0.0)
    s_k = tl.load(part + 2, mask=mask, other=0.0)
    a_k = tl.load(part + 3, mask=mask, other=0.0)
    b_k = tl.load(part + 4, mask=mask, other=0.0)
    m, first = tl.max(m_k, 0, return_indices=True, return_indices_tie_break_left=True)
    base = tl.where(m == float("-inf"), 0.0, m)
    scale = tl.exp(m_k - base)
    d = tl.sum(d_k * scale, 0)
    s = tl.sum(tl.where(scale == 0, 0.0, s_k * scale), 0)
    Da = tl.sum(a_k, 0)
    Db = tl.sum(b_k, 0)
    arg_bits = tl.load(PART + (row * S + first) * 8 + 7)
    y_a, y_b, valid = _targets(Y_A, Y_B, row, ignore_index, num_classes)
    if GATHER:
        if not DENSE:
            Db = Da  # one dense row for both targets
        za, zb, Da, Db = _target_stats(
            X + row * stride_x, y_a, y_b, valid, has_mix, Da, Db, col_offset, C, W, SP_IDX,
            SP_VAL, K, has_w, softcap, HAS_SOFTCAP, KP,
        )  # fmt: skip
    else:
        za = tl.load(PART + row * 8 + 5)
        zb = tl.load(PART + row * 8 + 6)
    if FINALIZE:
        loss, Wt, lse, eps_i, conf, pz = _finalize(
            m, d, s, Da, Db, za, zb, row, valid, y_a, y_b, has_mix,
            W, MASS, SP_IDX, SP_VAL, K, has_w, DENSE,
            EPS_ROWS, smoothing, eps_rows_on, LAM_ROWS, mix_lambda, lam_rows_on,
            adaptive_mode, adaptive_threshold, adaptive_factor, z_loss, confidence_penalty, NEED_S,
            NEED_PZ, KP,
        )  # fmt: skip
        logp = tl.where(valid, za - lse, 0.0)  # log p at the target
        _store_pack(PACK, LOSS, row, lse, eps_i, pz, conf, arg_bits, loss, Wt, logp, loss_rows_on)
    else:
        _store_stats(STATS, row, m, d, s, Da, Db, za, zb, arg_bits)


@triton.jit
def _grad_kernel(
    X, stride_x, OUT, stride_o,  # logits and gradient [N, C] (OUT may be X)
    Y_A, Y_B, W, R, stride_r, MASS, SP_IDX, SP_VAL, K,
    LAM_ROWS, GO, PACK,  # per-sample λ, upstream gradient [N | 1], pack [N+1, 8]
    C, col_offset, ignore_index, r0, mix_lambda, z_loss, confidence_penalty, softcap,
    lam_rows_on, has_mix, has_w, go_per_row, go_mean, N, cols_per_split,
    skip_unit,  # rescale: rows whose upstream gradient is 1 keep what OUT holds (no read, no write)
    BLOCK: tl.constexpr, KP: tl.constexpr, POINT_CHUNK: tl.constexpr,
    R_MODE: tl.constexpr, HAS_B: tl.constexpr, NEED_PZ: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    go = _upstream(GO, row, go_per_row)
    if (skip_unit != 0) & (go == 1.0):
        return
    split = tl.program_id(1)
    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, C)
    y_a = tl.load(Y_A + row)
    valid = y_a != ignore_index
    y_a = tl.where(valid, y_a, 0)
    y_b = tl.where(valid, tl.load(Y_B + row), 0)
    if go_mean != 0:
        go = go / tl.load(PACK + N * 8)
    lse = tl.load(PACK + row * 8 + 0)
    eps = tl.load(PACK + row * 8 + 1)
    pz = tl.load(PACK + row * 8 + 2)
    coef, gamma, u_a, u_b, t_a, t_b, sp_a, sp_b = _grad_coefs(
        lse, eps, go, row, valid, y_a, y_b, has_mix, W, MASS, SP_IDX, SP_VAL, K, has_w,
        R_MODE == 2, LAM_ROWS, mix_lambda, lam_rows_on, z_loss, confidence_penalty, KP,
    )  # fmt: skip
    if R_MODE == 2:
        ra_row = R + y_a * stride_r + col_offset
        r_scale = 1.0
    elif R_MODE == 1:
        ra_row = W + col_offset
        r_scale = r0
    else:
        ra_row = W
        r_scale = r0
    if HAS_B:
        rb_row = R + y_b * stride_r + col_offset
    else:
        rb_row = ra_row
    _grad_row(
        X + row * stride_x, OUT + row * stride_o, lo, hi, C, col_offset, ra_row, rb_row,
        r_scale, lse, pz, coef, gamma, u_a, u_b, t_a, t_b, sp_a, sp_b, go,
        y_a, y_b, has_mix, W, SP_IDX, SP_VAL, K, has_w, softcap,
        R_MODE, HAS_B, NEED_PZ, HAS_SOFTCAP, BLOCK, KP, POINT_CHUNK,
    )  # fmt: skip


@triton.jit
def _scale_kernel(
    OUT, stride_o,  # *x dtype [N, C]: the gradient for a unit upstream gradient, scaled in place
    GO,  # *fp32 [N | 1] upstream gradient
    C, go_per_row, cols_per_split,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # rescale when the logits are gone (written over by the gradient): g ← go · g in fp32, rounded
    # once, zero staying zero whatever go; a row whose go is 1 reads and writes nothing.
    # Bytes: N·C·b read and written for the rows with go ≠ 1.
    row = tl.program_id(0).to(tl.int64)
    go = _upstream(GO, row, go_per_row)
    if go == 1.0:
        return
    lo = tl.program_id(1) * cols_per_split
    hi = tl.minimum(lo + cols_per_split, C)
    o_row = OUT + row * stride_o
    cols = tl.arange(0, BLOCK)
    for start in range(lo, hi, BLOCK):
        c = start + cols
        mask = c < hi
        g = tl.load(o_row + c, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(g == 0.0, 0.0, g * go)
        tl.store(o_row + c, g.to(o_row.dtype.element_ty), mask=mask)


@triton.jit
def _weights_kernel(
    Y_A, Y_B, W, EPS_ROWS, LAM_ROWS,  # targets [N], class weights, per-sample ε / λ [N]
    PACK,  # *fp32 [N + 1, 8]: W_i into column 6 (then _reduce_kernel sums them into row N)
    num_classes, ignore_index, smoothing, mix_lambda, eps_rows_on, lam_rows_on, has_mix, has_w,
):  # fmt: skip
    # W_i (the weight of row i in "mean"'s denominator) from the targets alone, as _finalize
    # computes it, so that Σ W_i is known before the rows of forward_backward are read. The first
    # kernel of such a call to read the targets: it checks them (device asserts) before W[y].
    row = tl.program_id(0).to(tl.int64)
    y_a, y_b, valid = _targets(Y_A, Y_B, row, ignore_index, num_classes)
    _, lam = _row_eps_lam(row, EPS_ROWS, smoothing, eps_rows_on, LAM_ROWS, mix_lambda, lam_rows_on)
    Wt, _, _ = _row_weight(y_a, y_b, has_mix, lam, W, has_w)
    tl.store(PACK + row * 8 + 6, tl.where(valid, Wt, 0.0))


@triton.jit
def _reduce_kernel(
    PACK,  # *fp32 [N + 1, 8]: loss_i in column 5, W_i in column 6; totals written to row N
    LOSS,  # *fp32 []: Σ loss ("sum") or Σ loss / Σ W ("mean"); untouched for "none"
    N,
    reduction,  # 0 none, 1 mean, 2 sum
    BLOCK: tl.constexpr,
):
    # One program, rows in a fixed order: deterministic (no atomics).
    r = tl.arange(0, BLOCK)
    sl = tl.zeros([BLOCK], tl.float32)
    sw = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        i = (start + r).to(tl.int64)
        ok = i < N
        sl += tl.load(PACK + i * 8 + 5, mask=ok, other=0.0)
        sw += tl.load(PACK + i * 8 + 6, mask=ok, other=0.0)
    total_l = tl.sum(sl, 0)
    total_w = tl.sum(sw, 0)
    tl.store(PACK + N * 8 + 0, total_w)
    tl.store(PACK + N * 8 + 1, total_l)
    if reduction != 0:
        tl.store(LOSS, tl.where(reduction == 1, total_l / total_w, total_l))
