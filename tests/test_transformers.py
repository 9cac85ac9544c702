"""fused_ls.integrations.transformers on tiny causal LMs built from configs (random weights, no
download): the patched loss and every parameter's gradient against the unpatched model's logits
through F.cross_entropy(label_smoothing=ε) after the shift (and transformers' own LabelSmoother /
ForCausalLMLoss where the semantics agree), Trainer, refusals and revert."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip(
    "transformers",
    reason="transformers is not importable (pip install fused_ls[transformers])",
    exc_type=ImportError,
)

from helpers import load_script  # noqa: E402
from transformers import TrainingArguments  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402
from transformers.modeling_utils import slice_logits_to_keep  # noqa: E402
from transformers.trainer_pt_utils import LabelSmoother  # noqa: E402

import fused_ls  # noqa: E402
from fused_ls.integrations.transformers import (  # noqa: E402
    FusedLSTrainer,
    UnsupportedModelError,
    apply_fused_ls,
    patch_trainer,
    revert_fused_ls,
)

# the compatibility script: its reference loss_function (ForCausalLMLoss, dense and smoothed)
model_table = load_script("model_table")

# Whole-model gradients go through every layer's backward, so fp32 gets a looser tolerance than a
# single op (tests/helpers.TOL); atol is relative to the parameter's largest gradient.
MODEL_TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-4, 1e-5)}
EPS = 0.1

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    initializer_range=0.1,  # logits of a few units, so that the smoothing and the softcap matter
    attn_implementation="eager",
)
# family -> (config class, model class, config overrides). Llama keeps a real vocabulary (32000);
# the others use 512 to keep the file fast. Gemma2/3: a small final_logit_softcapping so that the
# cap changes the loss measurably (checked in test_softcap).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=32000)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),  # tied embeddings
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=1.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(final_logit_softcapping=1.0)),
}


def make_model(family="llama", dtype=torch.float64, seed=0, **overrides):
    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{"vocab_size": 512, **TINY, **extra, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).to(dtype)


def make_batch(vocab, B=2, T=12, seed=1):
    """input_ids, an attention mask with right padding on row 1, and labels with -100 on the
    padding and on a 3-token 'prompt' of row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 4 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def shifted(logits, labels):
    """ForCausalLMLoss's shift: logits [..., :-1] predict labels [..., 1:]; flattened."""
    return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


def reference_loss(ref_model, batch, eps=EPS, num_items=None):
    """The unpatched model's logits through F.cross_entropy(label_smoothing=eps)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits, target = shifted(ref_model(**inputs).logits, batch["labels"])
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    if num_items is None:
        return F.cross_entropy(logits, target, label_smoothing=eps)
    return F.cross_entropy(logits, target, label_smoothing=eps, reduction="sum") / num_items


def assert_close(a, b, dtype, scale=1.0, msg=""):
    rtol, atol = MODEL_TOL[dtype]
    torch.testing.assert_close(
        a, b.to(a.dtype), rtol=rtol, atol=atol * scale, msg=lambda m: f"{msg}: {m}" if msg else m
    )


def assert_same_grads(model, ref, dtype):
    """Every parameter's gradient (tied ones once) equal, parameter by parameter."""
    named, ref_named = dict(model.named_parameters()), dict(ref.named_parameters())
    assert named.keys() == ref_named.keys() and named
    for name, p in named.items():
        q = ref_named[name]
        assert p.grad is not None and q.grad is not None, name
        assert q.grad.abs().max() > 0 or name.endswith("bias"), name  # a gradient that can fail
        scale = float(q.grad.abs().max())
        assert_close(p.grad, q.grad, dtype, scale, f"gradient of {name}")


def patched_pair(family="llama", dtype=torch.float64, eps=EPS, **options):
    ref = make_model(family, dtype)
    model = apply_fused_ls(copy.deepcopy(ref), eps, **options)
    return model, ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_and_every_gradient_match_reference(family, dtype):
    model, ref = patched_pair(family, dtype)
    batch = make_batch(model.config.vocab_size)
    out = model(**batch)
    assert out.logits is None  # training with labels: no logits come back
    expected = reference_loss(ref, batch)
    assert_close(out.loss, expected, dtype)
    out.loss.backward()
    expected.backward()
    assert_same_grads(model, ref, dtype)


