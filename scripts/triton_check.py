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
R_MODES = {  # name: (PER_ROW_R, HAS_B)
    "R1": (False, False),  # [1, C] smoothing row: uniform / weights / sparse similarity
    "RC": (True, False),  # [C, C] dense similarity
    "RCx2": (True, True),  # dense similarity with mixup: two rows per sample
}
KP_VALUES = (2, 8)  # targets only; targets + up to 6 sparse neighbours


def _aligned(names, sig):
    """tt.divisibility=16 on pointers and strides, as the JIT gives 16-aligned arguments."""
    return {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if sig[n].startswith("*") or n.startswith("stride")
    }


def specialisations():
    """(label, kernel name, signature, constexprs, num_warps) of every specialisation."""
    from fused_ls import triton_kernels as tk

    block = tk.BLOCK_MAX
    warps = tk.num_warps_for(block)
    out = []
    for dt, (rname, (per_row, has_b)), pz, cap in itertools.product(
        DTYPES, R_MODES.items(), (False, True), (False, True)
    ):
        flags = f"{rname} pz={int(pz)} softcap={int(cap)}"
        sig = dict(
            X=f"*{dt}",
            stride_x="i32",
            R="*fp32",
            stride_r="i32",
            RIDX_A="*i64",
            RIDX_B="*i64",
            PART="*fp32",
            PART_ARG="*i64",
            C="i32",
            S="i32",
            cols_per_split="i32",
            softcap="fp32",
        )
        ce = dict(BLOCK=block, PER_ROW_R=per_row, HAS_B=has_b, NEED_PZ=pz, HAS_SOFTCAP=cap)
        out.append((f"row_stats {dt} {flags}", "_row_stats_kernel", sig, ce, warps))
        for kp in KP_VALUES:
            sig = dict(
                X=f"*{dt}",
                stride_x="i32",
                OUT=f"*{dt}",
                stride_o="i32",
                R="*fp32",
                stride_r="i32",
                RIDX_A="*i64",
                RIDX_B="*i64",
                LSE="*fp32",
                PZ="*fp32",
                TERMS="*fp32",
                Y_A="*i64",
                Y_B="*i64",
                SP_COLS="*i64",
                SP_MASS="*fp32",
                K="i32",
                C="i32",
                cols_per_split="i32",
                softcap="fp32",
            )
            ce = dict(
                BLOCK=block,
                KP=kp,
                PER_ROW_R=per_row,
                HAS_B=has_b,
                NEED_PZ=pz,
                HAS_SOFTCAP=cap,
                POINT_CHUNK=tk.POINT_CHUNK,
            )
            out.append((f"grad      {dt} {flags} KP={kp}", "_grad_kernel", sig, ce, warps))
    for sp in (1, 4, 8):
        sig = dict(
            PART="*fp32",
            PART_ARG="*i64",
            M="*fp32",
            LSE="*fp32",
            ARG="*i64",
            DOT_A="*fp32",
            DOT_B="*fp32",
            PZ="*fp32",
            S="i32",
        )
        out.append((f"merge     SP={sp}", "_merge_stats_kernel", sig, dict(SP=sp), 1))
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
    label, kernel, sig, ce, warps, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_ls import triton_kernels as tk

    fn = getattr(tk, kernel)
    full = dict(sig)
    full.update({k: "constexpr" for k in ce})
    names = fn.arg_names
    missing = set(names) ^ set(full)
    if missing:
        return False, f"sm_{arch} {label}: signature does not match the kernel ({sorted(missing)})"
    full = {n: full[n] for n in names}
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn, full, ce, _aligned(names, full))
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
    except Exception as e:  # noqa: BLE001 - every compile error is a failed check
        msg = str(e).strip().splitlines()
        return False, f"FAIL sm_{arch} {label}: {type(e).__name__}: {msg[-1] if msg else ''}"
    dt = time.perf_counter() - t0
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
    return ok, f"{tag} sm_{arch} {label:48s} warps={warps} {usage} {dt:5.2f}s{why}"


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
