"""The compiled C++ CPU backend (``backend="cpp"``, csrc/cpu) against the float64 dense
reference.

Every mode of the op contract (tests/helpers.py ``MODES``), every dtype, sizes chosen to hit the
kernel's edges (``KERNEL_SHAPES``), every compiled instruction-set path, and thread-count
independence. tests/test_cuda.py runs the same cases on CUDA tensors.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import (
    DTYPES,
    LOW,
    TOL,
    check_backend,
    dense_similarity,
    loss_and_grad,
    make_case,
    make_data,
    mode_cases,
    problem,
)

import fused_ls
from fused_ls import reference
from fused_ls._problem import S_ARG, S_D, S_M
from fused_ls.backends import reasons_for

CPP_WHY = reasons_for("cpp", None)
needs_cpp = pytest.mark.skipif(bool(CPP_WHY), reason="; ".join(CPP_WHY) or "cpp available")


def test_extension_built_when_compiler_present():
    # setup.py builds the extension whenever a C++ compiler is present; a silent build failure
    # would otherwise turn every cpp test below into a skip.
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH")
    assert not CPP_WHY, CPP_WHY


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("mode", "N", "C"), mode_cases())
def test_modes(mode, N, C, dtype):
    logits, target, kw = make_case(mode, N, C, dtype)
    check_backend("cpp", logits, target, reduction="none", **kw)


@needs_cpp
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reductions_weight_ignore(reduction, dtype):
    logits, target, kw = make_case("weight_ignore", 9, 101, dtype, seed=1)
    target[1] = target[4] = 7  # ignore_index other than -100
    check_backend("cpp", logits, target, reduction=reduction, **{**kw, "ignore_index": 7})


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_vocab_neg_inf(dtype):
    # −inf logits on zero-weight classes: zero-mass terms stay 0 (finite loss and gradient), with
    # uniform and dense-similarity smoothing, the confidence penalty, and a whole kernel chunk of
    # −inf. The reference's autograd turns p·log p at −inf into NaN, so the penalty case is
    # compared with the reference at a finite −1e4 instead (where p underflows to exactly 0).
    N, C = 4, 2100
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(N, C, generator=g).to(dtype)
    logits[:, 5:2060] = float("-inf")
    w = torch.ones(C, dtype=dtype)
    w[5:2060] = 0
    target = torch.tensor([0, 3, 2090, 4])
    for kw in (
        dict(weight=w),
        dict(weight=w, similarity=dense_similarity(C, g, "cpu"), similarity_mix=0.5),
        dict(weight=w, confidence_penalty=0.1, z_loss=1e-3),
    ):
        loss, grad = loss_and_grad(
            fused_ls.label_smoothing_cross_entropy,
            logits,
            target,
            backend="cpp",
            reduction="none",
            **kw,
        )
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        if "confidence_penalty" not in kw:
            check_backend("cpp", logits, target, reduction="none", **kw)
            continue
        finite = torch.where(torch.isinf(logits), -1e4, logits)
        ref_l, ref_g = loss_and_grad(
            reference.cross_entropy, finite, target, reduction="none", **kw
        )
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(loss, ref_l.to(loss.dtype), rtol=rtol, atol=atol)
        torch.testing.assert_close(grad, ref_g.to(dtype), rtol=rtol, atol=atol)


@needs_cpp
def test_neg_inf_with_uniform_mass_is_inf():
    logits = torch.randn(2, 50)
    logits[0, 7] = float("-inf")
    loss = fused_ls.label_smoothing_cross_entropy(
        logits, torch.tensor([1, 2]), backend="cpp", reduction="none"
    )
    assert loss[0] == float("inf") and torch.isfinite(loss[1])


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_rows(dtype):
    logits, target, kw = make_case("uniform", 5, 2500, dtype, seed=4)
    logits[2, 2300] = float("nan")  # in the second chunk
    logits[3, 0] = float("nan")
    check_backend("cpp", logits, target, reduction="none", **kw)
    loss = fused_ls.label_smoothing_cross_entropy(logits, target, backend="cpp", reduction="none")
    assert torch.isnan(loss[2]) and torch.isnan(loss[3]) and torch.isfinite(loss[[0, 4]]).all()


@needs_cpp
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_row_stats_argmax_rules(backend):
    # first maximal index (ties across chunks too), first NaN, all −inf row: as torch.max
    C = 5000
    x = torch.randn(6, C)
    x[0, 100] = x[0, 4500] = 50.0  # tie in two chunks: the first wins
    x[1, 3000] = float("nan")
    x[1, 4000] = float("nan")
    x[1, 10] = 1e9
    x[2] = float("-inf")
    x[3, :] = 0.0  # all equal: index 0
    x[4, 4999] = 1e9  # the very last column (a tail lane)
    y = torch.zeros(6, dtype=torch.long)
    stats = fused_ls.backends.get(backend).row_stats(x, problem(x, y, return_stats=True))
    m, d = stats[:, S_M], stats[:, S_D]
    arg = stats.view(torch.int32)[:, S_ARG].long()
    ref = torch.max(x, dim=1)
    assert torch.equal(arg, ref.indices)
    torch.testing.assert_close(m, ref.values, equal_nan=True)
    lse = m + torch.log(d)
    ok = torch.tensor([0, 3, 4, 5])
    torch.testing.assert_close(lse[ok], torch.logsumexp(x.double(), 1).float()[ok])
    assert torch.isnan(lse[1])


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_return_stats(dtype):
    logits, target, kw = make_case("softcap", 7, 3001, dtype, seed=5)
    kw["confidence_penalty"] = 0.1
    loss, st = fused_ls.label_smoothing_cross_entropy(
        logits, target, backend="cpp", return_stats=True, reduction="none", **kw
    )
    ref_loss = reference.cross_entropy(logits, target, reduction="none", **kw)
    z = kw["softcap"] * torch.tanh(logits.double() / kw["softcap"])
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype), **tol)
    torch.testing.assert_close(st.lse, torch.logsumexp(z, 1).to(st.lse.dtype), **tol)
    torch.testing.assert_close(st.confidence, z.softmax(1).max(1).values.to(st.lse.dtype), **tol)
    entropy = -(z.softmax(1) * z.log_softmax(1)).sum(1)
    torch.testing.assert_close(st.entropy, entropy.to(st.lse.dtype), **tol)
    logp = z.log_softmax(1).gather(1, target.clamp(min=0)[:, None])[:, 0]
    torch.testing.assert_close(
        st.logprob, torch.where(target == -100, 0, logp).to(st.lse.dtype), **tol
    )
    # the argmax of the kernel's own (accumulation-dtype) z
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    za = kw["softcap"] * torch.tanh(logits.to(acc) / kw["softcap"])
    assert torch.equal(st.prediction, za.argmax(1))


@needs_cpp
@pytest.mark.parametrize("mode", ["uniform", "mixup_sparse_all", "mixup_dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward(mode, dtype):
    # The gradient overwrites the logits' storage; the fix-up columns (targets, sparse neighbours)
    # must still be computed from the original logits.
    logits, target, kw = make_case(mode, 6, 2053, dtype, seed=6)
    base = logits.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(
        fused_ls.label_smoothing_cross_entropy(base, target, backend="cpp", **kw), base
    )
    h = base.clone()  # a non-leaf, so that the gradient returned is the buffer itself
    (got,) = torch.autograd.grad(
        fused_ls.label_smoothing_cross_entropy(
            h, target, backend="cpp", inplace_backward=True, **kw
        ),
        h,
    )
    assert got.data_ptr() == h.data_ptr()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_compiled_isa(dtype, monkeypatch):
    from fused_ls.backends import cpp_backend

    paths = cpp_backend.isas()
    assert paths[0] == "default"
    results = {}
    for isa in paths:
        monkeypatch.setenv("FUSED_LS_CPU_ISA", isa)
        assert cpp_backend.isa() == isa
        for mode in ("mixup_sparse_all", "per_sample_eps", "weight_ignore"):
            logits, target, kw = make_case(mode, 5, 2053, dtype, seed=7)
            check_backend("cpp", logits, target, reduction="none", **kw)
        logits, target, kw = make_case("mixup_sparse_all", 4, 4099 - 4096 + 33, dtype, seed=8)
        check_backend("cpp", logits, target, reduction="none", **kw)
        results[isa] = fused_ls.label_smoothing_cross_entropy(
            logits, target, backend="cpp", reduction="none", **kw
        )
    # the paths agree with each other to rounding
    for isa, loss in results.items():
        torch.testing.assert_close(loss, results["default"], rtol=1e-4, atol=1e-5, msg=isa)


@needs_cpp
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_gradient_rounds_to_nearest_even(dtype, monkeypatch):
    """The gradient is rounded once from fp32 to bf16/fp16, to nearest even, on every compiled
    path: also denormals of the format (bf16's are fp32's, which AVX512-BF16's conversion
    instruction would flush to zero: the kernels convert such a group of 32 the portable way).
    Checked through rescale's in-place scaling, whose only rounding is that of the store:
    out = round(go · out), the product exact in fp32 (it needs at most 21 bits)."""
    from fused_ls.backends import cpp_backend

    tiny = torch.finfo(dtype).tiny  # the smallest normal: fp32's for bf16, fp16's own for fp16
    g = torch.Generator().manual_seed(3)
    vals = torch.randn(3, 4099, generator=g)
    # The ties (products halfway between two neighbours of the format, about a third of rows 0
    # and 1) come from go = 1.5 and 0.75, which add one or two bits to the inputs' mantissas.
    vals[0] *= tiny * 64  # ~64·tiny: normals down to the denormals, ~28 products below tiny
    vals[1] = vals[1].abs() + 1  # normal numbers in [1, 5)
    # × (1 + 2⁻⁹): products a little above an input. In bf16 that is less than half a step: all
    # round down, no ties; in fp16 some round up, and a few (mantissa 1.25 or 1.75) are ties. (The
    # first 64 inputs are bf16/fp16 values of 1 + k·2⁻⁸ in fp32, rounded by PyTorch, not by us.)
    vals[2, :64] = 1 + torch.arange(64) * 2.0**-8
    x, y, _ = make_data(3, 4099, dtype)
    p = problem(x, y, reduction="none")
    go = torch.tensor([1.5, 0.75, 1.0 + 2.0**-9])
    want = (vals.to(dtype).float() * go[:, None]).to(dtype)  # PyTorch's round-to-nearest-even
    assert ((want[0] != 0) & (want[0].abs() < tiny)).sum() >= 10  # denormals to round
    for isa in cpp_backend.isas():
        monkeypatch.setenv("FUSED_LS_CPU_ISA", isa)
        out = vals.to(dtype)
        fused_ls.backends.get("cpp").rescale(go, out, out, torch.zeros(4, 8), p)
        assert torch.equal(out, want), isa  # (by value: the kernels' zero is +0)


@needs_cpp
def test_isa_env_rejects_unknown(monkeypatch):
    monkeypatch.setenv("FUSED_LS_CPU_ISA", "avx9000")
    with pytest.raises(RuntimeError, match="avx9000"):
        fused_ls.label_smoothing_cross_entropy(
            torch.randn(2, 5), torch.tensor([0, 1]), backend="cpp"
        )


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_independent_of_thread_count(dtype):
    logits, target, kw = make_case("mixup_sparse_all", 64, 3001, dtype, seed=9)
    old = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x = logits.clone().requires_grad_(True)
            loss = fused_ls.label_smoothing_cross_entropy(
                x, target, backend="cpp", reduction="none", **kw
            )
            loss.sum().backward()
            out.append((loss.detach(), x.grad))
    finally:
        torch.set_num_threads(old)
    for loss, grad in out[1:]:
        assert torch.equal(loss, out[0][0]) and torch.equal(grad, out[0][1])


@needs_cpp
def test_strided_rows_and_class_dim_1():
    # rows with a stride larger than C (a column slice of a wider tensor), and [N, C, d] logits
    g = torch.Generator().manual_seed(10)
    wide = torch.randn(8, 300, generator=g)
    logits = wide[:, :257]
    target = torch.randint(0, 257, (8,), generator=g)
    check_backend("cpp", logits, target, smoothing=0.1)
    x3 = torch.randn(3, 11, 5, generator=g)
    check_backend(
        "cpp", x3, torch.randint(0, 11, (3, 5), generator=g), smoothing=0.1, reduction="none"
    )


@needs_cpp
def test_auto_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("FUSED_LS_BACKEND", raising=False)
    req = fused_ls.backends.Request("cpu", torch.float32, False, False)
    assert fused_ls.backends.resolve("auto", req) == "cpp"
    assert fused_ls.backends.reasons_for(
        "cpp", fused_ls.backends.Request("cuda", torch.float32, False, False)
    )


@needs_cpp
def test_kernel_ops_opcheck_and_compile():
    x = torch.randn(4, 33)
    target = torch.randint(0, 33, (4,))
    p = problem(x, target, z_loss=1e-3, reduction="sum")
    ops = torch.ops.fused_ls
    utils = ("test_schema", "test_faketensor")
    loss, pack = ops.ext_forward(x, *p)
    go = torch.ones(())
    for op, args in (
        (ops.ext_forward, (x, *p)),
        (ops.ext_backward, (go, x, torch.empty_like(x), pack, *p)),
        (ops.ext_forward_backward, (x, torch.empty_like(x), go, *p)),
        (ops.ext_row_stats, (x, *p)),
        (ops.ext_finalize, (ops.ext_row_stats(x, *p), *p)),
    ):
        torch.library.opcheck(op.default, args, test_utils=utils)
    f = torch.compile(
        lambda a: fused_ls.label_smoothing_cross_entropy(a, target, backend="cpp"),
        fullgraph=True,
        backend="eager",
    )
    a = x.clone().requires_grad_(True)
    loss = f(a)
    loss.backward()
    check_backend("cpp", x, target, smoothing=0.1)
    ref = x.clone().requires_grad_(True)
    fused_ls.label_smoothing_cross_entropy(ref, target, backend="cpp").backward()
    torch.testing.assert_close(a.grad, ref.grad)