def test_no_logits_are_built_in_training():
    """The head module is called once (so that hooks gathering its weight fire) but returns the
    loss: no [B, T, V] logits in training; eval builds them, as the model does."""
    model, _ = patched_pair()
    shapes = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: shapes.append(tuple(out.shape)) if mod is model.lm_head else None
    )
    try:
        model(**make_batch(model.config.vocab_size)).loss.backward()
        model.eval()
        model(**make_batch(model.config.vocab_size))  # eval builds them, as the model does
    finally:
        handle.remove()
    V = model.config.vocab_size
    # training: the head's call returns the scalar loss; eval: the loss, then the logits
    assert shapes == [(), (), (2, 12, V)]


def test_agrees_with_transformers_label_smoother():
    """Trainer's LabelSmoother(ε) on the unpatched model's outputs, with and without
    num_items_in_batch, is the same loss (fp32: LabelSmoother sums log-probabilities in fp32)."""
    model, ref = patched_pair(dtype=torch.float32)
    batch = make_batch(model.config.vocab_size)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref_out = ref(**inputs)
    for n in (None, torch.tensor(37)):
        smoother = LabelSmoother(epsilon=EPS)
        expected = smoother(ref_out, batch["labels"], shift_labels=True, num_items_in_batch=n)
        kwargs = {} if n is None else {"num_items_in_batch": n}
        assert_close(model(**batch, **kwargs).loss, expected, torch.float32)


@pytest.mark.parametrize("case", ["plain", "num_items_in_batch", "shift_labels", "logits_to_keep"])
def test_eps0_is_the_models_own_loss(case):
    """With ε = 0 the patched loss is exactly transformers' ForCausalLMLoss, for each of the
    keywords that change how it counts or shifts. (fp32: ForCausalLMLoss casts fp64 logits to fp32,
    the fused loss keeps fp64.)"""
    model, ref = patched_pair(dtype=torch.float32, eps=0.0)
    batch = make_batch(model.config.vocab_size)
    kwargs = {}
    if case == "num_items_in_batch":
        kwargs["num_items_in_batch"] = torch.tensor(29)
    elif case == "shift_labels":
        kwargs["shift_labels"] = torch.roll(batch["labels"], -1, dims=1)  # wraps: not the shift
    elif case == "logits_to_keep":
        kwargs["logits_to_keep"] = 5
        batch["labels"] = batch["labels"][:, -5:]
    out, expected = model(**batch, **kwargs), ref(**batch, **kwargs)
    assert out.logits is None
    assert_close(out.loss, expected.loss, torch.float32)
    out.loss.backward()
    expected.loss.backward()
    assert_same_grads(model, ref, torch.float32)


def test_shift_labels_replace_labels():
    """shift_labels are used as given (ForCausalLMLoss ignores labels' values then)."""
    model, ref = patched_pair()
    batch = make_batch(model.config.vocab_size)
    shift = torch.roll(batch["labels"], -2, dims=1)
    out = model(**{**batch, "labels": torch.zeros_like(batch["labels"])}, shift_labels=shift)
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    V = logits.shape[-1]
    expected = F.cross_entropy(logits.reshape(-1, V), shift.reshape(-1), label_smoothing=EPS)
    assert_close(out.loss, expected, torch.float64)


def test_num_items_in_batch_gradient_accumulation():
    """Two half-batches, each summed and divided by the whole batch's token count (what Trainer
    passes), accumulate to the loss and gradients of one big batch's mean."""
    model, ref = patched_pair()
    batch = make_batch(model.config.vocab_size, B=4)
    n = int((batch["labels"][:, 1:] != -100).sum())  # Trainer counts labels[..., 1:]
    total = 0.0
    for half in (slice(0, 2), slice(2, 4)):
        part = {k: v[half] for k, v in batch.items()}
        loss = model(**part, num_items_in_batch=torch.tensor(n)).loss
        loss.backward()
        total = total + loss.detach()
    expected = reference_loss(ref, batch)
    expected.backward()
    assert_close(total, expected, torch.float64)
    assert_same_grads(model, ref, torch.float64)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_softcap(family):
    """final_logit_softcapping becomes the fused function's softcap: the loss equals the
    reference on the model's (capped) logits, and differs from the uncapped one."""
    model, ref = patched_pair(family)
    batch = make_batch(model.config.vocab_size)
    out = model(**batch)
    expected = reference_loss(ref, batch)
    assert_close(out.loss, expected, torch.float64)
    uncapped = copy.deepcopy(ref)
    uncapped.config.final_logit_softcapping = None
    assert (reference_loss(uncapped, batch) - expected).abs() > 1e-3
    with pytest.raises(TypeError, match="soft-caps its logits itself"):
        apply_fused_ls(model, EPS, softcap=5.0)


