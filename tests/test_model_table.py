"""scripts/model_table.py, the compatibility table: every class is exact or refused (or not
buildable from a tiny config), never MISMATCH or ERROR. The default run checks the families the
integration promises (issue 19's list); the full sweep over every class is marked slow.
The check itself can fail: a patch with another ε is a MISMATCH."""

from __future__ import annotations

import re

import pytest
from helpers import load_script

pytest.importorskip("transformers")

model_table = load_script("model_table")

# The classes the integration must reproduce exactly (dense, MoE with router loss, scaled heads,
# soft caps, GPT-2/NeoX heads, VLMs) and the forms the rewrite handles.
EXACT = [
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM",
    "Qwen3MoeForCausalLM", "GptOssForCausalLM", "CohereForCausalLM", "GraniteForCausalLM",
    "FalconH1ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "Llama4ForCausalLM",
    "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
    "Gemma3ForConditionalGeneration", "LlavaForConditionalGeneration",
    "Mistral3ForConditionalGeneration",
    "HYV4ForCausalLM",  # float32 round-off amplified by hyper-connections
    "BloomForCausalLM",  # a return_dict=False tuple of the logits
    "FalconForCausalLM",  # the logits named lm_logits
]  # fmt: skip
# Refused, with the statement or attribute named.
REFUSED = {
    "Inkling2ForCausalLM": r"self\.logit_softcap\(logits\).*other than a constant scale",
    "BartForConditionalGeneration": "does not call self.loss_function",
    "TrOCRForCausalLM": r"loss_fct\(logits\.view\(-1, self\.config\.vocab_size\)",
    "RobertaForCausalLM": "its lm_head is a RobertaLMHead, not a plain nn.Linear",
    "BertLMHeadModel": "its cls is a BertOnlyMLMHead, not a plain nn.Linear",
}


@pytest.mark.parametrize("name", EXACT)
def test_promised_classes_are_exact(name):
    verdict, detail = model_table.check(name)
    assert verdict == "exact", detail


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refusals_name_the_statement(name):
    verdict, detail = model_table.check(name)
    assert verdict == "refused"
    assert re.search(REFUSED[name], detail), detail


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "MixtralForCausalLM"])  # fp64, fp32
def test_the_check_can_fail(monkeypatch, name):
    """A patch that computes another loss (ε 0.2 instead of 0.1) is reported as a MISMATCH, in
    float64 and through float32's round-off rule."""
    real = model_table.apply_fused_ls
    monkeypatch.setattr(model_table, "apply_fused_ls", lambda m, eps: real(m, 0.2))
    verdict, detail = model_table.check(name)
    assert verdict == "MISMATCH" and "loss" in detail


@pytest.mark.slow
def test_full_sweep_has_no_mismatch(tmp_path):
    """Every class of the installed transformers (a few minutes)."""
    assert model_table.main(["--out", str(tmp_path / "table.md")]) == 0
    assert "| exact |" in (tmp_path / "table.md").read_text()
