"""The supervisor's logging: one stderr handler, journald-aware, phone numbers masked.

Worker records arrive as LOG frames and are re-emitted through the same handler
(`Ops.worker_log`), so one place decides the format for every line (`ipc.logfmt`).
"""

from __future__ import annotations

import logging
from typing import IO

from ipc.logfmt import log_to_stderr


def configure(level: str, stream: IO[str] | None = None) -> logging.Handler:
    """Replace the root handlers with ours; journald format when stderr is the journal."""
    return log_to_stderr(level, "waportd", stream)
