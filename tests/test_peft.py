"""PEFT models through apply_fused_ls: a PeftModel as users hold it (its base model patched;
generation, adapters and merge_and_unload unaffected), a LoRA on lm_head (the low-rank term as
extra input columns: exact A and B gradients, dropout included), modules_to_save=["lm_head"]
(the active copy), other adapter types on the head refused. The reference is the same PEFT
model unpatched with the dense smoothed loss on its logits (float64)."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install fused_ls[peft])")
transformers = pytest.importorskip("transformers")

from test_transformers import Rows, make_batch, make_model, reference_loss, trainer_args  # noqa: E402

from fused_ls.integrations.transformers import (  # noqa: E402
    FusedLSTrainer,
    UnsupportedModelError,
    apply_fused_ls,
    revert_fused_ls,
)

EPS = 0.1
TOL = dict(rtol=1e-9, atol=1e-11)


def peft_pair(config, seed=0, mixed=False):
    """(patched PeftModel, reference PeftModel): the same weights, adapters initialised to
    non-zero values (LoRA's B starts at zero, which would hide a wrong B gradient). ``mixed``: a
    PeftMixedModel (get_peft_model(..., mixed=True))."""
    base = make_model("llama", torch.float64, vocab_size=512)
    ref = peft.get_peft_model(base, config, mixed=mixed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    model = copy.deepcopy(ref)
    assert apply_fused_ls(model, EPS) is model  # the PeftModel, as given
    return model, ref


def run_and_compare(model, ref, seed=3):
    batch = make_batch(512)
    torch.manual_seed(seed)  # the same dropout draws
    out = model(**batch)
    torch.manual_seed(seed)
    expected = reference_loss(ref, batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected, **TOL)
    out.loss.backward()
    expected.backward()
    params = dict(ref.named_parameters())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained
    for name in trained:
        g, r = dict(model.named_parameters())[name].grad, params[name].grad
        assert r is not None and r.abs().max() > 0, name
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10 * float(r.abs().max()), msg=name)
    return trained


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_on_lm_head_is_exact(dropout):
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "lm_head"]
    )
    model, ref = peft_pair(cfg)
    assert isinstance(model.base_model.model.lm_head, peft.tuners.lora.Linear)
    trained = run_and_compare(model, ref)
    assert any("lm_head.lora_A" in n for n in trained)
    assert any("lm_head.lora_B" in n for n in trained)


def test_lora_without_head_adapter_and_generation():
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model, ref = peft_pair(cfg)
    run_and_compare(model, ref)
    # generation (no labels) is the original forward
    model.eval()
    ref.eval()
    ids = make_batch(512)["input_ids"][:1, :5]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=ids, **kw), ref.generate(input_ids=ids, **kw))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "lm_head"]])
def test_peft_mixed_model_is_exact(targets):
    """A PeftMixedModel (no get_base_model: its base model is base_model.model, as transformers'
    unwrap_peft_model has it) is patched like a PeftModel and exact, a LoRA head included."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    model, ref = peft_pair(cfg, mixed=True)
    assert isinstance(model, peft.PeftMixedModel)
    assert hasattr(model.base_model.model, "fused_ls")
    trained = run_and_compare(model, ref)
    assert any("lora_A" in n for n in trained)
    revert_fused_ls(model)
    assert not hasattr(model.base_model.model, "fused_ls")


def test_modules_to_save_lm_head_uses_the_active_copy():
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model, ref = peft_pair(cfg)
    head = model.base_model.model.lm_head
    with torch.no_grad():  # make the trained copy differ from the original
        for m in (head, ref.base_model.model.lm_head):
            m.modules_to_save["default"].weight.mul_(1.5)
    trained = run_and_compare(model, ref)
    assert any("modules_to_save.default" in n for n in trained)


def test_disabled_adapters_and_merge_and_unload():
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    model, ref = peft_pair(cfg)
    batch = make_batch(512)
    with model.disable_adapter(), ref.disable_adapter():
        torch.testing.assert_close(model(**batch).loss, reference_loss(ref, batch), **TOL)
    merged, ref_merged = model.merge_and_unload(), ref.merge_and_unload()
    assert type(merged.lm_head) is torch.nn.Linear
    torch.testing.assert_close(merged(**batch).loss, reference_loss(ref_merged, batch), **TOL)
    revert_fused_ls(merged)
    assert "forward" not in vars(merged)


def test_other_adapter_on_the_head_is_refused():
    cfg = peft.IA3Config(target_modules=["lm_head", "down_proj"], feedforward_modules=["down_proj"])
    base = make_model("llama", torch.float64, vocab_size=512)
    model = peft.get_peft_model(base, cfg)
    with pytest.raises(UnsupportedModelError, match="PEFT Linear adapter|only LoRA"):
        apply_fused_ls(model, EPS)
    assert not hasattr(model.get_base_model(), "fused_ls")


def test_dora_on_the_head_is_refused():
    cfg = peft.LoraConfig(r=4, target_modules=["lm_head"], use_dora=True)
    model = peft.get_peft_model(make_model("llama", torch.float64, vocab_size=512), cfg)
    with pytest.raises(UnsupportedModelError, match="variant"):
        apply_fused_ls(model, EPS)


def test_fused_trainer_with_a_lora_head_trains_like_the_label_smoother(tmp_path):
    """FusedLSTrainer on a PeftModel with LoRA on the attention and the head: two optimizer steps
    with gradient accumulation give the logged losses and trained adapters of Trainer's own
    LabelSmoother path."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
    base = make_model("llama", torch.float32, vocab_size=512)
    ref = peft.get_peft_model(base, cfg)
    model = copy.deepcopy(ref)
    data = Rows(512)
    stock = transformers.Trainer(model=ref, args=trainer_args(tmp_path / "a"), train_dataset=data)
    fused = FusedLSTrainer(model=model, args=trainer_args(tmp_path / "b"), train_dataset=data)
    stock.train()
    fused.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (fused, stock)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    trained = 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        if p.requires_grad:
            trained += 1
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    assert trained >= 6  # q, v and the head's A and B
