"""Build script. The kernel sources live in csrc/ at the top of the repository; a wheel ships a copy
of them inside the package (``fused_ls/csrc/``, by ``BuildPy``), so that the first-use build works
from an installed package, while an editable install builds from csrc/ itself.

The compiled extension ``fused_ls._C`` is built here only when torch is importable at build time
(``pip install --no-build-isolation``, ``make venv``): an ahead-of-time build, written next to the
package with a build-info sidecar. Otherwise
(the plain ``pip install``: pip's isolated build environment has no torch) the wheel is pure Python
and the kernels are compiled on first use against the torch the user imports, once, into a cache.

What is compiled, with which flags, and how, is described once, in fused_ls/build.py, which both
this script and the first-use build use (loaded here by file path: importing the package would
import torch).

Environment: FUSED_LS_NO_EXT=1 skips the extension; FUSED_LS_NO_CUDA=1 builds the CPU part only;
FUSED_LS_STRICT_BUILD=1 makes a build failure fatal (used by `make cuda-check`); DEBUG=1 builds
with -O0 -g; MAX_JOBS limits parallel compiles. Otherwise a failed build prints a warning and
installs the pure-Python package (the first-use build then tries again).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
STRICT = os.environ.get("FUSED_LS_STRICT_BUILD") == "1"


def _warn(msg: str) -> None:
    print(f"WARNING (fused_ls): {msg}", file=sys.stderr)


def _build_module():
    spec = importlib.util.spec_from_file_location(
        "_fused_ls_build", os.path.join(HERE, "fused_ls", "build.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


BUILD = _build_module()


class BuildPy(build_py):
    """Copies csrc/ into the built package as fused_ls/csrc/ (what a first-use build compiles).
    Not for editable installs: they compile csrc/ in place."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = os.path.join(self.build_lib, "fused_ls", "csrc")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(
            os.path.join(HERE, "csrc"), dest, ignore=shutil.ignore_patterns("__pycache__", "*.o")
        )


class BuildExt(build_ext):
    """Builds ``fused_ls._C`` with fused_ls/build.py; never fatal unless FUSED_LS_STRICT_BUILD=1."""

    def build_extension(self, ext):
        dest = self.get_ext_fullpath(ext.name)
        build_dir = os.path.join(self.build_temp, "fused_ls_C")
        if self.force:
            shutil.rmtree(build_dir, ignore_errors=True)
        try:
            import torch

            BUILD.build_ahead_of_time(torch, dest, build_dir, debug=os.environ.get("DEBUG") == "1")
        except Exception as e:  # noqa: BLE001 - any build failure falls back to pure Python
            if STRICT:
                raise
            log = os.path.join(build_dir, "build.log")
            _warn(
                f"building the compiled extension failed ({type(e).__name__}: {e}"
                + (f"; log: {log}" if os.path.exists(log) else "")
                + "); installing without it: the kernels will be built on first use. "
                "Set FUSED_LS_STRICT_BUILD=1 to see the failure as an error."
            )

    def copy_extensions_to_source(self):
        # editable installs: the library's build-info sidecar goes in place with it
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace, regular = self._get_inplace_equivalent(build_py, ext)
            if BUILD.sidecar(regular).exists():
                self.copy_file(BUILD.sidecar(regular), BUILD.sidecar(inplace), level=self.verbose)


def _ext_modules() -> list[Extension]:
    if os.environ.get("FUSED_LS_NO_EXT") == "1":
        return []
    try:
        import torch  # noqa: F401
    except ImportError:
        print(
            "fused_ls: torch is not importable in this build environment (pip's build isolation): "
            "building a pure-Python wheel; the kernels are compiled on first use against the "
            "installed torch",
            file=sys.stderr,
        )
        return []
    # BuildExt compiles what fused_ls/build.py describes; optional: a failed build (warned
    # about above) leaves no library to copy in place for editable installs
    return [Extension("fused_ls._C", sources=[], optional=True)]


setup(ext_modules=_ext_modules(), cmdclass={"build_py": BuildPy, "build_ext": BuildExt})
