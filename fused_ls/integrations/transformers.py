"""Hugging Face transformers (5.x): causal-LM training with fused label smoothing and no logits.

    from fused_ls.integrations.transformers import FusedLSTrainer, apply_fused_ls

    apply_fused_ls(model, smoothing=0.1)      # a *ForCausalLM instance; revert_fused_ls(model)
    trainer = FusedLSTrainer(model=model, args=TrainingArguments(label_smoothing_factor=0.1), ...)
    patch_trainer(trainer)                    # or: an existing Trainer (or a subclass, e.g. TRL's)

What the patch does. ``LlamaForCausalLM.forward`` (and its siblings) run the base model, project
the last hidden states with ``lm_head`` into [B, T, V] logits, optionally soft-cap them (Gemma2/3)
and hand them to ``self.loss_function`` (``ForCausalLMLoss``). There is no hook that skips the
logits, so ``apply_fused_ls`` replaces the *instance's* ``forward``: with labels it runs the same
base model and computes the loss as ONE call of ``fused_ls.linear_label_smoothing_cross_entropy``
on the hidden states and the head's weight (and bias), without building the logits; in training
``outputs.logits`` is None. Without labels the original forward runs unchanged (generation,
inference). In eval mode with labels the usual logits come back and ``outputs.loss`` is the same
smoothed loss as in training (what Trainer's evaluation reports with ``label_smoothing_factor``).

Semantics are ``ForCausalLMLoss``'s: the labels are shifted by padding them with ``ignore_index``
(-100) on the right (or ``shift_labels`` is used as given), ``logits_to_keep`` slices the hidden
states as the model does, and the loss is the sum divided by ``num_items_in_batch`` when it is
passed (Trainer does, for gradient accumulation and token averaging across devices), else the
mean over counted tokens. With ε = 0 the loss is the model's own loss.

Which models. The class's ``forward`` source is read once (``ast``) and must be exactly the standard
causal-LM head: ``self.model(...)`` with every argument passed through, ``lm_head`` on the
(``logits_to_keep``-sliced) last hidden state, optionally Gemma's ``final_logit_softcapping``
(mapped to ``softcap``), ``self.loss_function(...)`` and the usual output class. Llama, Mistral,
Qwen2, Qwen3, Gemma, Gemma2 and Gemma3 (text) qualify, and so does any model written the same way.
Anything else is refused with an error naming the statement we cannot reproduce: logit scaling
(Cohere, Granite), MoE router auxiliary losses (Mixtral, Qwen3-MoE: the patch would drop them),
extra inputs the forward uses itself. The instance must also have a plain ``nn.Linear`` head
(not a LoRA/quantised layer, no forward hooks: DeepSpeed ZeRO-3, accelerate offload), no
tensor-parallel sharding, and ``ForCausalLMLoss`` as its loss function; these are checked when
patching and again on every fused call (hooks may be added after patching).

Trainer. ``label_smoothing_factor > 0`` makes Trainer pop the labels, let the model build the
logits and run its dense ``LabelSmoother``. ``FusedLSTrainer`` / ``patch_trainer`` patch the
(unwrapped) model with ``args.label_smoothing_factor`` and set ``trainer.label_smoother = None``,
so the labels reach the patched forward. Trainer passes ``num_items_in_batch`` only when
``trainer.model_accepts_loss_kwargs``; the patched model sets ``accepts_loss_kwargs = True`` (the
attribute Trainer reads first), and ``patch_trainer`` recomputes the flag because Trainer decided it
in ``__init__`` from the unpatched model.

Transformers is imported by this module only; ``import fused_ls`` does not import it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer_utils import unwrap_peft_model

import fused_ls
from fused_ls._options import HEAD_KEYWORDS, keyword_values, takes_keywords

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


class UnsupportedModelError(ValueError):
    """The model's head or loss cannot be reproduced exactly by the fused loss; nothing patched."""


# ----------------------------------------------------------------------------------------------
# Reading the class's forward: is it the standard causal-LM head?
# ----------------------------------------------------------------------------------------------


def _dumps(src: str) -> list[str]:
    return [ast.dump(s) for s in ast.parse(textwrap.dedent(src)).body]


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _keep_positions(hidden_states, logits_to_keep):
    # transformers 5.0 - 5.x: `hidden_states[:, slice_indices, :]` written inline in the forward
    idx = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, idx, :]


