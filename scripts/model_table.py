"""The compatibility table: every ``*ForCausalLM``, ``*ForConditionalGeneration`` and
``*LMHeadModel`` (GPT-2 and its kin) class of the installed transformers, built from a tiny
config (random weights, offline), patched with ``apply_fused_ls`` and checked, or refused.

Per class the verdict is one of:

- ``exact``: the patched model's loss and every parameter's gradient equal the unpatched model's
  own forward with its ``loss_function`` replaced by the dense smoothed loss
  (``F.cross_entropy(label_smoothing=ε)`` on its logits, ForCausalLMLoss's shift), so whatever
  else the forward adds (MoE router loss) is in the reference too; float64, rtol 1e-6;
- ``refused``: ``apply_fused_ls`` raised ``UnsupportedModelError`` (the reason is listed);
- ``not built``: no tiny model could be built or run unpatched (the reason is listed);
- ``MISMATCH`` / ``ERROR``: the patched model computed something else, or crashed: a bug.

    python scripts/model_table.py                       # all classes -> docs/compatibility.md
    python scripts/model_table.py --only Llama Gemma2   # classes whose name starts with these
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
import types
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers.utils import logging as hf_logging

from fused_ls.integrations._forward import read_forward
from fused_ls.integrations.transformers import UnsupportedModelError, apply_fused_ls

EPS = 0.1
SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")
# Tiny sizes, set on the config and every sub-config that has the attribute. Hidden 32 with 2
# heads of 16 (1 KV head), 2 layers; MoE: 4 experts, 2 per token, and the router loss on.
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_hidden_layers=2,
    num_layers=2,
    n_layer=2,
    n_embd=32,
    n_head=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    num_local_experts=4,
    num_experts=4,
    n_routed_experts=4,
    n_group=1,
    topk_group=1,
    num_experts_per_tok=2,
    output_router_logits=True,
    router_aux_loss_coef=0.05,
    vocab_size=256,
    max_position_embeddings=128,
    initializer_range=0.1,  # logits of a few units: smoothing and caps matter
    # multi-head latent attention (DeepSeek-V3 and kin)
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=16,
    qk_nope_head_dim=8,
    v_head_dim=16,
    # the vision side of VLMs, when present
    depth=1,
    embed_dim=32,
    num_channels=3,
)
B, T = 2, 10


def tiny_config(cfg):
    """The config with every size in TINY it has (recursively in its sub-configs)."""
    for key, value in TINY.items():
        if hasattr(cfg, key) and not isinstance(getattr(cfg, key), (dict, list)):
            try:
                setattr(cfg, key, value)
            except (AttributeError, ValueError, TypeError):
                pass
    for key in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, key, None)
        if isinstance(sub, transformers.PretrainedConfig):
            tiny_config(sub)
    if getattr(cfg, "kv_lora_rank", None) and hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = cfg.num_attention_heads  # latent attention: one K/V per head
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and "vl" in str(getattr(cfg, "model_type", "")):
        rope["mrope_section"] = [2, 3, 3]  # multimodal rope: sums to head_dim / 2
    if hasattr(cfg, "layer_types") and isinstance(cfg.layer_types, list):
        n = getattr(cfg, "num_hidden_layers", None)
        if isinstance(n, int):  # each kind of layer once (hybrid models), then repeated
            kinds = list(dict.fromkeys(cfg.layer_types))
            try:
                cfg.layer_types = (kinds * n)[:n]
            except (AttributeError, ValueError, TypeError):
                pass
    # special tokens inside the tiny vocabulary, above the ids the batch uses
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int):
        top = vocab - 1
        for key in sorted(vars(cfg)):
            value = getattr(cfg, key, None)
            if (key.endswith(("_token_id", "_token_index")) and isinstance(value, int)
                    and not isinstance(value, bool) and value >= vocab):  # fmt: skip
                try:
                    setattr(cfg, key, top)
                    top -= 1
                except (AttributeError, ValueError, TypeError):
                    pass
    cfg._attn_implementation = "eager"
    return cfg


def smoothed_loss(eps):
    """ForCausalLMLoss with the dense smoothed cross-entropy (the reference's loss_function)."""

    def loss_function(
        logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
        **kwargs,
    ):  # fmt: skip
        logits = logits.double() if logits.dtype == torch.float64 else logits.float()
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        red = "mean" if num_items_in_batch is None else "sum"
        loss = F.cross_entropy(
            logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
            ignore_index=ignore_index, reduction=red, label_smoothing=eps,
        )  # fmt: skip
        return loss if num_items_in_batch is None else loss / num_items_in_batch

    return loss_function


# A tiny config that still gives a large model (a sub-config the generic sizes miss) is not built:
# a few such models would take the machine's memory.
MAX_PARAMS = 20_000_000


def build(name: str, dtype):
    cls = getattr(transformers, name)
    cfg = tiny_config(cls.config_class())
    try:  # count the parameters without allocating them
        with torch.device("meta"):
            n = sum(p.numel() for p in cls(copy.deepcopy(cfg)).parameters())
    except Exception:  # noqa: BLE001 - the real build below reports its own failure
        n = 0
    if n > MAX_PARAMS:
        raise MemoryError(f"{n / 1e6:.0f}M parameters from the tiny config")
    torch.manual_seed(0)
    model = cls(cfg).to(dtype)
    model.train()
    return model


def batch(model):
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(vocab, 200), (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids)), labels


