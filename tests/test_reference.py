"""The dense reference is the oracle of every other test, so it is checked first: against
F.cross_entropy where PyTorch has the same semantics, and with float64 gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from fused_ls import ConfidenceAdaptive, SparseSimilarity, reference


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_reference_matches_pytorch(reduction, weighted, eps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 13, dtype=torch.float64, generator=g)
    y = torch.randint(0, 13, (23,), generator=g)
    y[[2, 7]] = -100
    w = torch.rand(13, dtype=torch.float64, generator=g) + 0.1 if weighted else None
    ours = reference.cross_entropy(x, y, eps, weight=w, reduction=reduction)
    theirs = F.cross_entropy(x, y, weight=w, reduction=reduction, label_smoothing=eps)
    torch.testing.assert_close(ours, theirs)


def test_reference_nd_layout_matches_pytorch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 4, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 7, (3, 4, 5), generator=g)
    for red in ("none", "mean"):
        torch.testing.assert_close(
            reference.cross_entropy(x, y, 0.2, reduction=red),
            F.cross_entropy(x, y, reduction=red, label_smoothing=0.2),
        )


def test_label_smoothing_helper():
    y = torch.tensor([0, 3, 2])
    q = reference.label_smoothing(y, 4, 0.2)
    torch.testing.assert_close(q.sum(1), torch.ones(3, dtype=torch.float64))
    assert q[1, 3] == pytest.approx(0.8 + 0.05) and q[1, 0] == pytest.approx(0.05)
    S = torch.rand(4, 4, dtype=torch.float64)
    for sim in (S, SparseSimilarity.from_dense(S, 2)):
        q = reference.label_smoothing(
            y, 4, torch.tensor([0.1, 0.5, 1.0]), similarity=sim, similarity_mix=0.6
        )
        torch.testing.assert_close(q.sum(1), torch.ones(3, dtype=torch.float64))
    # a sparse similarity equals the dense matrix with the same non-zeros
    idx = torch.tensor([[1, -1], [0, 2], [3, 1], [2, 0]])
    val = torch.tensor([[1.0, 9.0], [1.0, 3.0], [2.0, 2.0], [1.0, 1.0]])
    dense = torch.zeros(4, 4, dtype=torch.float64)
    for c in range(4):
        for k in range(2):
            if idx[c, k] >= 0:
                dense[c, idx[c, k]] += val[c, k]
    torch.testing.assert_close(
        reference.label_smoothing(y, 4, 0.3, similarity=SparseSimilarity(idx, val)),
        reference.label_smoothing(y, 4, 0.3, similarity=dense),
    )


@pytest.mark.parametrize(
    "mode",
    [
        {},
        {"similarity": "dense", "similarity_mix": 0.5},
        {"z_loss": 0.1, "softcap": 2.0},
        {"confidence_penalty": 0.2},
        {"adaptive": ConfidenceAdaptive(0.9, 3.0)},
        {"mix": True},
    ],
)
def test_reference_gradcheck(mode):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, 5, -100, 3, 3])
    kw = dict(mode)
    if kw.pop("mix", False):
        kw.update(mix_target=torch.tensor([1, 1, 1, 0, 2]), mix_lambda=0.3)
    if kw.get("similarity") == "dense":
        kw["similarity"] = torch.rand(6, 6, dtype=torch.float64, generator=g)
    torch.autograd.gradcheck(lambda t: reference.cross_entropy(t, y, 0.2, **kw), (x,))
