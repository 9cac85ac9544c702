"""The plumbing every entry point shares: the ``Problem`` of parsed options, what an entry point
returns, and the options of the loss modules."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from . import _smoothing
from ._options import LossOptions, Stats, class_indices, parse_options
from ._problem import P_ARG, P_CONF, P_LOGP, P_LSE, P_PZ, Problem, argmax_bits_dtype


def make_problem(
    opts: LossOptions,
    target: Tensor,
    acc: torch.dtype,
    device_like: Tensor,
    num_classes: int,
    col_offset: int = 0,
) -> Problem:
    """The ``Problem`` of these options for class-index targets (any shape, flattened here) and
    logits that hold the columns ``[col_offset, col_offset + C)`` of ``num_classes``."""
    dev = device_like.device
    w, eps_rows, dense, sp_idx, sp_val, mix_y, mix_rows = opts.bind(num_classes, target.shape, dev)
    sm = _smoothing.prepare_traceable(
        w, dense, sp_idx, sp_val, opts.similarity_mix, num_classes, acc, device_like
    )
    return Problem(
        class_indices("target", target),
        sm.weight,
        sm.R,
        sm.mass,
        sm.sp_idx,
        sm.sp_val,
        eps_rows,
        mix_y,
        mix_rows,
        sm.r0,
        *opts.scalars(),
        col_offset,
        num_classes,
        opts.return_stats,
    )


def stats_from_pack(pack: Tensor, shape) -> Stats:
    """``Stats`` of the target's shape from a row pack."""
    n = pack.shape[0] - 1
    arg = pack.view(argmax_bits_dtype(pack.dtype))[:n, P_ARG].long()
    lse = pack[:n, P_LSE]
    entropy = lse - pack[:n, P_PZ]
    return Stats(
        lse.reshape(shape),
        pack[:n, P_CONF].reshape(shape),
        arg.reshape(shape),
        entropy.reshape(shape),
        pack[:n, P_LOGP].reshape(shape),
    )


def outputs(loss: Tensor, pack: Tensor, opts: LossOptions, shape):
    """What an entry point returns: the loss ("none": of the target's ``shape``), and with
    ``return_stats`` the ``Stats`` from the row pack."""
    if opts.reduction == "none" and loss.shape != shape:
        loss = loss.reshape(shape)
    if not opts.return_stats:
        return loss
    return loss, stats_from_pack(pack.detach(), shape)


def _keyword_init(cls: type):
    """The ``__init__`` that declares a module's keywords (``takes_keywords``): the first one in
    the MRO that does, so that a subclass with its own ``__init__`` takes its base's keywords."""
    for c in cls.__mro__:
        init = vars(c).get("__init__")
        if hasattr(init, "__fused_ls_keywords__"):
            return init
    raise TypeError(f"{cls.__qualname__}: no __init__ in its MRO declares takes_keywords")


class OptionsModule(nn.Module):
    """The options of a loss module: parsed once at construction (the keywords its ``__init__``
    takes, ``fused_ls._options.takes_keywords``; a subclass's own ``__init__`` takes those of the
    first ``__init__`` in its MRO that declares them), class weights and a dense similarity held as
    buffers (so that ``.to(device)`` moves them), ``smoothing`` settable between steps
    (schedules) and validated when set."""

    def __init__(self, **options):
        super().__init__()
        if isinstance(options.get("smoothing"), Tensor):
            raise ValueError(
                "smoothing must be a float in [0, 1]; pass a per-sample tensor to forward"
            )
        opts = parse_options(_keyword_init(type(self)), options)
        self.register_buffer("weight", opts.weight)
        self.register_buffer("similarity", opts.similarity)
        self._opts = opts

    @property
    def smoothing(self) -> float:
        return self._opts.smoothing

    @smoothing.setter
    def smoothing(self, value: float) -> None:
        if isinstance(value, Tensor):
            raise ValueError("smoothing must be a float in [0, 1]; pass tensors to forward")
        self._opts = self._opts.replace(smoothing=value)

    @property
    def ignore_index(self) -> int:
        return self._opts.ignore_index

    @property
    def reduction(self) -> str:
        return self._opts.reduction

    def options(self, smoothing=None, mix_target=None, mix_lambda=None) -> LossOptions:
        """The options of one call: the module's, with its current buffers and the call's
        per-sample overrides."""
        opts = self._opts
        if opts.weight is not self.weight or opts.similarity is not self.similarity:
            opts = self._opts = dataclasses.replace(
                opts, weight=self.weight, similarity=self.similarity
            )
        over = {}
        if smoothing is not None:
            over["smoothing"] = smoothing
        if mix_target is not None or mix_lambda is not None:
            over.update(mix_target=mix_target, mix_lambda=mix_lambda)
        return opts.replace(**over) if over else opts

    def extra_repr(self) -> str:
        o = self._opts
        out = f"smoothing={o.smoothing}, ignore_index={o.ignore_index}, reduction={o.reduction!r}"
        defaults = LossOptions()
        for name in (
            "similarity_mix",
            "adaptive",
            "z_loss",
            "softcap",
            "confidence_penalty",
            "sparse",
            "backend",
            "inplace_backward",
            "return_stats",
            "chunk_size",
        ):
            if getattr(o, name) != getattr(defaults, name):
                out += f", {'similarity' if name == 'sparse' else name}={getattr(o, name)!r}"
        return out
