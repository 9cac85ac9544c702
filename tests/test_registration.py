"""torch.library registration: opcheck of both custom ops, and torch.compile(fullgraph=True)."""

import os

import pytest
import torch
import torch.nn.functional as F
from test_contract import BACKENDS, DEV, MODES, _problem, _to_dev

import fused_ls
from fused_ls import reference


def _forward_args(x, y, backend, weight=None, sim=None, inplace=False):
    # positional arguments of fused_ls::forward, in schema order
    return (
        x,
        y,
        weight,
        None,
        sim,
        None,
        None,
        None,
        None,
        0.1,
        0.5,
        -100,
        0.0,
        1.0,
        0,
        1e-3,
        0.0,
        0.1,
        1.0,
        backend,
        inplace,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_sim", [False, True])
def test_opcheck_forward(backend, with_sim):
    x, y, g = _problem(6, 9, torch.float32)
    x.requires_grad_(True)
    sim = torch.rand(9, 9, generator=g).to(DEV) if with_sim else None
    w = torch.rand(9, generator=g).to(DEV)
    torch.library.opcheck(
        torch.ops.fused_ls.forward.default, _forward_args(x, y, backend, weight=w, sim=sim)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward(backend):
    x, y, _ = _problem(6, 9, torch.float32)
    outs = torch.ops.fused_ls.forward(*_forward_args(x, y, backend))
    lse, pz, coefs, cols, mass = outs[2], outs[6], outs[7], outs[8], outs[9]
    out = torch.empty_like(x)
    torch.library.opcheck(
        torch.ops.fused_ls.backward.default,
        (
            torch.ones(6, device=DEV),
            x,
            out,
            y,
            None,
            None,
            None,
            lse,
            pz,
            coefs,
            cols,
            mass,
            0.5,
            0.0,
            backend,
        ),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["uniform", "everything"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(backend, mode, dynamic):
    torch._dynamo.reset()

    def step(logits, target, kw):
        return fused_ls.label_smoothing_cross_entropy(logits * 2, target, backend=backend, **kw)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for n in (16, 9):  # a second shape: recompilation or dynamic shapes both work
        x, y, g = _problem(n, 11, torch.float32)
        kw = _to_dev(MODES[mode](11, n, g))
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
    x, y, _ = _problem(32, 50, torch.float32)
    torch.testing.assert_close(crit(x, y), F.cross_entropy(x, y, label_smoothing=0.1))


def test_reference_is_not_the_op():
    """Guard against a test suite that compares the op with itself."""
    src = open(os.path.join(os.path.dirname(reference.__file__), "reference.py")).read()
    assert "torch.ops.fused_ls" not in src and "label_smoothing_cross_entropy(" not in src