# The accepted statement sequences between the base-model call and the return. The value says how
# the hidden states are sliced: a name looked up in the model's module, or our copy of the inline
# form.
_SLICE_FORMS = [
    (
        _dumps("""
            hidden_states = outputs.last_hidden_state
            hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
            logits = self.lm_head(hidden_states)
        """),
        "slice_logits_to_keep",
    ),
    (
        _dumps("""
            hidden_states = outputs.last_hidden_state
            slice_indices = (
                slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            )
            logits = self.lm_head(hidden_states[:, slice_indices, :])
        """),
        _keep_positions,
    ),
]
_SOFTCAP = _dumps("""
    if self.config.final_logit_softcapping is not None:
        logits = logits / self.config.final_logit_softcapping
        logits = torch.tanh(logits)
        logits = logits * self.config.final_logit_softcapping
""")
_LOSS_FORMS = [
    _dumps(f"""
        loss = None
        if labels is not None:
            loss = self.loss_function({args}, **kwargs)
    """)
    for args in (
        "logits=logits, labels=labels, vocab_size=self.config.vocab_size",
        "logits, labels, self.vocab_size",
        "logits=logits, labels=labels, vocab_size=self.vocab_size",
        "logits, labels, self.config.vocab_size",
    )
]
# decorators of the standard forward; those that act at call time are re-applied to ours
_DECORATORS = {"deprecate_kwarg": True, "can_return_tuple": True, "auto_docstring": False}


@dataclass(frozen=True)
class _HeadSpec:
    """What the class's forward does, read from its source."""

    signature: inspect.Signature  # of the undecorated forward
    to_base: tuple[str, ...]  # parameters passed as `name=name` to self.model(...)
    slicing: Any  # (hidden_states, logits_to_keep) -> sliced hidden states
    softcap: bool  # the head applies config.final_logit_softcapping
    output_cls: type  # e.g. CausalLMOutputWithPast
    passthrough: tuple[tuple[str, str], ...]  # output field <- attribute of the base outputs
    decorators: tuple  # re-applied to the fused forward, outermost first


def _refuse(cls, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"fused_ls cannot patch {cls.__name__}: {why}. The fused loss reproduces only the standard "
        "causal-LM head (base model -> lm_head -> optional final_logit_softcapping -> "
        "ForCausalLMLoss); it refuses rather than patch a different head wrongly."
    )


def _unexpected(cls, stmt) -> UnsupportedModelError:
    text = ast.unparse(stmt).splitlines()[0]
    hint = ""
    if "router" in text or "aux_loss" in text:
        hint = " (a mixture-of-experts router auxiliary loss, which the patch would drop)"
    elif "scal" in text:
        hint = " (logit scaling)"
    return _refuse(cls, f"its forward does `{text}`{hint}, which is not part of the standard head")


