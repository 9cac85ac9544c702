"""The LM head at call time: which weight it holds, who gathers it, and where the fused loss runs.

``head_loss`` computes ``linear_label_smoothing_cross_entropy`` of the (scaled) hidden states and
the head's weight, for the head module the model's forward names (``self.lm_head``), whatever
holds that weight:

- a plain ``nn.Linear``;
- FSDP2 (``fully_shard``): with ``lm_head`` in the root unit its weight is already gathered when
  the model's forward runs; as its own unit its weight is a ``Shard(0)`` DTensor outside its call;
- DeepSpeed ZeRO-3: the weight is empty (``numel() == 0``) outside its module's call;
- accelerate's ``AlignDevicesHook`` (offload, device maps): the weight lives elsewhere (meta, CPU)
  outside the call;
- transformers' tensor-parallel plan (``colwise_gather_output``): a ``Shard(0)`` DTensor whose
  output hook all-gathers the logits;
- PEFT: ``ModulesToSaveWrapper`` (the active copy) and LoRA (``lora.Linear``).

Hooked heads. The fused loss runs *inside the head module's own call*: for the duration of one
call the module's ``forward`` (accelerate: ``_old_forward``, which its wrapper calls) is replaced
by a function of the hidden states that returns the loss. The frameworks' hooks therefore fire as
for the logits: FSDP2's and ZeRO-3's pre-forward all-gather the weight once per step (never once
per chunk), their post-forward hooks register the pre-backward re-gather on the output (now the
loss), and the input's post-backward hook (reduce-scatter of the weight gradient) fires when the
hidden states' gradient leaves the loss's backward, after the weight gradient was accumulated into
the gathered parameter. Accelerate's hook moves the weight to the execution device the same way.

Tensor parallelism. Running inside the call would all-gather the logits (the plan's output hook)
and hand back a "logits" DTensor; instead the loss runs on this rank's rows of the weight
(``DTensor.to_local``, differentiable: the gradient arrives as a ``Shard(0)`` DTensor) through
the vocabulary-parallel path (``fused_ls.VocabShard(group, start, V)`` from the DTensor's mesh and
placement): two small collectives per call, no all-gather of the weight or of the logits; the
input gradient is summed over the group in the backward (what the plan's ``Replicate`` input
layout does for the logits). The backbone's hooks are untouched.

LoRA. PEFT's ``lora.Linear`` computes ``z = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` per active adapter. The
low-rank term is extra input columns: ``z = [x, s·drop(x)·Aᵀ]·[W, B]ᵀ + b`` (``A`` [r, H], ``B``
[V, r]): one fused call with ``H + r`` columns whose autograd gives the exact gradients of ``W``,
``b``, ``A`` (through ``lora_A``'s own call and the dropout module, in training the same random
draw as PEFT's) and ``B``. The price is one [V, H + r] copy of the weight per call. Merged
adapters are the base weight; DoRA and other variants, a LoRA bias, mixed dtypes and other adapter
types on the head are refused.

Autocast. Under ``torch.autocast`` the head's ``F.linear`` runs in the autocast dtype; the fused
call gets the hidden states, weight and bias cast to it (what autocast casts) and runs with
autocast off (its GEMMs accumulate in fp32 and the loss is fp32, as ``ForCausalLMLoss`` upcasts).
"""

from __future__ import annotations

import sys
import types
from typing import NamedTuple

import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

import fused_ls

try:  # torch.distributed is optional in torch builds
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    FSDPModule = DTensor = Shard = compute_local_shape_and_global_offset = ()


class UnsupportedModelError(ValueError):
    """The model's head or loss cannot be reproduced exactly by the fused loss; nothing patched
    (or, raised at call time: nothing computed)."""


def refuse(who, why: str) -> UnsupportedModelError:
    name = who.__name__ if isinstance(who, type) else type(who).__name__
    return UnsupportedModelError(
        f"fused_ls cannot patch {name}: {why}. The fused loss reproduces only the causal-LM head "
        "(backbone -> last hidden state -> output embeddings -> optional constant scale -> "
        "optional final soft cap -> ForCausalLMLoss, plus what the forward adds to that loss); "
        "it refuses rather than compute a different loss."
    )


