"""Everything a GPU lease is for, in one call: device, tests on CUDA tensors, benchmark table.

    python benchmarks/gpu_check.py [--skip-tests] [--skip-bench] [--reps 10] [--out bench_out]

1. Prints the device (name, capability, memory) and the versions.
2. Runs pytest on CUDA tensors, the files concurrently: tests/test_triton.py (the Triton backend
   with the interpreter off), tests/test_cuda.py (the compiled CUDA backend),
   tests/test_contract.py with FUSED_LS_TEST_DEVICE=cuda (the op contract on every backend that
   serves CUDA tensors), tests/test_linear_cuda.py (the fused LM head on CUDA) and
   tests/test_gpu_one_pass.py (the gradient in the forward, opt-in on CUDA until measured, and
   the CUDA C++ cluster kernel).
3. Benchmarks at N = 16384, V ∈ {32000, 128256, 256000} (``--vocabs``), bf16 and fp32: forward +
   backward of eager ``F.cross_entropy(label_smoothing=0.1)``, ``torch.compile`` of it
   (``--compile``: each shape is a compilation of a minute or so), Liger-Kernel's cross-entropy
   with the same smoothing (when ``liger_kernel`` is installed: scripts/gpu_lease.sh installs
   the wheel that ``make gpu-wheels`` downloads into wheels/), and every fused_ls backend that
   serves CUDA tensors, each with the gradient computed in the forward (1-pass) and in the
   backward (2-pass, ``FUSED_LS_GRAD_IN_FORWARD=0``), with and without ``inplace_backward``, and
   its forward alone under ``torch.no_grad()``:
   - median time over ``--reps`` runs (CUDA events; inputs reset outside the timed region),
   - GB/s under the byte model "one read of the logits + one write of the gradient"
     (2·N·V·bytes per element), and that as a fraction of a measured device-to-device copy
     (which also moves 2·N·V·bytes: one read, one write); the forward alone against one read
     (N·V·bytes; a max over the logits measures the read bandwidth),
   - extra peak memory over the logits (and target) already allocated, in MiB and in units of
     the logits' size,
   - the loss's relative difference from eager (a sanity check, not the test).
   Prints a markdown table and appends the rows to ``<out>/gpu_check.csv`` (with the device,
   versions and timestamp: ``benchmarks/common.py``, as every benchmark).
   Then the issue's targets at 16384 × 128256 bf16 from those rows (% of copy and read, CUDA C++
   against Triton, Liger against fused_ls).
4. Counts the CUDA kernels launched and the ops dispatched by one forward+backward of each
   backend in both modes and of Liger's (uniform ε, 256 × 32000 bf16; torch profiler).
5. The fused LM head at N = 16384, H = 4096, V = 128256, bf16 (input and weight gradients):
   fused_ls vs eager ``F.cross_entropy(F.linear(...), label_smoothing=0.1)`` vs Liger-Kernel's
   fused linear cross-entropy with the same smoothing vs the three matmuls alone: time and peak
   memory.

Budget: well under 8 minutes on an H100 (tests ≈ 1–3 min, torch.compile ≈ 4 compiles, the
rest a few seconds per row). Exits non-zero when there is no GPU, or when a test suite failed.
Without a GPU it stops at once with a message saying so.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The Triton interpreter must be off: the point is to run the compiled kernels.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import append_csv, peak_extra_bytes, serving_backends, timed  # noqa: E402

N_ROWS = 16384
VOCABS = (32000, 128256, 256000)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SMOOTHING = 0.1
TEST_FILES = (
    "tests/test_triton.py",
    "tests/test_cuda.py",
    "tests/test_contract.py",
    "tests/test_linear_cuda.py",
    "tests/test_gpu_one_pass.py",
)


def device_report() -> str:
    p = torch.cuda.get_device_properties(0)
    lines = [
        f"device: {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
        f"{p.total_memory / 2**30:.1f} GiB)",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"python {platform.python_version()}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError as e:
        lines.append(f"triton: not importable ({e})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def run_tests(timeout: int, test_files) -> bool:
    """The CUDA test files, concurrently (one pytest process each: Triton's compilation is
    CPU-bound and the GPU is shared without harm at these sizes), each bounded by ``timeout``."""
    env = dict(os.environ, FUSED_LS_TEST_DEVICE="cuda")
    env.pop("TRITON_INTERPRET", None)
    files = [f for f in test_files if os.path.exists(os.path.join(ROOT, f.split("::")[0]))]
    t0 = time.perf_counter()
    procs = {
        f: subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for f in files
    }
    ok = True
    for f, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out, rc = (out or "") + f"\nTIMEOUT after {timeout} s", -1
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        verdict = "PASS" if rc == 0 else f"FAIL (rc={rc})"
        print(
            f"\n## pytest {f} (FUSED_LS_TEST_DEVICE=cuda): {verdict}, done at "
            f"{time.perf_counter() - t0:.0f} s"
        )
        shown = lines if rc != 0 else lines[-3:]
        print("\n".join(shown[-80:]), flush=True)
        ok &= rc == 0
    return ok


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------
def time_cuda(fn, reps: int, setup=None, warmup: int = 2) -> float:
    """Median milliseconds of fn() over reps runs (CUDA events); setup() runs before each,
    outside the timing."""
    return timed(fn, torch.device("cuda"), reps, setup=setup, warmup=warmup).median * 1e3


def copy_bandwidth(nbytes: int, reps: int) -> float:
    """GB/s of a device-to-device copy of nbytes (read nbytes + write nbytes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def read_bandwidth(x: torch.Tensor, reps: int) -> float:
    """GB/s of one read of x (a max over it: the floor of a forward that writes nothing N×V)."""
    ms = time_cuda(lambda: x.amax(), reps)
    return x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def eager_ce(x, y):
    return F.cross_entropy(x, y, label_smoothing=SMOOTHING)


def fused(backend, inplace):
    import fused_ls

    def f(x, y):
        return fused_ls.label_smoothing_cross_entropy(
            x, y, SMOOTHING, backend=backend, inplace_backward=inplace
        )

    return f


def liger_ce():
    """Liger-Kernel's cross-entropy with label smoothing (its kernel writes the gradient over the
    logits in the forward), or None when liger_kernel is not installed."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerCrossEntropyLoss(label_smoothing=SMOOTHING)
    return lambda x, y: loss(x, y)


def grad_in_forward(on: bool | None):
    """A context in which ``FUSED_LS_GRAD_IN_FORWARD`` is 1 (``on``: the gradient in the forward,
    one pass) or 0 (statistics in the forward, the gradient in the backward), or left as it is
    (None); the environment is restored on exit."""
    from fused_ls.backends.registry import GRAD_IN_FORWARD_ENV

    return mock.patch.dict(os.environ, {} if on is None else {GRAD_IN_FORWARD_ENV: str(int(on))})


def measure(fn, base, y, reps, inplace, ref_loss, forward_only=False):
    """One row: time (fwd+bwd, or the forward alone under no_grad), extra peak memory, loss
    difference from eager. In place methods get the logits restored outside the timed region."""
    x = base.clone().requires_grad_(not forward_only)

    def reset():
        if inplace:  # the previous call wrote the gradient over x: restore the logits
            with torch.no_grad():
                x.copy_(base)

    def step():
        if forward_only:
            with torch.no_grad():
                return fn(x, y), None
        loss = fn(x, y)
        (g,) = torch.autograd.grad(loss, x)
        return loss, g

    reset()
    loss, g = step()
    rel = abs(float(loss.detach()) - ref_loss) / max(abs(ref_loss), 1e-30)
    del g
    ms = time_cuda(lambda: step(), reps, setup=reset)
    reset()
    extra = peak_extra_bytes(step, torch.device("cuda"))
    return ms, extra, rel


def _methods(dtype, backends, compile_it):
    """(name, fn, in place, forward only, FUSED_LS_GRAD_IN_FORWARD) of one shape's rows."""
    methods = [("eager F.cross_entropy", eager_ce, False, False, None)]
    if compile_it:
        methods.append(
            ("torch.compile(F.cross_entropy)", torch.compile(eager_ce, dynamic=False), False,
             False, None)
        )  # fmt: skip
    liger = liger_ce()
    if liger is not None:
        methods.append(("Liger-Kernel CE (in place)", liger, True, False, None))
    for b in backends or serving_backends("cuda", dtype):
        if b == "torch":  # the reference path: one row is enough
            methods.append((f"fused_ls[{b}]", fused(b, False), False, False, None))
            continue
        for on, label in ((False, "2-pass"), (True, "1-pass")):
            methods.append((f"fused_ls[{b}] {label}", fused(b, False), False, False, on))
            methods.append((f"fused_ls[{b}] {label} inplace", fused(b, True), True, False, on))
        methods.append((f"fused_ls[{b}] forward only", fused(b, False), False, True, None))
    return methods


def run_bench(reps, out_dir, backends, vocabs=VOCABS, compiled="bf16,fp32") -> list[dict]:
    rows = []
    for vocab in vocabs:
        for dname, dtype in DTYPES.items():
            gen = torch.Generator(device="cuda").manual_seed(0)
            base = torch.randn(N_ROWS, vocab, device="cuda", dtype=dtype, generator=gen)
            y = torch.randint(0, vocab, (N_ROWS,), device="cuda", generator=gen)
            logit_bytes = base.numel() * base.element_size()
            copy_gbs = copy_bandwidth(logit_bytes, reps)
            read_gbs = read_bandwidth(base, reps)
            with torch.no_grad():
                ref_loss = float(eager_ce(base.float(), y))
            methods = _methods(dtype, backends, dname in compiled.split(","))
            for name, fn, inplace, fwd_only, on in methods:
                t0 = time.perf_counter()
                try:
                    with grad_in_forward(on):
                        ms, extra, rel = measure(fn, base, y, reps, inplace, ref_loss, fwd_only)
                    err = ""
                except torch.cuda.OutOfMemoryError:
                    ms = extra = rel = float("nan")
                    err = "OOM"
                except Exception as e:  # noqa: BLE001 - report and go on with the next method
                    ms = extra = rel = float("nan")
                    err = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                torch.cuda.empty_cache()
                # the byte model: one read (+ one write of the gradient) of the logits
                model_bytes = logit_bytes * (1 if fwd_only else 2)
                floor = read_gbs if fwd_only else copy_gbs
                gbs = model_bytes / (ms * 1e-3) / 1e9
                row = dict(
                    N=N_ROWS,
                    V=vocab,
                    dtype=dname,
                    method=name,
                    ms=ms,
                    model_GBps=gbs,
                    floor=("read" if fwd_only else "copy"),
                    floor_GBps=floor,
                    frac_of_floor=gbs / floor,
                    copy_GBps=copy_gbs,
                    read_GBps=read_gbs,
                    extra_MiB=extra / 2**20,
                    extra_x_logits=extra / logit_bytes,
                    loss_rel_diff=rel,
                    error=err,
                )
                rows.append(row)
                print(
                    f"  V={vocab} {dname} {name}: {ms:.3f} ms {err} "
                    f"({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
            del base, y
            torch.cuda.empty_cache()
    append_csv(os.path.join(out_dir, "gpu_check.csv"), rows, torch.device("cuda"))
    return rows


def targets(rows: list[dict]) -> str:
    """The issue's GPU targets at 16384 × 128256 bf16, from the rows just measured."""
    at = {r["method"]: r for r in rows if r["V"] == 128256 and r["dtype"] == "bf16"}
    lines = ["| check (16384 × 128256 bf16) | measured | target |", "|---|---:|---|"]

    def pct(name):
        r = at.get(name)
        return f"{100 * r['frac_of_floor']:.0f}%" if r and not r["error"] else "n/a"

    for b in ("triton", "cuda"):
        for label in ("1-pass", "1-pass inplace", "2-pass", "2-pass inplace"):
            lines.append(f"| {b} {label}: % of copy | {pct(f'fused_ls[{b}] {label}')} | ≥ 85% |")
        lines.append(
            f"| {b} forward only: % of read | {pct(f'fused_ls[{b}] forward only')} | ≥ 85% |"
        )
    t, c = at.get("fused_ls[triton] 1-pass"), at.get("fused_ls[cuda] 1-pass")
    lig = at.get("Liger-Kernel CE (in place)")
    if t and c and not (t["error"] or c["error"]):
        lines.append(f"| CUDA C++ / Triton time (1-pass) | {c['ms'] / t['ms']:.2f} | ≤ 1.10 |")
    for b in ("triton", "cuda"):
        r = at.get(f"fused_ls[{b}] 1-pass")
        if r and lig and not (r["error"] or lig["error"]):
            lines.append(f"| Liger / fused_ls[{b}] time | {lig['ms'] / r['ms']:.2f} | ≥ 1.5 |")
    return "\n".join(lines)


def kernel_counts(backends: list[str] | None) -> str:
    """Kernels launched and ops dispatched per forward+backward (uniform ε = 0.1)."""
    from torch.profiler import ProfilerActivity, profile

    import fused_ls

    gen = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(256, 32000, device="cuda", dtype=torch.bfloat16, generator=gen)
    y = torch.randint(0, 32000, (256,), device="cuda", generator=gen)
    names = backends or serving_backends("cuda", torch.bfloat16)
    fns = {"F.cross_entropy": (lambda x: F.cross_entropy(x, y, label_smoothing=SMOOTHING), None)}
    liger = liger_ce()
    if liger is not None:
        fns["Liger-Kernel CE"] = (lambda x: liger(x, y), None)
    for b in names:
        for on, label in ((False, "2-pass"), (True, "1-pass")):
            fns[f"fused_ls[{b}] {label}"] = (
                lambda x, b=b: fused_ls.label_smoothing_cross_entropy(x, y, SMOOTHING, backend=b),
                on,
            )
    lines = ["| method | CUDA kernels per fwd+bwd | ops dispatched |", "|---|---:|---:|"]
    for name, (fn, on) in fns.items():
        x = x0.clone().requires_grad_(True)
        with grad_in_forward(on):
            fn(x).backward()  # warm-up
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn(x).backward()
                torch.cuda.synchronize()
        ev = prof.events()
        kernels = sum(1 for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
        ops = sum(1 for e in ev if e.name.startswith(("aten::", "fused_ls::")))
        lines.append(f"| {name} | {kernels} | {ops} |")
    return "\n".join(lines)


def small_sizes(backends: list[str], reps: int = 200) -> str:
    """Wall-clock forward + backward per call at classifier sizes, where the op's fixed cost
    (launches and host work) is the time: synchronised, median of batches of 20 calls."""
    import fused_ls

    lines = ["| N × C (bf16) | " + " | ".join(["F.cross_entropy", *backends]) + " |"]
    lines.append("|---|" + "---:|" * (1 + len(backends)))
    for n, c in ((64, 10), (256, 1000), (1024, 32000), (4096, 32000)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        x0 = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, generator=gen)
        y = torch.randint(0, c, (n,), device="cuda", generator=gen)
        x = x0.clone().requires_grad_(True)
        fns = [lambda: F.cross_entropy(x, y, label_smoothing=SMOOTHING).backward()]
        for b in backends:
            fns.append(
                lambda b=b: fused_ls.label_smoothing_cross_entropy(
                    x, y, SMOOTHING, backend=b
                ).backward()
            )
        cells = []
        for fn in fns:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps // 20):
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / 20 * 1e6)
            cells.append(f"{statistics.median(times):.0f} µs")
        lines.append(f"| {n} × {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def linear_head(reps: int, backends: list[str], chunks: list[int | None]) -> str:
    """The fused LM head at N = 16384, H = 4096, V = 128256, bf16 (module docstring, item 5)."""
    from bench_linear import fwd_bwd, three_matmuls

    import fused_ls
    from fused_ls.linear import chunk_rows

    N, H, V = 16384, 4096, 128256
    gen = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, generator=gen) / H**0.5
    w0 = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=gen) / H**0.5
    y = torch.randint(0, V, (N,), device="cuda", generator=gen)

    def step(loss_fn):
        return fwd_bwd(loss_fn, x0, w0)

    methods = {
        "3 matmuls (floor)": three_matmuls(x0, w0),
        "eager F.cross_entropy(F.linear)": step(
            lambda x, w: F.cross_entropy(F.linear(x, w).float(), y, label_smoothing=SMOOTHING)
        ),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss(label_smoothing=SMOOTHING)
        methods["Liger-Kernel fused linear CE"] = step(lambda x, w: flce(w, x, y))
    except ImportError:
        pass
    default = chunk_rows(N, H, V, torch.bfloat16, torch.device("cuda"))
    for b in backends or ["auto"]:
        for c in chunks:
            methods[f"fused_ls[{b}], chunk {c or f'{default} (default)'}"] = step(
                lambda x, w, b=b, c=c: fused_ls.linear_label_smoothing_cross_entropy(
                    x, w, y, SMOOTHING, backend=b, chunk_size=c
                )
            )
    inputs = x0.numel() * 2 + w0.numel() * 2
    lines = [
        f"fused LM head, N={N}, H={H}, V={V}, bf16 (inputs {inputs / 2**30:.2f} GiB)",
        "",
        "| method | fwd+bwd ms | peak memory GiB (all allocations) | peak over the inputs GiB |",
        "|---|---:|---:|---:|",
    ]
    for name, fn in methods.items():
        try:
            ms = time_cuda(fn, reps)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            extra = peak_extra_bytes(fn, torch.device("cuda"))
            peak = torch.cuda.max_memory_allocated()  # since peak_extra_bytes reset it
            lines.append(f"| {name} | {ms:.1f} | {peak / 2**30:.2f} | {extra / 2**30:.2f} |")
        except torch.cuda.OutOfMemoryError:
            lines.append(f"| {name} | OOM | |")
        torch.cuda.empty_cache()
    lines.append(
        "\nLiger-Kernel's published figures (H = 4096, V = 128256, BT = 32768, bf16): fused linear "
        "cross-entropy 5.8 GB vs 27.6 GB for the PyTorch baseline (memory)."
    )
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    head = (
        "| V | dtype | method | ms | GB/s (model) | % of floor | extra peak MiB | × logits "
        "| loss rel. diff |"
    )
    lines = [head, "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['V']} | {r['dtype']} | {r['method']} | {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['V']} | {r['dtype']} | {r['method']} | {r['ms']:.2f} | {r['model_GBps']:.0f} "
            f"| {100 * r['frac_of_floor']:.0f}% of {r['floor']} | {r['extra_MiB']:.0f} | "
            f"{r['extra_x_logits']:.2f} | {r['loss_rel_diff']:.1e} |"
        )
    floors = sorted({(r["V"], r["dtype"], r["copy_GBps"], r["read_GBps"]) for r in rows})
    lines.append("")
    lines.append(
        "byte model: fwd+bwd one read of the logits + one write of the gradient (2·N·V·b, against "
        "a device-to-device copy); forward only one read (N·V·b, against a max over the logits). "
        "Floors: "
        + ", ".join(f"V={v} {d}: copy {c:.0f} GB/s, read {rd:.0f} GB/s" for v, d, c, rd in floors)
    )
    return "\n".join(lines)


def _report(section, *args) -> None:
    """Print a section's table, or its error (the lease goes on with the next section)."""
    try:
        print(section(*args), flush=True)
    except Exception:  # noqa: BLE001 - one failed section must not cost the others
        import traceback

        traceback.print_exc()
        sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--test-timeout", type=int, default=240, help="seconds per pytest file")
    ap.add_argument("--backends", default="", help="comma list (default: all that serve CUDA)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out"))
    ap.add_argument(
        "--sections",
        default="tests,bench,kernels,small,head",
        help="comma list of tests, bench, kernels, small, head",
    )
    ap.add_argument("--tests", default=",".join(TEST_FILES), help="comma list of test files")
    ap.add_argument("--vocabs", default=",".join(map(str, VOCABS)), help="bench: comma list of V")
    ap.add_argument(
        "--compile", default="bf16,fp32", help="bench: dtypes that get torch.compile rows ('' none)"
    )
    ap.add_argument(
        "--head-chunks", default="0", help="comma list of chunk sizes for the head (0: default)"
    )
    args = ap.parse_args()

    if not torch.cuda.is_available():
        build = torch.version.cuda or "none: this torch is a CPU build"
        print(
            f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA {build}). "
            "Run it on a GPU machine with a CUDA build of torch, e.g. "
            "`make gpu-check GPU_PY=path/to/cuda/venv/bin/python`.",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    print(device_report())
    import fused_ls
    import fused_ls.info

    print(fused_ls.info.report(), flush=True)
    sections = set(args.sections.split(","))
    if args.skip_tests:
        sections.discard("tests")
    if args.skip_bench:
        sections -= {"bench", "kernels", "small", "head"}
    tests_ok = True
    if "tests" in sections:
        tests_ok = run_tests(args.test_timeout, args.tests.split(","))
        print(
            f"\ntests: {'all passed' if tests_ok else 'FAILURES (see above)'} "
            f"({time.perf_counter() - t0:.0f} s so far)"
        )
    backends = [b for b in args.backends.split(",") if b] or None
    if "bench" in sections:
        print(
            f"\n## benchmark: N={N_ROWS}, fwd+bwd, label_smoothing={SMOOTHING}, "
            f"median of {args.reps}"
        )
        vocabs = tuple(int(v) for v in args.vocabs.split(","))
        rows = run_bench(args.reps, args.out, backends, vocabs, args.compile)
        print()
        print(
            f"{torch.cuda.get_device_name()}, "
            f"{time.strftime('%Y-%m-%d', time.gmtime())}, torch {torch.__version__}"
        )
        print()
        print(markdown(rows))
        print()
        print(targets(rows))
    if "kernels" in sections:
        print("\n## kernels per call\n", flush=True)
        _report(kernel_counts, backends)
    gpu = backends or serving_backends("cuda", torch.bfloat16)
    if "small" in sections:
        print("\n## fixed cost: wall-clock fwd+bwd per call at small sizes\n", flush=True)
        _report(small_sizes, gpu)
    if "head" in sections:
        print("\n## fused LM head\n", flush=True)
        chunks = [int(c) or None for c in args.head_chunks.split(",")]
        _report(linear_head, max(3, args.reps // 2), [b for b in gpu if b != "torch"], chunks)
    print(f"\ngpu_check finished in {time.perf_counter() - t0:.0f} s")
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
