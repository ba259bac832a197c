"""`kvmpy selftest nested` brings the checkout's bytecode up to date before the L1
boots (kvmpy/tools/nested.py refresh_bytecode): the L1 sees the tree read-only and
writes no bytecode, so a stale module would be compiled again, under TCG, by every
Python the L1 starts, and a stale dataclass would compile its methods."""

from __future__ import annotations

import marshal
import os
import shutil
import struct
import sys

from conftest import ROOT

SAMPLE = "import dataclasses\n\n\n@dataclasses.dataclass\nclass Sample:\n    first: int\n"


def _pyc_matches_source(path: str) -> bool:
    import importlib.util
    try:
        with open(importlib.util.cache_from_source(path), "rb") as f:
            header = f.read(16)
    except FileNotFoundError:
        return False
    magic, flags, mtime, size = struct.unpack("<4sIII", header)
    if magic != importlib.util.MAGIC_NUMBER:
        return False
    if flags & 1:       # hash-based (compileall's choice where SOURCE_DATE_EPOCH is set)
        with open(path, "rb") as f:
            return header[8:16] == importlib.util.source_hash(f.read())
    st = os.stat(path)
    return mtime == int(st.st_mtime) & 0xFFFFFFFF and size == st.st_size & 0xFFFFFFFF


def _package(tmp_path) -> str:
    """A package named kvmpy with the real code cache and one module of our own."""
    pkg = tmp_path / "kvmpy"
    pkg.mkdir()
    for name in ("__init__.py", "_codecache.py"):
        shutil.copy(os.path.join(ROOT, "kvmpy", name), pkg / name)
    (pkg / "sample.py").write_text(SAMPLE)
    return str(pkg)


def test_an_edited_module_and_dataclass_are_brought_up_to_date(tmp_path):
    from kvmpy.tools.nested import refresh_bytecode
    pkg = _package(tmp_path)
    cache = os.path.join(pkg, "__pycache__", f"dataclass-code.{sys.implementation.cache_tag}.marshal")
    refresh_bytecode(pkg, cache)
    assert not os.path.exists(cache)    # no in-place build made one: none is made
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "wb") as f:
        marshal.dump({}, f)
    refresh_bytecode(pkg, cache)
    sample = os.path.join(pkg, "sample.py")
    assert _pyc_matches_source(sample)
    with open(cache, "rb") as f:
        texts = marshal.load(f)
    assert any("first" in t and "second" not in t for t in texts), list(texts)

    # edited after that build: stale until the next refresh
    with open(sample, "a") as f:
        f.write("    second: int = 0\n")
    later = os.stat(sample).st_mtime + 5
    os.utime(sample, (later, later))
    assert not _pyc_matches_source(sample)
    refresh_bytecode(pkg, cache)
    assert _pyc_matches_source(sample)
    with open(cache, "rb") as f:
        texts = marshal.load(f)
    assert any("second" in t for t in texts), list(texts)
