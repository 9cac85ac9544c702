"""The smoothing distribution is prepared once per (weight, similarity, β) and reused: no per-call
rebuilding of constant tensors, and an in-place update of the inputs is seen (version counter)."""

import pytest
import torch

import fused_ls
from fused_ls import SparseSimilarity, _smoothing


@pytest.fixture
def computes(monkeypatch):
    calls = []
    real = _smoothing._compute

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(_smoothing, "_compute", counting)
    _smoothing._CACHE.clear()
    return calls


@pytest.mark.parametrize("kind", ["weight", "dense", "sparse"])
def test_prepared_once_and_updated_in_place(kind, computes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 12, generator=g)
    y = torch.randint(0, 12, (8,), generator=g)
    w = torch.rand(12, generator=g) + 0.5
    S = torch.rand(12, 12, generator=g)
    kw = {
        "weight": {"weight": w},
        "dense": {"similarity": S, "similarity_mix": 0.5},
        "sparse": {"similarity": SparseSimilarity.from_dense(S, 3)},
    }[kind]
    first = fused_ls.label_smoothing_cross_entropy(x, y, 0.1, **kw)
    for _ in range(3):
        torch.testing.assert_close(fused_ls.label_smoothing_cross_entropy(x, y, 0.1, **kw), first)
    assert len(computes) == 1
    # an in-place change of the inputs invalidates the entry (and changes the loss)
    target = w if kind == "weight" else (S if kind == "dense" else kw["similarity"].values)
    with torch.no_grad():
        target.mul_(torch.linspace(0.5, 1.5, target.shape[-1]))
    changed = fused_ls.label_smoothing_cross_entropy(x, y, 0.1, **kw)
    assert len(computes) == 2
    assert not torch.allclose(changed, first)


def test_module_buffers_hit_the_cache(computes):
    crit = fused_ls.FusedLabelSmoothingCE(0.1, similarity=torch.rand(10, 10), similarity_mix=0.3)
    x = torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    for _ in range(3):
        crit(x, y)
    assert len(computes) == 1
