"""The dense reference: builds the smoothed target q explicitly and computes −Σ_c w_c q_c log p_c.

Slow and memory-hungry on purpose (several N×C float64 tensors): it is the oracle every backend is
tested against, and is itself tested against ``F.cross_entropy`` and with float64 ``gradcheck``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._options import REFERENCE_KEYWORDS, SparseSimilarity, keyword_values, takes_keywords


def label_smoothing(
    labels: Tensor,
    num_classes: int,
    smoothing: float | Tensor = 0.1,
    *,
    similarity: Tensor | SparseSimilarity | None = None,
    similarity_mix: float = 1.0,
) -> Tensor:
    """The smoothed target q = (1 − ε)·onehot(y) + ε·r, r = (1 − β)/C + β·S̃[y].

    The classic ``label_smoothing(labels, num_classes, smoothing)`` helper (ε/C to every class,
    the target included), generalised to per-sample ε (a tensor of the labels' shape) and to
    dense or sparse similarity. Labels must be valid class ids. Returns [..., C] float64.
    """
    y = labels.long()
    onehot = torch.nn.functional.one_hot(y, num_classes).double()
    r = torch.full_like(onehot, 1.0 / num_classes)
    if similarity is not None:
        if isinstance(similarity, SparseSimilarity):
            S = torch.zeros(
                num_classes, num_classes, dtype=torch.float64, device=similarity.values.device
            )
            idx = similarity.indices.clamp_min(0)
            S.scatter_add_(
                1, idx, torch.where(similarity.indices >= 0, similarity.values.double(), 0)
            )
        else:
            S = similarity.double()
        S = (S / S.sum(1, keepdim=True)).to(onehot.device)
        r = (1 - similarity_mix) * r + similarity_mix * S[y]
    eps = smoothing.double()[..., None] if isinstance(smoothing, Tensor) else smoothing
    return (1 - eps) * onehot + eps * r


@takes_keywords(REFERENCE_KEYWORDS)
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    smoothing: float | Tensor = 0.1,
    *,
    compute_dtype: torch.dtype = torch.float64,
    **options,
) -> Tensor:
    """Dense reference of ``label_smoothing_cross_entropy`` (the same loss keywords), in float64.

    Differentiable with respect to ``logits``; the adaptive ε uses detached probabilities.
    ``compute_dtype`` runs the same dense computation in another precision: tests use it to
    measure what plain PyTorch's own error is in bf16/fp16, and set tolerances relative to it.
    The keywords are taken as given (no validation: this is the oracle, not the library).
    """
    kw = keyword_values(cross_entropy, dict(options, smoothing=smoothing))
    weight, ignore_index, reduction = kw["weight"], kw["ignore_index"], kw["reduction"]
    similarity, similarity_mix, adaptive = kw["similarity"], kw["similarity_mix"], kw["adaptive"]
    z_loss, softcap, confidence_penalty = kw["z_loss"], kw["softcap"], kw["confidence_penalty"]
    mix_target, mix_lambda = kw["mix_target"], kw["mix_lambda"]
    dt = compute_dtype
    C = logits.shape[1] if logits.dim() >= 2 else logits.shape[0]
    x = logits.to(dt)
    x = x[None] if x.dim() == 1 else x.movedim(1, -1).reshape(-1, C)
    y = target.reshape(-1).long()
    valid = y != ignore_index
    ys = torch.where(valid, y, 0)
    z = softcap * torch.tanh(x / softcap) if softcap else x
    logp = torch.log_softmax(z, dim=1)
    lse = torch.logsumexp(z, dim=1)
    p = logp.exp()

    eps = (
        smoothing.to(dt).reshape(-1)
        if isinstance(smoothing, Tensor)
        else torch.full_like(lse, float(smoothing))
    )
    if adaptive is not None:
        pd = p.detach()
        conf = pd.max(1).values if adaptive.confidence == "max" else pd.gather(1, ys[:, None])[:, 0]
        eps = torch.where(conf < adaptive.threshold, (eps * adaptive.factor).clamp(max=1), eps)

    def q_for(labels):
        return label_smoothing(
            labels, C, eps, similarity=similarity, similarity_mix=similarity_mix
        ).to(dt)

    w = weight.to(dt) if weight is not None else torch.ones(C, dtype=dt, device=x.device)
    if mix_target is not None:
        lam = (
            mix_lambda.to(dt).reshape(-1)
            if isinstance(mix_lambda, Tensor)
            else torch.full_like(lse, float(mix_lambda))
        )
        yb = torch.where(valid, mix_target.reshape(-1).long(), 0)
        q = lam[:, None] * q_for(ys) + (1 - lam[:, None]) * q_for(yb)
        W = lam * w[ys] + (1 - lam) * w[yb]
    else:
        q = q_for(ys)
        W = w[ys]
    wq = w * q
    # 0·(−inf) terms (zero mass at a −inf logit) are 0, as in the math
    loss = -torch.where(wq == 0, 0, wq * logp).sum(1)
    if z_loss:
        loss = loss + z_loss * W * lse**2
    if confidence_penalty:
        ent = -torch.where(p == 0, 0, p * logp).sum(1)
        loss = loss - confidence_penalty * W * ent
    loss = torch.where(valid, loss, 0)
    W = torch.where(valid, W, 0)
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / W.sum()
