"""The op contract: ``fused_ls::forward`` and ``fused_ls::backward`` custom ops.

The loss of DESIGN.md §2, for logits x [N, C] (class dim last), target y, class weights w,
smoothing ε_i, smoothing distribution r_i = (1 − β)·uniform + β·S̃[y_i]:

    loss_i = w_y (1 − ε_i)(lse − z_y) + ε_i (M_y · lse − D_y) + λ_z W lse² − β_cp W H
    M_y    = ⟨r_i, w⟩            (a per-class constant, "mass")
    D_y    = ⟨r_i ⊙ w, z⟩        (row statistic: one dot per smoothing row)
    H      = lse − Σ p z          (entropy, for the confidence penalty)

With mixup the loss is λ·loss(y_a) + (1 − λ)·loss(y_b) and W = λ w_a + (1 − λ) w_b. Everything
per row except D and the streaming statistics is O(N) work done here, once, for every backend:
a backend only provides ``row_stats`` and ``grad_rows`` (see ``fused_ls.backends``).

We fold the uniform part, the dense similarity part and the class weights into one matrix
``R`` with R[y, c] = r_yc · w_c: R is [1, C] = (1 − β)·w/C when there is no dense similarity and
[C, C] otherwise. Sparse similarity (k neighbours per class) enters through O(N·k) gathers.

The forward returns per-row losses (the reductions are plain torch ops outside the op, so the
mean's denominator stays a device tensor), the statistics users may ask for, and the per-row
gradient coefficients, so the backward is a single ``grad_rows`` pass scaled by the upstream grad.
"""

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .backends import GradTerms, acc_dtype

# Column layout of the per-row coefficient pack saved for backward.
COEF, GAMMA, U_A, U_B, T_A, T_B = range(6)
N_COEFS = 6

ADAPTIVE_MODES = {None: 0, "max": 1, "target": 2}


def capped(x: Tensor, softcap: float, acc: torch.dtype) -> Tensor:
    z = x.to(acc)
    return torch.tanh(z / softcap) * softcap if softcap > 0 else z


def wmul(a: Tensor, b: Tensor) -> Tensor:
    """a·b where a zero coefficient times ±inf gives 0 (zero-mass terms), but NaN stays NaN."""
    return a * torch.where((a == 0) & torch.isinf(b), 0, b)


def smoothing_matrix(
    C: int,
    weight: Optional[Tensor],
    similarity: Optional[Tensor],
    beta: float,
    has_sparse: bool,
    acc: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """R (rows of r ⊙ w, see module doc) and its row sums M_dense ([1] or [C])."""
    w = weight.to(device=device, dtype=acc) if weight is not None else None
    uni = (1.0 - beta) if (similarity is not None or has_sparse) else 1.0
    base = (w if w is not None else torch.ones(C, dtype=acc, device=device)) * (uni / C)
    if similarity is None:
        R = base[None, :]
    else:
        S = similarity.to(device=device, dtype=acc)
        S = S / S.sum(1, keepdim=True)
        R = base[None, :] + beta * (S * w[None, :] if w is not None else S)
    return R, R.sum(1)


def _check(bad: Tensor, exc: type, message) -> None:
    """Raise `exc` if any element of `bad` is set. Syncs on CPU only; on CUDA a device assert."""
    if bad.numel() == 0:
        return
    if bad.device.type == "cpu":
        if bool(bad.any()):
            raise exc(message() if callable(message) else message)
    else:
        msg = message() if not callable(message) else "fused_ls: invalid input (see CPU message)"
        torch._assert_async(~bad.any(), msg)


def _validate_rows(x, target, eps_rows, mix_target, mix_rows, similarity, ignore_index) -> None:
    C = x.shape[1]
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= C))
    _check(
        bad,
        IndexError,
        lambda: (
            f"target contains {int(target[bad][0])}, outside [0, {C}) and not "
            f"ignore_index={ignore_index}"
        ),
    )
    if mix_target is not None:
        bad = valid & ((mix_target < 0) | (mix_target >= C))
        _check(
            bad,
            IndexError,
            lambda: (
                f"mix_target contains {int(mix_target[bad][0])} on a non-ignored row, "
                f"outside [0, {C})"
            ),
        )
    for name, t in (("smoothing", eps_rows), ("mix_lambda", mix_rows)):
        if t is not None:
            bad = ~((t >= 0) & (t <= 1))  # NaN is bad too
            _check(
                bad,
                ValueError,
                lambda t=t, bad=bad, name=name: (
                    f"{name} (per-sample tensor) must lie in [0, 1]; found {float(t[bad][0])}"
                ),
            )
    if similarity is not None:
        S = similarity
        bad_rows = ~torch.isfinite(S).all(1) | (S < 0).any(1) | ~(S.sum(1) > 0)
        _check(
            bad_rows,
            ValueError,
            lambda: (
                "similarity rows must be finite, non-negative and not all zero; row "
                f"{int(bad_rows.nonzero()[0, 0])} is not"
            ),
        )


