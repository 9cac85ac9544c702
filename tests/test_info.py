"""`python -m fused_ls.info` and the quickstart example run and say what they should."""

import os
import subprocess
import sys

import fused_ls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout


def test_info_lists_every_backend_with_a_status():
    out = _run("-m", "fused_ls.info")
    assert "torch " in out and "cuda device:" in out
    backend_lines = out.split("backends:\n", 1)[1].splitlines()
    for name in fused_ls.BACKEND_NAMES:
        line = next(ln for ln in backend_lines if ln.strip().startswith(name + " "))
        status = line.split(None, 1)[1]
        assert status == "available" or (status.startswith("unavailable: ") and len(status) > 20)
    assert "torch   available" in out  # the pure-torch fallback always works


def test_quickstart_runs_and_matches_pytorch():
    out = _run("examples/quickstart.py")
    first = out.splitlines()[0].split()
    assert first[0] == "fused" and first[2] == first[4]  # fused loss == PyTorch, printed
