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
through the vocabulary-parallel path on its local rows; PEFT: a ``PeftModel`` or
``PeftMixedModel`` is accepted (its base model is patched), a LoRA on the head is exact (extra
input columns), ``modules_to_save`` uses the active copy.

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

import importlib

from transformers import Trainer

from ._heads import UnsupportedModelError
from ._patch import apply_fused_ls, patch_trainer_model, revert_fused_ls

__all__ = [
    "FusedLSTrainer",
    "UnsupportedModelError",
    "apply_fused_ls",
    "patch_trainer",
    "revert_fused_ls",
]


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
    patch_trainer_model(trainer, **options)
    return trainer


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
