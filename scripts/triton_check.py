"""Compile every Triton kernel specialisation ahead of time for sm_90 and sm_80; no GPU needed.

    python scripts/triton_check.py [--arch 90 80] [--jobs 2] [--keep-cache]

For each kernel × constexpr combination × logits dtype, at the block size and warp count the
backend launches in production, this runs the full Triton pipeline (TTIR → TTGIR → LLVM → PTX →
cubin via the ptxas bundled with triton) for each target, with the argument specialisations the
runtime would make (16-byte-aligned pointers, row strides divisible by 16). It catches the type
and lowering errors that the interpreter lets through, and reads the cubin's resource usage
(registers, local memory) with the bundled cuobjdump: a kernel that uses local memory (register
spills) fails the check too. Prints one line per specialisation; exits non-zero on any failure.

Compiles into a fresh cache directory unless --keep-cache, so every run really compiles.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# The check compiles for a GPU: the kernels must be JIT functions, not interpreted ones.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default; silences a warning
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DTYPES = ("fp32", "bf16", "fp16")
# R_MODE (0: uniform r0, 1: r0·w, 2: dense rows) and HAS_B (a second dense row for mixup)
R_MODES = {"R0": (0, False), "Rw": (1, False), "RC": (2, False), "RCx2": (2, True)}
KP = 8  # the point masses: two targets and up to 3 sparse neighbours each

# Argument types by name (pointer element types, scalar widths), as the launches pass them.
POINTERS_I64 = {"Y_A", "Y_B", "SP_IDX"}
FLOAT_SCALARS = {
    "r0",
    "smoothing",
    "mix_lambda",
    "adaptive_threshold",
    "adaptive_factor",
    "z_loss",
    "confidence_penalty",
    "softcap",
}


def _aligned(names, sig):
    """tt.divisibility=16 on pointers and strides, as the JIT gives 16-aligned arguments."""
    return {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if sig[n].startswith("*") or n.startswith("stride")
    }


def signature(fn, dt: str, constexprs: dict) -> dict:
    """The argument types of kernel `fn` for logits of dtype `dt` (names → Triton types)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("X", "OUT"):
            sig[name] = f"*{dt}"
        elif name in POINTERS_I64:
            sig[name] = "*i64"
        elif name.isupper() and name not in ("N", "S", "K", "C"):  # those are sizes
            sig[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def specialisations():
    """(label, kernel name, constexprs, dtype, num_warps, debug) of every specialisation; the
    rows and merge kernels are launched with debug=True (device-side asserts)."""
    from fused_ls import triton_kernels as tk

    block = tk.BLOCK_MAX
    warps = tk.num_warps_for(block)
    out = []
    base = dict(BLOCK=block, KP=KP, POINT_CHUNK=tk.POINT_CHUNK)
    grid = itertools.product(DTYPES, R_MODES.items(), (False, True), (False, True))
    for dt, (rname, (r_mode, has_b)), pz, cap in grid:
        flags = dict(R_MODE=r_mode, HAS_B=has_b, NEED_S=True, NEED_PZ=pz, HAS_SOFTCAP=cap)
        label = f"{dt} {rname} pz={int(pz)} softcap={int(cap)}"
        # forward_backward with stats: every code path of the rows kernel at once
        phases = dict(FINALIZE=True, GRAD=True, STATS_OUT=False, NEED_STATS=True)
        out.append((f"rows fwd+bwd {label}", "_rows_kernel", {**base, **flags, **phases}, dt,
                    warps, True))  # fmt: skip
        grad_flags = {k: v for k, v in flags.items() if k != "NEED_S"}  # a statistics flag
        out.append(
            (f"grad         {label}", "_grad_kernel", {**base, **grad_flags}, dt, warps, False)
        )
    for dt, (name, phases) in itertools.product(
        ("fp32", "bf16"),
        {
            "forward": dict(FINALIZE=True, GRAD=False, STATS_OUT=False, NEED_STATS=False),
            "stats": dict(FINALIZE=False, GRAD=False, STATS_OUT=True, NEED_STATS=True),
            "partial": dict(FINALIZE=False, GRAD=False, STATS_OUT=False, NEED_STATS=True),
        }.items(),
    ):
        flags = dict(R_MODE=1, HAS_B=False, NEED_S=phases["NEED_STATS"], NEED_PZ=False,
                     HAS_SOFTCAP=False)  # fmt: skip
        out.append((f"rows {name:7s} {dt} Rw", "_rows_kernel", {**base, **flags, **phases}, dt,
                    warps, True))  # fmt: skip
    for dt, dense, pz, (gather, finalize) in itertools.product(
        ("fp32", "bf16"), (False, True), (False, True), ((True, True), (True, False), (False, True))
    ):
        ce = dict(SP=4, KP=KP, DENSE=dense, NEED_S=pz, NEED_PZ=pz, HAS_SOFTCAP=True,
                  GATHER=gather, FINALIZE=finalize)  # fmt: skip
        label = (
            f"merge {dt} dense={int(dense)} pz={int(pz)} gather={int(gather)} fin={int(finalize)}"
        )
        out.append((label, "_merge_kernel", ce, dt, 1, True))
    out.append(("reduce", "_reduce_kernel", dict(BLOCK=tk.REDUCE_BLOCK), "fp32", 4, False))
    # the one-pass path's Σ W_i pre-pass (device asserts: it reads the targets first) and the
    # in-place rescale
    out.append(("weights", "_weights_kernel", {}, "fp32", 1, True))
    for dt in ("fp32", "bf16"):
        out.append((f"scale {dt}", "_scale_kernel", dict(BLOCK=block), dt, warps, False))
    return out


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def _resources(cubin: bytes) -> dict[str, int]:
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_one(job):
    """Compile one specialisation for one arch; returns (ok, line)."""
    label, kernel, ce, dt, warps, debug, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_ls import triton_kernels as tk

    fn = getattr(tk, kernel)
    names = fn.arg_names
    missing = set(ce) - set(names)
    if missing:
        return False, f"sm_{arch} {label}: no such constexpr in the kernel ({sorted(missing)})"
    full = signature(fn, dt, ce)
    options = dict(num_warps=warps, debug=debug, sanitize_overflow=False)
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn, full, ce, _aligned(names, full))
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # noqa: BLE001 - every compile error is a failed check
        msg = str(e).strip().splitlines()
        return False, f"FAIL sm_{arch} {label}: {type(e).__name__}: {msg[-1] if msg else ''}"
    secs = time.perf_counter() - t0
    res = _resources(ck.asm["cubin"])
    usage = (
        f"regs={res.get('REG', '?'):>3} smem={res.get('SHARED', '?'):>5} "
        f"local={res.get('LOCAL', '?')}"
        if res
        else "resources n/a (no cuobjdump)"
    )
    ok = res.get("LOCAL", 0) == 0
    tag = "ok  " if ok else "FAIL"
    why = "" if ok else "  <- local memory: register spills"
    return ok, f"{tag} sm_{arch} {label:52s} warps={warps} {usage} {secs:5.2f}s{why}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--keep-cache", action="store_true", help="use triton's normal cache instead of a fresh one"
    )
    args = ap.parse_args()
    cache = None
    if not args.keep_cache:
        cache = tempfile.TemporaryDirectory(prefix="triton-check-")
        os.environ["TRITON_CACHE_DIR"] = cache.name

    import triton

    specs = specialisations()
    jobs = [(*s, arch) for arch in args.arch for s in specs]
    print(
        f"triton {triton.__version__}: {len(specs)} specialisations × "
        f"{len(args.arch)} targets = {len(jobs)} compiles, {args.jobs} processes",
        flush=True,
    )
    t0 = time.perf_counter()
    failures = 0
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = pool.map(compile_one, jobs)
            for ok, line in results:
                failures += not ok
                print(line, flush=True)
    else:
        for job in jobs:
            ok, line = compile_one(job)
            failures += not ok
            print(line, flush=True)
    print(f"{len(jobs) - failures} compiled, {failures} failed in {time.perf_counter() - t0:.0f} s")
    if cache is not None:
        cache.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