# ---- which module computes the logits ----------------------------------------------------------


def _peft_type(name: str):
    """A PEFT class by dotted name, only if PEFT is already imported (a PEFT layer cannot exist
    otherwise): this module never imports PEFT."""
    if "peft" not in sys.modules:
        return None
    mod_name, _, attr = name.rpartition(".")
    mod = sys.modules.get(mod_name)
    return getattr(mod, attr, None) if mod is not None else None


def peft_base(model: nn.Module) -> nn.Module:
    """The model whose forward computes the logits, as transformers' ``unwrap_peft_model`` finds
    it: a PEFT ``PeftModel``'s ``get_base_model()``, a ``PeftMixedModel``'s ``base_model.model``
    (it has no ``get_base_model``; PEFT's forwards reach it through ``base_model.model.forward``
    in both), else the model itself. PEFT is not imported (a PEFT model cannot exist without
    it)."""
    wrappers = tuple(
        t for t in map(_peft_type, ("peft.PeftModel", "peft.PeftMixedModel")) if t is not None
    )
    if not wrappers or not isinstance(model, wrappers):
        return model
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model.base_model.model


def active_module(owner, head: nn.Module) -> nn.Module:
    """The module whose call computes the logits: PEFT's ``ModulesToSaveWrapper`` forwards to the
    active adapter's copy (or the original when adapters are off), as its forward does."""
    wrapper = _peft_type("peft.utils.other.AuxiliaryTrainingWrapper")
    if wrapper is None or not isinstance(head, wrapper):
        return head
    mts = _peft_type("peft.utils.other.ModulesToSaveWrapper")
    if mts is None or not isinstance(head, mts):
        raise refuse(owner, f"its output embeddings are wrapped by PEFT's {type(head).__name__}")
    active = list(head.active_adapters)
    if head.disable_adapters or not active or any(a not in head._adapters for a in active):
        return active_module(owner, head.original_module)
    return active_module(owner, head.modules_to_save[active[0]])


def _lora_terms(owner, head) -> list | None:
    """For a PEFT ``lora.Linear`` head: [(lora_A, lora_B, dropout, scaling)] of the active,
    unmerged adapters (PEFT's forward order); None when ``head`` is not a LoRA layer."""
    lora_layer = _peft_type("peft.tuners.lora.layer.LoraLayer")
    tuner_layer = _peft_type("peft.tuners.tuners_utils.BaseTunerLayer")
    if lora_layer is None or not isinstance(head, lora_layer):
        if tuner_layer is not None and isinstance(head, tuner_layer):
            raise refuse(
                owner,
                f"its output embeddings carry a PEFT {type(head).__name__} adapter (only LoRA "
                "and modules_to_save are reproduced on the head)",
            )
        return None
    lora_linear = _peft_type("peft.tuners.lora.layer.Linear")
    if type(head) is not lora_linear:
        raise refuse(owner, f"its output embeddings are a PEFT {type(head).__name__}")
    if head.disable_adapters:
        if head.merged:  # PEFT's forward would unmerge the weight first (a side effect)
            raise refuse(owner, "its LoRA head is merged while adapters are disabled")
        return []
    if head.merged:
        return []
    terms = []
    for name in head.active_adapters:
        if name not in head.lora_A.keys():
            continue
        if name in getattr(head, "lora_variant", {}) or head.use_dora.get(name, False):
            raise refuse(owner, f"its LoRA head uses a variant (DoRA or other) for {name!r}")
        A, B = head.lora_A[name], head.lora_B[name]
        if B.bias is not None:
            raise refuse(owner, f"its LoRA head has a bias on lora_B ({name!r})")
        base_dtype = head.base_layer.weight.dtype
        if A.weight.dtype != base_dtype:
            raise refuse(owner, f"its LoRA weights are {A.weight.dtype}, the head {base_dtype}")
        terms.append((A, B, head.lora_dropout[name], head.scaling[name]))
    return terms


