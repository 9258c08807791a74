"""The supervisor's logging: one stderr handler, journald-aware, phone numbers masked.

Worker records arrive as LOG frames and are re-emitted through the same handler
(`Ops.worker_log`), so one place decides the format for every line (`ipc.logfmt`).
"""

from __future__ import annotations

import logging
import sys
from typing import IO

from ipc.logfmt import LineFormatter, under_journald


def configure(level: str, stream: IO[str] | None = None) -> logging.Handler:
    """Replace the root handlers with ours; journald format when stderr is the journal."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(journald=under_journald(stream)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler
