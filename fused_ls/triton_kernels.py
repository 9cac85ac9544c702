"""Triton kernels of the fused label-smoothing cross-entropy (the two row passes of DESIGN.md §2).

Only the two kernels of the backend contract (``fused_ls.backends``) live here, plus the tiny merge
of split rows; validation, the O(N) finalisation of the loss and autograd are shared code in
``fused_ls._ops``. Notation, for row i of the logits x [N, C] (unit stride on C):

    z_c   = softcap · tanh(x_c / softcap)          (identity without softcap)
    m     = max_c z_c,  d = Σ_c exp(z_c − m),  lse = m + log d,  p_c = exp(z_c − lse)
    dot_a = Σ_c R[ra_i, c] · z_c                  (R = r ⊙ w, the folded smoothing rows)
    pz    = Σ_c p_c z_c                           (only for the confidence penalty)

    g_c = ( [coef + γ (z_c − pz)] p_c − u_a R[ra_i, c] − u_b R[rb_i, c]
            − Σ_j mass_j [c = col_j] ) · dz_c/dx_c,      dz/dx = 1 − (z/softcap)²

where the point masses (col_j, mass_j) are the target(s) (t_a at y_a, t_b at y_b) and the
sparse-similarity neighbours. Everything is accumulated in fp32; x and the gradient are fp32, bf16
or fp16.

One kernel family, specialised by a few constexpr switches instead of one kernel per mode:

    PER_ROW_R    R is [C, C] and each row picks R[ridx_a[i]] (dense similarity); else R is [1, C]
    HAS_B        a second R row R[ridx_b[i]] (mixup with dense similarity; only with PER_ROW_R)
    NEED_PZ      gather Σ p z (stats) / apply the γ term (grad): confidence penalty
    HAS_SOFTCAP  z = softcap · tanh(x / softcap) and the chain-rule factor
    x dtype      fp32 / bf16 / fp16, from the pointer type

Long rows (C ≥ ``SPLIT_MIN_C``) are split over a second grid axis of programs, each owning
``SPLIT_COLS`` consecutive columns; the stats pass writes per-split partial statistics and
``_merge_stats_kernel`` combines them with the online-softmax merge. The grad pass needs only
per-row scalars, so the same split applies to it without any merge.

Bytes moved (b = bytes per logit: 4 fp32, 2 bf16/fp16):
    stats pass: N·C·b (read x) + N·C·4 of R from L2 ([1, C] is reused by every row; a [C, C]
                dense similarity is a second N·C·4 read) + O(N·S) partials
    grad pass:  N·C·b (read x) + N·C·b (write g) + the same R traffic + O(N·K) point masses
so forward + backward is 3·N·C·b of HBM traffic, one more read of x than the
"one read + one write" floor: the backend contract runs the grad pass in backward, after the
per-row coefficients are finalised, so a second read of x is unavoidable here, and the best
case is 2/3 of copy bandwidth under that floor's byte model.
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
# of fp32) per thread and iteration. ptxas for sm_90 (`make triton-check` prints it) gives the
# grad kernel 39–60 registers and the stats kernel 60–64 (up to ~100 with the confidence penalty
# and dense similarity on), no spills, so 3–5 programs (768–1280 threads) share an SM and
# 12–40 KiB of loads are in flight per SM, about what 3.35 TB/s × ~600 ns of latency / 132 SMs
# (≈ 15 KiB) asks for. 4096 columns with 8 warps roughly doubled the registers for no more bytes
# in flight. Each stats iteration has one cross-thread reduction (the block max); shared memory
# use is ~1 KiB. Not yet tuned on a GPU.
BLOCK_MAX = 2048

# Point-mass columns per chunk in the grad pass's pair-sum (bounds its registers for large k).
POINT_CHUNK = 16


def num_warps_for(block: int) -> int:
    """Warps per program: 8 columns per thread at the largest block, at least one warp."""
    return max(1, min(8, block // 256))


# (Helpers are few and called outside the hot loops where possible: the interpreter re-patches
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


# --------------------------------------------------------------------------------------------
# Pass 1: row statistics.
#
# Online softmax over blocks of columns. After each block b with block max m_b:
#     m' = max(m, m_b),   d' = d · exp(m − m') + Σ_{c∈b} exp(z_c − m')
#     s' = s · exp(m − m') + Σ_{c∈b} exp(z_c − m') · z_c          (s/d = Σ p z at the end)
# one exp per element plus one per block. The exponent base m' is replaced by 0 while the row is
# still all −inf, so that −inf − (−inf) never makes NaN. The dots are plain sums: terms with
# R = 0 are skipped so that 0 · (−inf) gives 0 (masked vocabulary), and terms with exp(z − m) = 0
# are skipped in s for the same reason. argmax keeps the first maximal index: within a block the
# smallest column equal to the block max, across blocks only a strictly larger max replaces it.
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_stats_kernel(
    X,  # *x dtype [N, C]: logits, unit stride on C
    stride_x,  # elements between rows of X
    R,  # *fp32 [1, C] or [C, C]: smoothing rows r ⊙ w, unit stride on C
    stride_r,  # elements between rows of R (unused when not PER_ROW_R)
    RIDX_A,  # *i64 [N]: row of R for each sample (PER_ROW_R only)
    RIDX_B,  # *i64 [N]: second row of R for each sample (HAS_B only)
    PART,  # *fp32 [N, S, 8]: partial (m, d, dot_a, dot_b, s) of each split (3 slots spare)
    PART_ARG,  # *i64 [N, S]: argmax of each split (absolute column)
    C,  # number of classes
    S,  # number of splits per row (grid axis 1)
    cols_per_split,  # columns owned by one program (C when S == 1)
    softcap,  # fp32 cap (HAS_SOFTCAP only)
    BLOCK: tl.constexpr,  # columns per loop iteration (power of two)
    PER_ROW_R: tl.constexpr,  # R is [C, C], row picked by RIDX_A (and RIDX_B)
    HAS_B: tl.constexpr,  # gather the second dot with R[RIDX_B[i]]
    NEED_PZ: tl.constexpr,  # gather s = Σ exp(z − m) z
    HAS_SOFTCAP: tl.constexpr,  # apply the tanh soft cap
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride overflows int32 at N·C ≥ 2³¹
    split = tl.program_id(1)
    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, C)
    x_row = X + row * stride_x
    if PER_ROW_R:
        ra_row = R + tl.load(RIDX_A + row) * stride_r
    else:
        ra_row = R
    if HAS_B:
        rb_row = R + tl.load(RIDX_B + row) * stride_r
    else:
        rb_row = ra_row
    cols = tl.arange(0, BLOCK)

    # Scalar running max m (the exponent base) and first argmax; the sums are kept per lane
    # (d, s and the dots as [BLOCK] vectors, d and s rescaled by the scalar exp(m − m')), so an
    # iteration has a single cross-thread reduction (the block max) and no barrier for the sums.
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
        if m_b > m:  # rare after the first blocks: the first column holding the new max
            arg = tl.min(tl.where(z == m_b, c, hi), 0).to(tl.int64)
        m_new = tl.maximum(m, m_b)
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - base)
        e = tl.exp(z - base)
        d = d * alpha + e
        if NEED_PZ:
            s = s * alpha + tl.where(e == 0, 0.0, e * z)
        ra = tl.load(ra_row + c, mask=mask, other=0.0)
        dot_a += tl.where(ra != 0, ra * z, 0.0)
        if HAS_B:
            rb = tl.load(rb_row + c, mask=mask, other=0.0)
            dot_b += tl.where(rb != 0, rb * z, 0.0)
        m = m_new

    slot = row * S + split
    part = PART + slot * 8
    tl.store(part + 0, m)
    tl.store(part + 1, tl.sum(d, 0))
    tl.store(part + 2, tl.sum(dot_a, 0))
    tl.store(part + 3, tl.sum(dot_b, 0))
    tl.store(part + 4, tl.sum(s, 0))
    tl.store(PART_ARG + slot, arg)


# --------------------------------------------------------------------------------------------
# Merge of the S partials of a row (the same online-softmax merge, across splits):
#     m = max_k m_k,  d = Σ_k d_k exp(m_k − m),  s = Σ_k s_k exp(m_k − m)
#     lse = m + log d,  pz = s / d,  dots summed,  argmax from the first split holding m.
# Bytes: N·S·(8·4 + 8) read, 6·N·8 written at most; runs once per forward, also when S == 1.
# --------------------------------------------------------------------------------------------
@triton.jit
def _merge_stats_kernel(
    PART,  # *fp32 [N, S, 8]: partials from _row_stats_kernel
    PART_ARG,  # *i64 [N, S]: per-split argmax
    M,  # *fp32 [N] out: row max of z
    LSE,  # *fp32 [N] out: log-sum-exp of z
    ARG,  # *i64 [N] out: first index of the max
    DOT_A,  # *fp32 [N] out: Σ R[ra] z
    DOT_B,  # *fp32 [N] out: Σ R[rb] z (written always; meaningful with HAS_B)
    PZ,  # *fp32 [N] out: Σ p z (written always; meaningful with NEED_PZ)
    S,  # number of splits
    SP: tl.constexpr,  # S rounded up to a power of two
):
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, SP)
    mask = k < S
    part = PART + (row * S + k) * 8
    m_k = tl.load(part + 0, mask=mask, other=float("-inf"))
    d_k = tl.load(part + 1, mask=mask, other=0.0)
    a_k = tl.load(part + 2, mask=mask, other=0.0)
    b_k = tl.load(part + 3, mask=mask, other=0.0)
    s_k = tl.load(part + 4, mask=mask, other=0.0)
    m, first = tl.max(m_k, 0, return_indices=True, return_indices_tie_break_left=True)
    base = tl.where(m == float("-inf"), 0.0, m)
    scale = tl.exp(m_k - base)
    d = tl.sum(d_k * scale, 0)
    s = tl.sum(tl.where(scale == 0, 0.0, s_k * scale), 0)
    tl.store(M + row, m)
    tl.store(LSE + row, m + tl.log(d))
    tl.store(ARG + row, tl.load(PART_ARG + row * S + first))
    tl.store(DOT_A + row, tl.sum(a_k, 0))
    tl.store(DOT_B + row, tl.sum(b_k, 0))
    tl.store(PZ + row, s / d)


# --------------------------------------------------------------------------------------------
# Pass 2: gradient.
#
# Dense part, one read of x and one write of g per element, all in fp32 and rounded once:
#     g_c = ([coef + γ (z_c − pz)] p_c − u_a R[ra, c] − u_b R[rb, c]) · dz_c/dx_c
# (the γ term is skipped where p_c = 0, so z = −inf gives 0, not 0 · −inf).
#
# Point masses: the targets and the sparse-similarity neighbours ("specials", j = 0..K+1:
# j = 0 → (y_a, t_a), j = 1 → (y_b, t_b), j ≥ 2 → (sparse_cols[j − 2], sparse_mass[j − 2])) are
# not subtracted in the dense loop. Each program instead computes, before its dense loop, the
# complete fp32 gradient of every special column it owns, with all masses at that column summed
# (targets and neighbours may coincide), and stores those after the dense loop, behind a barrier
# so that the fix-up store lands after the dense store of the same column. The special logits are
# loaded before any store because `out` may alias `x` (in-place backward). Thus the target-class
# gradient p_y − (1 − ε)… is formed in fp32 and rounded once: no bf16 cancellation.
# --------------------------------------------------------------------------------------------
@triton.jit
def _special_points(
    Y_A,
    Y_B,
    TERMS,
    SP_COLS,
    SP_MASS,
    row,
    K,
    j,
):
    # (column, mass, valid) of specials j (a vector of indices, any length)
    sp_ok = (j >= 2) & (j - 2 < K)
    sp_col = tl.load(SP_COLS + row * K + (j - 2), mask=sp_ok, other=0)
    sp_mass = tl.load(SP_MASS + row * K + (j - 2), mask=sp_ok, other=0.0)
    y_a = tl.load(Y_A + row)
    y_b = tl.load(Y_B + row)
    t_a = tl.load(TERMS + row * 8 + 4)
    t_b = tl.load(TERMS + row * 8 + 5)
    col = tl.where(j == 0, y_a, tl.where(j == 1, y_b, sp_col))
    mass = tl.where(j == 0, t_a, tl.where(j == 1, t_b, sp_mass))
    return col, mass, (j < 2) | sp_ok


@triton.jit
def _grad_kernel(
    X,  # *x dtype [N, C]: logits, unit stride on C
    stride_x,  # elements between rows of X
    OUT,  # *out dtype [N, C]: gradient, unit stride on C; may be X itself (in-place)
    stride_o,  # elements between rows of OUT
    R,  # *fp32 [1, C] or [C, C]: smoothing rows r ⊙ w
    stride_r,  # elements between rows of R
    RIDX_A,  # *i64 [N]: row of R per sample (PER_ROW_R only)
    RIDX_B,  # *i64 [N]: second row of R per sample (HAS_B only)
    LSE,  # *fp32 [N]: log-sum-exp from the stats pass
    PZ,  # *fp32 [N]: Σ p z (NEED_PZ only)
    TERMS,  # *fp32 [N, 8]: coef, γ, u_a, u_b, t_a, t_b per row (× upstream grad), 2 spare
    Y_A,  # *i64 [N]: first target (in [0, C))
    Y_B,  # *i64 [N]: second target (mixup; = Y_A with t_b = 0 otherwise)
    SP_COLS,  # *i64 [N, K]: sparse-similarity columns (in [0, C))
    SP_MASS,  # *fp32 [N, K]: their masses (× upstream grad)
    K,  # sparse columns per row (0: none)
    C,  # number of classes
    cols_per_split,  # columns owned by one program (C when the row is not split)
    softcap,  # fp32 cap (HAS_SOFTCAP only)
    BLOCK: tl.constexpr,  # columns per loop iteration
    KP: tl.constexpr,  # K + 2 specials rounded up to a power of two
    PER_ROW_R: tl.constexpr,  # R is [C, C], rows picked by RIDX_A (and RIDX_B)
    HAS_B: tl.constexpr,  # subtract u_b R[RIDX_B[i]] too
    NEED_PZ: tl.constexpr,  # the γ (z − pz) p term of the confidence penalty
    HAS_SOFTCAP: tl.constexpr,  # z = softcap tanh(x / softcap), times dz/dx
    POINT_CHUNK: tl.constexpr,  # specials per chunk of the pair-sum
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, C)
    x_row = X + row * stride_x
    o_row = OUT + row * stride_o
    if PER_ROW_R:
        ra_row = R + tl.load(RIDX_A + row) * stride_r
    else:
        ra_row = R
    if HAS_B:
        rb_row = R + tl.load(RIDX_B + row) * stride_r
    else:
        rb_row = ra_row
    lse = tl.load(LSE + row)
    coef = tl.load(TERMS + row * 8 + 0)
    gamma = tl.load(TERMS + row * 8 + 1)
    u_a = tl.load(TERMS + row * 8 + 2)
    u_b = tl.load(TERMS + row * 8 + 3)
    if NEED_PZ:
        pz = tl.load(PZ + row)
    else:
        pz = 0.0

    # Specials owned by this program: full fp32 gradient, computed before any store.
    j = tl.arange(0, KP)
    col_j, mass_j, ok_j = _special_points(Y_A, Y_B, TERMS, SP_COLS, SP_MASS, row, K, j)
    own_j = ok_j & (col_j >= lo) & (col_j < hi)
    summed = tl.zeros([KP], tl.float32)  # Σ of the masses of all specials at col_j
    for j0 in range(0, K + 2, POINT_CHUNK):
        i = j0 + tl.arange(0, POINT_CHUNK)
        col_i, mass_i, ok_i = _special_points(Y_A, Y_B, TERMS, SP_COLS, SP_MASS, row, K, i)
        hit = (col_j[:, None] == col_i[None, :]) & ok_i[None, :]
        summed += tl.sum(tl.where(hit, mass_i[None, :], 0.0), 1)
    x_j = tl.load(x_row + col_j, mask=own_j, other=0.0).to(tl.float32)
    z_j = x_j
    if HAS_SOFTCAP:
        z_j = softcap * _tanh(x_j / softcap)
    p_j = tl.exp(z_j - lse)
    k_j = coef
    if NEED_PZ:
        k_j = coef + gamma * (z_j - pz)
    g_j = tl.where(p_j == 0, 0.0, k_j * p_j)
    g_j -= u_a * tl.load(ra_row + col_j, mask=own_j, other=0.0)
    if HAS_B:
        g_j -= u_b * tl.load(rb_row + col_j, mask=own_j, other=0.0)
    g_j -= summed
    if HAS_SOFTCAP:
        t_j = z_j / softcap
        g_j *= 1.0 - t_j * t_j

    # Dense part: one read of x, one write of g.
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
        g -= u_a * tl.load(ra_row + c, mask=mask, other=0.0)
        if HAS_B:
            g -= u_b * tl.load(rb_row + c, mask=mask, other=0.0)
        if HAS_SOFTCAP:
            t = z / softcap
            g *= 1.0 - t * t
        tl.store(o_row + c, g.to(OUT.dtype.element_ty), mask=mask)

    # All threads' dense stores of this row piece precede the fix-up stores.
    tl.debug_barrier()
    tl.store(o_row + col_j, g_j.to(OUT.dtype.element_ty), mask=own_j)