def check_module(owner, module: nn.Module, name: str = "lm_head") -> None:
    """Refuse a head we cannot reproduce: not an ``nn.Linear`` computation (a transform before
    the output projection, a quantised layer), or hooks we do not know to be gathers (FSDP2,
    ZeRO-3, accelerate, the tensor-parallel plan). ``name``: the model's attribute, for the
    message."""
    if type(module).forward is not nn.Linear.forward:
        raise refuse(owner, f"its {name} is a {type(module).__name__}, not a plain nn.Linear")
    tp = _tp_weight(module) is not None
    accel = hasattr(module, "_hf_hook") and "_old_forward" in vars(module)
    if "forward" in vars(module) and not (tp or accel):
        raise refuse(owner, f"its {name} has an instance-level forward of unknown origin")
    known = isinstance(module, FSDPModule) or _is_zero3(module)
    if (module._forward_hooks or module._forward_pre_hooks) and not known:
        raise refuse(
            owner,
            f"its {name} has forward hooks that are not FSDP2's or DeepSpeed ZeRO-3's "
            "(the fused loss would bypass what they do to the logits)",
        )


def _is_zero3(module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=False))


def _tp_weight(module):
    """The weight when the head is sharded by transformers' tensor-parallel plan, else None."""
    w = getattr(module, "weight", None)
    if not (DTensor and isinstance(w, DTensor)) or isinstance(module, FSDPModule):
        return None
    return w if getattr(module, "_is_hooked", False) else None


class Head(NamedTuple):
    """The head as ``resolve_head`` finds it at one moment: the model's attribute ``name`` and
    the module it holds (``attr``); the module whose call computes the logits (``module``: PEFT's
    active copy, maybe a LoRA layer); the ``nn.Linear`` that holds the weight (``base``); the LoRA
    terms (None: not a LoRA layer; [] merged or disabled)."""

    name: str
    attr: nn.Module
    module: nn.Module
    base: nn.Module
    terms: list | None

    @property
    def rows(self) -> int:
        """The number of output rows (V), whoever shards the weight."""
        w = self.base.weight
        return int(getattr(w, "ds_shape", w.shape)[0])


def resolve_head(owner, name: str, attr: nn.Module) -> Head:
    """The head module ``attr`` (``owner``'s attribute ``name``) resolved and checked: PEFT's
    active copy (``active_module``), its LoRA terms, the base ``nn.Linear`` (``check_module``);
    ``UnsupportedModelError`` for a head that cannot be reproduced."""
    module = active_module(owner, attr)
    terms = _lora_terms(owner, module)
    base = module.base_layer if terms is not None else module
    check_module(owner, base, name)
    return Head(name, attr, module, base, terms)


def check_loss(owner, head: Head | None = None, vocab_size=..., source: str | None = None):
    """Refuse a loss the fused call does not reproduce: a ``loss_function`` other than
    ``ForCausalLMLoss``, or a head (named by its attribute, e.g. ``lm_head``, ``embed_out``)
    whose rows differ from the loss's ``vocab_size`` (``...``: not known, when patching a forward
    whose ``vocab_size`` is not an attribute of the model). ``source``: the forward's expression
    for ``vocab_size``, for the message."""
    if owner.loss_function is not ForCausalLMLoss:
        raise refuse(owner, f"its loss_function is {owner.loss_function!r}, not ForCausalLMLoss")
    if vocab_size is ...:
        return
    rows = head.rows
    if rows != vocab_size:
        where = f" ({source})" if source else ""
        raise refuse(
            owner,
            f"its {head.name} has {rows} rows but the loss's vocab_size{where} is {vocab_size}",
        )


# ---- the fused call ----------------------------------------------------------------------------


def _scaled(x, ops):
    """x with the logits' constant factors applied in the model's order: z = (s·x)·Wᵀ."""
    for op, e in ops:
        if torch.is_tensor(e) and e.numel() != 1:
            raise UnsupportedModelError(
                f"fused_ls: the logits are scaled by a tensor of shape {tuple(e.shape)}, not a "
                "scalar"
            )
        x = x * e if op == "mul" else x / e
    return x


