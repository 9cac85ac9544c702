"""Bad input gets a clear error naming the argument, never a silent wrong answer."""

import pytest
import torch
import torch.nn.functional as F

import fused_ls
from fused_ls import ConfidenceAdaptive, SparseSimilarity

lsce = fused_ls.label_smoothing_cross_entropy
X = torch.randn(4, 5)
Y = torch.tensor([0, 1, 4, -100])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"smoothing": 1.5}, ValueError, "smoothing"),
        ({"smoothing": -0.1}, ValueError, "smoothing"),
        ({"smoothing": float("nan")}, ValueError, "smoothing"),
        ({"smoothing": torch.rand(3)}, ValueError, "smoothing tensor must have the target's shape"),
        ({"smoothing": torch.tensor([0.1, 2.0, 0.1, 0.1])}, ValueError, r"smoothing .*\[0, 1\]"),
        ({"smoothing": torch.tensor([0.1, float("nan"), 0.1, 0.1])}, ValueError, "smoothing"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"backend": "gpu"}, ValueError, "backend"),
        ({"weight": torch.ones(4)}, ValueError, "weight must have C=5"),
        ({"weight": torch.ones(5, 1)}, ValueError, "weight"),
        ({"similarity": torch.ones(4, 4)}, ValueError, "similarity must be"),
        ({"similarity": -torch.ones(5, 5)}, ValueError, "similarity rows"),
        ({"similarity": torch.zeros(5, 5)}, ValueError, "similarity rows"),
        ({"similarity": torch.full((5, 5), float("nan"))}, ValueError, "similarity rows"),
        ({"similarity": "cosine"}, TypeError, "similarity"),
        (
            {"similarity": SparseSimilarity(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))},
            ValueError,
            "similarity has 3 classes",
        ),
        ({"similarity_mix": 2.0}, ValueError, "similarity_mix"),
        ({"adaptive": 0.5}, TypeError, "adaptive"),
        ({"z_loss": float("inf")}, ValueError, "z_loss"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"softcap": -1.0}, ValueError, "softcap"),
        ({"confidence_penalty": float("nan")}, ValueError, "confidence_penalty"),
        ({"mix_target": torch.tensor([0, 1, 2, 3])}, ValueError, "mix_lambda is required"),
        ({"mix_lambda": 0.5}, ValueError, "mix_lambda given without mix_target"),
        ({"mix_target": torch.tensor([0, 1]), "mix_lambda": 0.5}, ValueError, "mix_target"),
        ({"mix_target": torch.tensor([0, 1, 2, 3]), "mix_lambda": 1.5}, ValueError, "mix_lambda"),
        ({"mix_target": torch.tensor([0, 9, 2, 3]), "mix_lambda": 0.5}, IndexError, "mix_target"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lsce(X, Y, **kwargs)


@pytest.mark.parametrize(
    "target, match",
    [
        (torch.tensor([0, 1, 5, 2]), "target contains 5"),
        (torch.tensor([0, -1, 2, 2]), "target contains -1"),
    ],
)
def test_target_out_of_range_names_the_value(target, match):
    with pytest.raises(IndexError, match=match):
        lsce(X, target)


def test_custom_ignore_index_is_not_an_error():
    y = torch.tensor([0, 7, 2, 7])
    loss = lsce(X, y, ignore_index=7, reduction="none")
    assert loss[1] == 0 and loss[3] == 0


@pytest.mark.parametrize(
    "logits, target, match",
    [
        (torch.randn(4, 5), torch.tensor([0, 1, 2]), "target shape"),
        (torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long), "target shape"),
        (torch.randn(5), torch.tensor([1]), "target shape"),
        (torch.randn(4, 0), torch.zeros(4, dtype=torch.long), "at least one class"),
        (torch.randn(4, 5), torch.zeros(4, 5), None),  # probabilities: valid, handled by PyTorch
        (torch.randn(4, 5), torch.zeros(4, 3), "probability targets"),
        (torch.randn(4, 5), torch.zeros(4, dtype=torch.bool), "integer"),
    ],
)
def test_shape_mismatch(logits, target, match):
    if match is None:  # valid: the loss is PyTorch's, not an error
        probs = torch.softmax(target, 1)
        want = F.cross_entropy(logits, probs, label_smoothing=0.1)
        torch.testing.assert_close(lsce(logits, probs), want, rtol=0, atol=0)
    else:
        with pytest.raises(ValueError, match=match):
            lsce(logits, target)


def test_type_errors():
    with pytest.raises(TypeError, match="logits"):
        lsce(torch.zeros(4, 5, dtype=torch.long), Y)
    with pytest.raises(TypeError, match="target"):
        lsce(X, [0, 1, 2, 3])


def test_soft_targets_reject_fused_only_options():
    with pytest.raises(ValueError, match="similarity"):
        lsce(X, torch.softmax(X, 1), similarity=torch.ones(5, 5))


@pytest.mark.parametrize(
    "ctor, match",
    [
        (lambda: ConfidenceAdaptive(threshold=1.5), "threshold"),
        (lambda: ConfidenceAdaptive(factor=-1.0), "factor"),
        (lambda: ConfidenceAdaptive(confidence="mean"), "confidence"),
        (lambda: SparseSimilarity(torch.tensor([[0, 5]]), torch.ones(1, 2)), "indices"),
        (lambda: SparseSimilarity(torch.tensor([[0]]), -torch.ones(1, 1)), "non-negative"),
        (lambda: SparseSimilarity(torch.tensor([[-1]]), torch.ones(1, 1)), "row 0"),
        (lambda: SparseSimilarity(torch.tensor([[0]]), torch.ones(1, 2)), "values"),
        (lambda: fused_ls.FusedLabelSmoothingCE(smoothing=3), "smoothing"),
        (lambda: fused_ls.FusedLabelSmoothingCE(reduction="x"), "reduction"),
    ],
)
def test_constructor_errors(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor()


def test_module_unknown_keyword():
    with pytest.raises(TypeError, match="label_smooth"):
        fused_ls.FusedLabelSmoothingCE(label_smooth=0.1)


def test_unavailable_backend_says_why():
    req = fused_ls.backends.Request("cpu", torch.float32, False, False)
    unable = [n for n in fused_ls.BACKEND_NAMES if fused_ls.backends.reasons_for(n, req)]
    if not unable:
        pytest.skip("every backend can serve CPU tensors here")
    for name in unable:
        with pytest.raises(ValueError, match=f"backend '{name}' cannot serve this call: .+"):
            lsce(X, Y, backend=name)
