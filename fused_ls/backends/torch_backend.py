"""Pure-PyTorch backend: the fallback that runs anywhere (CPU, CUDA, any dtype), and the readable
reference of the per-row finalisation that the compiled backends do inside their kernels.

The two passes work in row chunks, so the workspace is a few chunk-sized accumulation-dtype
buffers (``CHUNK_ELEMS`` elements each) however large N×C is: no dense target and no N×C
``log_softmax`` is ever built. The finalisation (``finalize``, ``grad_terms``) is O(N) tensor
code written as the formulas of docs/design.md §2:

    L(y)   = w_y (1 − ε)(lse − z_y) + ε (M_y · lse − D_y)          (one target y)
    loss_i = λ L(y_a) + (1 − λ) L(y_b)   [mixup]   + λ_z W lse²  − β_cp W (lse − Σpz)
    g_c    = [coef + γ (z_c − Σpz)] p_c − u_a R_{a,c} − u_b R_{b,c} − t_a [c = y_a] − t_b [c = y_b]
             − Σ_j mass_j [c = col_j]                                 (× dz/dx with softcap)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._problem import (
    P_ARG,
    P_CONF,
    P_EPS,
    P_LOGP,
    P_LOSS,
    P_LSE,
    P_PZ,
    P_W,
    R_MEAN,
    R_NONE,
    S_ARG,
    S_D,
    S_DA,
    S_DB,
    S_M,
    S_S,
    S_ZA,
    S_ZB,
    T_LOSS,
    T_W,
    WIDTH,
    Problem,
    argmax_bits_dtype,
    validate,
)
from .registry import Backend, acc_dtype, register

# Elements per chunk: 2**19 fp32 values = 2 MiB per workspace buffer, so that the several
# passes over a chunk mostly hit the cache. Measured on the 2-core CPU at N=4096, C=32000 fp32
# (forward+backward): 2**15 → 876 ms (per-chunk overhead), 2**17 → 457, 2**19 → 355, 2**21 → 375.
# On a GPU, caches matter less than launch count: chunks are CUDA_CHUNK_FACTOR times larger
# (64 MiB of fp32 per buffer), still a small fraction of the N×C logits this path is meant for.
CHUNK_ELEMS = 1 << 19
CUDA_CHUNK_FACTOR = 32


def _chunks(n: int, c: int, device: torch.device):
    elems = CHUNK_ELEMS * (CUDA_CHUNK_FACTOR if device.type == "cuda" else 1)
    step = max(1, elems // max(c, 1))
    for s in range(0, n, step):
        yield s, min(n, s + step)


class _Workspace:
    """Chunk-sized buffers allocated once per call and reused by every chunk: a fresh 8 MiB
    temporary per op per chunk would cost an allocation, page faults and the kernel's zeroing."""

    def __init__(self, n: int, c: int, dtype: torch.dtype, device: torch.device):
        rows = next(_chunks(n, c, device), (0, 0))[1]
        self.shape, self.dtype, self.device = (rows, c), dtype, device
        self.bufs: dict[str, Tensor] = {}

    def __call__(self, name: str, rows: int) -> Tensor:
        if name not in self.bufs:
            self.bufs[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.bufs[name][:rows]


def _capped(x: Tensor, acc: torch.dtype, softcap: float, ws: _Workspace) -> Tensor:
    """z = softcap·tanh(x/softcap) in the accumulation dtype; a view of x when nothing changes."""
    if softcap > 0:
        # x/softcap in the accumulation dtype: torch.div(x, softcap, out=<fp32>) would divide in
        # x's own dtype and round the quotient to bf16/fp16 before tanh
        z = ws("z", x.shape[0])
        z = torch.div(x, softcap, out=z) if x.dtype == acc else z.copy_(x).div_(softcap)
        return z.tanh_().mul_(softcap)
    if x.dtype == acc:
        return x
    return ws("z", x.shape[0]).copy_(x)


def wmul(a: Tensor, b: Tensor) -> Tensor:
    """a·b where a zero coefficient times ±inf gives 0 (zero-mass terms), but NaN stays NaN."""
    return a * torch.where((a == 0) & torch.isinf(b), 0, b)


def _scaled(c: Tensor, go: Tensor) -> Tensor:
    """c·go where c = 0 stays 0 even for an infinite or NaN upstream gradient (the "mean" over
    no counted rows is 0/0; PyTorch gives those rows a zero gradient too)."""
    return torch.where(c == 0, 0, c * go)


class _Cols(NamedTuple):
    """The logits' columns as a slice of the class space, and the row of R each sample uses."""

    lo: int  # global index of column 0
    n: int  # number of columns here

    def local(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(column of global class y here, clamped; whether y is one of these columns)."""
        yl = y - self.lo
        inr = (yl >= 0) & (yl < self.n)
        return yl.clamp(0, self.n - 1), inr


def _sparse_terms(p: Problem, y: Tensor, acc) -> tuple[Tensor, Tensor]:
    """(global columns [N, K], masses rw = β S̃_y,j w_col [N, K]) of the sparse neighbours of y."""
    cols = p.sp_idx[y]
    rw = p.sp_val[y].to(acc)
    if p.weight is not None:
        rw = rw * p.weight[cols]
    return cols, rw


def _targets(p: Problem) -> tuple[Tensor, Tensor, Tensor | None]:
    """(valid rows, y_a and y_b clamped into [0, C) on ignored rows)."""
    valid = p.target != p.ignore_index
    ya = torch.where(valid, p.target, 0)
    yb = torch.where(valid, p.mix_target, 0) if p.mix_target is not None else None
    return valid, ya, yb


class TorchBackend(Backend):
    name = "torch"

    # ---- pass 1: statistics -----------------------------------------------------------------
    def row_stats(self, x: Tensor, p: Problem) -> Tensor:
        validate(p)
        n, c = x.shape
        acc = acc_dtype(x.dtype)
        dev = x.device
        cols = _Cols(p.col_offset, c)
        _, ya, yb = _targets(p)
        stats = torch.zeros(n, WIDTH, dtype=acc, device=dev)
        argmax = torch.empty(n, dtype=torch.int64, device=dev)
        w_loc = p.weight[cols.lo : cols.lo + c] if p.weight is not None else None
        # the dense part of R for every row (R[0] = r0 · w when there is no dense similarity)
        if p.dense:
            R_loc = p.R[:, cols.lo : cols.lo + c]
        elif w_loc is not None:
            R_loc = (w_loc * p.r0)[None, :]
        else:
            R_loc = None  # the constant r0: D = r0 · Σ z
        # Only a zero entry of R times z = −inf needs masking; on CPU look once, on CUDA (no
        # sync) always mask.
        mask = R_loc is not None and (dev.type != "cpu" or bool((R_loc == 0).any()))
        ws = _Workspace(n, c, acc, dev)
        zero = torch.zeros((), dtype=acc, device=dev)
        need_pz = p.confidence_penalty != 0.0 or p.need_stats  # Σpz: penalty, Stats.entropy
        for s, e in _chunks(n, c, dev):
            z = _capped(x[s:e], acc, p.softcap, ws)
            st = stats[s:e]
            m, argmax[s:e] = torch.max(z, dim=1)  # one pass for the max and the argmax
            st[:, S_M] = m
            # shifted by a finite value: an all −inf row gives d = 0 and lse = −inf, as the
            # compiled kernels' empty state (not exp(−inf − (−inf)) = NaN)
            shift = torch.where(m == float("-inf"), 0, m)
            ex = torch.sub(z, shift[:, None], out=ws("ex", e - s)).exp_()
            st[:, S_D] = ex.sum(1)
            if need_pz:  # Σ exp(z − m)·z, p = 0 terms exactly 0 even where z = −inf
                st[:, S_S] = ex.mul_(torch.where(ex > 0, z, zero, out=ws("t", e - s))).sum(1)
            for col, y in ((S_DA, ya), (S_DB, yb)):
                if y is None:
                    continue
                if col == S_DB and not p.dense:  # one R row for both targets
                    st[:, S_DB] = st[:, S_DA]
                    continue
                if R_loc is None:
                    st[:, col] = z.sum(1) * p.r0 if p.r0 != 0 else 0
                    continue
                rows = R_loc[y[s:e]] if p.dense else R_loc
                zz = torch.where(rows > 0, z, zero, out=ws("t", e - s)) if mask else z
                st[:, col] = (zz * rows).sum(1)
            for zcol, dcol, y in ((S_ZA, S_DA, ya), (S_ZB, S_DB, yb)):
                if y is None:
                    continue
                yl, inr = cols.local(y[s:e])
                st[:, zcol] = torch.where(inr, z.gather(1, yl[:, None])[:, 0], 0)
                if p.has_sparse:
                    gcols, rw = _sparse_terms(p, y[s:e], acc)
                    cl, inr = cols.local(gcols)
                    zc = torch.where(inr, z.gather(1, cl), 0)
                    st[:, dcol] += wmul(torch.where(inr, rw, 0), zc).sum(1)
        argmax += cols.lo
        stats[:, S_ARG] = argmax.to(argmax_bits_dtype(acc)).view(acc)
        return stats

    # ---- finalisation (the readable reference of csrc/rowmath.h) ----------------------------
    def finalize(self, stats: Tensor, p: Problem) -> tuple[Tensor, Tensor]:
        n = stats.shape[0]
        acc = stats.dtype
        dev = stats.device
        valid, ya, yb = _targets(p)
        m, d, s = stats[:, S_M], stats[:, S_D], stats[:, S_S]
        lse = m + torch.log(d)
        conf = torch.where(d > 0, 1 / d, torch.exp(m - lse))  # max p = exp(m − lse) = 1/d
        pz = s / d
        eps = (
            p.eps_rows.to(acc)
            if p.eps_rows is not None
            else torch.full((n,), p.smoothing, dtype=acc, device=dev)
        )
        if p.adaptive_mode != 0:
            # detached confidence of the row itself: max p, or p at the target
            c = conf if p.adaptive_mode == 1 else torch.exp(stats[:, S_ZA] - lse)
            eps = torch.where(c < p.adaptive_threshold, (eps * p.adaptive_factor).clamp(max=1), eps)

        def one_target(y, zcol, dcol):
            w_t, M_t = self._target_weight_and_mass(p, y, acc)
            z_t, D_t = stats[:, zcol], stats[:, dcol]
            return wmul(w_t * (1 - eps), lse - z_t) + wmul(eps, M_t * lse - D_t), w_t

        L_a, w_a = one_target(ya, S_ZA, S_DA)
        if yb is not None:
            lam = self._lambda(p, n, acc, dev)
            L_b, w_b = one_target(yb, S_ZB, S_DB)
            loss = wmul(lam, L_a) + wmul(1 - lam, L_b)
            W = lam * w_a + (1 - lam) * w_b
        else:
            loss, W = L_a, w_a
        if p.z_loss != 0.0:
            loss = loss + p.z_loss * W * lse * lse
        if p.confidence_penalty != 0.0:
            loss = loss - p.confidence_penalty * W * (lse - pz)
        elif not p.need_stats:
            pz = torch.zeros_like(pz)
        loss = torch.where(valid, loss, 0)
        W = torch.where(valid, W, 0)
        pack = torch.zeros(n + 1, WIDTH, dtype=acc, device=dev)
        for col, v in (
            (P_LSE, lse),
            (P_EPS, torch.where(valid, eps, 0)),
            (P_PZ, pz),
            (P_CONF, conf),
            (P_ARG, stats[:, S_ARG]),
            (P_LOSS, loss),
            (P_W, W),
            (P_LOGP, torch.where(valid, stats[:, S_ZA] - lse, 0)),
        ):
            pack[:n, col] = v
        pack[n, T_W] = W.sum()
        pack[n, T_LOSS] = loss.sum()
        if p.reduction == R_NONE:
            out = loss
        elif p.reduction == R_MEAN:
            out = pack[n, T_LOSS] / pack[n, T_W]
        else:
            out = pack[n, T_LOSS].clone()
        return out, pack

    @staticmethod
    def _target_weight_and_mass(p: Problem, y: Tensor, acc) -> tuple[Tensor, Tensor]:
        """(w_y, M_y = ⟨r_y, w⟩) for targets y (sparse neighbours included)."""
        w_t = p.weight[y] if p.weight is not None else torch.ones_like(y, dtype=acc)
        M_t = p.mass[y] if p.dense else p.mass.expand(y.shape[0])
        if p.has_sparse:
            M_t = M_t + _sparse_terms(p, y, acc)[1].sum(1)
        return w_t, M_t

    @staticmethod
    def _lambda(p: Problem, n: int, acc, dev) -> Tensor:
        if p.mix_rows is not None:
            return p.mix_rows.to(acc)
        return torch.full((n,), p.mix_lambda, dtype=acc, device=dev)

    def grad_terms(self, grad_loss: Tensor, pack: Tensor, p: Problem):
        """Per-row coefficients of g (module docstring), times the upstream gradient."""
        n = pack.shape[0] - 1
        acc = pack.dtype
        dev = pack.device
        valid, ya, yb = _targets(p)
        go = grad_loss.to(acc)
        if p.reduction == R_MEAN:
            go = go / pack[n, T_W]
        go = go.expand(n) if go.dim() == 0 else go
        eps = pack[:n, P_EPS]
        w_a, M_a = self._target_weight_and_mass(p, ya, acc)
        lam = self._lambda(p, n, acc, dev) if yb is not None else None
        zero = torch.zeros_like(eps)
        if yb is not None:
            w_b, M_b = self._target_weight_and_mass(p, yb, acc)
            coef = lam * (w_a * (1 - eps) + eps * M_a) + (1 - lam) * (w_b * (1 - eps) + eps * M_b)
            t_a, t_b = lam * w_a * (1 - eps), (1 - lam) * w_b * (1 - eps)
            # one R row for both targets unless the similarity is dense: λ + (1 − λ) = 1
            u_a, u_b = (eps * lam, eps * (1 - lam)) if p.dense else (eps, zero)
            W = lam * w_a + (1 - lam) * w_b
        else:
            coef, t_a, t_b, u_a, u_b = w_a * (1 - eps) + eps * M_a, w_a * (1 - eps), zero, eps, zero
            W = w_a
        if p.z_loss != 0.0:
            coef = coef + 2 * p.z_loss * W * pack[:n, P_LSE]
        gamma = p.confidence_penalty * W if p.confidence_penalty != 0.0 else None
        cols = mass = None
        if p.has_sparse:
            cols_a, rw_a = _sparse_terms(p, ya, acc)
            mass = rw_a * (eps * (lam if lam is not None else 1))[:, None]
            cols = cols_a
            if yb is not None:
                cols_b, rw_b = _sparse_terms(p, yb, acc)
                cols = torch.cat([cols_a, cols_b], 1)
                mass = torch.cat([mass, rw_b * (eps * (1 - lam))[:, None]], 1)

        def sc(c):  # zero on ignored rows, then times the upstream gradient
            if c.dim() == 1:
                return _scaled(torch.where(valid, c, 0), go)
            return _scaled(torch.where(valid[:, None], c, 0), go[:, None])

        return dict(
            coef=sc(coef),
            gamma=sc(gamma) if gamma is not None else None,
            u_a=sc(u_a),
            u_b=sc(u_b),
            t_a=sc(t_a),
            t_b=sc(t_b),
            ya=ya,
            yb=yb,
            cols=cols,
            mass=sc(mass) if mass is not None else None,
        )

    # ---- pass 2: gradient --------------------------------------------------------------------
    def backward(self, grad_loss, x, out, pack, p: Problem) -> None:
        n, c = x.shape
        if n == 0:
            return
        acc = acc_dtype(x.dtype)
        dev = x.device
        k = self.grad_terms(grad_loss, pack, p)
        lse, pz = pack[:n, P_LSE], pack[:n, P_PZ]
        cols = _Cols(p.col_offset, c)
        w_loc = p.weight[cols.lo : cols.lo + c] if p.weight is not None else None
        R_loc = p.R[:, cols.lo : cols.lo + c] if p.dense else None
        # Work directly in `out` when it already holds the accumulation dtype and nothing needs
        # z after p has been written over it; else in an fp32 chunk, rounded once at the end.
        direct = out.dtype == acc and p.softcap <= 0 and k["gamma"] is None
        ws = _Workspace(n, c, acc, dev)
        zero = torch.zeros((), dtype=acc, device=dev)
        points = [(k["ya"], k["t_a"]), (k["yb"], k["t_b"])]
        for s, e in _chunks(n, c, dev):
            z = _capped(x[s:e], acc, p.softcap, ws)
            g = out[s:e] if direct else ws("g", e - s)
            torch.sub(z, lse[s:e, None], out=g).exp_()  # p
            if k["gamma"] is not None:
                # [coef + γ (z − pz)] p, with p = 0 terms exactly 0 even where z = −inf
                t = torch.sub(z, pz[s:e, None], out=ws("t", e - s))
                t.mul_(k["gamma"][s:e, None]).add_(k["coef"][s:e, None])
                g.mul_(torch.where(g > 0, t, zero, out=t))
            else:
                g.mul_(k["coef"][s:e, None])
            # − u_a R_a − u_b R_b (the dense part of the smoothing)
            if R_loc is not None:
                g.addcmul_(R_loc[k["ya"][s:e]], k["u_a"][s:e, None], value=-1)
                if k["yb"] is not None:
                    g.addcmul_(R_loc[k["yb"][s:e]], k["u_b"][s:e, None], value=-1)
            elif w_loc is not None:
                g.addr_(k["u_a"][s:e], w_loc, alpha=-p.r0)
            elif p.r0 != 0:
                g.sub_((k["u_a"][s:e] * p.r0)[:, None])
            # target-class and sparse-similarity masses, subtracted in the accumulation dtype
            for y, t in points:
                if y is not None:
                    yl, inr = cols.local(y[s:e])
                    g.scatter_add_(1, yl[:, None], -torch.where(inr, t[s:e], 0)[:, None])
            if k["cols"] is not None:
                cl, inr = cols.local(k["cols"][s:e])
                g.scatter_add_(1, cl, -torch.where(inr, k["mass"][s:e], 0))
            if p.softcap > 0:
                # dz/dx = 1 − tanh²(x/cap) = 1 − (z/cap)²  (z is not needed after this)
                g.mul_(z.div_(p.softcap).square_().neg_().add_(1))
            if not direct:
                out[s:e].copy_(g)


register(TorchBackend())
