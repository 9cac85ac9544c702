"""The Triton backend against the float64 dense reference, in every mode.

Without a GPU the kernels run on CPU tensors through the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with one, the same tests run on CUDA tensors.
Triton is a test requirement: if it is missing these tests fail, they do not skip.

Shapes are small and the kernels' block and split sizes are lowered (fixture ``small_tiles``) so
that the interpreter exercises the multi-block online softmax and the split-row merge in seconds;
each shape's reason is given where it is declared.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    LOW,
    MODES,
    check_backend,
    class_weight,
    dense_similarity,
    device_under_test,
    make_case,
    make_data,
    sparse_similarity,
)

import fused_ls
from fused_ls import SparseSimilarity, reference
from fused_ls import triton_kernels as tk
from fused_ls.backends import Request, reasons_for
from fused_ls.backends.triton_backend import launch_config

# CUDA tensors when a GPU is present (the compiled kernels), else CPU tensors (the interpreter);
# FUSED_LS_TEST_DEVICE, as set by benchmarks/gpu_check.py, overrides.
DEVICE = device_under_test(gpu_if_present=True)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The interpreter evaluates masked lanes too (0·−inf in padding), which numpy reports.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# (N, C): why each shape is here
SHAPES = [
    (1, 2),  # a single row, the smallest vocabulary
    (3, 17),  # C below one block: one masked iteration
    (6, 97),  # prime C: a masked tail after several blocks
]
SPLIT_SHAPE = (5, 151)  # prime C over 5 row pieces of 32 columns (with the small split below)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Blocks of 16 columns: rows of 17–151 classes take 2–10 online-softmax iterations."""
    monkeypatch.setattr(tk, "BLOCK_MAX", 16)


@pytest.fixture
def split_rows(monkeypatch):
    """Rows of ≥ 64 classes are split into pieces of 32 columns (2 blocks each)."""
    monkeypatch.setattr(tk, "SPLIT_MIN_C", 64)
    monkeypatch.setattr(tk, "SPLIT_COLS", 32)


# ---------------------------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------------------------
def test_triton_is_available_here():
    assert fused_ls.available_backends()["triton"] == []
    req = Request(DEVICE.type, torch.float32, False, False)
    assert reasons_for("triton", req) == []


def test_triton_states_what_it_cannot_serve():
    why = reasons_for("triton", Request(DEVICE.type, torch.float64, False, False))
    assert any("float64" in w for w in why)
    why = reasons_for("triton", Request("meta", torch.float32, False, False))
    assert any("meta" in w for w in why)
    x, y, _ = make_data(2, 5, torch.float64, DEVICE)
    with pytest.raises(ValueError, match="triton"):
        fused_ls.label_smoothing_cross_entropy(x, y, backend="triton")


# ---------------------------------------------------------------------------------------------
# every mode, every dtype
# ---------------------------------------------------------------------------------------------
# Every mode on a GPU. Through the interpreter (slow) the fifteen this table held before the one
# mode table, which reach every kernel branch; the other six only combine branches these reach
# (weight: test_reductions; dense_sim: dense_sim_weight; mixup_rows, mixup_dense:
# mixup_rows_dense; mixup_sparse_all: mixup_sparse, everything_dense; everything: its parts here,
# the combination in tests/test_one_call.py and tests/test_parallel.py on the interpreter).
INTERPRETER_MODES = [
    "uniform",
    "no_smoothing",
    "weight_ignore",
    "dense_sim_weight",
    "sparse_sim",
    "per_sample_eps",
    "adaptive_max",
    "adaptive_target",
    "z_loss",
    "softcap",
    "confidence_penalty",
    "mixup",
    "mixup_rows_dense",
    "mixup_sparse",
    "everything_dense",
]
FP32_MODES = list(MODES) if DEVICE.type == "cuda" else INTERPRETER_MODES


@pytest.mark.parametrize("mode", FP32_MODES)
def test_modes_fp32(mode):
    n, c = SHAPES[-1]
    x, y, kw = make_case(mode, n, c, device=DEVICE)
    check_backend("triton", x, y, **kw)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
    n, c = SHAPES[-1]
    x, y, kw = make_case("weight", n, c, device=DEVICE)
    check_backend("triton", x, y, reduction=reduction, **kw)


