"""torch.library registration: opcheck of both custom ops, and torch.compile(fullgraph=True)."""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import backends, device_under_test, make_case, make_data, problem

import fused_ls
from fused_ls import reference

DEV = device_under_test()
BACKENDS = backends(DEV)


def _case(backend, with_sim=False, reduction="mean"):
    x, y, g = make_data(6, 9, torch.float32, DEV)
    x.requires_grad_(True)
    kw = dict(
        weight=torch.rand(9, generator=g).to(DEV),
        z_loss=1e-3,
        confidence_penalty=0.1,
        reduction=reduction,
        return_stats=True,
    )
    if with_sim:
        kw.update(similarity=torch.rand(9, 9, generator=g).to(DEV), similarity_mix=0.5)
    return x, problem(x, y, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_sim", [False, True])
def test_opcheck_forward(backend, with_sim):
    x, p = _case(backend, with_sim)
    torch.library.opcheck(torch.ops.fused_ls.forward.default, (x, *p, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_backward_and_forward_backward(backend, reduction):
    x, p = _case(backend, reduction=reduction)
    x = x.detach()
    _, pack = torch.ops.fused_ls.forward(x, *p, backend)
    go = torch.ones(() if reduction == "mean" else 6, device=DEV)
    torch.library.opcheck(
        torch.ops.fused_ls.backward.default, (go, x, torch.empty_like(x), pack, *p, backend)
    )
    if reduction == "none":  # forward_backward takes "none" or "sum"
        torch.library.opcheck(
            torch.ops.fused_ls.forward_backward.default,
            (x, torch.empty_like(x), go, *p, backend),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_row_stats_and_finalize(backend):
    x, p = _case(backend, with_sim=True)
    x = x.detach()
    torch.library.opcheck(torch.ops.fused_ls.row_stats.default, (x, *p, backend))
    stats = torch.ops.fused_ls.row_stats(x, *p, backend)
    torch.library.opcheck(torch.ops.fused_ls.finalize.default, (stats, *p, backend))
    # finalize(row_stats) is forward
    a = torch.ops.fused_ls.finalize(stats, *p, backend)
    b = torch.ops.fused_ls.forward(x, *p, backend)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["uniform", "everything"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(backend, mode, dynamic):
    torch._dynamo.reset()

    def step(logits, target, kw):
        return fused_ls.label_smoothing_cross_entropy(logits * 2, target, backend=backend, **kw)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for n in (16, 9):  # a second shape: recompilation or dynamic shapes both work
        x, y, kw = make_case(mode, n, 11, torch.float32, DEV)
        xe = x.clone().requires_grad_(True)
        xc = x.clone().requires_grad_(True)
        le, lc = step(xe, y, kw), compiled(xc, y, kw)
        le.backward()
        lc.backward()
        torch.testing.assert_close(lc, le)
        torch.testing.assert_close(xc.grad, xe.grad)


def test_compile_module_uniform_matches_pytorch():
    torch._dynamo.reset()
    crit = torch.compile(fused_ls.FusedLabelSmoothingCE(0.1), fullgraph=True)
    x, y, _ = make_data(32, 50, torch.float32, DEV)
    torch.testing.assert_close(crit(x, y), F.cross_entropy(x, y, label_smoothing=0.1))


def test_reference_is_not_the_op():
    """Guard against a test suite that compares the op with itself."""
    src = open(os.path.join(os.path.dirname(reference.__file__), "reference.py")).read()
    assert "torch.ops.fused_ls" not in src and "label_smoothing_cross_entropy(" not in src
