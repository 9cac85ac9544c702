"""One training step of a tiny Llama through Trainer: fused_ls vs Trainer's LabelSmoother.

The model: Llama with hidden 64, 2 layers, 4 heads (2 KV heads), vocabulary 32000, random
weights from the config; a batch of 8 × 256 tokens (2048 rows of 32000 logits: 250 MiB in fp32),
fp32, CPU. Three paths, each exactly what ``Trainer.compute_loss`` runs for it:

- ``transformers, ε = 0``: the stock Trainer without smoothing; the model computes its logits and
  ``ForCausalLMLoss``.
- ``Trainer LabelSmoother, ε = 0.1``: the stock Trainer with ``label_smoothing_factor=0.1``: the
  labels are popped, the model builds the logits, ``LabelSmoother`` copies the shifted logits and
  takes a dense ``log_softmax``.
- ``fused_ls, ε = 0.1``: ``FusedLSTrainer`` with ``label_smoothing_factor=0.1``: the patched
  forward calls ``fused_ls.linear_label_smoothing_cross_entropy`` on the hidden states.

All get ``num_items_in_batch`` as Trainer passes it. For each path it measures (median over
``--reps`` runs, the paths taking turns, each timed run after an untimed one of the same path):

- **step**: ``trainer.compute_loss(model, batch)`` + ``loss.backward()`` on the whole model: the
  step's time and its peak memory above the state before the step (parameters, batch, optimizer
  state excluded: there is no optimizer step here).
- **loss part**: the same ``compute_loss`` + backward on the same model whose decoder stack
  (``model.model``) is replaced by a stub that returns fixed final hidden states (a leaf tensor
  that requires grad). What remains is exactly each path's own head + loss code, run through
  Trainer and the (patched or stock) forward, with the gradients of the hidden states and of
  ``lm_head.weight``; the decoder's activations, identical in all paths, are out of the picture.

Peak memory is the process's peak resident set above the resident set before the call
(``/proc/self/clear_refs`` resets ``VmHWM``), as in ``benchmarks/bench.py``. So that this measures
what a call allocates, glibc is told first (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``) to serve every
allocation of 64 KiB or more by its own mmap and unmap it when freed: a temporary then cannot
reuse heap pages that an earlier call left resident (the fused head's chunks, ~31 MiB here, are
below glibc's default dynamic threshold, and measured 0 without this).

Prints a markdown table and the two targets (loss-part memory ≤ 0.2× LabelSmoother's, step time
≤ 1.0× it).

``--trl``: the same measurements for TRL's ``SFTTrainer`` (``SFTConfig(bf16=False)``: fp32):
``TRL, ε = 0`` (its own chunked head), ``TRL, ε = 0.1`` (its label-smoothing path: the full
logits for ``LabelSmoother`` plus a no-grad forward through its head for the metrics) and
``fused_ls patch_trainer, ε = 0.1`` (one fused forward, the metrics from its statistics); the
table also counts the backbone forwards of one step (a forward hook on ``model.model``). Targets:
one forward instead of two, step time ≤ 0.6× TRL's, loss-part peak ≤ 0.2×.

    python benchmarks/bench_transformers.py [--reps 5] [--batch 8] [--seq 256] [--vocab 32000]
    python benchmarks/bench_transformers.py --trl
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.modeling_outputs import BaseModelOutputWithPast

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    device_name,
    interleaved,
    mmap_large_allocations,
    peak_extra_bytes,
)

import fused_ls  # noqa: E402
from fused_ls.integrations.transformers import FusedLSTrainer, patch_trainer  # noqa: E402

EPS = 0.1


class FixedHidden(nn.Module):
    """Stands in for the decoder stack: returns the same final hidden states on every call."""

    def __init__(self, hidden: torch.Tensor, embed_tokens: nn.Module):
        super().__init__()
        self.hidden = hidden
        # unused; transformers finds the output embeddings only where the input ones exist
        self.embed_tokens = embed_tokens

    def forward(self, **kwargs):
        return BaseModelOutputWithPast(last_hidden_state=self.hidden)


def build(args):
    transformers.logging.set_verbosity_error()
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=args.vocab,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
    n_items = (batch["labels"][:, 1:] != -100).sum()

    out = tempfile.mkdtemp(prefix="bench_transformers_")

    def targs(eps):
        return TrainingArguments(
            output_dir=out, use_cpu=True, report_to="none", label_smoothing_factor=eps
        )

    if args.trl:
        makers = _trl_makers(args, out)
    else:
        makers = (
            ("transformers, ε = 0", lambda m: Trainer(model=m, args=targs(0.0))),
            (f"Trainer LabelSmoother, ε = {EPS}", lambda m: Trainer(model=m, args=targs(EPS))),
            (f"fused_ls, ε = {EPS}", lambda m: FusedLSTrainer(model=m, args=targs(EPS))),
        )
    paths = {}
    for name, make in makers:
        full = make(copy.deepcopy(base))
        head_only = copy.deepcopy(base)
        with torch.no_grad():
            hidden = base.model(input_ids=ids).last_hidden_state
        head_only.model = FixedHidden(
            hidden.clone().requires_grad_(True), head_only.model.embed_tokens
        )
        part = make(head_only)
        paths[name] = dict(step=full, loss_part=part)
    return paths, batch, n_items


def _trl_makers(args, out):
    """TRL's SFTTrainer: its own paths and the patched one (a word-level tokenizer built in
    memory: SFTTrainer needs one, nothing is downloaded)."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, args.vocab)}}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
    )  # fmt: skip

    def sft(m, eps, patch=False):
        cfg = SFTConfig(output_dir=out, use_cpu=True, report_to="none", bf16=False,
                        label_smoothing_factor=eps)  # fmt: skip
        data = Dataset.from_dict({"text": ["w3 w4 w5"]})  # required; the step uses its own batch
        t = SFTTrainer(model=m, args=cfg, processing_class=tok, train_dataset=data)
        return patch_trainer(t) if patch else t

    return (
        ("TRL, ε = 0", lambda m: sft(m, 0.0)),
        (f"TRL LabelSmoother, ε = {EPS}", lambda m: sft(m, EPS)),
        (f"fused_ls patch_trainer, ε = {EPS}", lambda m: sft(m, EPS, patch=True)),
    )


