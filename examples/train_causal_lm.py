"""Train a small Llama from scratch with Trainer: fused label smoothing vs transformers' own path.

Corpus (on every machine, no download): the docstrings of the Python standard library, read from
its source files with ``ast`` (no module is imported, so nothing runs; test suites and idlelib
left out), plus the help topics of ``pydoc_data.topics`` (the language reference's text), in
sorted file order. Every 10th document is held out. Tokeniser: word level, written here:
identifiers/words, numbers and single punctuation characters; the vocabulary is ``<unk>``,
``<eos>`` (document separator) and the most frequent training tokens, at most 32000 in all; the
model's vocabulary is 32000 (a Llama-2-sized head) whatever the corpus fills.

Model: Llama with hidden 128, 2 layers, 4 heads (2 KV heads), MLP 512, vocabulary 32000, random
initialisation (seed 0). Four runs with the same initialisation, data order and
``TrainingArguments`` except ``label_smoothing_factor``:

- ``transformers ε=0``: the stock Trainer, the model's own ``ForCausalLMLoss``;
- ``fused ε=0``: ``FusedLSTrainer``: cross-entropy on the hidden states, no logits;
- ``transformers ε=0.1``: the stock Trainer's ``LabelSmoother`` (dense logits + log_softmax);
- ``fused ε=0.1``: ``FusedLSTrainer`` with the same smoothing.

Reported per run: median step time, peak resident memory during training above the state before
it (glibc set to mmap every allocation of 64 KiB or more, as in benchmarks/bench_transformers.py),
the training loss as optimised (smoothed for ε = 0.1, averaged over the last 10% of steps) and,
on the held-out split, the unsmoothed NLL, top-1 next-token accuracy and top-label ECE (15
bins) from the ``Stats`` of ``linear_label_smoothing_cross_entropy(..., return_stats=True)`` on
the final hidden states (no N×V softmax). Writes results.md, results.json, loss_curves.png and
reliability.png into ``--out``.

    python examples/train_causal_lm.py --out causal_lm_out            # 16 min on 2 shared cores
    python examples/train_causal_lm.py --quick --out causal_lm_quick  # about 30 s
"""

from __future__ import annotations

import argparse
import ast
import collections
import copy
import glob
import json
import os
import re
import statistics
import sys
import sysconfig
import time
from pydoc_data.topics import topics

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from common import (
    mmap_large_allocations,  # noqa: E402
    peak_extra_bytes,  # noqa: E402
)

import fused_ls  # noqa: E402
from fused_ls.integrations.transformers import FusedLSTrainer  # noqa: E402

VOCAB = 32000
UNK, EOS = 0, 1
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\S")
RUNS = [("transformers", 0.0), ("fused", 0.0), ("transformers", 0.1), ("fused", 0.1)]


# ---------------------------------------------------------------------------------------------
# corpus and tokeniser
# ---------------------------------------------------------------------------------------------
def stdlib_documents() -> list[str]:
    """Docstrings of every module, class and function in the stdlib sources (deduplicated, in
    sorted file order, then tree order), then the pydoc help topics in sorted order."""
    root = sysconfig.get_paths()["stdlib"]
    docs, seen = [], set()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        parts = os.path.relpath(path, root).split(os.sep)
        if parts[0] in ("site-packages", "idlelib") or any(p.startswith("test") for p in parts):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return docs + [topics[k] for k in sorted(topics)]


class WordTokenizer:
    """Word-level tokeniser: ``<unk>`` = 0, ``<eos>`` = 1, then the most frequent training tokens
    (ties broken alphabetically), up to ``size`` ids in all."""

    def __init__(self, documents: list[str], size: int = VOCAB):
        counts = collections.Counter(t for d in documents for t in TOKEN.findall(d))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - 2]
        self.itos = ["<unk>", "<eos>"] + [t for t, _ in ranked]
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def encode(self, documents: list[str]) -> torch.Tensor:
        """All documents as one stream of ids, each followed by <eos>."""
        ids = []
        for d in documents:
            ids.extend(self.stoi.get(t, UNK) for t in TOKEN.findall(d))
            ids.append(EOS)
        return torch.tensor(ids, dtype=torch.long)


