"""Patching a model instance (``apply_fused_ls``, ``revert_fused_ls``): the part of the Hugging
Face integration that the Trainer (``fused_ls.integrations.transformers``) and TRL
(``fused_ls.integrations.trl``) entry points share. The module docstring of
``fused_ls.integrations.transformers`` describes what the patch does and what it refuses."""

from __future__ import annotations

import ast
import functools
import types

import torch
from torch import nn

import fused_ls
from fused_ls._options import HEAD_KEYWORDS, keyword_values, takes_keywords

from ._forward import ForwardSpec, read_forward
from ._heads import Head, check_loss, peft_base, resolve_head
from ._heads import refuse as _refuse

__all__ = ["FusedLSHead", "apply_fused_ls", "patch_trainer_model", "revert_fused_ls"]

# Keywords the integration sets itself (from transformers' semantics); the user may not pass them.
_RESERVED = {
    "ignore_index": "the labels' ignore index is transformers' (-100, or ignore_index= in forward)",
    "reduction": "the reduction follows ForCausalLMLoss (sum / num_items_in_batch, else mean)",
    "linear_bias": "the bias is the head's own (lm_head.bias)",
    "return_stats": "the forward returns a loss; call the fused function directly for Stats",
    "mix_target": "mixup targets are per batch, not an option of the model",
    "mix_lambda": "mixup's λ goes with mix_target, per batch",
}
# The keywords apply_fused_ls takes: the fused head's, but those the integration sets itself.
_OPTIONS = tuple(k for k in HEAD_KEYWORDS if k not in _RESERVED)
assert set(_RESERVED) <= set(HEAD_KEYWORDS) | {"linear_bias"}


class FusedLSHead:
    """The patch's state, at ``model.fused_ls``: ``smoothing`` (may be changed between steps, e.g.
    by ``fused_ls.SmoothingScheduler(model.fused_ls, ...)``) and ``options`` (keywords of
    ``linear_label_smoothing_cross_entropy``). ``capturing``: set by a trainer that reads the
    per-token statistics of the same pass (``captured`` = (loss, Stats, target, ignore_index)
    of the last call); the forward then returns no logits, in eval mode too."""

    def __init__(self, smoothing, options: dict, spec: ForwardSpec, previous, accepts_loss_kwargs):
        self.smoothing = smoothing
        self.options = options
        self.capturing = False
        self.captured = None
        self._spec = spec
        self._previous = previous  # the instance's own forward before the patch (e.g. TRL's)
        self._accepts_loss_kwargs = accepts_loss_kwargs  # the instance's own attribute, if any

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"FusedLSHead(smoothing={self.smoothing!r}{opts})"


def _dispatch(self, *args, **kwargs):
    """The instance's forward: the fused forward when labels are given; TRL's ``fused_lm_head``
    protocol and calls without labels go to the forward the instance had before."""
    state: FusedLSHead = self.fused_ls
    if not kwargs.get("fused_lm_head"):
        labels = state._spec.signature.bind(self, *args, **kwargs).arguments.get("labels")
        if labels is not None:
            return state._spec.fused(self, *args, **kwargs)
    previous = state._previous or types.MethodType(type(self).forward, self)
    return previous(*args, **kwargs)


def _simple_attribute(expr: str) -> bool:
    """`self.a.b.c`: safe to evaluate on the instance when patching."""
    node = ast.parse(expr, mode="eval").body
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and node.id == "self"


def _check_instance(model: nn.Module, spec: ForwardSpec) -> Head:
    """The per-instance conditions when patching (the call re-checks the head, which hooks,
    PEFT and sharding may change afterwards)."""
    attr = getattr(model, spec.head, None)
    if not isinstance(attr, nn.Module):
        raise _refuse(model, f"its forward calls self.{spec.head}, which is not a module")
    head = resolve_head(model, spec.head, attr)
    vocab = ...  # not known before the call
    if spec.vocab is not None and _simple_attribute(spec.vocab):
        vocab = eval(spec.vocab, {}, {"self": model})  # an attribute chain of self only
    check_loss(model, head, vocab, spec.vocab)
    return head