@pytest.mark.parametrize("shape", SHAPES[:-1], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["uniform", "sparse_sim", "mixup_rows_dense", "everything_dense"])
def test_small_shapes(mode, shape):
    x, y, kw = make_case(mode, *shape, device=DEVICE)
    check_backend("triton", x, y, **kw)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(
    "mode",
    ["uniform", "weight_ignore", "dense_sim_weight", "sparse_sim", "softcap", "everything_dense"],
)
def test_modes_low_precision(mode, dtype):
    n, c = SHAPES[-1]
    x, y, kw = make_case(mode, n, c, dtype, DEVICE)
    check_backend("triton", x, y, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["uniform", "sparse_sim", "mixup_rows_dense", "everything_dense"])
def test_split_rows(split_rows, mode, dtype):
    n, c = SPLIT_SHAPE
    cols, splits, block, _ = launch_config(c)
    assert (cols, splits, block) == (32, 5, 16)  # the case under test really is split
    x, y, kw = make_case(mode, n, c, dtype, DEVICE, seed=3)
    check_backend("triton", x, y, **kw)


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_ignored_rows(request, split):
    if split:
        request.getfixturevalue("split_rows")
    n, c = SPLIT_SHAPE
    x, y, g = make_data(n, c, device=DEVICE, ignore=False)
    y[::2] = -100
    check_backend("triton", x, y, weight=class_weight(c, g, DEVICE))
    y[:] = -100  # every row ignored: mean is 0/0 = nan as in PyTorch, gradient 0
    check_backend("triton", x, y, reduction="sum")


@pytest.mark.parametrize(
    ("dtype", "split"),
    [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True), (torch.float16, False)],
    ids=["fp32-whole", "fp32-split", "bf16-split", "fp16-whole"],
)
def test_minus_inf_logits(request, split, dtype):
    """Masked vocabulary: −inf logits with zero smoothing mass give finite loss and gradient;
    with uniform mass the loss is +inf, as in PyTorch."""
    if split:
        request.getfixturevalue("split_rows")
    n, c = SPLIT_SHAPE
    x, y, g = make_data(n, c, dtype, DEVICE, ignore=False)
    masked = torch.zeros(c, dtype=torch.bool, device=DEVICE)
    masked[3::4] = True
    masked[:40] = True  # whole blocks and (split) a whole row piece of −inf
    x[:, masked] = float("-inf")
    y = torch.where(masked[y], 41, y)
    w = torch.where(masked, 0.0, 0.8 + class_weight(c, g, DEVICE))
    sim = dense_similarity(c, g, DEVICE) * ~masked
    check_backend("triton", x, y, weight=w)
    check_backend("triton", x, y, weight=w, similarity=sim, similarity_mix=1.0, softcap=3.0)
    # confidence penalty: p log p → 0 at p = 0. The dense reference's autograd makes NaN there
    # (0 · −inf in the backward of p · log p), so compare the loss and ask for a finite gradient.
    check_backend("triton", x, y, weight=w, confidence_penalty=0.2, grad=False)
    _, g = _loss_and_grad(x, y, weight=w, confidence_penalty=0.2)
    assert torch.isfinite(g).all()
    loss = fused_ls.label_smoothing_cross_entropy(x, y, backend="triton")
    assert torch.isinf(loss) and loss > 0
    check_backend("triton", x, y, grad=True)