class Chunks(torch.utils.data.Dataset):
    """Consecutive, non-overlapping windows of `seq` tokens; labels = inputs (the model shifts)."""

    def __init__(self, stream: torch.Tensor, seq: int):
        self.rows = stream[: len(stream) // seq * seq].view(-1, seq)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


# ---------------------------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------------------------
class Recorder(TrainerCallback):
    """Wall time of every optimizer step, and held-out metrics at chosen steps."""

    def __init__(self, evaluate, at_steps):
        self.evaluate, self.at_steps = evaluate, set(at_steps)
        self.step_times, self.heldout = [], []

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kw):
        self.step_times.append(time.perf_counter() - self.t0)
        if state.global_step in self.at_steps:
            self.heldout.append((state.global_step, self.evaluate(model)["nll"]))


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, batch: int, with_stats: bool = False):
    """Unsmoothed NLL, top-1 accuracy and ECE of next-token prediction on `rows` [R, T], from the
    fused function's Stats on the final hidden states (the same code for every run)."""
    was_training = model.training
    model.eval()
    nll, stats = [], []
    for i in range(0, len(rows), batch):
        ids = rows[i : i + batch]
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        loss, st = fused_ls.linear_label_smoothing_cross_entropy(
            hidden, model.lm_head.weight, ids[:, 1:], 0.0, reduction="none", return_stats=True
        )
        nll.append(loss.reshape(-1))
        stats.append([s.reshape(-1) for s in st])
    model.train(was_training)
    stats = fused_ls.Stats(*(torch.cat(s) for s in zip(*stats, strict=True)))
    target = rows[:, 1:].reshape(-1)
    out = {
        "nll": float(torch.cat(nll).mean()),
        "accuracy": float((stats.prediction == target).double().mean()),
        "ece": float(fused_ls.expected_calibration_error(stats, target, n_bins=15)),
    }
    if with_stats:
        out["stats"], out["target"] = stats, target
    return out


