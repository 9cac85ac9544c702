"""fused_ls/build.py: the build description, the checks that keep a library built against another
torch (or older sources) from being loaded, and the first-use build's failure modes that need no
compiling. The whole install-and-build-on-first-use path is tests/test_install.py."""

from __future__ import annotations

import json

import pytest
import torch

from fused_ls import build


def test_every_cpu_source_is_compiled_baseline_first_with_isa_flags_only_on_isa_units():
    r = build.recipe(torch)
    names = [src for src, _ in r.cxx_sources]
    on_disk = sorted(f"cpu/{p.name}" for p in (build.CSRC / "cpu").glob("*.cpp"))
    assert sorted(names) == on_disk
    for src, extra in r.cxx_sources:
        assert extra == build.ISA_FLAGS.get(src.split("/")[1], [])
    first_isa = min(i for i, (_, extra) in enumerate(r.cxx_sources) if extra)
    assert all(not extra for _, extra in r.cxx_sources[:first_isa])  # baseline units link first
    assert all(extra for _, extra in r.cxx_sources[first_isa:])


def test_the_library_loaded_here_matches_this_torch_and_these_sources():
    st = build.load()
    assert st.kind in ("ahead-of-time", "first-use")
    info = json.loads(build.sidecar(st.path).read_text())
    assert build.mismatch(info, torch) is None
    assert info["kind"] == st.kind and info["sources"] == build.sources_hash()


@pytest.mark.parametrize(
    "change, why",
    [
        ({"torch": "2.12.0+cpu"}, "built for torch 2.12.0+cpu, this process has"),
        ({"cxx11_abi": None}, "built for cxx11_abi None"),
        ({"python": "cpython-310"}, "built for python cpython-310"),
        ({"sources": "0" * 64}, "the kernel sources changed since it was built"),
    ],
)
def test_a_library_built_for_another_torch_or_older_sources_is_not_loaded(change, why):
    info = {**build.torch_identity(torch), "sources": build.sources_hash()}
    assert build.mismatch(info, torch) is None
    assert why in build.mismatch({**info, **change}, torch)
    assert "no build-info sidecar" in build.mismatch(None, torch)


def test_cache_key_names_python_machine_torch_and_hashes_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_LS_CACHE", str(tmp_path))
    d = build.cache_dir(torch, build.recipe(torch))
    assert d.parent == tmp_path
    assert d.name.startswith(f"{build.torch_identity(torch)['python']}-")
    assert f"-torch{torch.__version__}-" in d.name
    other = build.recipe(torch, debug=True)  # other flags, other build
    assert build.cache_dir(torch, other) != d


def test_no_compiler_says_so_and_leaves_no_build(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_LS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(build.BuildError, match="no C.. compiler: `/nonexistent/g..` was not found"):
        build.cached_build(torch)
    assert not list(tmp_path.iterdir())  # checked before anything is written


def test_no_jit_does_not_build(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_LS_CACHE", str(tmp_path))
    with pytest.raises(build.BuildError, match="FUSED_LS_NO_JIT=1"):
        build.cached_build(torch, build=False)
    assert not list(tmp_path.iterdir())
