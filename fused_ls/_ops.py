"""The op contract: ``fused_ls::`` custom ops, and the autograd path of the loss.

The loss of docs/design.md §2 for logits x [N, C] (class dim last) and a ``Problem`` p (see
``fused_ls._problem``). Every op takes ``(…, *p, backend)`` and is served by the named backend:

    fused_ls::forward(x, p)                      -> (loss, pack)   statistics + finalisation
    fused_ls::backward(grad_loss, x, out!, pack, p)                  gradient into out (may be x)
    fused_ls::forward_backward(x, out!, grad_loss, p) -> (loss, pack)   both in one pass
    fused_ls::rescale(grad_loss, x, out!, pack, p)                   out: unit upstream → grad_loss
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

The gradient in the forward (one read of the logits, one write of the gradient). When autograd
will need the logits' gradient, the forward runs ``forward_backward`` with a unit upstream
gradient: statistics, finalisation and d loss/dx in one pass over each row (into the logits with
``inplace_backward``, else into a fresh buffer). The backward then hands that buffer to autograd,
after ``rescale`` has made it the gradient of ``grad_loss · loss``: nothing is read or written
where grad_loss is 1 (decided on the device), otherwise one pass. The buffer is the backward's
alone from then on, so nothing anyone can observe is changed in place; a second backward through
a retained graph recomputes the gradient from the saved logits and pack (with
``inplace_backward`` the logits are gone: it raises). Under torch.compile the buffer is saved like
any activation and the backward returns ``grad_loss · G`` out of place (one fused pass).
Backends that have not been measured with this path on a device keep the two passes there
(``Backend.grad_in_forward``): the forward's statistics, the backward's gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from ._problem import PROBLEM_SCHEMA, R_NONE, Problem, acc_dtype, fake_loss_pack, fake_stats
from .backends.registry import scaled

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
    "rescale": (
        f"rescale(Tensor grad_loss, Tensor x, Tensor(a!) out, Tensor pack, {PROBLEM_SCHEMA}, "
        "str backend) -> ()"
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


def _rescale(grad_loss, x, out, pack, *args):
    p, b = _problem(args)
    backends.get(b).rescale(grad_loss, x, out, pack, p)


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


def _fake_rescale(grad_loss, x, out, pack, *args):
    return None


def _fake_row_stats(x, *args):
    return fake_stats(x)


def _fake_finalize(stats, *args):
    return fake_loss_pack(stats, stats.shape[0], _problem(args)[0])


for _name, _impl, _fake in (
    ("forward", _forward, _fake_forward),
    ("backward", _backward, _fake_backward),
    ("forward_backward", _forward_backward, _fake_forward_backward),
    ("rescale", _rescale, _fake_rescale),
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
    """Make an in-place write visible to autograd (docs/design.md §4): an op that saved ``t`` for
    its backward then raises instead of computing with the overwritten values."""
    torch.autograd.graph.increment_version(t)


# ---- autograd -----------------------------------------------------------------------------------
def unit_upstream(x: Tensor, p: Problem) -> Tensor:
    """The upstream gradient 1 for forward_backward: [N] ones for reduction "none", else a scalar
    (in the accumulation dtype, on the logits' device)."""
    shape = (x.shape[0],) if p.reduction == R_NONE else ()
    return torch.ones(shape, dtype=acc_dtype(x.dtype), device=x.device)


def _one_pass(x: Tensor, g: Tensor, p: Problem, backend: str):
    """(loss, pack), and the gradient for a unit upstream gradient written into g: the forward's
    one pass (forward_backward)."""
    return call("forward_backward", backend, x, g, unit_upstream(x, p), p)


class LossFunction(torch.autograd.Function):
    """loss, pack = LossFunction.apply(x, backend, inplace_backward, *problem).

    The module docstring describes when the gradient is computed in the forward."""

    @staticmethod
    def forward(ctx, x, backend, inplace, *problem):
        p = Problem(*problem)
        ctx.set_materialize_grads(False)  # no zero gradient for the pack
        ctx.grad = []  # the forward's gradient, until the first backward takes it
        ctx.compiled = False  # True: the gradient is a saved tensor (torch.compile)
        ctx.one_pass = ctx.needs_input_grad[0] and backends.get(backend).grad_in_forward(x.device)
        if not ctx.one_pass:
            loss, pack = call("forward", backend, x, p)
            save_two_pass(ctx, x, pack, p, backend, inplace)
        elif torch.compiler.is_compiling():
            g = torch.empty_like(x)  # (in place into a graph input would cost a copy-back)
            loss, pack = _one_pass(x, g, p, backend)
            ctx.save_for_backward(g, pack)
            ctx.compiled = True
        else:
            g = x if inplace else backends.get(backend).new_gradient(x)
            loss, pack = _one_pass(x, g, p, backend)
            if inplace:
                bump_version(x)  # the logits now hold the gradient: saved copies elsewhere raise
            ctx.grad.append(g)
            # for a second backward (retain_graph): recompute from the logits, unless they are gone
            save_two_pass(ctx, None if inplace else x, pack, p, backend, inplace)
        ctx.mark_non_differentiable(pack)
        return loss, pack

    @staticmethod
    def backward(ctx, grad_loss, _grad_pack):
        n_args = 2 + len(Problem._fields)
        if not ctx.one_pass or grad_loss is None:  # (no gradient at all for grad_loss None)
            return two_pass_backward(ctx, grad_loss, n_args)
        none = (None,) * n_args
        if ctx.compiled:
            g, pack = ctx.saved_tensors
            # grad_loss · g out of place, rounded once to g's dtype
            return (scaled(g, grad_loss, pack.dtype).to(g.dtype), *none)
        x, pack, p = _saved(ctx)
        if ctx.grad:  # the forward's gradient, for a unit upstream gradient: now ours alone
            g = ctx.grad.pop()
            call("rescale", ctx.backend, grad_loss, x if x is not None else g, g, pack, p)
            return (g, *none)
        if x is None:
            raise RuntimeError(
                "fused_ls: a second backward through a loss computed with inplace_backward=True: "
                "the forward wrote the gradient over the logits, so they are gone. Compute the "
                "loss without inplace_backward to backpropagate through it more than once."
            )
        # a later backward (retain_graph): the first one's computation again, bit for bit
        g = torch.empty_like(x)
        _one_pass(x, g, p, ctx.backend)
        call("rescale", ctx.backend, grad_loss, x, g, pack, p)
        return (g, *none)


def gradient(grad_loss, x, pack, p: Problem, backend: str, inplace: bool) -> Tensor:
    """d(grad_loss · loss)/dx, written into x's own storage when ``inplace``."""
    out = x if inplace else torch.empty_like(x)
    call("backward", backend, grad_loss, x, out, pack, p)
    if inplace:
        bump_version(out)
    return out


# ---- the two-pass autograd: LossFunction's, parallel.ShardedLossFunction's, the op's ----------
def save_two_pass(ctx, x, pack, p: Problem, backend: str, inplace: bool) -> None:
    """Save what ``two_pass_backward`` computes the gradient from: the logits (None when the
    forward overwrote them), the pack and the problem, the backend and ``inplace``."""
    ctx.save_for_backward(x, pack, *p.tensors())
    ctx.scalars, ctx.backend, ctx.inplace = p.scalars(), backend, inplace


def _saved(ctx) -> tuple:
    """(x, pack, problem) of ``save_two_pass``."""
    x, pack, *tensors = ctx.saved_tensors
    return x, pack, Problem(*tensors, *ctx.scalars)


def two_pass_backward(ctx, grad_loss, n_args: int) -> tuple:
    """The backward of a forward that called ``save_two_pass`` with x's gradient first, then
    ``n_args`` Nones: the backward op's d(grad_loss · loss)/dx (into x with ``inplace``), none
    where x needs no gradient or no gradient reached the loss."""
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return (None,) * (1 + n_args)
    x, pack, p = _saved(ctx)
    return (gradient(grad_loss, x, pack, p, ctx.backend, ctx.inplace), *(None,) * n_args)


# The registered autograd of fused_ls::forward (for direct calls of the op) is the same formula.
def _setup_context(ctx, inputs, output):
    x, *rest = inputs
    p, backend = _problem(rest)
    save_two_pass(ctx, x, output[1], p, backend, False)


def _op_backward(ctx, grad_loss, _grad_pack):
    return two_pass_backward(ctx, grad_loss, len(Problem._fields) + 1)


torch.library.register_autograd(
    "fused_ls::forward", _op_backward, setup_context=_setup_context, lib=_lib
)