def count_forwards(trainer, batch, n_items) -> int:
    """Backbone forwards in one step (a forward hook on ``model.model``)."""
    calls = []
    h = trainer.model.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        run_step(trainer, batch, n_items)
    finally:
        h.remove()
    return len(calls)


def run_step(trainer, batch, n_items):
    model = trainer.model
    model.train()
    for p in model.parameters():
        p.grad = None
    if isinstance(model.model, FixedHidden):
        model.model.hidden.grad = None
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    loss.backward()
    return loss.detach()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--trl", action="store_true", help="TRL's SFTTrainer instead of Trainer")
    args = ap.parse_args(argv)
    mmap_large_allocations()
    warnings.filterwarnings("ignore")

    paths, batch, n_items = build(args)
    device = torch.device("cpu")
    logits_bytes = args.batch * args.seq * args.vocab * 4
    calls = {
        (p, k): (lambda t=trainer: run_step(t, batch, n_items))
        for p, trainers in paths.items()
        for k, trainer in trainers.items()
    }
    # the paths take turns; each timed run follows an untimed one of the same path (its setup),
    # so that no path pays for the memory another one just returned to the OS
    times = interleaved(calls, args.reps, device, warmup=0, setup=calls, collect=True)
    losses = {key: float(call()) for key, call in calls.items()}
    mem = {key: peak_extra_bytes(call, device) for key, call in calls.items()}

    print(
        f"\n{device_name(device)}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, fused_ls {fused_ls.__version__}: Llama hidden 64, 2 layers, "
        f"vocab {args.vocab}, batch {args.batch} × {args.seq}, fp32; median of {args.reps} "
        f"(logits: {logits_bytes / 2**20:.0f} MiB)\n"
    )
    forwards = {p: count_forwards(t["step"], batch, n_items) for p, t in paths.items()}
    print(
        "| path | loss | backbone forwards | step time (ms) | step peak (MiB) "
        "| loss-part time (ms) | loss-part peak (MiB) | loss-part peak (× logits) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    med = {key: v.median * 1e3 for key, v in times.items()}
    for p in paths:
        print(
            f"| {p} | {losses[(p, 'step')]:.5f} | {forwards[p]} | {med[(p, 'step')]:.0f} "
            f"| {mem[(p, 'step')] / 2**20:.0f} | {med[(p, 'loss_part')]:.0f} "
            f"| {mem[(p, 'loss_part')] / 2**20:.0f} | {mem[(p, 'loss_part')] / logits_bytes:.2f} |"
        )
    names = list(paths)
    smoother, fused = names[1], names[2]
    mem_ratio = mem[(fused, "loss_part")] / max(mem[(smoother, "loss_part")], 1)
    time_ratio = med[(fused, "step")] / med[(smoother, "step")]
    limit = 0.6 if args.trl else 1.0
    print(
        f"\ntargets: loss-part peak memory fused / LabelSmoother = {mem_ratio:.2f} (≤ 0.2: "
        f"{'met' if mem_ratio <= 0.2 else 'NOT met'}); step time fused / LabelSmoother = "
        f"{time_ratio:.2f} (≤ {limit}: {'met' if time_ratio <= limit else 'NOT met'}); "
        f"backbone forwards {forwards[fused]} vs {forwards[smoother]}"
    )
    diff = abs(losses[(fused, "step")] - losses[(smoother, "step")])
    print(f"|fused loss − LabelSmoother loss| = {diff:.2e}")


if __name__ == "__main__":
    main()
