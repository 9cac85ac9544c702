"""Shared test machinery: the one table of modes, the one list of backends, the one way to
build a case, and the comparison of a backend with the dense float64 reference.

Tolerances are data (``TOL``). For bf16/fp16 the allowed error is relative to what plain PyTorch
makes in the same precision (the dense reference computed in that dtype), as in flash-attention's
tests: error(ours) <= 2 · error(pytorch_lowp) + atol, both measured against float64.

Environment (benchmarks/gpu_check.py sets the first):
    FUSED_LS_TEST_DEVICE=cuda    the device of the files that follow it (``device_under_test``)
    FUSED_LS_TEST_BACKENDS=a,b   only these backends (``backends``), taken as asked
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

import fused_ls
from fused_ls import ConfidenceAdaptive, SparseSimilarity, reference
from fused_ls._entry import make_problem
from fused_ls._options import parse_options
from fused_ls.backends import BACKEND_NAMES, Request, reasons_for

# dtype -> (rtol, atol) for fp32/fp64 direct comparison; (factor, atol) for low precision.
TOL = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2.0, 1e-2),
    torch.float16: (2.0, 2e-3),
}
LOW = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# the device and the backends under test
# ---------------------------------------------------------------------------------------------
def device_under_test(gpu_if_present: bool = False) -> torch.device:
    """The device of a file's tensors: ``FUSED_LS_TEST_DEVICE`` when set, else CPU; with
    ``gpu_if_present``, CUDA where a GPU exists (the Triton file: the compiled kernels on a GPU,
    the interpreter without one)."""
    env = os.environ.get("FUSED_LS_TEST_DEVICE")
    if env:
        return torch.device(env)
    return torch.device("cuda" if gpu_if_present and torch.cuda.is_available() else "cpu")


def backends(device="cpu", *, interpreted_triton=False, among=BACKEND_NAMES) -> list[str]:
    """The backends a test runs on: those of ``among`` that serve float32 tensors on ``device`` in
    this process, in ``BACKEND_NAMES`` order. Triton on CPU tensors (the interpreter: slow) only
    with ``interpreted_triton``; files that leave it out have their Triton cases elsewhere.

    ``FUSED_LS_TEST_BACKENDS=a,b`` narrows every list to those names (of ``among``), taken as
    asked: one that cannot serve is kept, so that its tests fail with the backend's reason
    instead of passing by testing nothing. An unknown name is an error.
    """
    env = os.environ.get("FUSED_LS_TEST_BACKENDS")
    if env:
        names = [n.strip() for n in env.split(",") if n.strip()]
        unknown = [n for n in names if n not in BACKEND_NAMES]
        if unknown:
            raise ValueError(
                f"FUSED_LS_TEST_BACKENDS names unknown backends {unknown}; known: {BACKEND_NAMES}"
            )
        return [n for n in names if n in among]
    dev = torch.device(device)
    req = Request(dev.type, torch.float32)
    return [
        b
        for b in among
        if not reasons_for(b, req) and (interpreted_triton or b != "triton" or dev.type != "cpu")
    ]


# ---------------------------------------------------------------------------------------------
# the modes: one table
# ---------------------------------------------------------------------------------------------
def class_weight(C, g, device):
    """Class weights [C] in [0.2, 1.2)."""
    return (torch.rand(C, generator=g) + 0.2).to(device)


def dense_similarity(C, g, device):
    """A [C, C] similarity with every row's mass ≥ 0.01·C."""
    return (torch.rand(C, C, generator=g) + 0.01).to(device)


def sparse_similarity(C, k, g, device):
    """The k largest entries per row of a random dense similarity (k clipped to C)."""
    return SparseSimilarity.from_dense(torch.rand(C, C, generator=g) + 0.01, min(k, C)).to(device)


def _mix(N, C, g, device, lam):
    """Mixup with a second target; ``lam`` a scalar, or "rows" for a per-row λ tensor."""
    y_b = torch.randint(0, C, (N,), generator=g).to(device)
    if lam == "rows":
        lam = torch.rand(N, generator=g).to(device)
    return {"mix_target": y_b, "mix_lambda": lam}