def _n_sparse(sparse_idx: Optional[Tensor], mix_target: Optional[Tensor]) -> int:
    if sparse_idx is None:
        return 0
    return sparse_idx.shape[1] * (2 if mix_target is not None else 1)


@torch.library.custom_op("fused_ls::forward", mutates_args=())
def ls_forward(
    x: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    eps_rows: Optional[Tensor],
    similarity: Optional[Tensor],
    sparse_idx: Optional[Tensor],
    sparse_val: Optional[Tensor],
    mix_target: Optional[Tensor],
    mix_rows: Optional[Tensor],
    smoothing: float,
    similarity_mix: float,
    ignore_index: int,
    adaptive_threshold: float,
    adaptive_factor: float,
    adaptive_mode: int,
    z_loss: float,
    softcap: float,
    confidence_penalty: float,
    mix_lambda: float,
    backend: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss and statistics; see the module docstring.

    Returns (loss [N], row_weight W [N], lse [N], confidence max p [N], prediction [N] int64,
    effective ε [N], Σpz [N or 0], coefficient pack [N, 6], sparse columns [N, K], sparse masses
    [N, K]). Ignored rows have loss 0, W 0 and all coefficients 0.
    """
    N, C = x.shape
    acc = acc_dtype(x.dtype)
    dev = x.device
    _validate_rows(x, target, eps_rows, mix_target, mix_rows, similarity, ignore_index)

    valid = target != ignore_index
    has_mix = mix_target is not None
    has_sparse = sparse_idx is not None
    beta = similarity_mix
    ya = torch.where(valid, target, 0)
    yb = torch.where(valid, mix_target, 0) if has_mix else None
    R, mass_dense = smoothing_matrix(C, weight, similarity, beta, has_sparse, acc, dev)
    single = R.shape[0] == 1
    need_pz = confidence_penalty != 0.0

    st = backends.get(backend).row_stats(
        x, R, None if single else ya, None if (single or not has_mix) else yb, softcap, need_pz
    )
    lse = st.lse

    w = weight.to(device=dev, dtype=acc) if weight is not None else None
    eps = (
        eps_rows.to(acc)
        if eps_rows is not None
        else torch.full((N,), smoothing, dtype=acc, device=dev)
    )
    z_a = capped(x.gather(1, ya[:, None])[:, 0], softcap, acc)
    conf = torch.exp(st.m - lse)
    if adaptive_mode != 0:
        # detached confidence of the row itself: max p, or p at the target
        c = conf if adaptive_mode == 1 else torch.exp(z_a - lse)
        eps = torch.where(c < adaptive_threshold, (eps * adaptive_factor).clamp(max=1.0), eps)

    def target_terms(y: Tensor, z_y: Tensor, dot: Tensor):
        """(L_t, w_t, M_t, sparse columns, sparse r·w) for the targets y."""
        w_t = w[y] if w is not None else torch.ones_like(z_y)
        M_t = mass_dense[y] if not single else mass_dense.expand(N)
        D_t = dot
        cols = rw = None
        if has_sparse:
            cols = sparse_idx[y].clamp_min(0)
            rw = beta * sparse_val[y].to(acc)
            if w is not None:
                rw = rw * w[cols]
            M_t = M_t + rw.sum(1)
            D_t = D_t + wmul(rw, capped(x.gather(1, cols), softcap, acc)).sum(1)
        L = wmul(w_t * (1 - eps), lse - z_y) + wmul(eps, M_t * lse - D_t)
        return L, w_t, M_t, cols, rw

    L_a, w_a, M_a, cols_a, rw_a = target_terms(ya, z_a, st.dot_a)
    coefs = torch.zeros(N, N_COEFS, dtype=acc, device=dev)
    if has_mix:
        lam = (
            mix_rows.to(acc)
            if mix_rows is not None
            else torch.full((N,), mix_lambda, dtype=acc, device=dev)
        )
        z_b = capped(x.gather(1, yb[:, None])[:, 0], softcap, acc)
        L_b, w_b, M_b, cols_b, rw_b = target_terms(
            yb, z_b, st.dot_b if st.dot_b is not None else st.dot_a
        )
        loss = wmul(lam, L_a) + wmul(1 - lam, L_b)
        W = lam * w_a + (1 - lam) * w_b
        coefs[:, COEF] = lam * (w_a * (1 - eps) + eps * M_a) + (1 - lam) * (
            w_b * (1 - eps) + eps * M_b
        )
        coefs[:, T_A] = lam * w_a * (1 - eps)
        coefs[:, T_B] = (1 - lam) * w_b * (1 - eps)
        if single:
            coefs[:, U_A] = eps
        else:
            coefs[:, U_A] = eps * lam
            coefs[:, U_B] = eps * (1 - lam)
    else:
        lam = None
        loss, W = L_a, w_a
        coefs[:, COEF] = w_a * (1 - eps) + eps * M_a
        coefs[:, T_A] = w_a * (1 - eps)
        coefs[:, U_A] = eps

    if z_loss != 0.0:
        loss = loss + z_loss * W * lse * lse
        coefs[:, COEF] += 2 * z_loss * W * lse
    pz = st.pz if need_pz else lse.new_empty(0)
    if need_pz:
        loss = loss - confidence_penalty * W * (lse - pz)
        coefs[:, GAMMA] = confidence_penalty * W

    if has_sparse:
        mass_a = rw_a * (eps * (lam if lam is not None else 1))[:, None]
        if has_mix:
            cols = torch.cat([cols_a, cols_b], 1)
            mass = torch.cat([mass_a, rw_b * (eps * (1 - lam))[:, None]], 1)
        else:
            cols, mass = cols_a, mass_a
        mass = torch.where(valid[:, None], mass, 0)
    else:
        cols = torch.zeros(N, 0, dtype=torch.int64, device=dev)
        mass = torch.zeros(N, 0, dtype=acc, device=dev)

    loss = torch.where(valid, loss, 0)
    W = torch.where(valid, W, 0)
    coefs = torch.where(valid[:, None], coefs, 0)
    eps = torch.where(valid, eps, 0)
    return loss, W, lse, conf, st.argmax, eps, pz, coefs, cols, mass


@ls_forward.register_fake
def _(
    x,
    target,
    weight,
    eps_rows,
    similarity,
    sparse_idx,
    sparse_val,
    mix_target,
    mix_rows,
    smoothing,
    similarity_mix,
    ignore_index,
    adaptive_threshold,
    adaptive_factor,
    adaptive_mode,
    z_loss,
    softcap,
    confidence_penalty,
    mix_lambda,
    backend,
    inplace_backward,
):
    N = x.shape[0]
    acc = acc_dtype(x.dtype)
    row = lambda: x.new_empty(N, dtype=acc)  # noqa: E731
    K = _n_sparse(sparse_idx, mix_target)
    return (
        row(),
        row(),
        row(),
        row(),
        x.new_empty(N, dtype=torch.int64),
        row(),
        x.new_empty(N if confidence_penalty != 0.0 else 0, dtype=acc),
        x.new_empty(N, N_COEFS, dtype=acc),
        x.new_empty(N, K, dtype=torch.int64),
        x.new_empty(N, K, dtype=acc),
    )


@torch.library.custom_op("fused_ls::backward", mutates_args=("out",))
def ls_backward(
    grad_loss: Tensor,
    x: Tensor,
    out: Tensor,
    target: Tensor,
    mix_target: Optional[Tensor],
    weight: Optional[Tensor],
    similarity: Optional[Tensor],
    lse: Tensor,
    pz: Tensor,
    coefs: Tensor,
    sparse_cols: Tensor,
    sparse_mass: Tensor,
    similarity_mix: float,
    softcap: float,
    backend: str,
) -> None:
    """Write d(Σ grad_loss_i · loss_i)/dx into `out` (which may be x itself)."""
    N, C = x.shape
    acc = acc_dtype(x.dtype)
    has_sparse = sparse_cols.shape[1] > 0
    R, _ = smoothing_matrix(C, weight, similarity, similarity_mix, has_sparse, acc, x.device)
    single = R.shape[0] == 1
    go = grad_loss.to(acc)[:, None]
    # Zero coefficients (ignored rows) stay zero even when the upstream grad is inf/NaN, as for a
    # "mean" over no counted rows (0/0): PyTorch gives those rows a zero gradient too.
    k = torch.where(coefs == 0, 0, coefs * go)
    # The coefficients of ignored rows are 0, so any in-range index serves for them.
    ya = target.clamp(0, C - 1)
    yb = mix_target.clamp(0, C - 1) if mix_target is not None else None
    terms = GradTerms(
        coef=k[:, COEF],
        gamma=k[:, GAMMA] if pz.numel() else None,
        u_a=k[:, U_A],
        u_b=None if (single or yb is None) else k[:, U_B],
        y_a=ya,
        t_a=k[:, T_A],
        y_b=yb,
        t_b=k[:, T_B] if yb is not None else None,
    )
    backends.get(backend).grad_rows(
        x,
        out,
        R,
        None if single else ya,
        None if (single or yb is None) else yb,
        lse,
        pz if pz.numel() else None,
        terms,
        sparse_cols if has_sparse else None,
        torch.where(sparse_mass == 0, 0, sparse_mass * go) if has_sparse else None,
        softcap,
    )


@ls_backward.register_fake
def _(
    grad_loss,
    x,
    out,
    target,
    mix_target,
    weight,
    similarity,
    lse,
    pz,
    coefs,
    sparse_cols,
    sparse_mass,
    similarity_mix,
    softcap,
    backend,
):
    return None


_FWD_ARGS = (
    "x",
    "target",
    "weight",
    "eps_rows",
    "similarity",
    "sparse_idx",
    "sparse_val",
    "mix_target",
    "mix_rows",
    "smoothing",
    "similarity_mix",
    "ignore_index",
    "adaptive_threshold",
    "adaptive_factor",
    "adaptive_mode",
    "z_loss",
    "softcap",
    "confidence_penalty",
    "mix_lambda",
    "backend",
    "inplace_backward",
)


def _setup_context(ctx, inputs, output):
    a = dict(zip(_FWD_ARGS, inputs, strict=True))
    _, _, lse, _, _, _, pz, coefs, cols, mass = output
    ctx.save_for_backward(
        a["x"],
        a["target"],
        a["mix_target"],
        a["weight"],
        a["similarity"],
        lse,
        pz,
        coefs,
        cols,
        mass,
    )
    ctx.cfg = (a["similarity_mix"], a["softcap"], a["backend"], a["inplace_backward"])


def _backward(ctx, grad_loss, *unused):
    x, target, mix_target, weight, similarity, lse, pz, coefs, cols, mass = ctx.saved_tensors
    beta, softcap, backend, inplace = ctx.cfg
    if not ctx.needs_input_grad[0]:
        return (None,) * len(_FWD_ARGS)
    # In-place: the gradient overwrites the logits' storage. The op declares `out` as mutated,
    # so the dispatcher bumps its version counter and any other op that saved the same logits
    # raises instead of computing with corrupted values (DESIGN.md §4).
    out = x if inplace else torch.empty_like(x)
    torch.ops.fused_ls.backward(
        grad_loss,
        x,
        out,
        target,
        mix_target,
        weight,
        similarity,
        lse,
        pz,
        coefs,
        cols,
        mass,
        beta,
        softcap,
        backend,
    )
    return (out,) + (None,) * (len(_FWD_ARGS) - 1)


ls_forward.register_autograd(_backward, setup_context=_setup_context)