@functools.cache
def _read_forward(cls) -> _HeadSpec:
    func = getattr(cls, "forward", None)
    raw = inspect.unwrap(func) if func is not None else None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(raw)))
    except (OSError, TypeError) as e:  # no source (e.g. compiled) or no forward
        raise _refuse(cls, f"the source of its forward is not readable ({e})") from None
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise _refuse(cls, "its forward is not a plain function")

    sig = inspect.signature(raw)
    params = list(sig.parameters.values())
    var_kw = [p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    named = [p.name for p in params[1:] if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    if var_kw != ["kwargs"] or "labels" not in named or "logits_to_keep" not in named:
        raise _refuse(cls, f"its forward signature {sig} is not the causal-LM one")
    if len(named) + 2 != len(params):
        raise _refuse(cls, f"its forward signature {sig} has *args or keyword-only parameters")

    decorators = []
    for dec in fdef.decorator_list:
        name = dec.func if isinstance(dec, ast.Call) else dec
        name = name.id if isinstance(name, ast.Name) else ast.unparse(name)
        if name not in _DECORATORS:
            raise _refuse(cls, f"its forward has the decorator @{ast.unparse(dec)}")
        if isinstance(dec, ast.Call) and not all(
            isinstance(a, ast.Constant) for a in [*dec.args, *(k.value for k in dec.keywords)]
        ):
            raise _refuse(cls, f"its forward has the decorator @{ast.unparse(dec)}")
        if _DECORATORS[name]:  # the same decorator object, evaluated where the class defined it
            code = compile(ast.Expression(dec), "<decorator>", "eval")
            decorators.append(eval(code, raw.__globals__))

    body = list(fdef.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # docstring
    if not body:
        raise _refuse(cls, "its forward is empty")

    # 1. outputs = self.model(name=name for every parameter but labels/logits_to_keep, **kwargs)
    first = body.pop(0)
    call = first.value if isinstance(first, (ast.Assign, ast.AnnAssign)) else None
    target = (first.targets[0] if isinstance(first, ast.Assign) else first.target) if call else None
    if not (
        isinstance(target, ast.Name)
        and target.id == "outputs"
        and isinstance(call, ast.Call)
        and ast.unparse(call.func) == "self.model"
        and not call.args
    ):
        raise _unexpected(cls, first)
    to_base, star = [], []
    for kw in call.keywords:
        if kw.arg is None:
            star.append(ast.unparse(kw.value))
        elif isinstance(kw.value, ast.Name) and kw.value.id == kw.arg:
            to_base.append(kw.arg)
        else:
            raise _refuse(cls, f"it calls the base model with `{kw.arg}={ast.unparse(kw.value)}`")
    if star != ["kwargs"] or sorted(to_base) != sorted(set(named) - {"labels", "logits_to_keep"}):
        raise _refuse(cls, f"it calls the base model as `{ast.unparse(call)}`")

    # 2. hidden states -> (sliced) -> lm_head
    dumps = [ast.dump(s) for s in body]

    def take(forms, required=True):
        """Consume the first of `forms` that starts the body; return its index (None if none
        does and it is optional, else refuse, naming the statement where the closest differs)."""
        for i, form in enumerate(forms):
            if dumps[: len(form)] == form:
                del dumps[: len(form)], body[: len(form)]
                return i
        if not required:
            return None
        same = max(_common_prefix(form, dumps) for form in forms)
        if same == len(body):
            raise _refuse(cls, "its forward ends before the standard head does")
        raise _unexpected(cls, body[same])

    slicing = _SLICE_FORMS[take([form for form, _ in _SLICE_FORMS])][1]
    if isinstance(slicing, str):
        slicing = raw.__globals__[slicing]
    # 3. optional soft-capping
    softcap = take([_SOFTCAP], required=False) is not None
    # 4. the loss
    take(_LOSS_FORMS)
    stmts = body
    # 5. return OutputClass(loss=loss, logits=logits, field=outputs.field, ...)
    ret = stmts[0] if len(stmts) == 1 else None
    if len(stmts) > 1:
        raise _unexpected(cls, stmts[0])
    value = ret.value if isinstance(ret, ast.Return) else None
    if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and not value.args):
        raise _unexpected(cls, ret) if ret is not None else _refuse(cls, "it returns nothing")
    fields, passthrough = {}, []
    for kw in value.keywords:
        src = ast.unparse(kw.value)
        fields[kw.arg] = src
        if kw.arg not in ("loss", "logits"):
            if not (isinstance(kw.value, ast.Attribute) and src == f"outputs.{kw.value.attr}"):
                raise _refuse(cls, f"it returns `{kw.arg}={src}`")
            passthrough.append((kw.arg, kw.value.attr))
    if fields.get("loss") != "loss" or fields.get("logits") != "logits":
        raise _refuse(cls, f"it returns `{ast.unparse(value)}`")

    return _HeadSpec(
        signature=sig,
        to_base=tuple(to_base),
        slicing=slicing,
        softcap=softcap,
        output_cls=raw.__globals__[value.func.id],
        passthrough=tuple(passthrough),
        decorators=tuple(decorators),
    )


# ----------------------------------------------------------------------------------------------
# The instance: head, loss function, parallelism
# ----------------------------------------------------------------------------------------------


def _check_instance(model: nn.Module) -> nn.Linear:
    """The per-instance conditions, cheap enough to re-check on every fused call."""
    cls = type(model)
    head = getattr(model, "lm_head", None)
    if not isinstance(getattr(model, "model", None), nn.Module) or not isinstance(head, nn.Module):
        raise _refuse(cls, "it has no base `model` and `lm_head` submodules")
    if type(head).forward is not nn.Linear.forward or "forward" in vars(head):
        # LoRA / quantised linears compute something else than F.linear(x, weight, bias), and an
        # instance-level forward is accelerate's hook wrapper (offloading, device maps)
        raise _refuse(cls, f"its lm_head is a {type(head).__name__}, not a plain nn.Linear")
    if head._forward_hooks or head._forward_pre_hooks:
        raise _refuse(
            cls,
            "its lm_head has forward hooks (DeepSpeed ZeRO-3, FSDP or tensor-parallel sharding "
            "gather or split the head in hooks, which the fused loss would bypass)",
        )
    if (getattr(model, "tp_size", None) or 1) > 1 or type(head.weight).__name__ == "DTensor":
        raise _refuse(cls, "its head is sharded by a tensor-parallel plan")
    if model.loss_function is not ForCausalLMLoss:
        raise _refuse(cls, f"its loss_function is {model.loss_function!r}, not ForCausalLMLoss")
    if head.weight.shape[0] != model.config.vocab_size:
        raise _refuse(
            cls,
            f"its lm_head has {head.weight.shape[0]} rows but config.vocab_size is "
            f"{model.config.vocab_size}",
        )
    return head


# ----------------------------------------------------------------------------------------------
# The patched forward
# ----------------------------------------------------------------------------------------------


class FusedLSHead:
    """The patch's state, at ``model.fused_ls``: ``smoothing`` (may be changed between steps, e.g.
    by ``fused_ls.SmoothingScheduler(model.fused_ls, ...)``) and ``options`` (keywords of
    ``linear_label_smoothing_cross_entropy``)."""

    def __init__(self, smoothing, options: dict, spec: _HeadSpec, original, accepts_loss_kwargs):
        self.smoothing = smoothing
        self.options = options
        self._spec = spec
        self._original = original  # the class's (decorated) forward
        self._accepts_loss_kwargs = accepts_loss_kwargs  # the instance's own attribute, if any
        # the fused forward with the original's call-time decorators (kwarg renames, return_dict)
        self._fused = functools.reduce(lambda f, d: d(f), reversed(spec.decorators), _fused_forward)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"FusedLSHead(smoothing={self.smoothing!r}{opts})"


def _dispatch(self, *args, **kwargs):
    """The instance's forward: fused loss when labels are given, else the original forward."""
    state: FusedLSHead = self.fused_ls
    labels = state._spec.signature.bind(self, *args, **kwargs).arguments.get("labels")
    if labels is None:
        return state._original(self, *args, **kwargs)
    return state._fused(self, *args, **kwargs)


def _fused_forward(self, *args, **kwargs):
    state: FusedLSHead = self.fused_ls
    spec = state._spec
    bound = spec.signature.bind(self, *args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    kwargs = arguments["kwargs"]
    head = _check_instance(self)
    outputs = self.model(**{name: arguments[name] for name in spec.to_base}, **kwargs)
    hidden_states = spec.slicing(outputs.last_hidden_state, arguments["logits_to_keep"])
    cap = self.config.final_logit_softcapping if spec.softcap else None

    logits = None
    if not self.training:  # eval with labels: the usual logits, exactly as the model computes them
        logits = head(hidden_states)
        if cap is not None:
            logits = logits / cap
            logits = torch.tanh(logits)
            logits = logits * cap

    # ForCausalLMLoss: pad the labels with ignore_index on the right and drop the first column,
    # unless shift_labels is given; sum / num_items_in_batch when given, else the mean
    ignore_index = kwargs.get("ignore_index", -100)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        labels = F.pad(arguments["labels"], (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    num_items = kwargs.get("num_items_in_batch")
    options = state.options if cap is None else {**state.options, "softcap": cap}
    loss = fused_ls.linear_label_smoothing_cross_entropy(
        hidden_states.reshape(-1, hidden_states.shape[-1]),
        head.weight,
        shift_labels.reshape(-1).to(hidden_states.device),
        state.smoothing,
        linear_bias=head.bias,
        ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum",
        **options,
    )
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    fields = {name: getattr(outputs, attr) for name, attr in spec.passthrough}
    return spec.output_cls(loss=loss, logits=logits, **fields)


@takes_keywords(_OPTIONS)
def apply_fused_ls(model: nn.Module, smoothing: float = 0.1, **options) -> nn.Module:
    """Patch a causal LM instance so that its loss is fused label-smoothed cross-entropy on the
    final hidden states and the head's weight, without building the logits.

    Args:
        model: a ``*ForCausalLM`` with the standard head (see the module docstring); refused with
            ``UnsupportedModelError`` (nothing patched) otherwise.
        smoothing: ε (Trainer: ``args.label_smoothing_factor``); ``model.fused_ls.smoothing`` may
            be changed later.
        **options: keywords of ``fused_ls.linear_label_smoothing_cross_entropy`` (``weight``,
            ``similarity``, ``similarity_mix``, ``adaptive``, ``z_loss``, ``softcap``,
            ``confidence_penalty``, ``chunk_size``, ``backend``, ``process_group``, ...), passed
            through unchanged and validated by one call on a single row now. ``softcap`` is
            taken from ``config.final_logit_softcapping`` on models that soft-cap.

    Returns:
        the model (patched in place). Applying again replaces ε and the options.
    """
    if isinstance(getattr(model, "fused_ls", None), FusedLSHead):
        revert_fused_ls(model)
    spec = _read_forward(type(model))
    head = _check_instance(model)
    clash = {k: why for k, why in _RESERVED.items() if k in options}
    if spec.softcap and "softcap" in options:
        clash["softcap"] = "this model soft-caps its logits itself (config.final_logit_softcapping)"
    if clash:
        raise TypeError(
            "apply_fused_ls: these keywords are set by the integration: "
            + "; ".join(f"{k}: {why}" for k, why in clash.items())
        )
    keyword_values(apply_fused_ls, options)  # names it does not take: TypeError
    # validation of ε and the options: the fused function's own, on one row
    with torch.no_grad():
        row = head.weight.new_zeros(1, head.weight.shape[1])
        fused_ls.linear_label_smoothing_cross_entropy(
            row, head.weight, torch.zeros(1, dtype=torch.long, device=row.device), smoothing,
            linear_bias=head.bias, **options,
        )  # fmt: skip

    model.fused_ls = FusedLSHead(
        smoothing, dict(options), spec, type(model).forward, vars(model).get("accepts_loss_kwargs")
    )

    @functools.wraps(type(model).forward)  # the original's signature, **kwargs included
    def forward(self, *args, **kwargs):
        return _dispatch(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)
    # Trainer reads `accepts_loss_kwargs` first to decide whether to pass num_items_in_batch
    model.accepts_loss_kwargs = True
    return model


def revert_fused_ls(model: nn.Module) -> nn.Module:
    """Undo ``apply_fused_ls``: the class's forward serves again. A no-op on an unpatched model."""
    state = vars(model).get("fused_ls")
    if not isinstance(state, FusedLSHead):
        return model
    del model.forward
    del model.fused_ls
    if state._accepts_loss_kwargs is None:
        del model.accepts_loss_kwargs
    else:
        model.accepts_loss_kwargs = state._accepts_loss_kwargs
    return model


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


def patch_trainer(trainer: Trainer, **options) -> Trainer:
    """Make an existing ``Trainer`` (or a subclass) train with the fused loss.

    Patches the unwrapped model with ``trainer.args.label_smoothing_factor`` (0 too: plain
    cross-entropy without logits) and ``options``, switches off Trainer's dense ``LabelSmoother``
    and recomputes ``trainer.model_accepts_loss_kwargs`` (Trainer decided it in ``__init__``
    from the unpatched model). Call it after ``Trainer.__init__`` and before ``train()``; with
    ``model_init`` use ``FusedLSTrainer``, which also patches the models it creates.
    """
    model = unwrap_peft_model(trainer.accelerator.unwrap_model(trainer.model))
    apply_fused_ls(model, trainer.args.label_smoothing_factor, **options)
    trainer.label_smoother = None
    # Trainer's own rule (Trainer.__init__): the model's `accepts_loss_kwargs`, except under
    # DeepSpeed sequence parallelism, which counts its tokens itself
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    sp = pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled
    trainer.model_accepts_loss_kwargs = model.accepts_loss_kwargs and not sp
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