# Every mode of the op contract: MODES[name](N, C, generator, device) -> the keyword arguments
# (``smoothing`` included) of a call on logits [N, C]. Together they reach every branch of the
# kernels: smoothing distributions R of [1, C] (uniform, class weights) and [C, C] (dense,
# sparse with fix-up columns), mixup (ridx_b, scalar and per-row λ, with each similarity),
# per-row ε, adaptive ε (both confidences), z-loss, soft cap, confidence penalty, a class id as
# ignore_index, and all of them at once. Every file that tests "every mode" takes this table;
# a mode added here is tested on every backend (Triton's interpreter runs a fixed subset, see
# tests/test_triton.py), the fused head and the sharded paths.
MODES = {
    "uniform": lambda N, C, g, d: dict(smoothing=0.1),
    "no_smoothing": lambda N, C, g, d: dict(smoothing=0.0),
    "weight": lambda N, C, g, d: dict(smoothing=0.1, weight=class_weight(C, g, d)),
    "weight_ignore": lambda N, C, g, d: dict(
        smoothing=0.2, weight=class_weight(C, g, d), ignore_index=1
    ),
    "dense_sim": lambda N, C, g, d: dict(
        smoothing=0.3, similarity=dense_similarity(C, g, d), similarity_mix=0.7
    ),
    "dense_sim_weight": lambda N, C, g, d: dict(
        smoothing=0.3,
        similarity=dense_similarity(C, g, d),
        similarity_mix=1.0,
        weight=class_weight(C, g, d),
    ),
    "sparse_sim": lambda N, C, g, d: dict(
        smoothing=0.25,
        similarity=sparse_similarity(C, 3, g, d),
        similarity_mix=0.5,
        weight=class_weight(C, g, d),
    ),
    "per_sample_eps": lambda N, C, g, d: dict(smoothing=torch.rand(N, generator=g).to(d)),
    "adaptive_max": lambda N, C, g, d: dict(
        smoothing=0.1, adaptive=ConfidenceAdaptive(0.5, 3.0, "max")
    ),
    "adaptive_target": lambda N, C, g, d: dict(
        smoothing=0.1, adaptive=ConfidenceAdaptive(0.3, 2.0, "target")
    ),
    "z_loss": lambda N, C, g, d: dict(smoothing=0.1, z_loss=1e-2),
    "softcap": lambda N, C, g, d: dict(smoothing=0.1, softcap=4.0),
    "confidence_penalty": lambda N, C, g, d: dict(smoothing=0.1, confidence_penalty=0.3),
    "mixup": lambda N, C, g, d: dict(smoothing=0.1, **_mix(N, C, g, d, 0.3)),
    "mixup_rows": lambda N, C, g, d: dict(smoothing=0.1, **_mix(N, C, g, d, "rows")),
    "mixup_dense": lambda N, C, g, d: dict(
        smoothing=0.2,
        similarity=dense_similarity(C, g, d),
        similarity_mix=0.6,
        **_mix(N, C, g, d, 0.4),
    ),
    "mixup_rows_dense": lambda N, C, g, d: dict(
        smoothing=0.1,
        similarity=dense_similarity(C, g, d),
        similarity_mix=0.5,
        **_mix(N, C, g, d, "rows"),
    ),
    "mixup_sparse": lambda N, C, g, d: dict(
        smoothing=0.1, similarity=sparse_similarity(C, 2, g, d), **_mix(N, C, g, d, 0.6)
    ),
    "mixup_sparse_all": lambda N, C, g, d: dict(
        smoothing=0.2,
        similarity=sparse_similarity(C, 3, g, d),
        similarity_mix=0.5,
        z_loss=1e-3,
        softcap=5.0,
        confidence_penalty=0.1,
        weight=class_weight(C, g, d),
        **_mix(N, C, g, d, 0.6),
    ),
    "everything": lambda N, C, g, d: dict(
        smoothing=torch.rand(N, generator=g).to(d) * 0.5,
        weight=class_weight(C, g, d),
        similarity=sparse_similarity(C, 4, g, d),
        similarity_mix=0.6,
        adaptive=ConfidenceAdaptive(0.5, 2.0, "target"),
        z_loss=1e-3,
        softcap=4.0,
        confidence_penalty=0.1,
        **_mix(N, C, g, d, 0.8),
    ),
    "everything_dense": lambda N, C, g, d: dict(
        smoothing=0.1,
        weight=class_weight(C, g, d),
        similarity=dense_similarity(C, g, d),
        similarity_mix=0.4,
        adaptive=ConfidenceAdaptive(0.6, 1.5, "max"),
        z_loss=1e-3,
        softcap=5.0,
        confidence_penalty=0.2,
        ignore_index=0,
        **_mix(N, C, g, d, 0.7),
    ),
}
# The modes that build a [C, C] similarity (a sparse one is taken from a dense one): C² memory
# and reference time, so they take small C.
SIMILARITY_MODES = frozenset(
    name for name, build in MODES.items() if "similarity" in build(3, 2, torch.Generator(), "cpu")
)

