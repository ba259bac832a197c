"""Compiled code for the methods @dataclass writes, kept from the build to every run.

@dataclass writes each class's ``__init__``, ``__repr__``, ``__eq__`` (a frozen one's
``__setattr__``, ``__delattr__`` and ``__hash__`` too) as source text and compiles it
with ``exec``: about 280 compilations for the 57 classes on `kvmpy run`'s path, 40% of
its imports on our hosts, and most of its start-up in the nested L1, where Python's
compiler runs under TCG (a dataclass there costs 50-90 ms). Bytecode files do not
help: the text is made at import.

The in-place build (setup.py, as it compiles the modules' bytecode) imports every
kvmpy module with ``record()`` on and writes each text with its code object to
``__pycache__``; ``install()``, first thing at import, gives the dataclasses module
an ``exec`` of its own (a module global, found before the builtin) that runs a
recorded text's code object instead of compiling the text again. What the cache
gives is what ``compile()`` makes of the same text, so only the time differs. A text
not recorded (a class edited since the build, another package's dataclass) is
compiled as ``exec`` would; a cache that is missing, unreadable or from another
Python is ignored. Nothing changes where dataclasses stops calling ``exec`` with a
text (Python 3.13 builds its methods otherwise): the texts are then never seen.
"""

import builtins
import dataclasses
import marshal
import os
import sys
import types

CACHE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__",
                          f"dataclass-code.{sys.implementation.cache_tag}.marshal")

_codes: dict = {}
_recording = False
# Texts compiled at run time since install(): 0 where the build's cache covered them.
compiled = 0


def _exec(source, globals=None, locals=None, /):
    global compiled
    if isinstance(source, str):
        blob = _codes.get(source)
        # Each kept as its own marshal blob, read when first used: one dict of code
        # objects took ten times as long to load as the ~280 the run path uses.
        code = _load(blob) if blob is not None else None
        if code is None:
            # dont_inherit: the flags of the code that called exec (dataclasses has no
            # __future__ imports), not this module's
            code = compile(source, "<string>", "exec", dont_inherit=True)
            compiled += 1
            if _recording:
                _codes[source] = marshal.dumps(code)
        source = code
    if globals is None:     # exec's own default: the caller's namespace
        caller = sys._getframe(1)
        globals = caller.f_globals
        if locals is None:
            locals = caller.f_locals
    return builtins.exec(source, globals, locals)


def _load(blob: bytes):
    try:
        code = marshal.loads(blob)
    except (EOFError, ValueError, TypeError):
        return None
    return code if isinstance(code, types.CodeType) else None


def install(path: str = CACHE_FILE) -> None:
    """Use the code recorded in ``path`` (none where it cannot be read) for dataclasses."""
    try:
        with open(path, "rb") as f:
            loaded = marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        loaded = None
    _codes.clear()
    if isinstance(loaded, dict):
        _codes.update((text, blob) for text, blob in loaded.items()
                      if isinstance(text, str) and isinstance(blob, bytes))
    dataclasses.exec = _exec


def build(package_dir: str, path: str = CACHE_FILE) -> int:
    """The build's step, in a fresh interpreter (a class made before it would be
    missed): import every module of the kvmpy package in ``package_dir`` and write the
    texts their dataclasses compiled to ``path``; returns how many."""
    import importlib
    import pkgutil
    global _recording
    _codes.clear()
    _recording = True
    dataclasses.exec = _exec
    for info in pkgutil.walk_packages([package_dir], prefix="kvmpy.", onerror=lambda name: None):
        last = info.name.rsplit(".", 1)[-1]
        if last == "__main__" or last.endswith("_build"):
            continue        # the command itself; the cffi builders
        try:
            importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - an optional dependency missing: its classes compile at run time
            continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        marshal.dump(dict(_codes), f)
    os.replace(tmp, path)
    return len(_codes)