def _autocast_dtype(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _fused(x, weight, bias, target, smoothing, kwargs):
    """One fused call, in the autocast dtype when autocast is on (as F.linear would cast)."""
    dt = _autocast_dtype(x.device.type)
    if dt is None:
        return fused_ls.linear_label_smoothing_cross_entropy(
            x, weight, target, smoothing, linear_bias=bias, **kwargs
        )
    x, weight = x.to(dt), weight.to(dt)
    bias = bias.to(dt) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return fused_ls.linear_label_smoothing_cross_entropy(
            x, weight, target, smoothing, linear_bias=bias, **kwargs
        )


def _in_module_call(module: nn.Module, fn, *args):
    """``module(*args)`` with ``fn`` as its forward for this one call: every hook of the module
    (FSDP2, ZeRO-3, accelerate) fires around ``fn``."""
    attr = "_old_forward" if "_old_forward" in vars(module) else "forward"
    saved = vars(module).get(attr)
    setattr(module, attr, types.MethodType(fn, module))
    try:
        return module(*args)
    finally:
        if saved is None:
            delattr(module, attr)
        else:
            setattr(module, attr, saved)


def head_loss(owner, head: Head, hidden, ops, cap, target, smoothing, options: dict, want_stats):
    """The loss of the logits ``cap·tanh(((s·hidden)·Wᵀ + s·b) / cap)`` against ``target``.

    Args:
        owner: the model (for messages).
        head: the head the forward calls for the logits, as ``resolve_head`` found it.
        hidden: [..., H] hidden states (as the forward passes them to the head).
        ops: [("mul" | "div", factor)], the constant factors of the logits in order.
        cap: the final soft cap or None.
        target: [N] class indices (N = hidden's rows).
        smoothing, options: ε and keywords of ``linear_label_smoothing_cross_entropy``
            (``ignore_index``, ``reduction``, ...).
        want_stats: also return ``Stats``.

    Returns:
        (loss, Stats or None).
    """
    module, base, terms = head.module, head.base, head.terms
    x = hidden.reshape(-1, hidden.shape[-1])
    kwargs = dict(options, return_stats=want_stats)
    if cap is not None:
        kwargs["softcap"] = cap

    if terms:  # LoRA: [x, s·drop(x)·Aᵀ] against [W, B]
        if _is_zero3(module) or isinstance(base, FSDPModule) or _tp_weight(base) is not None:
            raise refuse(owner, "a LoRA head under ZeRO-3, FSDP2 or tensor parallelism")
        cols = [x] + [A(drop(x)) * s for A, _, drop, s in terms]
        x = torch.cat(cols, dim=-1)
    x = _scaled(x, ops)

    def bias_of(m):
        return _scaled(m.bias, ops) if m.bias is not None else None

    tp_w = _tp_weight(base)
    if tp_w is not None:  # the tensor-parallel plan: this rank's rows, the vocabulary-parallel path
        if "process_group" in options:
            raise TypeError("process_group= is set by the tensor-parallel plan of this model")
        mesh, placements = tp_w.device_mesh, tuple(tp_w.placements)
        if mesh.ndim != 1 or placements != (Shard(0),):
            raise refuse(owner, f"its {head.name} weight is a DTensor with placements {placements}")
        _, offset = compute_local_shape_and_global_offset(tp_w.shape, mesh, placements)
        kwargs["process_group"] = fused_ls.VocabShard(mesh.get_group(), offset[0], tp_w.shape[0])
        bias = base.bias
        if bias is not None:
            bias = _scaled(bias.to_local() if isinstance(bias, DTensor) else bias, ops)
        if isinstance(x, DTensor):
            x = x.to_local()
        out = _fused(x, tp_w.to_local(), bias, target, smoothing, kwargs)
        return out if want_stats else (out, None)

    box = []

    def forward(m, inp):
        # inside the module's call: the weight as its hooks left it (gathered, on device)
        w = m.weight
        if DTensor and isinstance(w, DTensor):
            why = f"its {head.name} weight is a DTensor {w.placements} inside its call"
            raise refuse(owner, why)
        if terms:
            w = torch.cat([w] + [B.weight for _, B, _, _ in terms], dim=1)
        out = _fused(inp, w, bias_of(m), target, smoothing, kwargs)
        loss, stats = out if want_stats else (out, None)
        box.append(stats)
        return loss

    loss = _in_module_call(base, forward, x)
    return loss, box[0]


__all__ = [
    "Head",
    "UnsupportedModelError",
    "active_module",
    "check_loss",
    "check_module",
    "head_loss",
    "peft_base",
    "resolve_head",
]
