"""The op contract: ``fused_ls::`` custom ops, and the autograd path of the loss.

The loss of DESIGN.md §2 for logits x [N, C] (class dim last) and a ``Problem`` p (see
``fused_ls._problem``). Every op takes ``(…, *p, backend)`` and is served by the named backend:

    fused_ls::forward(x, p)                      -> (loss, pack)   statistics + finalisation
    fused_ls::backward(grad_loss, x, out!, pack, p)                  gradient into out (may be x)
    fused_ls::forward_backward(x, out!, grad_loss, p) -> (loss, pack)   both in one call
    fused_ls::row_stats(x, p)                    -> stats          unfinalised (sharding)
    fused_ls::finalize(stats, p)                 -> (loss, pack)

They have fake (meta) kernels, so ``torch.compile(fullgraph=True)`` traces through them and
``opcheck`` checks them; ``fused_ls::forward`` also has its autograd formula registered.

The loss itself goes through ``LossFunction`` (a ``torch.autograd.Function``): a custom op's
registered autograd costs ~0.1 ms of Python per call with this many arguments, which would be
more than the whole kernel at classifier sizes. ``LossFunction`` calls the backend directly; the
compiled backends (``cpp``, ``cuda``) are themselves C++ ops with fake kernels, and the Python
backends (``torch``, ``triton``) are entered through the ``fused_ls::`` ops when torch.compile is
tracing (``call``), so the traced graph never sees their Python.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from ._problem import PROBLEM_SCHEMA, Problem, fake_loss_pack, fake_stats

_lib = torch.library.Library("fused_ls", "FRAGMENT")  # noqa: TOR901 - ops defined from schemas

SCHEMAS = {
    "forward": f"forward(Tensor x, {PROBLEM_SCHEMA}, str backend) -> (Tensor, Tensor)",
    "backward": (
        f"backward(Tensor grad_loss, Tensor x, Tensor(a!) out, Tensor pack, {PROBLEM_SCHEMA}, "
        "str backend) -> ()"
    ),
    "forward_backward": (
        f"forward_backward(Tensor x, Tensor(a!) out, Tensor grad_loss, {PROBLEM_SCHEMA}, "
        "str backend) -> (Tensor, Tensor)"
    ),
    "row_stats": f"row_stats(Tensor x, {PROBLEM_SCHEMA}, str backend) -> Tensor",
    "finalize": f"finalize(Tensor stats, {PROBLEM_SCHEMA}, str backend) -> (Tensor, Tensor)",
}


def _problem(args) -> tuple[Problem, str]:
    return Problem(*args[:-1]), args[-1]


# ---- implementations: the named backend ---------------------------------------------------------
def _forward(x, *args):
    p, b = _problem(args)
    return backends.get(b).forward(x, p)


def _backward(grad_loss, x, out, pack, *args):
    p, b = _problem(args)
    backends.get(b).backward(grad_loss, x, out, pack, p)


def _forward_backward(x, out, grad_loss, *args):
    p, b = _problem(args)
    return backends.get(b).forward_backward(x, out, grad_loss, p)


def _row_stats(x, *args):
    p, b = _problem(args)
    return backends.get(b).row_stats(x, p)


def _finalize(stats, *args):
    p, b = _problem(args)
    return backends.get(b).finalize(stats, p)


# ---- fake kernels (fused_ls._problem's output shapes) --------------------------------------------
def _fake_forward(x, *args):
    return fake_loss_pack(x, x.shape[0], _problem(args)[0])


def _fake_backward(grad_loss, x, out, pack, *args):
    return None


def _fake_forward_backward(x, out, grad_loss, *args):
    return fake_loss_pack(x, x.shape[0], _problem(args)[0])


def _fake_row_stats(x, *args):
    return fake_stats(x)


def _fake_finalize(stats, *args):
    return fake_loss_pack(stats, stats.shape[0], _problem(args)[0])


for _name, _impl, _fake in (
    ("forward", _forward, _fake_forward),
    ("backward", _backward, _fake_backward),
    ("forward_backward", _forward_backward, _fake_forward_backward),
    ("row_stats", _row_stats, _fake_row_stats),
    ("finalize", _finalize, _fake_finalize),
):
    _lib.define(SCHEMAS[_name])
    _lib.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fused_ls::{_name}", _fake, lib=_lib)


# ---- dispatch -----------------------------------------------------------------------------------
def call(kind: str, backend: str, *args):
    """Run ``kind`` ("forward", "backward", ...) on ``backend``: directly in eager mode and for
    the compiled backends, through the ``fused_ls::`` op for Python backends under tracing."""
    b = backends.get(backend)
    if b.traceable or not torch.compiler.is_compiling():
        return getattr(b, kind)(*args)
    *head, p = args
    return getattr(torch.ops.fused_ls, kind)(*head, *p, backend)


def bump_version(t: Tensor) -> None:
    """Make an in-place write visible to autograd (DESIGN.md §4): an op that saved ``t`` for its
    backward then raises instead of computing with the overwritten values."""
    torch.autograd.graph.increment_version(t)


# ---- autograd -----------------------------------------------------------------------------------
class LossFunction(torch.autograd.Function):
    """loss, pack = LossFunction.apply(x, backend, inplace_backward, *problem)."""

    @staticmethod
    def forward(ctx, x, backend, inplace, *problem):
        p = Problem(*problem)
        loss, pack = call("forward", backend, x, p)
        LossFunction.remember(ctx, x, pack, p, backend, inplace)
        return loss, pack

    @staticmethod
    def remember(ctx, x, pack, p: Problem, backend: str, inplace: bool) -> None:
        """Keep what ``backward`` reads (also after the sharded forward of fused_ls.parallel)."""
        ctx.mark_non_differentiable(pack)
        ctx.set_materialize_grads(False)  # no zero gradient for the pack
        ctx.save_for_backward(x, pack, *p.tensors())
        ctx.scalars = p.scalars()
        ctx.backend, ctx.inplace = backend, inplace

    @staticmethod
    def backward(ctx, grad_loss, _grad_pack):
        if not ctx.needs_input_grad[0] or grad_loss is None:
            return (None,) * (3 + len(Problem._fields))
        x, pack, *tensors = ctx.saved_tensors
        p = Problem(*tensors, *ctx.scalars)
        return (gradient(grad_loss, x, pack, p, ctx.backend, ctx.inplace),) + (None,) * (
            2 + len(Problem._fields)
        )


def gradient(grad_loss, x, pack, p: Problem, backend: str, inplace: bool) -> Tensor:
    """d(grad_loss · loss)/dx, written into x's own storage when ``inplace``."""
    out = x if inplace else torch.empty_like(x)
    call("backward", backend, grad_loss, x, out, pack, p)
    if inplace:
        bump_version(out)
    return out


# The registered autograd of fused_ls::forward (for direct calls of the op) is the same formula.
def _setup_context(ctx, inputs, output):
    x, *rest = inputs
    p, backend = _problem(rest)
    ctx.save_for_backward(x, output[1], *p.tensors())
    ctx.scalars, ctx.backend = p.scalars(), backend


def _op_backward(ctx, grad_loss, _grad_pack):
    x, pack, *tensors = ctx.saved_tensors
    p = Problem(*tensors, *ctx.scalars)
    g = gradient(grad_loss, x, pack, p, ctx.backend, False) if ctx.needs_input_grad[0] else None
    return (g,) + (None,) * (len(Problem._fields) + 1)


torch.library.register_autograd(
    "fused_ls::forward", _op_backward, setup_context=_setup_context, lib=_lib
)
