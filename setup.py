"""Build script. The compiled extensions (fused_ls/csrc/) are optional: a missing compiler never
breaks `pip install` or `import fused_ls`; the pure-torch backend then serves.

What gets built, as the extension module ``fused_ls._C``:

- always (when a C++ compiler and torch's headers are usable): the CPU kernels
  (fused_ls/csrc/cpu), the row loops compiled once per instruction set on x86-64 (baseline,
  AVX2+FMA, AVX-512; the widest the CPU supports is picked at run time, $FUSED_LS_CPU_ISA forces
  one); baseline only elsewhere;
- the CUDA kernels (fused_ls/csrc/cuda) too, when torch is a CUDA build and nvcc is found
  ($CUDA_HOME, or nvcc on PATH; $TORCH_CUDA_ARCH_LIST picks the GPU architectures).

Environment: FUSED_LS_NO_EXT=1 skips the extension; FUSED_LS_NO_CUDA=1 builds the CPU part only;
FUSED_LS_STRICT_BUILD=1 makes a build failure fatal (used by `make cuda-check`); DEBUG=1 builds
with -O0 -g. Otherwise a failed build prints a warning and installs the pure-Python package.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

STRICT = os.environ.get("FUSED_LS_STRICT_BUILD") == "1"
DEBUG = os.environ.get("DEBUG") == "1"
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") and sys.platform != "win32"

# Extra compiler flags of the per-ISA kernel translation units
# (fused_ls/csrc/cpu/kernel_<isa>.cpp); the rest of the extension is compiled with the baseline
# flags.
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


def _warn(msg: str) -> None:
    print(f"WARNING (fused_ls): {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root (the folder above nvcc's bin/), following wrapper scripts."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(real))
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


def _extensions():
    if os.environ.get("FUSED_LS_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as e:  # noqa: BLE001 - no torch at build time: pure-Python package
        _warn(
            f"torch is not importable at build time ({e}); building without the C++ extension. "
            "Install torch first and use `pip install --no-build-isolation`."
        )
        return [], {}

    cpu_dir = os.path.join("fused_ls", "csrc", "cpu")
    # Baseline kernel and the dispatcher first: the linker keeps the first copy of any inline
    # function the translation units share, which must be the baseline one (see kernel_impl.h).
    sources = [os.path.join(cpu_dir, "ops.cpp"), os.path.join(cpu_dir, "kernel_default.cpp")]
    # quiet known-noisy warnings of torch's vec headers and GCC's AVX-512 intrinsics
    cxx = (["-O0", "-g"] if DEBUG else ["-O3"]) + [
        "-Wno-psabi",
        "-Wno-unknown-pragmas",
        "-Wno-maybe-uninitialized",
    ]
    if X86:
        sources += [os.path.join(cpu_dir, f) for f in ISA_FLAGS]
        cxx += ["-DFUSED_LS_HAVE_AVX2", "-DFUSED_LS_HAVE_AVX512"]
    # headers: rebuild when they change, and ship them in an sdist
    depends = [
        os.path.join("fused_ls", "csrc", h) for h in ("rowmath.h", "ext_common.h", "args.h")
    ] + [os.path.join(cpu_dir, "kernel_impl.h")]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inlined into our code: without OpenMP it would run on one thread
        cxx.append("-fopenmp")
        link.append("-fopenmp")

    cuda_home = None
    if torch.version.cuda and os.environ.get("FUSED_LS_NO_CUDA") != "1":
        cuda_home = _find_cuda_home()
        if cuda_home is None:
            _warn("torch is a CUDA build but nvcc was not found: building the CPU kernels only")
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home
        ce.CUDA_HOME = cuda_home  # resolved at import time from PATH; a wrapper script misleads it
        sources.append(os.path.join("fused_ls", "csrc", "cuda", "kernels.cu"))
        nvcc = ["-O0", "-g", "-G"] if DEBUG else ["-O3", "-lineinfo"]
        ext = ce.CUDAExtension(
            "fused_ls._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
            depends=depends,
        )
    else:
        ext = ce.CppExtension(
            "fused_ls._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            depends=depends,
        )

    class BuildExt(ce.BuildExtension):
        """torch's BuildExtension with per-file ISA flags, and never fatal unless STRICT."""

        def build_extension(self, ext):
            compile_one = self.compiler._compile

            def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                flags = ISA_FLAGS.get(os.path.basename(src))
                if flags:
                    if isinstance(extra_postargs, dict):
                        extra_postargs = {
                            **extra_postargs,
                            "cxx": list(extra_postargs.get("cxx", [])) + flags,
                        }
                    else:
                        extra_postargs = list(extra_postargs or []) + flags
                return compile_one(obj, src, ext_, cc_args, extra_postargs, pp_opts)

            self.compiler._compile = _compile
            try:
                super().build_extension(ext)
            finally:
                self.compiler._compile = compile_one

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure falls back to pure Python
                if STRICT:
                    raise
                _warn(
                    f"building the compiled extension failed ({type(e).__name__}: {e}); "
                    "installing without it: the pure-torch backend will serve. "
                    "Set FUSED_LS_STRICT_BUILD=1 to see the failure as an error."
                )

    # Per-file flags need the plain (one compiler call per file) path, not torch's ninja path.
    return [ext], {"build_ext": BuildExt.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