def test_row_stride_and_class_dim_1():
    """A row-strided view (stride ≠ C) and [N, C, d] logits (class dim 1)."""
    big, y, _ = make_data(4, 60, device=DEVICE, ignore=False)
    x = big[:, 5:50]
    y = y % 45
    assert x.stride(0) == 60
    check_backend("triton", x, y)
    x3, y3, g = make_data(3 * 4, 19, device=DEVICE)
    x3 = x3.reshape(3, 4, 19).transpose(1, 2)  # [3, 19, 4]
    y3 = y3.reshape(3, 4)
    check_backend("triton", x3, y3, similarity=dense_similarity(19, g, DEVICE))


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_return_stats(request, split):
    if split:
        request.getfixturevalue("split_rows")
    n, c = SPLIT_SHAPE
    x, y, _ = make_data(n, c, device=DEVICE, scale=1.0, ignore=False)
    x = (x * 2).round() / 2  # many ties, so "first maximal index" is tested
    x[0, 100] = x[0, 7] = x[0].max() + 1  # tie across blocks (and across row pieces)
    x[1] = 0.0  # all equal: argmax 0
    for softcap in (None, 2.0):
        loss, st = fused_ls.label_smoothing_cross_entropy(
            x, y, softcap=softcap, return_stats=True, backend="triton"
        )
        z = x.double() if softcap is None else softcap * torch.tanh(x.double() / softcap)
        torch.testing.assert_close(st.lse, torch.logsumexp(z, 1).float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            st.confidence, torch.softmax(z, 1).max(1).values.float(), rtol=1e-5, atol=1e-6
        )
        assert torch.equal(st.prediction, torch.argmax(z, 1))
        entropy = -(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1)
        torch.testing.assert_close(st.entropy, entropy.float(), rtol=1e-5, atol=1e-5)
        logp = torch.log_softmax(z, 1).gather(1, y[:, None])[:, 0]
        torch.testing.assert_close(st.logprob, logp.float(), rtol=1e-5, atol=1e-5)
        assert st.prediction[0] == 7 and st.prediction[1] == 0
        torch.testing.assert_close(loss, reference.cross_entropy(x, y, softcap=softcap).float())


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward(request, split, dtype):
    """The gradient is written over the logits and equals the out-of-place one bit for bit,
    including the fix-up of the target and sparse-neighbour columns (which must read the logits
    before the dense pass overwrites them)."""
    if split:
        request.getfixturevalue("split_rows")
    n, c = SPLIT_SHAPE
    x0, y, g = make_data(n, c, dtype, DEVICE)
    kw = dict(
        similarity=sparse_similarity(c, 4, g, DEVICE),
        similarity_mix=0.5,
        softcap=6.0,
        mix_target=torch.randint(0, c, (n,), generator=g).to(DEVICE),
        mix_lambda=0.4,
    )
    a = x0.clone().requires_grad_(True)
    fused_ls.label_smoothing_cross_entropy(a, y, backend="triton", **kw).backward()
    leaf = x0.clone().requires_grad_(True)
    b = leaf * 1  # non-leaf logits: the in-place gradient overwrites this buffer
    fused_ls.label_smoothing_cross_entropy(
        b, y, backend="triton", inplace_backward=True, **kw
    ).backward()
    assert torch.equal(b.detach(), a.grad)  # the logits' storage now holds the gradient
    assert torch.equal(leaf.grad, a.grad)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_confident_target_gradient_is_not_cancelled(dtype):
    """p_y − 1 for a confident row (C = 50, z_y = 11, others 0, ε = 0): −(C−1)e⁻¹¹/(1 + (C−1)e⁻¹¹)
    ≈ −8.2e-4. Formed in fp32 and rounded once it is right to ~1e-3 relative; formed in the
    logits' precision it is 0 (bf16: p_y rounds to 1) or off by tens of percent (fp16)."""
    n, c = 4, 50
    x = torch.zeros(n, c, dtype=dtype, device=DEVICE)
    rows = torch.arange(n, device=DEVICE)
    y = rows * 3
    x[rows, y] = 11.0
    _, g = _loss_and_grad(x, y, smoothing=0.0, reduction="sum")
    tail = (c - 1) * torch.exp(torch.tensor(-11.0, dtype=torch.float64))
    ref = (-tail / (1 + tail)).expand(n).to(DEVICE)
    torch.testing.assert_close(g[rows, y].double(), ref, rtol=1e-2, atol=0)
    plain = (torch.softmax(x, 1)[rows, y] - 1).double()
    assert torch.all((plain - ref).abs() > 0.1 * ref.abs())  # why the fp32 fix-up exists


