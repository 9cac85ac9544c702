"""The modules and entry points as users hold them: subclasses of the loss modules with their own
__init__, the keyword defaults of every entry point, and what `import fused_ls` loads."""

import pytest
import torch

import fused_ls
from fused_ls import FusedLabelSmoothingCE, FusedLinearLabelSmoothingCE


class MyLoss(FusedLabelSmoothingCE):
    def __init__(self, **kw):
        super().__init__(**kw)


class MyHead(FusedLinearLabelSmoothingCE):
    def __init__(self, **kw):
        super().__init__(**kw)


class MyLossTwice(MyLoss):  # two levels of __init__ without the keywords
    def __init__(self, eps=0.2, **kw):
        super().__init__(smoothing=eps, **kw)


def _loss_args():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 7, generator=g), torch.tensor([0, 1, 6, 3, -100, 2])


def _head_args():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 4, generator=g), torch.randn(7, 4, generator=g)
    return x, w, torch.tensor([0, 1, 6, 3, -100, 2])


def test_loss_subclass_with_own_init_takes_the_keywords():
    x, y = _loss_args()
    kw = dict(smoothing=0.3, reduction="sum", z_loss=1e-3, backend="torch")
    mine = MyLoss(**kw)
    assert mine.reduction == "sum" and mine.smoothing == 0.3
    torch.testing.assert_close(mine(x, y), FusedLabelSmoothingCE(**kw)(x, y), rtol=0, atol=0)
    two = MyLossTwice(eps=0.25, reduction="none")
    ref = FusedLabelSmoothingCE(smoothing=0.25, reduction="none")
    assert two.smoothing == 0.25
    torch.testing.assert_close(two(x, y), ref(x, y), rtol=0, atol=0)


def test_head_subclass_with_own_init_takes_the_keywords():
    x, w, y = _head_args()
    kw = dict(smoothing=0.2, reduction="none", chunk_size=2)
    mine = MyHead(**kw)
    assert mine.chunk_size == 2
    torch.testing.assert_close(
        mine(x, w, y), FusedLinearLabelSmoothingCE(**kw)(x, w, y), rtol=0, atol=0
    )


@pytest.mark.parametrize("cls", [MyLoss, MyHead, MyLossTwice])
def test_subclass_errors_name_the_keyword(cls):
    with pytest.raises(TypeError, match="label_smooth"):
        cls(label_smooth=0.1)
    with pytest.raises(ValueError, match="reduction"):
        cls(reduction="avg")
    with pytest.raises(ValueError, match="similarity_mix"):
        cls(similarity_mix=2.0)


def test_subclass_keywords_are_those_of_its_base():
    # the loss module takes inplace_backward, not chunk_size; the head module the other way round
    MyLoss(inplace_backward=True)
    MyHead(chunk_size=8)
    with pytest.raises(TypeError, match="chunk_size"):
        MyLoss(chunk_size=8)
    with pytest.raises(TypeError, match="inplace_backward"):
        MyHead(inplace_backward=True)
    with pytest.raises(TypeError, match="mix_target"):  # a per-call keyword, not a module's
        MyLoss(mix_target=torch.zeros(6, dtype=torch.long))


def test_plain_options_module_has_no_keywords():
    class Bare(fused_ls._entry.OptionsModule):
        pass

    with pytest.raises(TypeError, match="takes_keywords"):
        Bare(smoothing=0.1)


def test_parse_options_defaults_come_from_keywords():
    from fused_ls import _options, reference
    from fused_ls.linear import linear_label_smoothing_cross_entropy
    from fused_ls.loss import label_smoothing_cross_entropy

    entry_points = (
        label_smoothing_cross_entropy,
        linear_label_smoothing_cross_entropy,
        reference.cross_entropy,
        FusedLabelSmoothingCE.__init__,
        FusedLinearLabelSmoothingCE.__init__,
    )
    want = _options.parse_options(label_smoothing_cross_entropy, {})
    for fn in entry_points:
        assert _options.parse_options(fn, {}) == want, fn.__qualname__
    d = {n: k.default for n, k in _options.KEYWORDS.items()}
    assert (want.smoothing, want.ignore_index, want.reduction) == (
        d["smoothing"],
        d["ignore_index"],
        d["reduction"],
    )
    assert (want.similarity_mix, want.z_loss, want.confidence_penalty) == (
        d["similarity_mix"],
        d["z_loss"],
        d["confidence_penalty"],
    )
    assert (want.backend, want.return_stats, want.inplace_backward, want.chunk_size) == (
        d["backend"],
        d["return_stats"],
        d["inplace_backward"],
        d["chunk_size"],
    )


def test_import_does_not_load_the_build_module():
    import subprocess
    import sys

    code = "import sys, fused_ls; print('fused_ls.build' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
