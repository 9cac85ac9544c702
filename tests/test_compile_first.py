"""torch.compile(fullgraph=True) as the very first use of the package in a fresh process.

Backend discovery (imports, loading the compiled extension) must happen outside traced code; the
other compile tests cannot see a failure there because eager calls run first in the same process.
Each case runs in its own interpreter, bounded in time.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import backends

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import fused_ls

    backend, mode = sys.argv[1], sys.argv[2]
    kw = {}
    if mode == "everything":
        g = torch.Generator().manual_seed(1)
        kw = dict(
            weight=torch.rand(11, generator=g) + 0.1,
            similarity=torch.rand(11, 11, generator=g),
            similarity_mix=0.5,
            z_loss=1e-3,
            confidence_penalty=0.1,
            softcap=5.0,
        )

    def step(x, y):
        return fused_ls.label_smoothing_cross_entropy(x * 2, y, 0.1, backend=backend, **kw)

    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 11, generator=g)
    y = torch.randint(0, 11, (16,), generator=g)
    xc = x.clone().requires_grad_(True)
    lc = compiled(xc, y)  # the first call of anything in fused_ls in this process
    lc.backward()
    xe = x.clone().requires_grad_(True)
    le = step(xe, y)
    le.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(xc.grad, xe.grad)
    print("ok", float(lc))
    """
)


@pytest.mark.parametrize("backend", ["auto", *backends("cpu", among=("torch", "cpp"))])
@pytest.mark.parametrize("mode", ["uniform", "everything"])
def test_compile_is_the_first_call(backend, mode, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FUSED_LS_BACKEND"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")  # no warm cache from other runs
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, backend, mode],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")
