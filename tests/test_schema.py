"""One schema: the ``Problem`` fields of fused_ls/_problem.py are the arguments of every
``fused_ls::`` op, of the compiled kernels' ops (their schema, and the C++ parameter and argument
lists that unpack them, csrc/ext_common.h) and of the Triton launches (by keyword). Each is checked
against the one definition here, so that a field added, removed or reordered in one place but not
the others fails, instead of shifting positional values silently."""

from __future__ import annotations

import os
import re

import pytest
import torch

import fused_ls
from fused_ls import _problem
from fused_ls._problem import PROBLEM_SCHEMA, Problem
from fused_ls.backends import reasons_for

HEADER = os.path.join(os.path.dirname(__file__), "..", "csrc", "ext_common.h")
# C++ parameter types of the schema types (FLS_PROBLEM_PARAMS)
CPP_TYPES = {
    "Tensor": "const at::Tensor &",
    "Tensor?": "const OptT &",
    "float": "double",
    "int": "int64_t",
    "bool": "bool",
}


def _macro(name: str) -> str:
    text = open(HEADER).read()
    m = re.search(rf"#define {name}\s*\\\n(.*?)\n\n", text, re.S)
    assert m, f"{name} not found in csrc/ext_common.h"
    return re.sub(r"\s*\\\n\s*", " ", m.group(1)).strip()


def _schema_pairs() -> list[tuple[str, str]]:
    return [tuple(arg.rsplit(" ", 1)) for arg in PROBLEM_SCHEMA.split(", ")]


def test_schema_is_derived_from_the_fields():
    types, names = zip(*_schema_pairs(), strict=True)
    assert list(names) == list(Problem._fields)
    n = _problem.N_TENSORS
    assert all(t.startswith("Tensor") for t in types[:n])
    assert not any(t.startswith("Tensor") for t in types[n:])


def test_cpp_schema_string_equals_the_python_one():
    cpp = "".join(re.findall(r'"([^"]*)"', _macro("FLS_PROBLEM_SCHEMA")))
    assert cpp == PROBLEM_SCHEMA


def test_cpp_parameters_unpack_the_fields_in_order():
    got = []
    for param in _macro("FLS_PROBLEM_PARAMS").split(","):
        ctype, name = re.fullmatch(r"\s*(.*?)\s*&?\s*(\w+)\s*", param).groups()
        got.append((ctype + (" &" if "&" in param else ""), name))
    assert got == [(CPP_TYPES[t], n) for t, n in _schema_pairs()]


def test_cpp_arguments_pass_the_fields_in_order():
    args = [a.strip() for a in _macro("FLS_PROBLEM_ARGS").split(",")]
    assert args == list(Problem._fields)


@pytest.mark.skipif(bool(reasons_for("cpp", None)), reason="needs the compiled extension")
def test_registered_kernel_ops_take_the_problem():
    """The schemas the library registered (ext_*) and the Python ops (fused_ls::*) list the
    fields with their types after their own leading arguments."""
    assert fused_ls.backends.cpp_backend.load_extension() is None
    want = _schema_pairs()
    for kind, lead in (
        ("forward", 1),
        ("backward", 4),
        ("forward_backward", 3),
        ("row_stats", 1),
        ("finalize", 1),
    ):
        for op, tail in ((f"ext_{kind}", 0), (kind, 1)):  # the Python ops end with `backend`
            schema = getattr(torch.ops.fused_ls, op).default._schema
            args = schema.arguments[lead : len(schema.arguments) - tail]
            got = [(str(a.type).replace("Optional[Tensor]", "Tensor?"), a.name) for a in args]
            assert got == want, op


def test_triton_launches_take_problem_fields_by_name():
    """Every Triton kernel parameter named like a scalar Problem field gets that field's value,
    and a
    launch with a parameter missing raises instead of shifting the others."""
    pytest.importorskip("triton")
    from helpers import problem

    from fused_ls import triton_kernels as k
    from fused_ls.backends import triton_backend as tb

    x = torch.randn(3, 11)
    y = torch.tensor([1, 2, 3])
    p = problem(x, y, smoothing=0.13, z_loss=0.2, softcap=3.5, confidence_penalty=0.05,
                ignore_index=-7, mix_target=y, mix_lambda=0.4)  # fmt: skip
    values = tb._call_values(x, p)
    kernels = (k._rows_kernel, k._merge_kernel, k._grad_kernel)
    used = set()
    for kernel in kernels:
        for name in tb._param_names(kernel):
            if name in Problem._fields[_problem.N_TENSORS :]:
                used.add(name)
                assert values[name] == getattr(p, name), (kernel.fn.__name__, name)
    assert used == set(tb._PROBLEM_SCALARS)
    with pytest.raises(TypeError, match="no value for"):
        tb._launch(k._reduce_kernel, (1,), {"PACK": None})