# (N, C) at the compiled kernels' edges, and why: C = 7 / 3 are below every vector width (tails
# only); 97 is prime; 2053 is a prime just past the CPU kernel's 2048-column chunk; 4099 spans
# three chunks (not for the similarity modes); N = 1 is a single row.
KERNEL_SHAPES = ((1, 7), (5, 3), (13, 97), (6, 2053), (3, 4099))
SIMILARITY_MAX_C = 2053


def mode_cases(shapes=KERNEL_SHAPES):
    """pytest params (mode, N, C): every mode at every shape (the similarity modes at
    C ≤ SIMILARITY_MAX_C)."""
    return [
        pytest.param(mode, N, C, id=f"{mode}-{N}x{C}")
        for mode in MODES
        for N, C in shapes
        if mode not in SIMILARITY_MODES or C <= SIMILARITY_MAX_C
    ]


# ---------------------------------------------------------------------------------------------
# building a case: one way
# ---------------------------------------------------------------------------------------------
def ignore_row(target: torch.Tensor, kw: dict | None = None, row: int = 1) -> torch.Tensor:
    """Make ``row`` of the (flattened) target an ignored row, with the mode's ``ignore_index``
    (-100 unless ``kw`` says otherwise), when there are more than two rows; in place."""
    if target.numel() > 2:
        target.view(-1)[row] = (kw or {}).get("ignore_index", -100)
    return target


def make_data(N, C, dtype=torch.float32, device="cpu", *, seed=0, scale=3.0, ignore=True):
    """Logits [N, C] (``randn · scale`` drawn in fp32, then cast), targets [N] with row 1 ignored
    (``ignore``), and the generator that drew them, to draw the rest of a case from."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g) * scale).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    if ignore:
        ignore_row(y)
    return x.to(device), y.to(device), g


def make_case(mode, N, C, dtype=torch.float32, device="cpu", *, seed=0, scale=3.0, ignore=True):
    """Logits [N, C], targets [N] (row 1 ignored with the mode's ignore_index) and the keyword
    arguments of ``MODES[mode]``, all on ``device``."""
    x, y, g = make_data(N, C, dtype, device, seed=seed, scale=scale, ignore=False)
    kw = MODES[mode](N, C, g, device)
    if ignore:
        ignore_row(y, kw)
    return x, y, kw


def make_head(rows, H, V, dtype=torch.float64, device="cpu", *, seed=0, scale=0.7, bias=True):
    """A fused-head case: input [*rows, H], head weight [V, H], bias [V] (or None), all
    ``randn · scale`` drawn in float64 and cast to ``dtype``; targets [*rows] with row 1 ignored;
    and the generator, to draw the rest from. ``rows`` is N or a tuple of leading dims."""
    rows = (rows,) if isinstance(rows, int) else tuple(rows)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, H, generator=g, dtype=torch.float64) * scale
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * scale
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = ignore_row(torch.randint(0, V, rows, generator=g))
    cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), y.to(device), g


def kw_to(kw: dict, device=None, dtype=None) -> dict:
    """The keyword arguments with their tensors (and sparse similarities) moved to ``device``
    and their floating-point tensors cast to ``dtype`` (each when given)."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, SparseSimilarity) and device is not None:
            v = v.to(device)
        elif isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype if dtype and v.is_floating_point() else None)
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# the comparison with the dense reference
# ---------------------------------------------------------------------------------------------
def loss_and_grad(fn, logits, target, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target, **kw)
    if isinstance(loss, tuple):
        loss = loss[0]
    (g,) = torch.autograd.grad(loss.sum(), x) if loss.numel() else (torch.zeros_like(x),)
    return loss.detach(), g


