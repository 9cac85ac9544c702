"""``python -m fused_ls.info``: versions, devices, which build of the compiled extension is in use,
and which backends can run here (and why not)."""

from __future__ import annotations

import platform

import torch

import fused_ls
from fused_ls import build


def report() -> str:
    lines = [
        f"fused_ls {fused_ls.__version__}",
        f"python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as e:  # noqa: BLE001 - any import failure is worth reporting
        lines.append(f"triton: not importable ({type(e).__name__}: {e})")
    if torch.cuda.is_available():
        lines.append(
            f"cuda device: {torch.cuda.get_device_name()} "
            f"(sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
        )
    else:
        lines.append("cuda device: none")
    backends = fused_ls.available_backends()  # loads (or builds) the compiled extension
    ext = build.status()
    lines.append(f"compiled extension: {ext.describe() if ext else 'not looked for'}")
    lines.append("backends:")
    for name, why in backends.items():
        status = "available" if not why else "unavailable: " + "; ".join(why)
        lines.append(f"  {name:7s} {status}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