def train_one(path, eps, init, data, heldout_rows, args, out_dir):
    model = copy.deepcopy(init)
    targs = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer", f"{path}_{eps}"),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        weight_decay=0.01,
        logging_steps=args.log_every,
        label_smoothing_factor=eps,
        seed=0,
        dataloader_num_workers=0,
    )
    evals = [round(args.steps * k / args.evals) for k in range(1, args.evals)]
    rec = Recorder(lambda m: evaluate(m, heldout_rows, args.batch), evals)
    cls = FusedLSTrainer if path == "fused" else Trainer
    trainer = cls(model=model, args=targs, train_dataset=data, callbacks=[rec])
    trainer.remove_callback(PrinterCallback)  # no log lines on stdout (disable_tqdm adds it)
    peak = peak_extra_bytes(trainer.train, torch.device("cpu"))
    log = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    final = evaluate(model, heldout_rows, args.batch, with_stats=True)
    rec.heldout.append((args.steps, final["nll"]))
    tail = [loss for step, loss in log if step > 0.9 * args.steps] or [log[-1][1]]
    return dict(
        path=path,
        eps=eps,
        step_ms=1e3 * statistics.median(rec.step_times[1:]),
        peak_mib=peak / 2**20,
        train_loss=statistics.mean(tail),
        heldout_nll=final["nll"],
        accuracy=final["accuracy"],
        ece=final["ece"],
        curve=log,
        heldout_curve=rec.heldout,
        stats=final["stats"],
        target=final["target"],
    )


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def table(results) -> str:
    by = {(r["path"], r["eps"]): r for r in results}
    lines = [
        "| run | step time (ms) | peak memory (MiB) | train loss | held-out NLL | held-out "
        "top-1 acc (%) | held-out ECE (%) | max Δ train loss vs transformers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        other = by[("transformers", r["eps"])]
        delta = max(abs(a[1] - b[1]) for a, b in zip(r["curve"], other["curve"], strict=True))
        lines.append(
            f"| {r['path']} ε={r['eps']} | {r['step_ms']:.0f} | {r['peak_mib']:.0f} "
            f"| {r['train_loss']:.3f} | {r['heldout_nll']:.3f} | {100 * r['accuracy']:.2f} "
            f"| {100 * r['ece']:.2f} | {'—' if r['path'] == 'transformers' else f'{delta:.1e}'} |"
        )
    return "\n".join(lines)


def plots(results, out_dir):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    style = {("transformers", 0.0): ("#4c72b0", "-"), ("fused", 0.0): ("#55a868", "--")}
    style |= {("transformers", 0.1): ("#c44e52", "-"), ("fused", 0.1): ("#8172b2", "--")}
    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax_train, ax_held = fig.subplots(1, 2)
    for r in results:
        color, ls = style[(r["path"], r["eps"])]
        label = f"{r['path']} ε={r['eps']}"
        ax_train.plot(*zip(*r["curve"], strict=True), ls, color=color, label=label)
        ax_held.plot(*zip(*r["heldout_curve"], strict=True), ls + "o", color=color, label=label)
    ax_train.set(xlabel="step", ylabel="training loss (as optimised)", title="training loss")
    ax_held.set(xlabel="step", ylabel="NLL (no smoothing)", title="held-out NLL")
    for ax in (ax_train, ax_held):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss_curves.png"))

    fig = Figure(figsize=(8, 8.4), dpi=110)
    FigureCanvasAgg(fig)
    for ax, r in zip(fig.subplots(2, 2).ravel(), results, strict=True):
        fused_ls.reliability_diagram(
            r["stats"], r["target"], 15, ax=ax, title=f"{r['path']} ε={r['eps']} (held-out)"
        )
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "reliability.png"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="causal_lm_out", help="directory for tables and PNGs")
    ap.add_argument("--quick", action="store_true", help="a short smoke run (< 2 min on 2 cores)")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default 400; quick 20)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default 128; quick 64)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--heldout-rows", type=int, help="held-out sequences (default 128; quick 32)")
    args = ap.parse_args(argv)
    mmap_large_allocations()  # so that the peak-memory column sees every temporary (see there)
    args.steps = args.steps or (20 if args.quick else 400)
    args.seq = args.seq or (64 if args.quick else 128)
    args.heldout_rows = args.heldout_rows or (32 if args.quick else 128)
    args.log_every = max(1, args.steps // 50)
    args.evals = 2 if args.quick else 6  # held-out points on the curve, the last at the end
    os.makedirs(args.out, exist_ok=True)
    transformers.logging.set_verbosity_error()
    t_start = time.perf_counter()

    docs = stdlib_documents()
    train_docs = [d for i, d in enumerate(docs) if i % 10 != 0]
    heldout_docs = [d for i, d in enumerate(docs) if i % 10 == 0]
    tok = WordTokenizer(train_docs)
    train_ids, heldout_ids = tok.encode(train_docs), tok.encode(heldout_docs)
    data = Chunks(train_ids, args.seq)
    heldout_rows = Chunks(heldout_ids, args.seq).rows[: args.heldout_rows]
    unk = float((heldout_ids == UNK).double().mean())
    print(
        f"corpus: {len(docs)} documents, {len(train_ids)} training / {len(heldout_ids)} held-out "
        f"tokens, {len(tok.itos)} token types in the vocabulary (model vocabulary {VOCAB}), "
        f"held-out <unk> {100 * unk:.1f}%; {len(data)} training sequences of {args.seq}, "
        f"{args.steps} steps × {args.batch} sequences ({args.steps * args.batch / len(data):.2f} "
        f"epochs); held-out {len(heldout_rows)} sequences"
    )

    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=args.seq,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    init = LlamaForCausalLM(cfg)
    results = []
    for path, eps in RUNS:
        t0 = time.perf_counter()
        r = train_one(path, eps, init, data, heldout_rows, args, args.out)
        results.append(r)
        print(
            f"  {path:12s} ε={eps}: {time.perf_counter() - t0:5.1f} s, step {r['step_ms']:.0f} ms, "
            f"held-out NLL {r['heldout_nll']:.3f}, acc {100 * r['accuracy']:.2f}%, "
            f"ECE {100 * r['ece']:.2f}%",
            flush=True,
        )

    md = table(results)
    header = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; {args.steps} steps of {args.batch} × {args.seq} "
        f"tokens, lr {args.lr}; total {time.perf_counter() - t_start:.0f} s"
    )
    print("\n" + header + "\n\n" + md)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(header + "\n\n" + md + "\n")
    keep = ("stats", "target")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k not in keep} for r in results], f, indent=1)
    plots(results, args.out)
    print(f"wrote {args.out}/results.md, results.json, loss_curves.png, reliability.png")


if __name__ == "__main__":
    main()
