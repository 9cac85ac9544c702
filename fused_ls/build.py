"""How the compiled extension ``fused_ls._C`` is built and found; ``python -m fused_ls.build``.

One description of the build (``recipe()``: the kernel sources, each with its flags)
and one way to compile it (``compile_library()``: a small ninja file, torch's include and library
paths) serve both places a build happens:

- **ahead of time**: ``setup.py`` when torch is importable at build time (``pip install
  --no-build-isolation``, ``make venv``). The library lands next to the package with a build-info
  sidecar, ``<library>.json``, naming the torch it was built against and a hash of the sources.
- **on first use**: when there is no usable ahead-of-time build (the plain ``pip install``, whose
  isolated build environment has no torch), the first process that needs the kernels compiles them
  against the torch it imported, into a cache directory, and every later process loads them from
  there. The cache key covers the Python and torch versions, the C++ ABI, the CUDA version, the CPU
  architecture, and a hash of the sources and flags; a file lock makes concurrent first uses
  (distributed ranks) build once, and a build is renamed into place only when complete.

An ahead-of-time build is loaded only when its sidecar matches the imported torch and the sources
(loading a library built against another torch can crash the process); otherwise the first-use
build replaces it and ``python -m fused_ls.info`` says why.

Where the sources are (``CSRC``): ``csrc/`` at the top of the repository, next to the package,
for a source tree or an editable install; ``fused_ls/csrc/`` inside an installed wheel, where
setup.py copies them (the repository keeps no C++ under ``fused_ls/``).

What is compiled: every csrc/cpu/*.cpp with the baseline flags, except the per-ISA translation
units named in ``ISA_FLAGS``, which get those flags (x86-64 only; ops.cpp picks the widest one
this CPU supports at run time); and csrc/cuda/*.cu with nvcc when torch is a CUDA build, nvcc is
found and the GPU architectures are known (``$TORCH_CUDA_ARCH_LIST``, else the visible GPUs).

Environment: ``FUSED_LS_CACHE`` (cache directory; default ``$XDG_CACHE_HOME/fused_ls`` or
``~/.cache/fused_ls``), ``FUSED_LS_NO_JIT=1`` (never compile on first use), ``FUSED_LS_NO_CUDA=1``
(C++ CPU kernels only), ``CXX`` (the C++ compiler, default ``c++``), ``MAX_JOBS`` (parallel
compiles), ``CUDA_HOME``, ``TORCH_CUDA_ARCH_LIST``.

Only the standard library is imported at module level: setup.py loads this file by path in build
environments that may have no torch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parent


def _find_csrc() -> Path:
    """The kernel sources: shipped inside the installed package, else the repository's csrc/."""
    shipped = PKG_DIR / "csrc"
    if (shipped / "rowmath.h").is_file():
        return shipped
    return PKG_DIR.parent / "csrc"


CSRC = _find_csrc()
MODULE = "fused_ls._C"
LIB_NAME = "_C.so"  # file name of a first-use build inside its cache directory

X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") and sys.platform != "win32"

# Extra compiler flags of the per-ISA kernel translation units (csrc/cpu/kernel_<isa>.cpp); the
# rest of the extension is compiled with the baseline flags. A new kernel_<isa>.cpp needs an entry.
ISA_FLAGS = {
    "kernel_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "kernel_avx512.cpp": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-mbmi",
        "-mbmi2",
    ],
}
# quiet known-noisy warnings of torch's vec headers and GCC's AVX-512 intrinsics
_CXX_WARNINGS = ["-Wno-psabi", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]


class BuildError(RuntimeError):
    """Why the extension cannot be built or loaded here; the message is shown to the user."""