def test_options_pass_through():
    """Every keyword goes to the fused function unchanged: z-loss, confidence penalty, adaptive and
    similarity smoothing equal label_smoothing_cross_entropy on the reference logits."""
    V = 512
    sim = fused_ls.SparseSimilarity(
        torch.randint(0, V, (V, 4), generator=torch.Generator().manual_seed(3)), torch.ones(V, 4)
    )
    options = dict(
        z_loss=1e-3,
        confidence_penalty=0.05,
        adaptive=fused_ls.ConfidenceAdaptive(threshold=0.5, factor=2.0),
        similarity=sim,
        similarity_mix=0.5,
    )
    model, ref = patched_pair("mistral", **options)
    batch = make_batch(V)
    logits, target = shifted(ref(input_ids=batch["input_ids"]).logits, batch["labels"])
    expected = fused_ls.label_smoothing_cross_entropy(logits, target, EPS, **options)
    plain = F.cross_entropy(logits, target, label_smoothing=EPS)
    assert (expected - plain).abs() > 1e-4  # the options change the loss
    assert_close(model(**batch).loss, expected, torch.float64)


def test_invalid_option_is_refused_by_the_fused_function():
    model = make_model()
    with pytest.raises(ValueError, match="z_loss"):
        apply_fused_ls(model, EPS, z_loss=float("nan"))
    with pytest.raises(ValueError, match="smoothing"):
        apply_fused_ls(model, 1.5)
    with pytest.raises(TypeError, match="reduction"):
        apply_fused_ls(model, EPS, reduction="sum")
    assert "forward" not in vars(model) and not hasattr(model, "fused_ls")


def test_eval_returns_logits_and_the_smoothed_loss():
    model, ref = patched_pair()
    model.eval()
    ref.eval()
    batch = make_batch(model.config.vocab_size)
    with torch.no_grad():
        out, ref_out = model(**batch), ref(**batch)
        assert torch.equal(out.logits, ref_out.logits)
        assert_close(out.loss, reference_loss(ref, batch), torch.float64)
        no_labels = {k: v for k, v in batch.items() if k != "labels"}
        assert torch.equal(model(**no_labels).logits, ref(**no_labels).logits)
    # the eval logits of a soft-capped model are capped, as the model's own
    model, ref = patched_pair("gemma2")
    model.eval()
    batch = make_batch(model.config.vocab_size)
    assert torch.equal(model(**batch).logits, ref(**batch).logits)


def test_return_dict_false():
    model, ref = patched_pair()
    batch = make_batch(model.config.vocab_size)
    out = model(**batch, return_dict=False)
    assert isinstance(out, tuple)
    assert_close(out[0], reference_loss(ref, batch), torch.float64)


def test_revert_restores_the_original_outputs():
    model, ref = patched_pair()
    batch = make_batch(model.config.vocab_size)
    assert model(**batch).logits is None
    assert revert_fused_ls(model) is model
    assert "forward" not in vars(model) and not hasattr(model, "accepts_loss_kwargs")
    out, expected = model(**batch), ref(**batch)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
    revert_fused_ls(model)  # a no-op now


def test_apply_twice_replaces_the_options():
    model, ref = patched_pair()
    apply_fused_ls(model, 0.0)
    batch = make_batch(model.config.vocab_size)
    assert_close(model(**batch).loss, reference_loss(ref, batch, eps=0.0), torch.float64)
    model.fused_ls.smoothing = 0.2  # e.g. set by fused_ls.SmoothingScheduler(model.fused_ls, ...)
    assert_close(model(**batch).loss, reference_loss(ref, batch, eps=0.2), torch.float64)


