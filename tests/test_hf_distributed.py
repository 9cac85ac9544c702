"""The transformers integration under sharding, with real processes (gloo over 127.0.0.1, the
launcher of tests/test_parallel.py): FSDP2 (patched before or after ``fully_shard``, ``lm_head``
in the root unit or its own), transformers' tensor-parallel plan (``from_pretrained(...,
tp_plan="auto")``: a colwise ``Shard(0)`` head) and DeepSpeed ZeRO-3 (``DS_ACCELERATOR=cpu``).

Each rank compares the patched model with the same model, sharded the same way, unpatched, whose
``loss_function`` is the dense smoothed loss on its logits (ForCausalLMLoss's shift): the loss
(rtol 1e-5) and every parameter's full gradient (rtol 1e-4, atol 1e-5 of its largest), on
per-rank batches (data parallel for FSDP2 and ZeRO-3: the gradient is the reduced one).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from helpers import load_script  # noqa: E402
from test_parallel import _launch  # noqa: E402

from fused_ls.integrations.transformers import apply_fused_ls  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed")
EPS = 0.1
V = 250  # not divisible by the world size: uneven shards
WORLD = 2
# the reference's loss_function: ForCausalLMLoss with the dense smoothed loss
smoothed_loss = load_script("model_table").smoothed_loss(EPS)


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.1,
        tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, V, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return dict(input_ids=ids, labels=labels)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def compare(model, ref, loss, ref_loss, what, grads=None):
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0, msg=f"{what}: loss")
    got = grads or {n: full(p.grad) for n, p in model.named_parameters()}
    want = {n: full(p.grad) for n, p in ref.named_parameters()} if grads is None else ref
    assert got.keys() == want.keys() and got, what
    for name, g in got.items():
        r = want[name]
        scale = float(r.abs().max())
        assert scale > 0, f"{what}: {name} has no gradient"
        torch.testing.assert_close(
            g, r, rtol=1e-4, atol=1e-5 * scale, msg=f"{what}: gradient of {name}"
        )


# ---- FSDP2 ----------------------------------------------------------------------------------
def _fsdp(model, own_unit: bool):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    if own_unit:
        fully_shard(model.lm_head)
    fully_shard(model)
    return model


def check_fsdp2(rank, world):
    base = tiny_llama()
    data = batch(rank)
    for own_unit in (False, True):
        ref = _fsdp(copy.deepcopy(base), own_unit)
        ref.loss_function = smoothed_loss
        ref_loss = ref(**data).loss
        ref_loss.backward()
        for when in ("before", "after"):
            what = f"FSDP2 patched {when} fully_shard, lm_head {'own unit' if own_unit else 'root'}"
            model = copy.deepcopy(base)
            if when == "before":
                model = _fsdp(apply_fused_ls(model, EPS), own_unit)
            else:
                model = apply_fused_ls(_fsdp(model, own_unit), EPS)
            out = model(**data)
            assert out.logits is None, what
            out.loss.backward()
            compare(model, ref, out.loss, ref_loss, what)


# ---- transformers' tensor-parallel plan ---------------------------------------------------------
class _Gathers(TorchDispatchMode):
    """Records the size of every all-gather's output (DTensor redistributions included)."""

    def __enter__(self):
        super().__enter__()
        self.sizes = []
        return self.sizes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "all_gather" in str(func):
            self.sizes.append(out.numel())
        return out


def check_tp(rank, world):
    path = os.environ["FUSED_LS_TEST_MODEL"]
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    kw = dict(tp_plan="auto", tp_size=world, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
    ref.train()  # from_pretrained gives eval mode
    model.train()
    w = model.lm_head.weight
    assert type(w).__name__ == "DTensor", (type(w), w.shape, model.tp_size, model._tp_plan)
    ref.loss_function = smoothed_loss
    data = batch(0)  # tensor parallel: the same batch on every rank
    with _Gathers() as ref_gathers:
        ref_loss = ref(**data).loss
    ref_loss.backward()
    assert max(ref_gathers) >= 2 * 12 * V  # the unpatched head gathers its logits
    apply_fused_ls(model, EPS)
    with _Gathers() as gathers:
        out = model(**data)
    assert out.logits is None
    assert max(gathers, default=0) < V, f"an all-gather of {max(gathers)} elements"
    out.loss.backward()
    compare(model, ref, out.loss, ref_loss, "tensor-parallel plan")


# ---- DeepSpeed ZeRO-3 -------------------------------------------------------------------------
def check_zero3(rank, world):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        # persistence 0: every parameter partitioned (small ones are kept whole by default)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    data = batch(rank)
    grads, losses = {}, {}
    for name in ("ref", "fused"):
        model = tiny_llama()
        if name == "ref":
            model.loss_function = smoothed_loss
        else:
            apply_fused_ls(model, EPS)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        assert engine.module.lm_head.weight.numel() == 0, "ZeRO-3 partitions the head"
        loss = engine(**data).loss
        engine.backward(loss)
        losses[name] = loss.detach()
        grads[name] = {
            n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()
        }
        engine.destroy()
    compare(None, grads["ref"], losses["fused"], losses["ref"], "ZeRO-3", grads=grads["fused"])


# ---- the tests ------------------------------------------------------------------------------
def test_fsdp2():
    _launch(WORLD, "test_hf_distributed:check_fsdp2", timeout=300)


def test_tensor_parallel_plan(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    os.environ["FUSED_LS_TEST_MODEL"] = str(tmp_path)  # inherited by the spawned processes
    try:
        _launch(WORLD, "test_hf_distributed:check_tp", timeout=300)
    finally:
        del os.environ["FUSED_LS_TEST_MODEL"]


def test_deepspeed_zero3():
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    _launch(WORLD, "test_hf_distributed:check_zero3", timeout=300)