@takes_keywords(_OPTIONS)
def apply_fused_ls(model: nn.Module, smoothing: float = 0.1, **options) -> nn.Module:
    """Patch a causal LM (or image-text-to-text) instance so that its loss is fused
    label-smoothed cross-entropy on the final hidden states and the head's weight, without
    building the logits.

    Args:
        model: a ``*ForCausalLM`` / ``*ForConditionalGeneration`` whose forward the module
            docstring's rules accept, or a PEFT ``PeftModel`` or ``PeftMixedModel`` of one (its
            base model is patched); refused with ``UnsupportedModelError`` (nothing patched)
            otherwise.
        smoothing: ε (Trainer: ``args.label_smoothing_factor``); ``model.fused_ls.smoothing`` may
            be changed later.
        **options: keywords of ``fused_ls.linear_label_smoothing_cross_entropy`` (``weight``,
            ``similarity``, ``similarity_mix``, ``adaptive``, ``z_loss``, ``softcap``,
            ``confidence_penalty``, ``chunk_size``, ``backend``, ...), passed through unchanged
            and validated by one call on a single row now. ``softcap`` is the model's own on
            models that soft-cap (not allowed then).

    Returns:
        the model as given (patched in place). Applying again replaces ε and the options.
    """
    target = peft_base(model)
    patched = vars(target).get("fused_ls")
    spec = read_forward(type(target))  # cached per class: the spec a first patch stored
    head = _check_instance(target, spec)
    clash = {k: why for k, why in _RESERVED.items() if k in options}
    if spec.caps and "softcap" in options:
        clash["softcap"] = "this model soft-caps its logits itself (its forward does)"
    if clash:
        raise TypeError(
            "apply_fused_ls: these keywords are set by the integration: "
            + "; ".join(f"{k}: {why}" for k, why in clash.items())
        )
    keyword_values(apply_fused_ls, options)  # names it does not take: TypeError
    if "process_group" not in options:  # (a sharded call would be a collective)
        # ε and the options, validated by the fused function itself on one row of width 1
        V = head.rows
        w = next(iter(head.attr.parameters()), None)
        dev = w.device if w is not None and w.device.type != "meta" else torch.device("cpu")
        with torch.no_grad():
            fused_ls.linear_label_smoothing_cross_entropy(
                torch.zeros(1, 1, device=dev), torch.zeros(V, 1, device=dev),
                torch.zeros(1, dtype=torch.long, device=dev), smoothing, **options,
            )  # fmt: skip

    if isinstance(patched, FusedLSHead):
        # applied again: new ε and options, the same forward (which may have been wrapped since,
        # e.g. by TRL's fused head, whose wrapper calls ours)
        patched.smoothing, patched.options = smoothing, dict(options)
        return model
    target.fused_ls = FusedLSHead(
        smoothing,
        dict(options),
        spec,
        vars(target).get("forward"),
        vars(target).get("accepts_loss_kwargs"),
    )

    @functools.wraps(type(target).forward)  # the original's signature, **kwargs included
    def forward(self, *args, **kwargs):
        return _dispatch(self, *args, **kwargs)

    target.forward = types.MethodType(forward, target)
    # Trainer reads `accepts_loss_kwargs` first to decide whether to pass num_items_in_batch;
    # true only when the forward hands its **kwargs to the loss (else the loss would ignore it
    # and Trainer must average over the accumulation steps itself)
    target.accepts_loss_kwargs = spec.loss_kwargs
    return model


def revert_fused_ls(model: nn.Module) -> nn.Module:
    """Undo ``apply_fused_ls``: the forward the instance had before serves again. A no-op on an
    unpatched model."""
    target = peft_base(model)
    state = vars(target).get("fused_ls")
    if not isinstance(state, FusedLSHead):
        return model
    if state._previous is None:
        del target.forward
    else:
        target.forward = state._previous
    del target.fused_ls
    if state._accepts_loss_kwargs is None:
        vars(target).pop("accepts_loss_kwargs", None)
    else:
        target.accepts_loss_kwargs = state._accepts_loss_kwargs
    return model


def patch_trainer_model(trainer, **options) -> nn.Module:
    """What ``patch_trainer`` and ``patch_sft_trainer`` do to the trainer's model: patch the
    unwrapped model with ``trainer.args.label_smoothing_factor`` and ``options``, switch off
    Trainer's dense ``LabelSmoother`` (so the labels reach the patched forward), and recompute
    ``trainer.model_accepts_loss_kwargs`` with Trainer's own rule (``Trainer.__init__``) on the
    patched model: its ``accepts_loss_kwargs``, except under DeepSpeed sequence parallelism,
    which counts its tokens itself. Returns the unwrapped model."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    apply_fused_ls(model, trainer.args.label_smoothing_factor, **options)
    trainer.label_smoother = None
    accepts = peft_base(model).accepts_loss_kwargs  # set by apply_fused_ls
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    sp = pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled
    trainer.model_accepts_loss_kwargs = bool(accepts) and not sp
    return model
