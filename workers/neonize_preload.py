"""neonize's Python side without its Go library, for the fork server (issue 16).

Most of a neonize worker's memory is Python — neonize's generated protobuf modules and what
`neonize.client` imports (Pillow, python-magic, linkpreview, segno) — and a fork shares it
copy-on-write. But the Go runtime must never be forked, and it starts as soon as neonize's shared
library is loaded: `neonize._binder` loads it at import, `neonize.client` imports `_binder`, and the
package's `__init__` imports `client`, so even `import neonize.proto...` would map it.

`preload()` (in the fork server) registers the `neonize` package without running its `__init__`,
then imports every submodule while an import hook refuses the two that load Go: a module that needs
them fails here and is imported by the worker instead. `finish()` (in the worker, after the fork)
runs the package's `__init__`, which loads the Go library in that process only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

log = logging.getLogger("waport.preload")

GO_MODULES = frozenset({"neonize._binder", "neonize.client"})  # importing either loads the Go library
SKIPPED = ("neonize.aioze",)  # the asyncio client: never used by waport
THIRD_PARTY = ("magic", "PIL.Image", "PIL.ImageSequence", "linkpreview", "segno", "google.protobuf.message")
MARK = "__waport_preloaded__"
LIBRARY_HINT = "neonize-"  # the shared library's file name: neonize-linux-amd64.so


class GoBarrier(importlib.abc.MetaPathFinder):
    """Refuses the modules that load the Go library, while the fork server preloads."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname in GO_MODULES:
            raise ImportError(f"{fullname} loads neonize's Go library: not in the fork server")
        return None


def preload() -> list[str]:
    """Import neonize's Python side here, never its Go library; the names of the modules imported."""
    spec = importlib.util.find_spec("neonize")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("neonize is not installed")
    package = importlib.util.module_from_spec(spec)
    setattr(package, MARK, True)
    sys.modules["neonize"] = package
    barrier = GoBarrier()
    sys.meta_path.insert(0, barrier)
    loaded: list[str] = []
    try:
        for name in THIRD_PARTY:
            _try_import(name, loaded)
        for name in submodules(spec.submodule_search_locations[0]):
            if name not in GO_MODULES and not name.startswith(SKIPPED):
                _try_import(name, loaded)
    finally:
        sys.meta_path.remove(barrier)
    if go_library_loaded():
        raise RuntimeError("neonize's Go library was loaded while preloading: the fork server must not fork it")
    return loaded


def submodules(root: str) -> list[str]:
    """Every Python module of the package at `root`, namespace folders included (the generated protobuf
    modules live in folders without `__init__.py`, which pkgutil does not walk); never the .so."""
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d.isidentifier())
        rel = os.path.relpath(folder, root)
        prefix = "neonize" if rel == "." else "neonize." + rel.replace(os.sep, ".")
        names += [f"{prefix}.{f[:-3]}" for f in sorted(files)
                  if f.endswith(".py") and f != "__init__.py" and f[:-3].isidentifier()]
    return names


def _try_import(name: str, loaded: list[str]) -> None:
    before = set(sys.modules)
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a module that needs Go (or an optional extra) is left to the worker
        for partial in set(sys.modules) - before:  # half-imported modules would be reused broken
            del sys.modules[partial]
        log.debug("not preloaded: %s (%s)", name, exc)
        return
    loaded.append(name)


def finish() -> None:
    """In a worker forked from a preloading fork server: run neonize's `__init__` (it loads Go, here)."""
    package = sys.modules.get("neonize")
    if package is None or not getattr(package, MARK, False):
        return
    delattr(package, MARK)
    assert package.__spec__ is not None and package.__spec__.loader is not None
    package.__spec__.loader.exec_module(package)


def start_go() -> None:
    """In a forked worker, before anything rewrites the process title: Go reads its environment (GOGC,
    GOMEMLIMIT, GOMAXPROCS) from the strings the process started with, and setproctitle overwrites those."""
    finish()
    importlib.import_module("neonize.client")


def go_library_loaded(pid: int | str = "self") -> bool:
    """Whether a process has neonize's shared library mapped (/proc/PID/maps)."""
    with open(f"/proc/{pid}/maps") as fh:
        return any(LIBRARY_HINT in line and ".so" in line for line in fh)