def _say(msg: str) -> None:
    print(f"fused_ls: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The build description


def find_cuda_home() -> str | None:
    """The CUDA toolkit root (the folder above nvcc's bin/), following wrapper scripts."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
        return root
    try:  # nvcc may be a wrapper script: ask the driver where it lives
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
        if m:
            return os.path.dirname(m.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _cuda_plan(torch) -> tuple[str | None, list[str], str]:
    """(CUDA toolkit root, nvcc architecture flags, why not) for the CUDA kernels."""
    if not torch.version.cuda:
        return None, [], "torch is a CPU build"
    if os.environ.get("FUSED_LS_NO_CUDA") == "1":
        return None, [], "FUSED_LS_NO_CUDA=1"
    home = find_cuda_home()
    if home is None:
        return None, [], "torch is a CUDA build but nvcc was not found (set CUDA_HOME)"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        return None, [], "no GPU is visible and TORCH_CUDA_ARCH_LIST does not name architectures"
    from torch.utils import cpp_extension as ce

    return home, ce._get_cuda_arch_flags(), ""  # $TORCH_CUDA_ARCH_LIST, else the visible GPUs


def _torch_std(torch) -> str:
    # torch >= 2.13 headers require C++20 (pytorch/pytorch#176659); older ones are built as C++17
    major, minor = (int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    return "-std=c++20" if (major, minor) >= (2, 13) else "-std=c++17"


@dataclass
class Recipe:
    """What to compile and with which flags, for one torch. The include and library paths of
    torch, Python and CUDA are added by ``write_ninja``; everything else enters the cache key."""

    cxx_sources: list[tuple[str, list[str]]]  # (path relative to csrc/, extra flags of that file)
    cuda_sources: list[str]
    cxx_flags: list[str]
    nvcc_flags: list[str]
    ld_flags: list[str]
    cuda_home: str | None  # the CUDA toolkit, when cuda_sources are compiled
    no_cuda_reason: str  # why not, otherwise

    def digest(self) -> str:
        parts = [
            self.cxx_sources,
            self.cuda_sources,
            self.cxx_flags,
            self.nvcc_flags,
            self.ld_flags,
        ]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def recipe(torch, debug: bool = False) -> Recipe:
    """The build description of ``fused_ls._C`` for the imported torch."""
    isa_units = sorted(ISA_FLAGS) if X86 else []
    # The baseline units first, then the per-ISA ones: the linker keeps the first copy of any
    # inline function the translation units share, which must be the baseline one (kernel_impl.h).
    cxx_sources = [
        (f"cpu/{p.name}", [])
        for p in sorted((CSRC / "cpu").glob("*.cpp"))
        if p.name not in ISA_FLAGS
    ]
    cxx_sources += [(f"cpu/{f}", ISA_FLAGS[f]) for f in isa_units]
    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    common = [
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        _torch_std(torch),
    ]
    cxx = [*common, "-fPIC", *(["-O0", "-g"] if debug else ["-O3"]), *_CXX_WARNINGS]
    ld = ["-shared", "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]
    if X86:
        cxx += ["-DFUSED_LS_HAVE_AVX2", "-DFUSED_LS_HAVE_AVX512"]
    if sys.platform.startswith("linux"):
        # at::parallel_for is inlined into our code: without OpenMP it would run on one thread
        cxx.append("-fopenmp")
        ld.append("-fopenmp")
    cuda_home, arch_flags, no_cuda = _cuda_plan(torch)
    cuda_sources, nvcc = [], []
    if cuda_home is not None:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

        cuda_sources = [f"cuda/{p.name}" for p in sorted((CSRC / "cuda").glob("*.cu"))]
        nvcc = [*common, *COMMON_NVCC_FLAGS, *arch_flags, "--compiler-options", "-fPIC"]
        nvcc += ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
        if os.environ.get("CC"):  # as torch: the host compiler nvcc drives
            nvcc += ["-ccbin", os.environ["CC"]]
        ld += ["-lc10_cuda", "-ltorch_cuda", "-lcudart"]
    return Recipe(cxx_sources, cuda_sources, cxx, nvcc, ld, cuda_home, no_cuda)


@functools.cache
def sources_hash() -> str:
    """sha256 of every file under CSRC (names and contents)."""
    h = hashlib.sha256()
    for p in sorted(CSRC.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(p.relative_to(CSRC).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def torch_identity(torch) -> dict:
    """What a compiled library must share with the process that loads it."""
    return {
        "python": sys.implementation.cache_tag,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "cuda": torch.version.cuda,
    }


def sidecar(lib: str | Path) -> Path:
    """The build-info file written next to every library this module builds."""
    return Path(f"{lib}.json")


# --------------------------------------------------------------------------------------------
# Compiling


def _ninja_path(p: str | Path) -> str:
    return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _flags(flags: list[str]) -> str:
    return " ".join(shlex.quote(f) for f in flags).replace("$", "$$")


def write_ninja(r: Recipe, build_dir: Path, cxx: str) -> None:
    """build.ninja in build_dir: one rule per compiler, one build line per source (with its own
    extra flags), one link line to ``_C.so``."""
    from torch.utils import cpp_extension as ce

    py_include = sysconfig.get_path("include", scheme="posix_prefix")
    system_includes = [*ce.include_paths(), py_include]
    lib_dirs = [f"-L{p}" for p in ce.library_paths()]
    if r.cuda_home:
        system_includes.append(os.path.join(r.cuda_home, "include"))
        lib64 = os.path.join(r.cuda_home, "lib64")
        lib_dirs.append(f"-L{lib64 if os.path.isdir(lib64) else os.path.join(r.cuda_home, 'lib')}")
    includes = [arg for p in system_includes for arg in ("-isystem", p)]
    lines = [
        "ninja_required_version = 1.3",
        f"cxx = {cxx}",
        f"nvcc = {shlex.quote(os.path.join(r.cuda_home, 'bin', 'nvcc')) if r.cuda_home else ''}",
        f"cflags = {_flags(includes + r.cxx_flags)}",
        f"nvcc_flags = {_flags(includes + r.nvcc_flags)}",
        f"ldflags = {_flags(lib_dirs + r.ld_flags)}",
        "rule cxx",
        "  command = $cxx -MMD -MF $out.d $cflags $extra -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = compiling $in",
        "rule nvcc",
        "  command = $nvcc -MD -MF $out.d $nvcc_flags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = compiling $in",
        "rule link",
        "  command = $cxx $in $ldflags -o $out",
        "  description = linking $out",
    ]
    objects = []
    for src, extra in r.cxx_sources:
        objects.append(Path(src).stem + ".o")
        lines.append(f"build {objects[-1]}: cxx {_ninja_path(CSRC / src)}")
        lines.append(f"  extra = {_flags(extra)}")
    for src in r.cuda_sources:
        objects.append(Path(src).stem + ".cuda.o")
        lines.append(f"build {objects[-1]}: nvcc {_ninja_path(CSRC / src)}")
    lines += [f"build {LIB_NAME}: link {' '.join(objects)}", f"default {LIB_NAME}", ""]
    (build_dir / "build.ninja").write_text("\n".join(lines))


def _find_ninja() -> str | None:
    # the `ninja` wheel (a dependency) puts it next to the interpreter, which may not be on PATH
    here = os.path.join(sysconfig.get_path("scripts"), "ninja")
    return shutil.which("ninja") or (here if os.access(here, os.X_OK) else None)


def find_tools() -> tuple[str, str]:
    """(C++ compiler command, ninja) for compile_library; BuildError when one is missing."""
    cxx = os.environ.get("CXX", "c++")  # torch's rule for its own extension builds
    if not cxx.strip() or shutil.which(shlex.split(cxx)[0]) is None:
        raise BuildError(f"no C++ compiler: `{cxx}` was not found (install g++, or set CXX)")
    ninja = _find_ninja()
    if ninja is None:
        raise BuildError("ninja was not found (`pip install ninja`)")
    return cxx, ninja


def compile_library(r: Recipe, build_dir: Path, tools: tuple[str, str]) -> Path:
    """Compile and link ``r`` in build_dir (incrementally, output in build_dir/build.log) with
    ``tools`` from find_tools(); the path of the library."""
    cxx, ninja = tools
    build_dir.mkdir(parents=True, exist_ok=True)
    write_ninja(r, build_dir, cxx)
    cmd = [ninja, "-C", str(build_dir)]
    if os.environ.get("MAX_JOBS", "").isdigit():
        cmd += ["-j", os.environ["MAX_JOBS"]]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (build_dir / "build.log").write_text(out.stdout)
    if out.returncode != 0:
        lines = out.stdout.splitlines()
        errors = [ln for ln in lines if re.search(r"\berror\b", ln, re.I)] or lines[-1:] or [""]
        raise BuildError(f"compiling the kernels failed: {errors[0].strip()}")
    return build_dir / LIB_NAME


def build_info(torch, r: Recipe, kind: str, seconds: float) -> dict:
    return {
        **torch_identity(torch),
        "sources": sources_hash(),
        "recipe": r.digest(),
        "cuda_kernels": bool(r.cuda_sources),
        "no_cuda_reason": r.no_cuda_reason,
        "kind": kind,
        "seconds": round(seconds, 1),
    }


def build_ahead_of_time(torch, dest: str, build_dir: str, debug: bool = False) -> None:
    """setup.py's build: compile into build_dir, copy the library to dest, write its sidecar."""
    r = recipe(torch, debug=debug)
    t0 = time.monotonic()
    lib = compile_library(r, Path(build_dir), find_tools())
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    shutil.copyfile(lib, dest)
    info = build_info(torch, r, "ahead-of-time", time.monotonic() - t0)
    sidecar(dest).write_text(json.dumps(info, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# The first-use build cache


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("FUSED_LS_CACHE") or os.path.join(base, "fused_ls"))


def cache_dir(torch, r: Recipe) -> Path:
    """Where the first-use build for this torch, these sources and these flags lives."""
    ident = torch_identity(torch)
    key = {"identity": ident, "sources": sources_hash(), "recipe": r.digest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cuda = f"cu{ident['cuda'].replace('.', '')}" if r.cuda_sources else "cpu"
    name = f"{ident['python']}-{ident['machine']}-torch{ident['torch']}-{cuda}-{digest}"
    return cache_root() / name


def cached_build(torch, build: bool = True) -> Path:
    """The first-use build's library for the imported torch, compiled now when it is not in the
    cache (and ``build`` is true): once, under a file lock shared with concurrent processes."""
    r = recipe(torch)
    final = cache_dir(torch, r)
    lib = final / LIB_NAME
    if lib.exists():
        return lib
    if not build:
        raise BuildError(
            f"no first-use build in the cache {final.parent} and FUSED_LS_NO_JIT=1 "
            "(`python -m fused_ls.build` makes one)"
        )
    if sys.platform == "win32":
        raise BuildError("first-use builds need Linux or macOS")
    import fcntl

    tools = find_tools()  # no compiler: say so before announcing a build

    failed = final.parent / f"{final.name}.failed"  # the last failure's message and log
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "a") as lock:
        waited_since = None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited_since = time.time()
            _say(f"waiting for another process that is building the kernels into {final}")
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        if lib.exists():  # built by the process we waited for
            return lib
        if waited_since is not None and failed.exists() and failed.stat().st_mtime >= waited_since:
            # it failed while we waited: the same failure, without compiling again
            raise BuildError(f"{failed.read_text().splitlines()[0]} (log: {failed})")
        what = "C++ and CUDA" if r.cuda_sources else "C++"
        _say(
            f"building the {what} kernels for torch {torch.__version__}, once "
            f"({'several minutes' if r.cuda_sources else 'under a minute'}), into {final}"
        )
        t0 = time.monotonic()
        for stale in final.parent.glob(f"{final.name}.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
        try:
            built = compile_library(r, tmp, tools)
            info = build_info(torch, r, "first-use", time.monotonic() - t0)
            sidecar(built).write_text(json.dumps(info, indent=1) + "\n")
            for p in tmp.glob("*.o"):  # objects are not needed once linked
                p.unlink()
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover, if any
            os.rename(tmp, final)  # atomic: other processes see a complete build or none
        except BuildError as e:
            log = tmp / "build.log"
            failed.write_text(f"{e}\n" + (log.read_text() if log.exists() else ""))
            raise BuildError(f"{e} (log: {failed})") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        failed.unlink(missing_ok=True)
        _say(f"built the {what} kernels in {time.monotonic() - t0:.0f} s")
    return lib


# --------------------------------------------------------------------------------------------
# Loading: which build serves this process


@dataclass(frozen=True)
class Status:
    """Which build of ``fused_ls._C`` this process uses: kind is "ahead-of-time", "first-use" or
    "none"; note says what else is worth knowing (why an ahead-of-time build was passed over,
    why the CUDA kernels were not built, or why there is no build at all)."""

    kind: str
    path: str | None
    note: str = ""

    def describe(self) -> str:
        if self.kind == "none":
            return f"none: {self.note}"
        where = "" if self.kind == "ahead-of-time" else ", cached at"
        return f"{self.kind} build{where} {self.path}" + (f" ({self.note})" if self.note else "")


_status: Status | None = None


def status() -> Status | None:
    """What ``load()`` found in this process (None before the first call)."""
    return _status


def ahead_of_time_library() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = PKG_DIR / f"_C{suffix}"
        if p.exists():
            return p
    return None


def mismatch(info: dict | None, torch) -> str | None:
    """Why a library with build-info ``info`` must not be loaded by this process (None: it may)."""
    if info is None:
        return "it has no build-info sidecar"
    now = torch_identity(torch)
    for k, v in now.items():
        if info.get(k) != v:
            return f"it was built for {k} {info.get(k)}, this process has {v}"
    if info.get("sources") != sources_hash():
        return "the kernel sources changed since it was built (`make venv` rebuilds it in place)"
    return None


def _read_info(lib: Path) -> dict | None:
    try:
        return json.loads(sidecar(lib).read_text())
    except (OSError, ValueError):
        return None


def _load_module(lib: Path):
    spec = importlib.util.spec_from_file_location(MODULE, lib)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)  # runs the library's TORCH_LIBRARY registrations
    except Exception as e:  # noqa: BLE001 - ImportError, OSError (undefined symbol), ...
        raise BuildError(f"loading {lib} failed ({type(e).__name__}: {e})") from e
    sys.modules[MODULE] = mod
    return mod


def load() -> Status:
    """Load ``fused_ls._C`` into this process once: the ahead-of-time build when it matches the
    imported torch and the sources, else the first-use build (compiled now if it is not cached,
    unless ``FUSED_LS_NO_JIT=1``). Raises BuildError saying why when neither is possible."""
    global _status
    if _status is not None and _status.kind != "none":
        return _status
    import torch

    aot = ahead_of_time_library()
    skipped = mismatch(_read_info(aot), torch) if aot else None
    notes = [f"the ahead-of-time build {aot} was not used: {skipped}"] if skipped else []
    try:
        if aot and not skipped:
            kind, lib = "ahead-of-time", aot
        else:
            kind = "first-use"
            lib = cached_build(torch, build=os.environ.get("FUSED_LS_NO_JIT") != "1")
        _load_module(lib)
    except (BuildError, OSError) as e:  # OSError: the cache is not writable, ...
        _status = Status("none", None, "; ".join([*notes, str(e)]))
        raise BuildError(_status.note) from e
    info = _read_info(lib) or {}
    if torch.version.cuda and not info.get("cuda_kernels"):
        notes.append(f"C++ kernels only: {info.get('no_cuda_reason') or 'built without nvcc'}")
    _status = Status(kind, str(lib), "; ".join(notes))
    return _status


def main() -> int:
    """``python -m fused_ls.build``: compile the first-use build into the cache now (for images
    and clusters: later processes, all ranks, then only load it)."""
    import torch

    try:
        t0 = time.monotonic()
        lib = cached_build(torch)
        _load_module(lib)
    except (BuildError, OSError) as e:
        _say(f"no build: {e}")
        return 1
    print(f"fused_ls kernels for torch {torch.__version__}: {lib} ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
