"""TRL's SFTTrainer patched by fused_ls (fused_ls.integrations.trl), against TRL's own
label-smoothing path, step by step: the logged loss, entropy and mean_token_accuracy, the
parameters after training and evaluate(); one backbone forward per micro-batch instead of two;
bf16 autocast, PEFT, padding-free; ε = 0 unchanged; TRL's fused_lm_head protocol intact."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install fused_ls[trl])")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from fused_ls.integrations.transformers import patch_trainer  # noqa: E402

V = 512
EPS = 0.1
WORDS = [f"w{i}" for i in range(V - 3)]
METRICS = ("loss", "entropy", "mean_token_accuracy", "num_tokens")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def tokenizer():
    """A word-level tokenizer built in memory: "w17" -> id 20 (0 pad, 1 eos, 2 unk)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def dataset(n=16, seed=0):
    """Texts of 5 to 13 random words (uneven lengths: padding, uneven token counts)."""
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        k = int(torch.randint(5, 14, (1,), generator=g))
        texts.append(" ".join(WORDS[j] for j in torch.randint(0, V - 3, (k,), generator=g)))
    return datasets.Dataset.from_dict({"text": texts})


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0,
        eos_token_id=1, bos_token_id=1, initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def config(path, **kw):
    base = dict(
        output_dir=str(path), use_cpu=True, report_to="none", save_strategy="no",
        per_device_train_batch_size=2, per_device_eval_batch_size=4,
        gradient_accumulation_steps=2, max_steps=3, optim="sgd", learning_rate=0.5,
        logging_steps=1, label_smoothing_factor=EPS, seed=0, bf16=False, max_length=32,
    )  # fmt: skip
    base.update(kw)
    return SFTConfig(**base)


def pair(tmp_path, model=None, peft_config=None, **kw):
    """(stock, fused) SFTTrainers on copies of the same model; each counts its backbone
    forwards in trainer.forwards."""
    model = model if model is not None else tiny_llama()
    out = []
    for name in ("stock", "fused"):
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = SFTTrainer(
                model=m,
                args=config(tmp_path / name, **kw),
                train_dataset=dataset(),
                eval_dataset=dataset(8, seed=1),
                processing_class=tokenizer(),
                peft_config=peft_config,
            )
        t.forwards = [0]
        backbone = t.model.get_base_model().model if peft_config else t.model.model
        backbone.register_forward_hook(lambda *a, c=t.forwards: c.__setitem__(0, c[0] + 1))
        if name == "fused":
            assert patch_trainer(t) is t
        out.append(t)
    return out


def logged(trainer):
    return [{k: h[k] for k in METRICS if k in h} for h in trainer.state.log_history if "loss" in h]


def assert_same_run(stock, fused, rtol=1e-5):
    a, b = logged(stock), logged(fused)
    assert len(a) == len(b) == stock.args.max_steps
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.keys() == y.keys() == set(METRICS), step
        for k in METRICS:
            torch.testing.assert_close(y[k], x[k], rtol=rtol, atol=1e-6, msg=f"step {step} {k}")


def test_sft_label_smoothing_matches_trl_step_by_step(tmp_path):
    """fp32, gradient accumulation 2 over uneven micro-batches (num_items_in_batch): the same
    logged loss, entropy, mean_token_accuracy and token count at every step, the same
    parameters, the same evaluate(); one backbone forward per micro-batch instead of two."""
    stock, fused = pair(tmp_path)
    assert fused.label_smoother is None and fused.model_accepts_loss_kwargs
    stock.train()
    fused.train()
    assert_same_run(stock, fused)
    micro = stock.args.max_steps * stock.args.gradient_accumulation_steps
    assert (stock.forwards[0], fused.forwards[0]) == (2 * micro, micro)
    for (name, p), q in zip(fused.model.named_parameters(), stock.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=f"parameter {name}")
    ev = [t.evaluate() for t in (stock, fused)]
    for k in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        torch.testing.assert_close(ev[1][k], ev[0][k], rtol=1e-5, atol=1e-6, msg=k)
    assert ev[0]["eval_entropy"] > 1  # a metric that can differ (near log V here)


def test_no_full_logits_in_the_fused_step(tmp_path):
    """No [B, T, V] tensor leaves the head in the patched step (TRL's path builds the logits)."""
    stock, fused = pair(tmp_path, max_steps=1)
    seen = {}
    for t in (stock, fused):
        seen[t] = []
        # a global hook: a hook on the head itself would be refused (it could edit the logits)
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, args, out, t=t: (
                seen[t].append(tuple(out.shape)) if mod is t.model.lm_head else None
            )
        )
        try:
            t.train()
        finally:
            handle.remove()
    assert any(len(s) == 3 and s[-1] == V for s in seen[stock])
    assert seen[fused] and all(s == () for s in seen[fused])  # the loss, not logits


def test_bf16_autocast(tmp_path):
    """SFTConfig's default bf16=True (CPU autocast): the same run as TRL's within bf16."""
    stock, fused = pair(tmp_path, bf16=True, max_steps=2)
    stock.train()
    fused.train()
    a, b = logged(stock), logged(fused)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y["loss"], x["loss"], rtol=2e-2, atol=0)
        torch.testing.assert_close(y["entropy"], x["entropy"], rtol=2e-2, atol=0)
        assert y["num_tokens"] == x["num_tokens"]


def test_peft_config(tmp_path):
    """peft_config (LoRA on the attention): SFTTrainer wraps the model in a PeftModel; the
    patched run equals TRL's."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0)
    stock, fused = pair(tmp_path, peft_config=lora, max_steps=2, learning_rate=5.0)
    stock.train()
    fused.train()
    assert_same_run(stock, fused)


def test_padding_free(tmp_path):
    """padding_free=True (one row of packed sequences, position_ids, no attention mask)."""
    stock, fused = pair(
        tmp_path, padding_free=True, max_length=None, max_steps=2, per_device_train_batch_size=3
    )
    stock.train()
    fused.train()
    assert_same_run(stock, fused)


def test_eps0_leaves_trl_unchanged(tmp_path):
    stock, fused = pair(tmp_path, label_smoothing_factor=0.0, max_steps=1)
    assert "compute_loss" not in vars(fused)
    assert not hasattr(fused.model, "fused_ls")
    assert fused.model.forward.__func__.__code__.co_name == "_fused_forward"  # TRL's own head


def test_fused_lm_head_protocol_keeps_true_log_probs(tmp_path):
    """After patch_trainer, model(..., fused_lm_head=True).log_probs are still log p(label)
    (what DPO, GRPO, KTO and RLOO read), not anything smoothed."""
    _, fused = pair(tmp_path, max_steps=1)
    model = fused.model
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    logits = model(input_ids=ids).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    expected = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
    torch.testing.assert_close(out.log_probs, expected, rtol=1e-5, atol=1e-5)
    # and the smoothed loss is what the plain labels call gives
    assert model(input_ids=ids, labels=labels).loss > -out.log_probs.sum() / (target != -100).sum()


def test_model_patched_before_the_trainer(tmp_path):
    """apply_fused_ls before SFTTrainer (whose fused head then wraps the patched forward), then
    patch_trainer: still one forward per micro-batch and TRL's values."""
    from fused_ls.integrations.transformers import apply_fused_ls

    model = tiny_llama()
    stock, _ = pair(tmp_path / "a", model=model, max_steps=2)
    apply_fused_ls(model, 0.3)  # another ε: patch_trainer sets the trainer's
    _, fused = pair(tmp_path / "b", model=model, max_steps=2)
    assert fused.model.fused_ls.smoothing == EPS
    stock.train()
    fused.train()
    assert_same_run(stock, fused)
    assert fused.forwards[0] == 2 * stock.args.gradient_accumulation_steps


def test_moe_router_loss_follows_trls_nll_path(tmp_path):
    """Mixtral: the patched step's loss is the smoothed cross-entropy / num_items_in_batch plus
    router_aux_loss_coef × aux_loss / accumulation steps (TRL's nll path), and aux_loss is
    logged; the cross-entropy part equals the dense smoothed loss on the model's logits."""
    cfg = transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, router_aux_loss_coef=0.2, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    _, fused = pair(tmp_path, model=transformers.MixtralForCausalLM(cfg), max_steps=1)
    assert fused.aux_loss_enabled
    batch = next(iter(fused.get_train_dataloader()))
    n = (batch["labels"][:, 1:] != -100).sum()
    fused.current_gradient_accumulation_steps = 2
    loss = fused.compute_loss(fused.model, dict(batch), num_items_in_batch=n)
    model = fused.model
    with torch.no_grad():
        out = model.forward.__self__.__class__.forward(
            model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            output_router_logits=True,
        )  # fmt: skip
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, V), labels.reshape(-1), label_smoothing=EPS, reduction="sum"
    )
    expected = ce / n + fused.router_aux_loss_coef * out.aux_loss / 2
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    assert fused._metrics["train"]["aux_loss"]


class NoKwargsLlama(transformers.LlamaForCausalLM):
    """A causal LM whose forward takes no **kwargs: Trainer's model_accepts_loss_kwargs is
    False, so Trainer passes no num_items_in_batch to the model and divides the per-micro-batch
    mean by the accumulation steps itself."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                use_cache=None):  # fmt: skip
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache,
        ).last_hidden_state  # fmt: skip
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


@pytest.mark.parametrize("kind", ["forward without **kwargs", "flag toggled"])
def test_model_not_accepting_loss_kwargs_with_accumulation(tmp_path, kind):
    """model_accepts_loss_kwargs False, gradient accumulation 2: the patched loss is the
    per-micro-batch mean (Trainer's compute_loss ignores num_items_in_batch then, and its
    training_step divides by the accumulation steps), as in TRL's own run; a num_items_in_batch
    handed to compute_loss is neither passed to a forward that does not take it nor used to
    scale the loss."""
    if kind == "flag toggled":
        stock, fused = pair(tmp_path, max_steps=2)
        for t in (stock, fused):
            t.model_accepts_loss_kwargs = False
    else:
        model = NoKwargsLlama(tiny_llama().config)
        model.load_state_dict(tiny_llama().state_dict())
        stock, fused = pair(tmp_path, model=model, max_steps=2)
    assert not stock.model_accepts_loss_kwargs and not fused.model_accepts_loss_kwargs
    it = iter(fused.get_train_dataloader())
    batch, other = next(it), next(it)
    # the tokens of the two micro-batches of an accumulation step
    n = sum((b["labels"][:, 1:] != -100).sum() for b in (batch, other))
    fused.current_gradient_accumulation_steps = 2
    expected = stock.compute_loss(stock.model, dict(batch))  # what Trainer's loop passes: None
    loss = fused.compute_loss(fused.model, dict(batch), num_items_in_batch=n)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    stock.train()
    fused.train()
    assert_same_run(stock, fused)


def test_patch_state_is_read_from_the_model_at_each_call(tmp_path):
    """revert_fused_ls + apply_fused_ls after patch_trainer give the model a new patch state:
    compute_loss uses the model's current one (TRL's loss), and refuses an unpatched model."""
    from fused_ls.integrations.transformers import apply_fused_ls, revert_fused_ls

    stock, fused = pair(tmp_path, max_steps=1)
    batch = next(iter(fused.get_train_dataloader()))
    revert_fused_ls(fused.model)
    apply_fused_ls(fused.model, EPS)
    expected = stock.compute_loss(stock.model, dict(batch))
    loss = fused.compute_loss(fused.model, dict(batch))
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    revert_fused_ls(fused.model)
    with pytest.raises(RuntimeError, match="did not reach the fused loss"):
        fused.compute_loss(fused.model, dict(batch))
