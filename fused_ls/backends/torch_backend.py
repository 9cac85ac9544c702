"""Pure-PyTorch backend: the fallback that runs anywhere (CPU, CUDA, any dtype).

It follows the kernel contract of ``fused_ls.backends`` in row chunks, so its workspace is a few
chunk-sized fp32 buffers (``CHUNK_ELEMS`` elements each) however large N×C is: no dense target and
no N×C ``log_softmax`` is ever built. Per chunk the forward makes about four passes (max, exp+sum,
one mat-vec per smoothing row) and the backward writes the gradient in place of an fp32 chunk.
"""

from __future__ import annotations

import torch

from . import Backend, GradTerms, RowStats, acc_dtype, register

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

    def __init__(self, rows: int, c: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (rows, c), dtype, device
        self.bufs: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, rows: int) -> torch.Tensor:
        if name not in self.bufs:
            self.bufs[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.bufs[name][:rows]


def _capped(x: torch.Tensor, acc: torch.dtype, softcap: float, ws: _Workspace) -> torch.Tensor:
    """z = softcap·tanh(x/softcap) in the accumulation dtype; a view of x when nothing changes."""
    if softcap > 0:
        z = torch.div(x, softcap, out=ws("z", x.shape[0]))
        return z.tanh_().mul_(softcap)
    if x.dtype == acc:
        return x
    return ws("z", x.shape[0]).copy_(x)


def _zero_mass_possible(R: torch.Tensor) -> bool:
    # A zero entry of R times z = -inf would make NaN in a plain mat-vec; mask only when needed.
    # On CPU the check is free; on CUDA we do not sync and always mask.
    return R.device.type != "cpu" or bool((R == 0).any())


def _constant_row(R: torch.Tensor) -> float | None:
    """R's single row value when it is constant (uniform smoothing without class weights), so
    that a row sum replaces the mat-vec (about 2× cheaper on CPU). CPU only: no sync on CUDA."""
    if R.shape[0] != 1 or R.device.type != "cpu":
        return None
    r0 = R[0, 0]
    return float(r0) if bool((R[0] == r0).all()) else None


class TorchBackend(Backend):
    name = "torch"

    def row_stats(self, x, R, ridx_a, ridx_b, softcap, need_pz):
        n, c = x.shape
        acc = acc_dtype(x.dtype)
        out = {k: torch.empty(n, dtype=acc, device=x.device) for k in ("m", "lse", "dot_a")}
        out["argmax"] = torch.empty(n, dtype=torch.int64, device=x.device)
        if ridx_b is not None:
            out["dot_b"] = torch.empty(n, dtype=acc, device=x.device)
        if need_pz:
            out["pz"] = torch.empty(n, dtype=acc, device=x.device)
        single = R.shape[0] == 1
        const = _constant_row(R)
        mask = const is None and _zero_mass_possible(R)
        pos = R > 0 if mask else None
        ws = _Workspace(next(_chunks(n, c, x.device), (0, 0))[1], c, acc, x.device)
        zero = torch.zeros((), dtype=acc, device=x.device)
        for s, e in _chunks(n, c, x.device):
            z = _capped(x[s:e], acc, softcap, ws)
            m, am = out["m"][s:e], out["argmax"][s:e]
            torch.max(z, dim=1, out=(m, am))  # one pass for the max and the argmax
            ex = torch.sub(z, m[:, None], out=ws("ex", e - s)).exp_()
            d = ex.sum(1)
            out["lse"][s:e] = m + torch.log(d)
            if need_pz:
                # Σ p z, with p = 0 terms exactly 0 even where z = -inf (ex is not needed after)
                zz = torch.where(ex > 0, z, zero, out=ws("t", e - s))
                out["pz"][s:e] = ex.mul_(zz).sum(1) / d
            for key, ridx in (("dot_a", ridx_a), ("dot_b", ridx_b)):
                if key == "dot_b" and ridx is None:
                    continue
                if const is not None:  # Σ_c r z_c = r Σ_c z_c; r = 0 terms are exactly 0
                    out[key][s:e] = z.sum(1).mul_(const) if const != 0 else 0
                elif single:
                    zz = torch.where(pos[0], z, zero, out=ws("t", e - s)) if mask else z
                    out[key][s:e] = zz @ R[0]
                else:
                    rows = R[ridx[s:e]]
                    zz = torch.where(pos[ridx[s:e]], z, zero, out=ws("t", e - s)) if mask else z
                    out[key][s:e] = (zz * rows).sum(1)
        return RowStats(
            out["m"], out["lse"], out["argmax"], out["dot_a"], out.get("dot_b"), out.get("pz")
        )

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
        softcap,
    ):
        n, c = x.shape
        acc = acc_dtype(x.dtype)
        single = R.shape[0] == 1
        const = _constant_row(R)
        # Work directly in `out` when it already holds the accumulation dtype and nothing needs
        # z after p has been written over it; otherwise use an fp32 chunk and round once at the end.
        direct = out.dtype == acc and softcap <= 0 and terms.gamma is None
        ws = _Workspace(next(_chunks(n, c, x.device), (0, 0))[1], c, acc, x.device)
        zero = torch.zeros((), dtype=acc, device=x.device)
        for s, e in _chunks(n, c, x.device):
            z = _capped(x[s:e], acc, softcap, ws)
            g = out[s:e] if direct else ws("g", e - s)
            torch.sub(z, lse[s:e, None], out=g)
            g.exp_()  # p
            if terms.gamma is not None:
                # [coef + γ (z − pz)] p, with p = 0 terms exactly 0 even where z = −inf
                t = torch.sub(z, pz[s:e, None], out=ws("t", e - s))
                t.mul_(terms.gamma[s:e, None]).add_(terms.coef[s:e, None])
                g.mul_(torch.where(g > 0, t, zero, out=t))
            else:
                g.mul_(terms.coef[s:e, None])
            for u, ridx in ((terms.u_a, ridx_a), (terms.u_b, ridx_b)):
                if u is None:
                    continue
                if const is not None:
                    g.sub_((u[s:e] * const)[:, None])
                elif single:
                    g.addr_(u[s:e], R[0], alpha=-1)
                elif ridx is not None:
                    g.addcmul_(R[ridx[s:e]], u[s:e, None], value=-1)
            # target-class and sparse-similarity masses, subtracted in the accumulation dtype
            for y, t in ((terms.y_a, terms.t_a), (terms.y_b, terms.t_b)):
                if y is not None:
                    g.scatter_add_(1, y[s:e, None], -t[s:e, None].to(acc))
            if sparse_cols is not None and sparse_cols.shape[1] > 0:
                g.scatter_add_(1, sparse_cols[s:e], -sparse_mass[s:e].to(acc))
            if softcap > 0:
                # dz/dx = 1 − tanh²(x/cap) = 1 − (z/cap)²  (z is not needed after this)
                g.mul_(z.div_(softcap).square_().neg_().add_(1))
            if not direct:
                out[s:e].copy_(g)


register(TorchBackend())
