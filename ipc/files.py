"""Atomic file writes: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from typing import Any


def write_atomic(path: str, data: bytes | str, mode: int = 0o600, durable: bool = True) -> None:
    """Write `data` to `path` through a temporary file and a rename.

    `durable` fsyncs the file before the rename, so power loss cannot leave an empty file in its
    place. The temporary name carries the PID: two processes writing the same path never share one.
    """
    raw = data.encode() if isinstance(data, str) else data
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; a wider umask never widens it
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path: str, data: Any, mode: int = 0o600, **dump: Any) -> None:
    write_atomic(path, json.dumps(data, **dump), mode)


def create_private(path: str) -> int:
    """A new file only we may read (0600), never one that exists already (FileExistsError): a descriptor
    open for writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # the umask may have narrowed it
    return fd


def make_dir(path: str, mode: int) -> None:
    """Create `path` if needed and give it exactly `mode` (makedirs' mode is narrowed by the umask)."""
    os.makedirs(path, mode=mode, exist_ok=True)
    os.chmod(path, mode)