class InlineSliceLlama(transformers.LlamaForCausalLM):
    """The head as transformers 5.0 wrote it (inline slice_indices) must be recognised."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = (
            slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        )
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class ScaledLlama(InlineSliceLlama):
    """An operation on the logits that is not a constant scale: must be refused, naming it."""

    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, **kwargs)
        hidden_states = outputs.last_hidden_state
        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states) - self.lm_head(hidden_states).sum(-1, keepdim=True)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class LeftCapLlama(InlineSliceLlama):
    """A final soft cap written with the factor on the left, c·tanh(z / c) (Jev's form)."""

    cap = 0.5

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        logits = self.cap * torch.tanh(logits / self.cap)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_soft_cap_with_the_factor_on_the_left():
    """c·tanh(z / c) is the soft cap as z·... is: accepted when patching and at call time (the
    two read the same fold), loss and gradients exact, and the cap does change the loss."""
    ref = LeftCapLlama(make_model(vocab_size=512).config).double()
    batch = make_batch(512)
    out, _ = forward_pair(ref, torch.float64, **batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    uncapped = F.cross_entropy(
        *shifted(ref.lm_head(ref.model(**inputs).last_hidden_state), batch["labels"]),
        label_smoothing=EPS,
    )
    assert (out.loss - uncapped).abs() > 1e-2


def test_inline_slice_form_of_transformers_5_0():
    ref = make_model(dtype=torch.float32)
    model = InlineSliceLlama(ref.config)
    model.load_state_dict(ref.state_dict())
    ref_inline = copy.deepcopy(model)
    apply_fused_ls(model, 0.0)
    batch = make_batch(model.config.vocab_size)
    batch["labels"] = batch["labels"][:, -7:]
    out, expected = model(**batch, logits_to_keep=7), ref_inline(**batch, logits_to_keep=7)
    assert_close(out.loss, expected.loss, torch.float32)


def _scaled():
    return ScaledLlama(make_model(vocab_size=512).config)


def _lora_like_head():
    class AdapterLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = make_model(vocab_size=512)
    model.lm_head = AdapterLinear(64, 512, bias=False)
    return model


def _padded_vocab():
    model = make_model(vocab_size=512)
    model.lm_head = torch.nn.Linear(64, 520, bias=False)
    return model


def _custom_loss_function():
    model = make_model(vocab_size=512)
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    return model


@pytest.mark.parametrize(
    "build, match",
    [
        (_scaled, r"self\.lm_head\(hidden_states\)\.sum\(-1, keepdim=True\)"),
        (_lora_like_head, "lm_head is a AdapterLinear, not a plain nn.Linear"),
        (
            _padded_vocab,
            r"lm_head has 520 rows but the loss's vocab_size \(self\.config\.vocab_size\) is 512",
        ),
        (_custom_loss_function, "not ForCausalLMLoss"),
    ],
    ids=["subclass", "adapter", "vocab", "loss"],
)
def test_refused_models_are_left_untouched(build, match):
    model = build()
    with pytest.raises(UnsupportedModelError, match=match):
        apply_fused_ls(model, EPS)
    assert "forward" not in vars(model) and not hasattr(model, "fused_ls")


def test_hooks_added_after_patching_are_refused_at_call_time():
    model, _ = patched_pair()
    model.lm_head.register_forward_pre_hook(lambda mod, args: None)
    with pytest.raises(UnsupportedModelError, match="forward hooks"):
        model(**make_batch(model.config.vocab_size))


def test_import_fused_ls_does_not_import_transformers():
    code = "import sys, fused_ls; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------


class Rows(torch.utils.data.Dataset):
    def __init__(self, vocab, n=8, T=12):
        batch = make_batch(vocab, B=n, T=T, seed=5)
        batch["labels"][2:, :2] = -100  # uneven counts per micro-batch
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def trainer_args(tmp_path, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
        optim="sgd",  # updates linear in the gradients, so parameters compare tightly
        learning_rate=0.5,
        logging_steps=1,
        label_smoothing_factor=EPS,
        seed=0,
        **kw,
    )


@pytest.mark.skipif(
    not transformers.utils.is_accelerate_available(), reason="Trainer needs accelerate"
)
@pytest.mark.parametrize("how", ["FusedLSTrainer", "patch_trainer"])
def test_trainer_trains_like_the_label_smoother(tmp_path, how):
    """Two optimizer steps with gradient accumulation 2 (num_items_in_batch over uneven
    micro-batches): the same logged losses, parameters and eval loss as Trainer's own
    LabelSmoother path."""
    V = 512
    ref_model = make_model(dtype=torch.float32, vocab_size=V)
    data = Rows(V)
    stock = transformers.Trainer(
        model=ref_model,
        args=trainer_args(tmp_path / "stock"),
        train_dataset=data,
        eval_dataset=data,
    )
    assert stock.label_smoother is not None
    model = copy.deepcopy(ref_model)
    kw = dict(model=model, train_dataset=data, eval_dataset=data)
    if how == "FusedLSTrainer":
        fused = FusedLSTrainer(args=trainer_args(tmp_path / "fused"), **kw)
    else:
        fused = transformers.Trainer(args=trainer_args(tmp_path / "fused"), **kw)
        fused.model_accepts_loss_kwargs = False  # a stale value: patch_trainer must recompute it
        assert patch_trainer(fused) is fused
    assert fused.label_smoother is None and fused.model_accepts_loss_kwargs is True
    assert model.fused_ls.smoothing == EPS

    stock.train()
    fused.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (fused, stock)]
    assert len(losses[0]) == 2
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=f"parameter {name}")
    ev = [t.evaluate()["eval_loss"] for t in (fused, stock)]
    torch.testing.assert_close(ev[0], ev[1], rtol=1e-5, atol=0)


@pytest.mark.skipif(
    not transformers.utils.is_accelerate_available(), reason="Trainer needs accelerate"
)
def test_fused_trainer_patches_models_from_model_init(tmp_path):
    """train() re-creates the model from model_init: the new model is patched too."""
    V = 512
    trainer = FusedLSTrainer(
        model_init=lambda: make_model(dtype=torch.float32, vocab_size=V),
        args=trainer_args(tmp_path),
        train_dataset=Rows(V),
        fused_ls_options=dict(z_loss=1e-4),
    )
    first = trainer.model
    trainer.train()
    assert trainer.model is not first  # re-created by train()
    assert trainer.model.fused_ls.options == {"z_loss": 1e-4}
    assert trainer.model.fused_ls.smoothing == EPS and trainer.label_smoother is None


# ------------------------------------------------------------------------------------------------
# Beyond the plain head: MoE router loss, what the forward (not the config) does, VLM pixels,
# accelerate's hooks
# ------------------------------------------------------------------------------------------------


def forward_pair(ref, dtype, **inputs):
    """(patched output, reference output) after backward, for a model and its reference."""
    model = copy.deepcopy(ref)
    ref.loss_function = model_table.smoothed_loss(EPS)
    apply_fused_ls(model, EPS)
    out, expected = model(**inputs), ref(**inputs)
    assert_close(out.loss, expected.loss, dtype)
    out.loss.backward()
    expected.loss.backward()
    # every gradient the reference has (a VLM's unused vision parameters have none, the CLS
    # embedding LLaVA drops has zeros), relative to the model's largest
    top = max(float(q.grad.abs().max()) for q in ref.parameters() if q.grad is not None)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert_close(p.grad, q.grad, dtype, top, f"gradient of {name}")
    return out, expected


def test_moe_router_loss_is_added_as_the_model_adds_it():
    """Mixtral: loss = smoothed CE + router_aux_loss_coef · aux_loss, aux_loss returned; fp32
    (its grouped-GEMM experts do not run in fp64)."""
    cfg = transformers.MixtralConfig(
        vocab_size=512, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5,
        **TINY,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.MixtralForCausalLM(cfg)
    batch = make_batch(512)
    out, expected = forward_pair(ref, torch.float32, **batch, output_router_logits=True)
    assert out.aux_loss is not None and out.logits is None
    torch.testing.assert_close(out.aux_loss, expected.aux_loss)
    ce = reference_loss(ref, batch)
    assert (out.loss - ce - 0.5 * out.aux_loss).abs() < 1e-5  # the router term is in the loss


@pytest.mark.parametrize("cls, scale", [("CohereForCausalLM", "logit_scale"),
                                        ("GraniteForCausalLM", "logits_scaling")])  # fmt: skip
def test_scaled_heads(cls, scale):
    """Cohere multiplies the logits by logit_scale, Granite divides them by logits_scaling: both
    read at call time (a changed value is followed)."""
    cfg = getattr(transformers, cls.replace("ForCausalLM", "Config"))(vocab_size=512, **TINY)
    setattr(cfg, scale, 0.25)
    torch.manual_seed(0)
    ref = getattr(transformers, cls)(cfg).double()
    forward_pair(ref, torch.float64, **make_batch(512))


def test_gemma3_vlm_does_not_softcap_although_its_config_says_so():
    """Gemma3ForConditionalGeneration's forward applies no final soft cap; its text config's
    final_logit_softcapping (set here) must not be applied (a patch that read the config would)."""
    text = transformers.Gemma3TextConfig(vocab_size=512, final_logit_softcapping=1.0, **TINY)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=14,
    )  # fmt: skip
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(cfg).double()
    batch = make_batch(512)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    capped = F.cross_entropy(
        *shifted(1.0 * torch.tanh(ref(**inputs).logits / 1.0), batch["labels"]),
        label_smoothing=EPS,
    )
    out, _ = forward_pair(ref, torch.float64, **batch)
    assert (out.loss - capped).abs() > 1e-2


def test_vlm_batch_with_pixel_values():
    """LLaVA with an image in every row: the same loss and gradients, vision tower included."""
    text = transformers.LlamaConfig(vocab_size=300, **TINY)
    vision = transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    cfg = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_id=299)
    torch.manual_seed(0)
    ref = transformers.LlavaForConditionalGeneration(cfg).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 290, (2, 24), generator=g)
    ids[:, 2:18] = 299  # (32 / 8)² = 16 image tokens
    labels = ids.masked_fill(ids == 299, -100)
    pixels = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    forward_pair(ref, torch.float64, input_ids=ids, pixel_values=pixels, labels=labels)
    assert ref.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().max() > 0


def test_accelerate_offloaded_head():
    """accelerate's cpu_offload on the head (weights on the meta device outside its call, loaded
    by its AlignDevicesHook): the fused loss runs inside the hooked call, same loss."""
    accelerate = pytest.importorskip("accelerate")
    ref = make_model(dtype=torch.float64, vocab_size=512)
    model = copy.deepcopy(ref)
    accelerate.cpu_offload(model.lm_head, execution_device="cpu")
    assert model.lm_head.weight.device.type == "meta"
    apply_fused_ls(model, EPS)
    batch = make_batch(512)
    with torch.no_grad():
        assert_close(model(**batch).loss, reference_loss(ref, batch), torch.float64)
    assert model.lm_head.weight.device.type == "meta"  # offloaded again after the call


def test_apply_on_a_model_whose_forward_was_wrapped_after_patching():
    """Patched, then wrapped by another instance forward (TRL's fused head does that): applying
    again updates ε and the options and keeps the wrapper."""
    model, ref = patched_pair()
    inner = model.forward
    model.forward = lambda *a, **k: inner(*a, **k)
    wrapper = model.forward
    apply_fused_ls(model, 0.2)
    assert model.forward is wrapper and model.fused_ls.smoothing == 0.2
    batch = make_batch(model.config.vocab_size)
    assert_close(model(**batch).loss, reference_loss(ref, batch, eps=0.2), torch.float64)


def test_vocab_refusal_names_the_head_attribute():
    """GPT-NeoX Japanese's head is `embed_out`: a head whose rows differ from the loss's
    vocab_size is refused naming it, at call time (a head swapped after patching) and when
    patching."""
    cfg = transformers.GPTNeoXJapaneseConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPTNeoXJapaneseForCausalLM(cfg)
    apply_fused_ls(model, EPS)
    model.embed_out = torch.nn.Linear(32, 520, bias=False)
    why = r"embed_out has 520 rows but the loss's vocab_size \(self\.config\.vocab_size\) is 512"
    with pytest.raises(UnsupportedModelError, match=why):
        model(**make_batch(512))
    revert_fused_ls(model)
    with pytest.raises(UnsupportedModelError, match=why):
        apply_fused_ls(model, EPS)