def run(model, inputs, labels):
    torch.manual_seed(2)  # the same dropout draws in both models
    out = model(**inputs, labels=labels)
    out.loss.backward()
    model._last_loss = out.loss.detach()
    return out.loss.detach()


# (loss rtol, gradient rtol, gradient atol relative to the largest gradient) per dtype
TOL = {torch.float64: (1e-6, 1e-6, 1e-9), torch.float32: (1e-5, 1e-4, 1e-5)}


def check(name: str) -> tuple[str, str]:
    """(verdict, detail) for one class: float64, or float32 where the model cannot run in
    float64 (grouped-GEMM MoE experts)."""
    for dtype in TOL:
        try:
            ref = build(name, dtype)
            inputs, labels = batch(ref)
            ref.loss_function = smoothed_loss(EPS)
            model = copy.deepcopy(ref)
            expected = run(ref, inputs, labels)
            if not torch.isfinite(expected):
                return "not built", "the unpatched loss is not finite"
            break
        except Exception as e:  # noqa: BLE001 - any failure to build or run unpatched
            failure = f"{type(e).__name__}: {_short(e)}"
    else:
        return "not built", failure
    unpatched = copy.deepcopy(ref)  # for the float32 fallback rule below
    try:
        verdict, detail = _compare(ref, model, inputs, labels, expected, TOL[dtype])
        if verdict == "MISMATCH" and dtype == torch.float32:
            verdict, detail = _within_float32_roundoff(unpatched, ref, model, inputs, labels)
    except Exception as e:  # noqa: BLE001
        return "ERROR", f"{type(e).__name__}: {_short(e)}"
    if verdict == "exact" and dtype != torch.float64:
        detail += f" ({str(dtype).split('.')[-1]})"
    return verdict, detail


def _within_float32_roundoff(unpatched, ref, model, inputs, labels):
    """float32 models whose gradients amplify round-off (e.g. hyper-connection mixing): the error
    is measured against a precise reference (the same model with its head GEMM and loss in
    float64) and must be at most 2× the dense float32 reference's own error plus a small
    allowance (below; the loss: 2× plus 1e-6 relative), as the project's low-precision tests."""
    precise = unpatched
    for p in precise.parameters():
        p.grad = None
    head = getattr(precise, read_forward(type(model)).head)
    head.forward = types.MethodType(
        lambda m, x: F.linear(x.double(), m.weight.double(),
                              None if m.bias is None else m.bias.double()), head
    )  # fmt: skip
    exact = run(precise, inputs, labels).double()
    got, dense = (run_loss(m) for m in (model, ref))
    if abs(got - exact) > 2 * abs(dense - exact) + 1e-6 * abs(exact):
        return "MISMATCH", f"loss {got:.8g} vs {exact:.8g} (float32 dense {dense:.8g})"
    named = dict(precise.named_parameters())
    dense_grads = dict(ref.named_parameters())
    # absolute errors; the allowance: 1e-5 of the parameter's largest gradient, and 1e-6 of the
    # model's (a gradient that nearly cancels carries round-off of the size of the terms summed)
    top = max(float(q.grad.abs().max()) for q in named.values() if q.grad is not None)
    n = 0
    for pname, p in model.named_parameters():
        q = named[pname]
        if q.grad is None:
            continue
        scale = float(q.grad.abs().max())
        err = float((p.grad - q.grad).abs().max())
        err_dense = float((dense_grads[pname].grad - q.grad).abs().max())
        if err > 2 * err_dense + 1e-5 * scale + 1e-6 * top:
            return "MISMATCH", (f"gradient of {pname}: error {err:.2e} against a float64 head, "
                                f"the dense float32 reference's {err_dense:.2e}")  # fmt: skip
        n += 1
    return "exact", f"loss and {n} parameter gradients, within 2x float32 round-off"


def run_loss(model) -> float:
    """The loss the last ``run`` of ``model`` gave (kept by ``run``)."""
    return float(model._last_loss)


def _compare(ref, model, inputs, labels, expected, tol):
    loss_rtol, rtol, atol = tol
    del model._loss_function  # the patched model's own loss function (ForCausalLMLoss)
    try:
        apply_fused_ls(model, EPS)
    except UnsupportedModelError as e:
        return "refused", _reason(e)
    try:
        got = run(model, inputs, labels)
    except UnsupportedModelError as e:
        return "refused", "at call time: " + _reason(e)
    except Exception as e:  # noqa: BLE001
        return "ERROR", f"{type(e).__name__}: {_short(e)}"
    if got.dtype != expected.dtype:
        return "MISMATCH", f"loss dtype {got.dtype} vs {expected.dtype}"
    if expected.dtype == torch.float32:  # a model that upcasts its logits to fp32
        loss_rtol, rtol, atol = TOL[torch.float32]
    if not torch.allclose(got, expected, rtol=loss_rtol, atol=0):
        return "MISMATCH", f"loss {got.item():.8g} vs {expected.item():.8g}"
    ref_params = dict(ref.named_parameters())
    # a gradient that is zero in exact arithmetic (e.g. a key bias: softmax is shift-invariant)
    # is round-off: its scale is at least a millionth of the model's largest gradient
    top = max(float(q.grad.abs().max()) for q in ref_params.values() if q.grad is not None)
    n = 0
    for pname, p in model.named_parameters():
        q = ref_params[pname]
        if q.grad is None and p.grad is None:
            continue
        if (q.grad is None) != (p.grad is None):
            return "MISMATCH", f"gradient of {pname}: present in only one model"
        scale = max(float(q.grad.abs().max()), 1e-6 * top)
        if not torch.allclose(p.grad, q.grad, rtol=rtol, atol=atol * scale):
            err = float((p.grad - q.grad).abs().max()) / scale
            return "MISMATCH", f"gradient of {pname} (max error {err:.2e} of its largest)"
        n += 1
    return "exact", f"loss and {n} parameter gradients"


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text[:160] + ("…" if len(text) > 160 else "")


def _reason(e: UnsupportedModelError) -> str:
    text = str(e).split(": ", 1)[-1]
    return text.split(". The fused loss reproduces")[0]


def cause(detail: str) -> str:
    """A refusal's group: the parenthesised reason, else the text without code and names."""
    m = re.search(r"\(([^()]*)\)$", detail)
    if m:
        return m.group(1)
    detail = re.sub(r"its \w+ is a \w+, not a plain nn.Linear",
                    "its head module is not a plain nn.Linear (a transform before the projection)",
                    detail)  # fmt: skip
    return re.sub(r"`[^`]*`", "`…`", detail)


def classes(only=None) -> list[str]:
    names = sorted(n for n in dir(transformers) if n.endswith(SUFFIXES))
    if only:
        names = [n for n in names if n.startswith(tuple(only))]
    return names


def table(results: dict) -> str:
    counts = Counter(v for v, _ in results.values())
    lines = [
        "# Compatibility table",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}: every "
        "`*ForCausalLM`, `*ForConditionalGeneration` and `*LMHeadModel` class, built from a tiny "
        "config (random weights, float64; float32 where a model cannot run in float64) and "
        "patched with `apply_fused_ls(model, 0.1)`. **exact**: the loss "
        "and every parameter gradient equal the unpatched model's forward with the dense "
        "smoothed loss on its logits (float64: rtol 1e-6; float32, marked so: loss 1e-5, "
        "gradients 1e-4, or, where a model amplifies round-off, at most twice the float32 dense "
        "reference's own error against the same model with its head in float64); **refused**: "
        "`UnsupportedModelError` with the reason; **not built**: no tiny model could be built "
        "or run from the default config (the reason). Generated by "
        "`python scripts/model_table.py`.",
        "",
        "| verdict | classes |",
        "|---|---|",
        *(f"| {v} | {c} |" for v, c in counts.most_common()),
        "",
    ]
    groups = defaultdict(list)
    for name, (verdict, detail) in results.items():
        if verdict == "refused":
            groups[cause(detail)].append(name)
    if groups:
        lines += ["## Refusals by cause", "", "| cause | classes |", "|---|---|"]
        for why, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"| {why} | {len(names)}: {', '.join(names)} |")
        lines.append("")
    lines += ["## Every class", "", "| class | verdict | detail |", "|---|---|---|"]
    for name, (verdict, detail) in results.items():
        detail = detail.replace("|", "\\|")
        lines.append(f"| {name} | {verdict} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="class name prefixes")
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "compatibility.md"))
    args = ap.parse_args(argv)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    results = {}
    for name in classes(args.only):
        t = time.perf_counter()
        results[name] = check(name)
        verdict, detail = results[name]
        print(f"{name:60s} {verdict:10s} {time.perf_counter() - t:5.1f}s  {detail}", flush=True)
    if not args.only:
        Path(args.out).write_text(table(results))
        print(f"wrote {args.out}")
    bad = [n for n, (v, _) in results.items() if v in ("MISMATCH", "ERROR")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
