"""The op contract, checked on every backend available for the test device.

The device is CPU unless FUSED_LS_TEST_DEVICE=cuda (the GPU script sets it). The backends are
all those that can serve that device, except Triton on CPU (the interpreter is slow: its own file
tests/test_triton.py covers it); FUSED_LS_TEST_BACKENDS=a,b narrows the list (tests/helpers.py).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPES,
    MODES,
    backends,
    check_backend,
    device_under_test,
    kw_to,
    make_case,
    make_data,
)

import fused_ls
from fused_ls import SparseSimilarity, reference
from fused_ls.backends import Request

DEV = device_under_test()
BACKENDS = backends(DEV)
ALL_DTYPES = [d for d in DTYPES if not (DEV.type == "cuda" and d == torch.float64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_uniform_equals_pytorch(backend, dtype, reduction, weighted):
    """With uniform smoothing this is exactly F.cross_entropy(label_smoothing=ε)."""
    x, y, g = make_data(67, 101, torch.float64, DEV)
    w = (torch.rand(101, generator=g, dtype=torch.float64) + 0.1).to(DEV) if weighted else None
    xd = x.to(dtype)
    a = fused_ls.label_smoothing_cross_entropy(
        xd, y, 0.1, weight=w, reduction=reduction, backend=backend
    )
    b = F.cross_entropy(x, y, weight=w, reduction=reduction, label_smoothing=0.1)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype)
    if tol is None:  # low precision: compare with PyTorch on the same rounded input
        b = F.cross_entropy(xd.double(), y, weight=w, reduction=reduction, label_smoothing=0.1)
        tol = 1e-5
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
def test_modes_against_reference(backend, dtype, mode):
    x, y, kw = make_case(mode, 37, 29, dtype, DEV)
    check_backend(backend, x, y, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 3), (5, 97), (2, 257), (1, 1031)])
@pytest.mark.parametrize("mode", ["uniform", "dense_sim", "everything"])
def test_odd_sizes(backend, shape, mode):
    N, C = shape
    x, y, kw = make_case(mode, N, C, torch.float32, DEV, seed=N * 1000 + C)
    check_backend(backend, x, y, reduction="none", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["1d", "nd", "transposed", "sliced"])
def test_layouts(backend, layout):
    g = torch.Generator().manual_seed(3)
    if layout == "1d":
        x, y = torch.randn(11, generator=g), torch.tensor(4)
    elif layout == "nd":
        x, y = torch.randn(3, 11, 4, 2, generator=g), torch.randint(0, 11, (3, 4, 2), generator=g)
    elif layout == "transposed":  # [N, C] with unit stride on N
        x, y = torch.randn(11, 6, generator=g).t(), torch.randint(0, 11, (6,), generator=g)
    else:  # rows with a stride larger than C
        x, y = torch.randn(6, 20, generator=g)[:, 3:14], torch.randint(0, 11, (6,), generator=g)
    x, y = x.to(DEV), y.to(DEV)
    for red in ("none", "mean"):
        check_backend(backend, x, y, reduction=red, weight=torch.rand(11, generator=g).to(DEV))
        torch.testing.assert_close(
            fused_ls.label_smoothing_cross_entropy(x, y, 0.1, reduction=red, backend=backend),
            F.cross_entropy(x, y, reduction=red, label_smoothing=0.1),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_boundaries(backend, monkeypatch):
    """Many rows (several torch-backend chunks, several kernel row blocks) still match."""
    from fused_ls.backends import torch_backend

    monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", 300)
    x, y, kw = make_case("everything", 203, 53, torch.float32, DEV, seed=5)
    check_backend(backend, x, y, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_float64(backend, mode):
    if DEV.type == "cuda":
        pytest.skip("float64 gradcheck runs on CPU")
    x, y, kw = make_case(mode, 6, 7, torch.float64, seed=7)
    kw = kw_to(kw, dtype=torch.float64)
    eps = kw.pop("smoothing")
    xr = x.clone().requires_grad_(True)
    torch.autograd.gradcheck(
        lambda t: fused_ls.label_smoothing_cross_entropy(t, y, eps, backend=backend, **kw), (xr,)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_stats(backend):
    x, y, _ = make_data(13, 17, torch.float32, DEV)
    x3 = x.reshape(13, 17, 1)
    loss, st = fused_ls.label_smoothing_cross_entropy(
        x3, y[:, None], 0.1, return_stats=True, backend=backend
    )
    assert st.lse.shape == st.confidence.shape == st.prediction.shape == (13, 1)
    assert st.entropy.shape == (13, 1)
    torch.testing.assert_close(st.lse[:, 0], torch.logsumexp(x, 1))
    torch.testing.assert_close(st.confidence[:, 0], torch.softmax(x, 1).max(1).values)
    assert torch.equal(st.prediction[:, 0], x.argmax(1))
    entropy = -(torch.softmax(x, 1) * torch.log_softmax(x, 1)).sum(1)
    torch.testing.assert_close(st.entropy[:, 0], entropy)
    logp = torch.log_softmax(x, 1).gather(1, y.clamp(min=0)[:, None])[:, 0]
    torch.testing.assert_close(st.logprob[:, 0], torch.where(y == -100, 0, logp))
    assert not st.lse.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["uniform", "everything"])
def test_inplace_backward(backend, dtype, mode):
    x, y, kw = make_case(mode, 19, 31, dtype, DEV)
    ref_loss, ref_grad = _loss_grad(x, y, backend, kw, inplace=False)
    leaf = x.clone().requires_grad_(True)
    h = leaf * 1  # the logits of a real model are an intermediate (matmul output)
    storage = h.data_ptr()
    loss = fused_ls.label_smoothing_cross_entropy(
        h, y, inplace_backward=True, backend=backend, **kw
    )
    seen = {}

    def hook(grad):
        seen["ptr"] = grad.data_ptr()

    h.register_hook(hook)
    loss.backward()
    assert seen["ptr"] == storage, "gradient was not written into the logits' storage"
    torch.testing.assert_close(leaf.grad, ref_grad, rtol=0, atol=0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)


def _loss_grad(x, y, backend, kw, inplace):
    xr = x.clone().requires_grad_(True)
    loss = fused_ls.label_smoothing_cross_entropy(
        xr * 1, y, inplace_backward=inplace, backend=backend, **kw
    )
    loss.backward()
    return loss.detach(), xr.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_bumps_version(backend):
    """Another op that saved the same logits must raise instead of using the overwritten values.
    The gradient is written over the logits in the forward (one pass), so the version moves
    there."""
    x, y, _ = make_data(8, 9, torch.float32, DEV)
    leaf = x.clone().requires_grad_(True)
    h = leaf * 1
    other = (h * h).sum()  # mul saves h for its backward
    v0 = h._version
    loss = fused_ls.label_smoothing_cross_entropy(h, y, inplace_backward=True, backend=backend)
    assert h._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    x, y, kw = make_case("everything", 64, 300, torch.float32, DEV)
    a = _loss_grad(x, y, backend, kw, False)
    b = _loss_grad(x, y, backend, kw, False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_and_all_ignored(backend, reduction):
    lsce = fused_ls.label_smoothing_cross_entropy
    x = torch.randn(0, 5, device=DEV, requires_grad=True)
    out = lsce(
        x, torch.zeros(0, dtype=torch.long, device=DEV), reduction=reduction, backend=backend
    )
    if reduction == "none":
        assert out.shape == (0,)
    elif reduction == "sum":
        assert out.item() == 0
    else:
        assert math.isnan(out.item())
    x = torch.randn(4, 5, device=DEV, requires_grad=True)
    out = lsce(x, torch.full((4,), -100, device=DEV), reduction=reduction, backend=backend)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    if reduction == "mean":
        assert math.isnan(out.item())
    else:
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_stays_in_its_row(backend):
    x, y, _ = make_data(5, 7, torch.float32, DEV, ignore=False)
    x[2, 3] = float("nan")
    loss = fused_ls.label_smoothing_cross_entropy(x, y, reduction="none", backend=backend)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits(backend):
    """Zero-mass columns stay finite at −inf; with uniform mass −inf gives +inf, as PyTorch."""
    x, y, _ = make_data(4, 6, torch.float32, DEV, ignore=False)
    y = torch.tensor([0, 1, 2, 3], device=DEV)
    x[:, 5] = float("-inf")  # a masked vocabulary entry
    lsce = fused_ls.label_smoothing_cross_entropy
    w = torch.ones(6, device=DEV)
    w[5] = 0
    check_backend(backend, x, y, reduction="none", weight=w)
    check_backend(backend, x, y, reduction="none", smoothing=0.0)
    # sparse similarity never pointing at the masked column: finite loss with ε > 0
    idx = torch.tensor([[1, 2], [0, 2], [0, 1], [4, 2], [3, 0], [0, 1]])
    sim = SparseSimilarity(idx, torch.ones(6, 2)).to(DEV)
    check_backend(backend, x, y, reduction="none", similarity=sim, similarity_mix=1.0)
    assert torch.isfinite(lsce(x, y, 0.1, similarity=sim, backend=backend))
    inf = lsce(x, y, 0.1, reduction="none", backend=backend)
    ref = F.cross_entropy(x, y, reduction="none", label_smoothing=0.1)
    assert torch.equal(inf, ref) and torch.isinf(inf).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend):
    x, y, g = make_data(9, 12, torch.float32, DEV)
    w = torch.rand(12, generator=g).to(DEV)
    crit = fused_ls.FusedLabelSmoothingCE(0.2, weight=w, backend=backend)
    torch.testing.assert_close(crit(x, y), F.cross_entropy(x, y, weight=w, label_smoothing=0.2))
    eps = torch.rand(9, generator=g).to(DEV)
    torch.testing.assert_close(
        crit(x, y, smoothing=eps), reference.cross_entropy(x, y, eps, weight=w).float()
    )
    crit.smoothing = 0.0
    torch.testing.assert_close(crit(x, y), F.cross_entropy(x, y, weight=w))


def test_auto_backend_and_env_override(monkeypatch):
    x, y, _ = make_data(4, 5, torch.float32, DEV)
    req = Request(DEV.type, torch.float32, False, False)
    monkeypatch.setenv("FUSED_LS_BACKEND", "torch")
    assert fused_ls.backends.resolve("auto", req) == "torch"
    monkeypatch.setenv("FUSED_LS_BACKEND", "nope")
    with pytest.raises(ValueError, match="FUSED_LS_BACKEND"):
        fused_ls.label_smoothing_cross_entropy(x, y)
    monkeypatch.delenv("FUSED_LS_BACKEND")
    assert fused_ls.backends.resolve("auto", req) in BACKENDS + ["triton"]


def test_auto_on_cuda_orders_by_size(monkeypatch):
    """On CUDA "auto" takes the C++ op (lowest host cost per call) for fewer logits than
    SMALL_LOGITS and Triton (fastest on the logits) from there; each falls back to the next that
    can serve. The order is checked with every backend declared able (no GPU needed)."""
    from fused_ls.backends import registry as backends

    able = {"triton", "cuda", "torch"}
    monkeypatch.setattr(backends, "reasons_for", lambda name, req: [] if name in able else ["x"])
    backends._resolve.cache_clear()
    monkeypatch.delenv("FUSED_LS_BACKEND", raising=False)
    try:
        big = Request("cuda", torch.bfloat16, False, False, small=False)
        small = Request("cuda", torch.bfloat16, False, False, small=True)
        assert backends.resolve("auto", big) == "triton"
        assert backends.resolve("auto", small) == "cuda"
        able.discard("cuda")
        backends._resolve.cache_clear()
        assert backends.resolve("auto", small) == "triton"
        with pytest.raises(ValueError, match="backend 'cuda' cannot serve"):
            backends.resolve("cuda", small)  # an explicit name is never replaced
    finally:
        backends._resolve.cache_clear()
    assert backends.is_small(torch.device("cuda"), backends.SMALL_LOGITS - 1)
    assert not backends.is_small(torch.device("cuda"), backends.SMALL_LOGITS)
    assert not backends.is_small(torch.device("cpu"), 15)  # no size rule on CPU
