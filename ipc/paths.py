"""Where the sockets live under RUN_DIR (DESIGN.md §2)."""

from __future__ import annotations

import os

CONTROL_SOCK = "control.sock"
EVENTS_SOCK = "events.sock"
WORKERS_SOCK = "workers.sock"
SIMNET_SOCK = "simnet.sock"
WEBHOOKS_SOCK = "webhooks.sock"  # the supervisor nudges the webhook delivery process here


def endpoint(run_dir: str, name: str) -> str:
    return "ipc://" + os.path.join(os.path.abspath(run_dir), name)


def ipc_path(endpoint_: str) -> str | None:
    """The filesystem path of an ipc:// endpoint, else None."""
    return endpoint_[len("ipc://") :] if endpoint_.startswith("ipc://") else None
