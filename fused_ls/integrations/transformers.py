"""Hugging Face transformers (5.x): causal-LM training with fused label smoothing and no logits.

    from fused_ls.integrations.transformers import FusedLSTrainer, apply_fused_ls

    apply_fused_ls(model, smoothing=0.1)      # a causal LM, VLM or PeftModel; revert_fused_ls
    trainer = FusedLSTrainer(model=model, args=TrainingArguments(label_smoothing_factor=0.1), ...)
    patch_trainer(trainer)                    # or: an existing Trainer (or a subclass, e.g. TRL's)

What the patch does. A causal LM's forward runs its backbone, projects the last hidden states with
its head into [B, T, V] logits, maybe scales and soft-caps them, hands them to
``self.loss_function`` (``ForCausalLMLoss``) and maybe adds more (an MoE router loss). There is no
hook that skips the logits, so ``apply_fused_ls`` gives the *instance* a forward rewritten from
the class's own (``fused_ls.integrations._forward``): every statement as the model wrote it, except
that the head region becomes ONE call of ``fused_ls.linear_label_smoothing_cross_entropy`` on the
hidden states and the head's weight (and bias), constant factors folded into the hidden states and
the final soft cap into ``softcap=``. In training ``outputs.logits`` is None. Without labels the
forward the instance had before runs unchanged (generation, inference); so do TRL's
``fused_lm_head=True`` calls. In eval mode with labels the logits come back as the model computes
them, and ``outputs.loss`` is the same smoothed loss as in training.

Semantics are ``ForCausalLMLoss``'s: the labels are shifted by padding them with ``ignore_index``
(-100) on the right (or ``shift_labels`` is used as given), ``logits_to_keep`` slices the hidden
states as the model does, and the loss is the sum divided by ``num_items_in_batch`` when it is
passed (Trainer does, for gradient accumulation and token averaging across devices), else the
mean over counted tokens. With ε = 0 the loss is the model's own loss.

Exact or refused. What the fused call computes is read from the class's forward source, never from
the config (``Gemma3ForConditionalGeneration`` does not soft-cap although its text config has
``final_logit_softcapping``): the head is the module the forward calls
(``logits = self.lm_head(h)``, ``self.embed_out(h)``, ...), which must compute ``F.linear``; the
factors and the cap are the expressions the forward multiplies and divides by, evaluated at call
time where it evaluates them. Anything else that reads the logits (a slice, a bias, a custom
cap, a loss of its own) is refused with ``UnsupportedModelError`` naming the statement, and so is
a head that is not an ``nn.Linear`` computation or carries hooks we do not know, a loss function
other than ``ForCausalLMLoss``, a head whose rows differ from the loss's ``vocab_size``.
``scripts/model_table.py`` writes the verdict for every class of the installed transformers
(``docs/compatibility.md``).

Sharded and wrapped heads (``fused_ls.integrations._heads``): the fused loss runs inside the head
module's own call, so that FSDP2's, DeepSpeed ZeRO-3's and accelerate's hooks gather the weight
(once per step) and re-gather it for backward; transformers' tensor-parallel colwise head goes
through the vocabulary-parallel path on its local rows; PEFT: a ``PeftModel`` is accepted (its
base model is patched), a LoRA on the head is exact (extra input columns), ``modules_to_save``
uses the active copy.

Trainer. ``label_smoothing_factor > 0`` makes Trainer pop the labels, let the model build the
logits and run its dense ``LabelSmoother``. ``FusedLSTrainer`` / ``patch_trainer`` patch the
(unwrapped) model with ``args.label_smoothing_factor`` and set ``trainer.label_smoother = None``,
so the labels reach the patched forward. Trainer passes ``num_items_in_batch`` only when
``trainer.model_accepts_loss_kwargs``; the patched model sets ``accepts_loss_kwargs`` (the
attribute Trainer reads first) to whether its forward hands ``**kwargs`` to the loss, and
``patch_trainer`` recomputes the flag because Trainer decided it in ``__init__`` from the
unpatched model. TRL's ``SFTTrainer``: ``fused_ls.integrations.trl``.

Transformers is imported by this module only; ``import fused_ls`` does not import it.
"""

from __future__ import annotations

import ast
import functools
import importlib
import types

import torch
from torch import nn
from transformers import Trainer
from transformers.loss.loss_utils import ForCausalLMLoss

import fused_ls
from fused_ls._options import HEAD_KEYWORDS, keyword_values, takes_keywords

from ._forward import ForwardSpec, read_forward
from ._heads import UnsupportedModelError, _lora_terms, active_module, check_module, global_rows
from ._heads import refuse as _refuse

__all__ = [
    "FusedLSTrainer",
    "UnsupportedModelError",
    "apply_fused_ls",
    "patch_trainer",
    "revert_fused_ls",
]

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


def _peft_base(model: nn.Module) -> nn.Module:
    """The model whose forward computes the logits: a PEFT ``PeftModel``'s base model (PEFT's
    forward reaches it through ``base_model.model.forward``), else the model itself."""
    get_base = getattr(model, "get_base_model", None)
    if get_base is not None and type(model).__module__.startswith("peft."):
        return get_base()
    return model


