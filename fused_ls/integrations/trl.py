"""TRL (1.16): ``SFTTrainer`` with label smoothing through the fused head, in one pass.

    from fused_ls.integrations.transformers import patch_trainer
    trainer = SFTTrainer(model=..., args=SFTConfig(label_smoothing_factor=0.1, ...), ...)
    patch_trainer(trainer)           # -> patch_sft_trainer(trainer)

What TRL does. ``SFTTrainer.__init__`` installs its own chunked head (``add_fused_lm_head``):
``model(..., fused_lm_head=True)`` returns per-token ``log_probs`` (true log-probabilities of the
labels), ``label_mask``, ``entropy`` and ``is_top1``, from which ``compute_loss`` takes the NLL and
logs ``entropy`` and ``mean_token_accuracy``. With ``label_smoothing_factor > 0`` it cannot use
that head: it runs the model once for the full logits (``LabelSmoother``) and a second time,
without gradient, through its fused head for the metrics. Two backbone forwards and the [N, V]
logits per micro-batch.

What the patch does. The model is patched with ``apply_fused_ls(model, ε)`` (a ``PeftModel``: its
base model) and ``trainer.compute_loss`` is replaced, for this instance, by one that calls the
model *once* with the labels: the fused smoothed loss and, from the same kernels' row statistics
(``return_stats``), each token's entropy H(p) = lse − Σp·z and argmax, from which the same two
metrics are logged with TRL's rules (sums over the counted tokens of every process, divided by
their number; the token count, ``num_tokens``; the MoE ``aux_loss``). The loss follows TRL's
nll path otherwise: ``num_items_in_batch`` (gradient accumulation), the multiplication by the
number of processes under ``average_tokens_across_devices``, and for MoE models
``router_aux_loss_coef × aux_loss`` divided by the accumulation steps, all three only when
``trainer.model_accepts_loss_kwargs`` (Trainer's rule: else the loss is a per-micro-batch mean
that ``training_step`` divides by the accumulation steps itself) (TRL's own label-smoothing
path adds no router loss; its nll path does, and so does this one). ``evaluate()`` goes through
the same function (TRL's ``prediction_step`` calls ``compute_loss``); ``return_outputs=True``
(``compute_metrics``) recomputes the logits, as TRL does.

What it leaves alone. With ε = 0, a ``loss_type`` other than ``"nll"`` (TRL ignores the smoothing
there) or a ``compute_loss_func``, TRL's own path is kept: ``patch_sft_trainer`` changes nothing.
TRL's ``fused_lm_head=True`` protocol keeps its meaning on the patched model: such calls reach
TRL's own head (``apply_fused_ls`` hands them to the forward the instance had), so ``log_probs``
stay true log-probabilities for DPO, GRPO, KTO and RLOO.
"""

from __future__ import annotations

import types
import warnings

import torch
from trl import SFTTrainer

from ._heads import peft_base
from ._patch import FusedLSHead, patch_trainer_model

__all__ = ["patch_sft_trainer"]

_NOT_REACHED = "fused_ls: the model's forward did not reach the fused loss"


def patch_sft_trainer(trainer: SFTTrainer, **options) -> SFTTrainer:
    """Make an ``SFTTrainer`` with ``label_smoothing_factor > 0`` train through the fused head in
    one forward per micro-batch (module docstring); a no-op where TRL's own path applies.

    Args:
        trainer: a TRL ``SFTTrainer`` (or subclass), after ``__init__`` and before ``train()``.
        **options: keywords of ``linear_label_smoothing_cross_entropy`` (``apply_fused_ls``).
    """
    args = trainer.args
    eps = args.label_smoothing_factor
    if eps == 0 or args.loss_type != "nll" or trainer.compute_loss_func is not None:
        return trainer
    pc = trainer.accelerator.parallelism_config
    if pc is not None and pc.sp_enabled:
        raise ValueError("fused_ls: SFTTrainer with sequence parallelism is not supported")
    patch_trainer_model(trainer, **options)
    trainer.compute_loss = types.MethodType(_compute_loss, trainer)
    return trainer


def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``SFTTrainer.compute_loss`` for ε > 0: one fused forward, loss and metrics."""
    mode = "train" if self.model.training else "eval"
    inputs["use_cache"] = False
    if self.aux_loss_enabled:
        inputs["output_router_logits"] = True
    # the patch's state as the model holds it now (it may have been reverted and applied again)
    state = vars(peft_base(self.accelerator.unwrap_model(model))).get("fused_ls")
    if not isinstance(state, FusedLSHead):
        raise RuntimeError(_NOT_REACHED)
    # Trainer's rule (compute_loss, training_step): the loss is normalised by num_items_in_batch
    # only when the model takes loss kwargs; otherwise it is a per-micro-batch mean, which
    # training_step divides by the accumulation steps itself
    scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
    call = dict(inputs)
    if scaled:
        call["num_items_in_batch"] = num_items_in_batch
    state.capturing, state.captured = True, None
    try:
        outputs = model(**call)
    finally:
        state.capturing = False
    if state.captured is None:
        raise RuntimeError(_NOT_REACHED)
    loss, stats, target, ignore_index = state.captured
    state.captured = None

    # TRL's nll path: scaled by the processes when tokens are averaged across them; the MoE
    # router loss, averaged over the accumulation steps
    if self.args.average_tokens_across_devices and scaled:
        loss = loss * (self.accelerator.num_processes // self.get_tp_size())
    if self.aux_loss_enabled:
        steps = self.current_gradient_accumulation_steps if scaled else 1
        loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps

    # the metrics from the row statistics of the same pass, over the counted tokens
    counted = target != ignore_index
    gather = self.accelerator.gather_for_metrics
    num_valid = gather(counted.sum()).sum()
    entropy_sum = gather(torch.where(counted, stats.entropy, 0).sum()).sum()
    num_correct = gather((counted & (stats.prediction == target)).sum()).sum()
    metrics = self._metrics[mode]
    metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
    metrics["mean_token_accuracy"].append(
        (num_correct / num_valid).item() if num_valid > 0 else 0.0
    )

    if mode == "train":
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:  # padding-free: one row of real tokens
            local = torch.tensor(
                inputs["position_ids"].size(1), device=inputs["position_ids"].device
            )
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        self._total_train_tokens += gather(local).sum().item() // self._tp_size
    metrics["num_tokens"] = [self._total_train_tokens]
    if self.aux_loss_enabled:
        metrics["aux_loss"].append(gather(outputs.aux_loss).mean().item())

    if return_outputs:  # compute_metrics wants the logits: one more forward, as TRL does
        warnings.warn(
            "fused_ls: return_outputs=True recomputes the logits with an extra forward pass",
            stacklevel=2,
        )
        with torch.no_grad():
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return loss, outputs
    return loss
