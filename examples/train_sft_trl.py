"""Supervised fine-tuning with TRL's SFTTrainer, label smoothing through fused_ls, LoRA adapters.

A tiny Llama built from a config (random weights) and a word-level tokenizer built in memory, so
that it runs offline; with a real checkpoint, replace ``tiny_model_and_tokenizer`` by
``AutoModelForCausalLM.from_pretrained(...)`` and ``AutoTokenizer.from_pretrained(...)``.

    python examples/train_sft_trl.py [--steps 20] [--lora] [--bf16]

``patch_trainer(trainer)`` makes each micro-batch one forward through the fused head (TRL's own
label-smoothing path runs two and builds the logits); the logged ``entropy`` and
``mean_token_accuracy`` come from the same pass. The script prints TRL's log lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fused_ls.integrations.transformers import patch_trainer  # noqa: E402


def tiny_model_and_tokenizer(vocab_size=2000):
    words = [f"w{i}" for i in range(vocab_size - 3)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), tok, words


def dataset(words, n=64, seed=0):
    """Sequences with structure to learn: each word followed by its successor."""
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        start = int(torch.randint(0, len(words) - 20, (1,), generator=g))
        texts.append(" ".join(words[start : start + int(torch.randint(8, 20, (1,), generator=g))]))
    return Dataset.from_dict({"text": texts})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lora", action="store_true", help="LoRA adapters on the attention")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (SFTConfig's default)")
    args = ap.parse_args(argv)

    model, tok, words = tiny_model_and_tokenizer()
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        # (SFTTrainer itself refuses an adapter on lm_head: its own head reads lm_head.weight)
        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="sft_"), use_cpu=True, report_to="none",
        save_strategy="no", max_steps=args.steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=5, max_length=64,
        label_smoothing_factor=0.1, bf16=args.bf16, eval_strategy="no",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset(words),
        eval_dataset=dataset(words, n=16, seed=1),
        processing_class=tok,
        peft_config=peft_config,
    )
    patch_trainer(trainer)
    trainer.train()
    print(trainer.evaluate())


if __name__ == "__main__":
    main()