def _loss_and_grad(x, y, **kw):
    x = x.clone().requires_grad_(True)
    loss = fused_ls.label_smoothing_cross_entropy(x, y, backend="triton", **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


def test_sparse_neighbours_coinciding_with_targets():
    """Sparse neighbours that repeat a column or hit the target: all masses at a column add."""
    n, c = 6, 23
    idx = torch.stack([torch.arange(c), torch.arange(c), (torch.arange(c) + 1) % c], 1)
    val = torch.tensor([0.5, 0.25, 0.25]).expand(c, 3)
    sim = SparseSimilarity(idx.to(DEVICE), val.to(DEVICE))
    x, y, _ = make_data(n, c, device=DEVICE, ignore=False)
    check_backend(
        "triton", x, y, similarity=sim, similarity_mix=0.8, mix_target=(y + 1) % c, mix_lambda=0.5
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_pass_rounds_once(dtype):
    """The backend's grad pass equals the torch backend's fp32 computation rounded once."""
    n, c = SHAPES[-1]
    x, y, g = make_data(n, c, dtype, DEVICE)
    kw = dict(
        similarity=sparse_similarity(c, 3, g, DEVICE),
        similarity_mix=0.5,
        z_loss=1e-2,
        confidence_penalty=0.1,
    )
    _, g_t = _loss_and_grad(x, y, **kw)
    xx = x.clone().requires_grad_(True)
    fused_ls.label_smoothing_cross_entropy(xx, y, backend="torch", **kw).sum().backward()
    # Both round an fp32 value once, so they differ by at most one step of the output dtype
    # (bf16: 2⁻⁷ relative at worst) plus fp32 noise (summation order, the GPU's approximate exp).
    diff = (g_t.float() - xx.grad.float()).abs()
    step = xx.grad.float().abs() * (2.0**-7 if dtype in LOW else 1e-5) + 1e-7
    assert torch.all(diff <= step), float((diff - step).max())


@pytest.mark.cuda
@pytest.mark.parametrize("c", [32000, 128256, 262144])
def test_real_vocabularies_cuda(monkeypatch, c):
    """Real vocabulary sizes (Llama-2 32000, Llama-3 128256, Gemma 262144 split 8-way) with the
    production block and split sizes, bf16, on a GPU."""
    monkeypatch.undo()
    n = 64
    x, y, g = make_data(n, c, torch.bfloat16, DEVICE)
    check_backend("triton", x, y, weight=class_weight(c, g, DEVICE), z_loss=1e-4)
    check_backend("triton", x, y, softcap=30.0, confidence_penalty=0.1)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's asserts stand in for CUDA's")
@pytest.mark.parametrize("bad", ["target", "mix_target"])
def test_first_kernel_to_read_a_target_checks_it(monkeypatch, bad):
    """On CUDA the kernels check the targets (device asserts), with no Python check first. Here
    that is emulated: Python's check off, the interpreter's device asserts on (they follow its
    builder's debug option, off by default). For "mean" with the gradient in the forward the
    first kernel is _weights_kernel (Σ W_i): it must stop at the bad target before it reads
    W[y] out of bounds, with the message of _rows_kernel's check."""
    from dataclasses import replace

    from triton.runtime import interpreter

    from fused_ls.backends import triton_backend

    monkeypatch.setenv("FUSED_LS_GRAD_IN_FORWARD", "1")
    monkeypatch.setattr(triton_backend, "validate", lambda p: None)
    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", replace(builder.options, debug=True))
    launched = []
    launch = triton_backend._launch

    def recording(kernel, *args, **kw):
        launched.append((kernel.fn.__name__, kw.get("debug")))  # debug: CUDA's device asserts
        launch(kernel, *args, **kw)

    monkeypatch.setattr(triton_backend, "_launch", recording)
    n, c = SHAPES[-1]
    x, y, g = make_data(n, c, device=DEVICE, ignore=False)
    y_b = (y + 1) % c
    (y if bad == "target" else y_b)[2] = c
    x.requires_grad_(True)
    with pytest.raises(Exception, match=rf"fused_ls: {bad} out of \[0, num_classes\)"):
        fused_ls.label_smoothing_cross_entropy(
            x, y, weight=class_weight(c, g, DEVICE), mix_target=y_b, mix_lambda=0.3,
            reduction="mean", backend="triton",
        )  # fmt: skip
    assert launched == [("_weights_kernel", True)]