def _dispatch(self, *args, **kwargs):
    """The instance's forward: the fused forward when labels are given; TRL's ``fused_lm_head``
    protocol and calls without labels go to the forward the instance had before."""
    state: FusedLSHead = self.fused_ls
    previous = state._previous or types.MethodType(type(self).forward, self)
    if kwargs.get("fused_lm_head"):
        return previous(*args, **kwargs)
    labels = state._spec.signature.bind(self, *args, **kwargs).arguments.get("labels")
    if labels is None:
        return previous(*args, **kwargs)
    return state._spec.fused(self, *args, **kwargs)


def _simple_attribute(expr: str) -> bool:
    """`self.a.b.c`: safe to evaluate on the instance when patching."""
    node = ast.parse(expr, mode="eval").body
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and node.id == "self"


def _check_instance(model: nn.Module, spec: ForwardSpec) -> nn.Module:
    """The per-instance conditions when patching (the call re-checks the head, which hooks,
    PEFT and sharding may change afterwards)."""
    head = getattr(model, spec.head, None)
    if not isinstance(head, nn.Module):
        raise _refuse(model, f"its forward calls self.{spec.head}, which is not a module")
    module = active_module(model, head)
    terms = _lora_terms(model, module)
    check_module(model, module.base_layer if terms is not None else module, spec.head)
    if model.loss_function is not ForCausalLMLoss:
        raise _refuse(model, f"its loss_function is {model.loss_function!r}, not ForCausalLMLoss")
    if spec.vocab is not None and _simple_attribute(spec.vocab):
        vocab = eval(spec.vocab, {}, {"self": model})  # an attribute chain of self only
        rows = global_rows(model, head)
        if rows != vocab:
            raise _refuse(model, f"its lm_head has {rows} rows but {spec.vocab} is {vocab}")
    return head


@takes_keywords(_OPTIONS)
def apply_fused_ls(model: nn.Module, smoothing: float = 0.1, **options) -> nn.Module:
    """Patch a causal LM (or image-text-to-text) instance so that its loss is fused
    label-smoothed cross-entropy on the final hidden states and the head's weight, without
    building the logits.

    Args:
        model: a ``*ForCausalLM`` / ``*ForConditionalGeneration`` whose forward the module
            docstring's rules accept, or a PEFT ``PeftModel`` of one (its base model is
            patched); refused with ``UnsupportedModelError`` (nothing patched) otherwise.
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
    target = _peft_base(model)
    patched = vars(target).get("fused_ls")
    spec = patched._spec if isinstance(patched, FusedLSHead) else read_forward(type(target))
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
        V = global_rows(target, head)
        w = next(iter(head.parameters()), None)
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
    target = _peft_base(model)
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


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


def _is_trl_sft(trainer) -> bool:
    return any(c.__module__.startswith("trl.") and c.__name__ == "SFTTrainer"
               for c in type(trainer).__mro__)  # fmt: skip


def patch_trainer(trainer: Trainer, **options) -> Trainer:
    """Make an existing ``Trainer`` (or a subclass) train with the fused loss.

    Patches the unwrapped model (a PEFT model's base model) with
    ``trainer.args.label_smoothing_factor`` (0 too: plain cross-entropy without logits) and
    ``options``, switches off Trainer's dense ``LabelSmoother`` and recomputes
    ``trainer.model_accepts_loss_kwargs`` (Trainer decided it in ``__init__`` from the unpatched
    model). Call it after ``Trainer.__init__`` and before ``train()``; with ``model_init`` use
    ``FusedLSTrainer``, which also patches the models it creates.

    TRL's ``SFTTrainer`` is handled by ``fused_ls.integrations.trl.patch_sft_trainer`` (its loss
    and logged metrics from one fused pass; unchanged with ε = 0).
    """
    if _is_trl_sft(trainer):
        # imported only for TRL's trainer (TRL is an optional dependency)
        return importlib.import_module("fused_ls.integrations.trl").patch_sft_trainer(
            trainer, **options
        )
    model = trainer.accelerator.unwrap_model(trainer.model)
    apply_fused_ls(model, trainer.args.label_smoothing_factor, **options)
    trainer.label_smoother = None
    refresh_accepts_loss_kwargs(trainer, model)
    return trainer


def refresh_accepts_loss_kwargs(trainer: Trainer, model: nn.Module) -> None:
    """Trainer's own rule (Trainer.__init__) on the patched model: its ``accepts_loss_kwargs``,
    except under DeepSpeed sequence parallelism, which counts its tokens itself."""
    accepts = _peft_base(model).accepts_loss_kwargs  # set by apply_fused_ls
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    sp = pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled
    trainer.model_accepts_loss_kwargs = bool(accepts) and not sp


class FusedLSTrainer(Trainer):
    """``Trainer`` whose loss is fused label-smoothed cross-entropy without logits.

    Same arguments as ``Trainer``, plus ``fused_ls_options`` (a dict of keywords for
    ``linear_label_smoothing_cross_entropy``). ε is ``args.label_smoothing_factor``.
    """

    def __init__(self, *args, fused_ls_options: dict | None = None, **kwargs):
        self.fused_ls_options = dict(fused_ls_options or {})
        super().__init__(*args, **kwargs)
        patch_trainer(self, **self.fused_ls_options)

    def call_model_init(self, trial=None):
        # train() re-creates the model from model_init (hyper-parameter search): patch each one
        model = super().call_model_init(trial)
        apply_fused_ls(model, self.args.label_smoothing_factor, **self.fused_ls_options)
        return model
