"""Per-op micro-benchmarks with pytest-benchmark (`make microbench`).

Forward+backward of each CPU backend and of eager PyTorch on a mid-size problem, every mode of the
op on the fastest backend. Timings only: correctness lives in tests/.
"""

import pytest
import torch
import torch.nn.functional as F

import fused_ls
from fused_ls.backends import Request, reasons_for

N, V = 1024, 32000
BACKENDS = [
    b for b in ("torch", "cpp") if not reasons_for(b, Request("cpu", torch.float32, False, False))
]


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, V, generator=g), torch.randint(0, V, (N,), generator=g)


def _fwd_bwd(loss_fn, x, y):
    xr = x.requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(xr, y), xr)
    return g


def test_eager_pytorch(benchmark, problem):
    x, y = problem
    benchmark(_fwd_bwd, lambda a, b: F.cross_entropy(a, b, label_smoothing=0.1), x.clone(), y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform(benchmark, problem, backend, dtype):
    x, y = problem
    fn = lambda a, b: fused_ls.label_smoothing_cross_entropy(a, b, 0.1, backend=backend)  # noqa: E731
    benchmark(_fwd_bwd, fn, x.to(dtype), y)


MODES = {
    "weight": lambda: {"weight": torch.rand(V) + 0.5},
    "sparse_sim_k8": lambda: {
        "similarity": fused_ls.SparseSimilarity(torch.randint(0, V, (V, 8)), torch.rand(V, 8) + 0.1)
    },
    "adaptive": lambda: {"adaptive": fused_ls.ConfidenceAdaptive(0.5, 2.0)},
    "z_loss_softcap": lambda: {"z_loss": 1e-4, "softcap": 30.0},
    "confidence_penalty": lambda: {"confidence_penalty": 0.1},
    "mixup": lambda: {"mix_target": torch.randint(0, V, (N,)), "mix_lambda": 0.7},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_modes(benchmark, problem, mode):
    x, y = problem
    kw = MODES[mode]()
    fn = lambda a, b: fused_ls.label_smoothing_cross_entropy(a, b, 0.1, **kw)  # noqa: E731
    benchmark(_fwd_bwd, fn, x.clone(), y)