def check_backend(
    backend: str, logits: torch.Tensor, target: torch.Tensor, *, grad: bool = True, **kw
) -> None:
    """Loss and gradient of `backend` on `logits` (any dtype) against the float64 reference."""
    dtype = logits.dtype
    ours_l, ours_g = loss_and_grad(
        fused_ls.label_smoothing_cross_entropy, logits, target, backend=backend, **kw
    )
    ref_l, ref_g = loss_and_grad(reference.cross_entropy, logits, target, **kw)
    assert ours_l.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ours_g.dtype == dtype and ours_g.shape == logits.shape
    if dtype in LOW:
        factor, atol = TOL[dtype]
        pt_l, pt_g = loss_and_grad(
            reference.cross_entropy, logits, target, compute_dtype=dtype, **kw
        )
        _within(ours_l, ref_l, factor * _finite_err(pt_l, ref_l) + atol, "loss")
        if grad:
            _within(ours_g, ref_g, factor * _finite_err(pt_g, ref_g) + atol * 0.1, "grad")
    else:
        rtol, atol = TOL[dtype]
        # The loss combines terms of the size of the logits (M·lse − ⟨r ⊙ w, z⟩ and lse − z_y),
        # so its achievable absolute error grows with max|z| (a loss of exactly 0 from logits of
        # ~92 in fp32 comes out as ~1 ulp(92)); the gradient is made of probabilities and is not.
        finite = logits[torch.isfinite(logits)]
        scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
        torch.testing.assert_close(
            ours_l, ref_l.to(ours_l.dtype), rtol=rtol, atol=atol * scale, equal_nan=True
        )
        if grad:
            torch.testing.assert_close(
                ours_g, ref_g.to(dtype), rtol=rtol, atol=atol, equal_nan=True
            )


def _err(ours, ref) -> float:
    """max |ours − ref| in float64. A NaN where the reference has NaN and the same infinity on
    both sides agree (0); every other non-finite pair (an infinity or NaN where the reference is
    finite, a finite value where it is not, infinities of opposite sign) is an error of inf."""
    a, b = ours.double(), ref.double()
    agree = (torch.isnan(a) & torch.isnan(b)) | (torch.isinf(a) & (a == b))
    d = torch.where(agree, 0.0, (a - b).abs())
    d = torch.where(torch.isnan(d), math.inf, d)  # NaN on one side only
    return float(d.max()) if d.numel() else 0.0


def _finite_err(pt, ref) -> float:
    """max |pt − ref| over the elements where both are finite: PyTorch's own error in low
    precision, the scale of the allowance. Where PyTorch itself overflows it allows nothing
    (counting it would make the allowance inf, and any result pass)."""
    d = (pt.double() - ref.double()).abs()
    d = d[torch.isfinite(d)]
    return float(d.max()) if d.numel() else 0.0


def _within(ours, ref, tol, what):
    same_nan = torch.equal(torch.isnan(ours.double()), torch.isnan(ref.double()))
    assert same_nan, f"{what}: NaN pattern differs from the reference"
    err = _err(ours, ref)
    assert err <= tol, f"{what}: max error {err:.3g} > allowed {tol:.3g}"


def problem(x: torch.Tensor, target: torch.Tensor, num_classes=None, col_offset=0, **kw):
    """The ``Problem`` (fused_ls._problem) of the keywords ``kw`` for logits x [N, C] that hold
    the columns [col_offset, col_offset + C) of ``num_classes`` (default: all of them)."""
    opts = parse_options(fused_ls.label_smoothing_cross_entropy, kw)
    C = num_classes if num_classes is not None else x.shape[1]
    acc = fused_ls.backends.acc_dtype(x.dtype)
    return make_problem(opts, target, acc, x, C, col_offset)


def load_script(name: str):
    """A module of scripts/ by file name (scripts/ is not a package)."""
    path = Path(__file__).parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
