"""One control call from the command line, with failures turned into the documented exit codes.

Exit codes (DESIGN.md §4): 0 ok, 1 error reply, 2 usage (click), 3 daemon unreachable. Every
command goes through `call`, so the messages and codes are the same for all of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from ipc import paths
from ipc.control import ControlClient, DaemonUnreachable
from ipc.errors import INTERNAL, RATE_LIMITED, WaportError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DEFAULT_RUN_DIR = "/run/waport"
DEFAULT_TIMEOUT = 10.0
# Commands the daemon answers only once a worker has acted (its worker calls wait up to 30 s, a
# stop up to stop_timeout and the kill): a 10 s wait would report a busy daemon as unreachable.
WORKER_BOUND_TIMEOUT = 60.0
WORKER_BOUND = frozenset({"stop", "restart", "logout", "delete", "send", "pair_code", "read", "typing",
                          "export", "backup", "import_commit"})  # bundles: a stop, copies of files
MEDIA_FETCH_TIMEOUT = 130.0  # the daemon gives a download 120 s (three attempts)

START_HINT = "is it running? (start it with `systemctl start waportd` or `waportd`)"


@dataclass
class Settings:
    """The global options, shared by every verb through click's context object."""

    run_dir: str = DEFAULT_RUN_DIR
    json: bool = False
    timeout: float | None = None  # None: the command's default

    def timeout_for(self, cmd: str) -> float:
        if self.timeout is not None:
            return self.timeout
        if cmd == "media_fetch":
            return MEDIA_FETCH_TIMEOUT
        return WORKER_BOUND_TIMEOUT if cmd in WORKER_BOUND else DEFAULT_TIMEOUT


def unreachable(path: str, timeout: float | None = None, what: str = "waportd") -> NoReturn:
    """Say why the daemon could not be reached and exit 3."""
    if not os.path.exists(path):
        why = "socket file missing"
    elif timeout is not None:
        why = f"no reply within {timeout:g} s"
    else:
        why = "no answer"
    click.echo(f"waportctl: cannot reach {what} at {path} ({why}): {START_HINT}", err=True)
    raise click.exceptions.Exit(EXIT_UNREACHABLE)


def error_text(err: WaportError) -> str:
    """`<code>: <message>`, plus the retry delay a `rate_limited` error carries."""
    text = f"{err.code}: {err.message}"
    retry_ms = err.extra.get("retry_after_ms")
    if err.code == RATE_LIMITED and isinstance(retry_ms, int | float):
        text += f" (retry after {retry_ms / 1000:g} s)"
    return text


def fail(settings: Settings, err: WaportError) -> NoReturn:
    """Report an error reply and exit 1; with --json the error object also goes to stdout."""
    if settings.json:
        click.echo(json.dumps(err.to_dict(), sort_keys=True))
    click.echo(f"error: {error_text(err)}", err=True)
    raise click.exceptions.Exit(EXIT_ERROR)


def call(settings: Settings, cmd: str, **args: Any) -> dict[str, Any]:
    """Send one command and return its result; error replies exit 1, no daemon exits 3."""
    endpoint = paths.endpoint(settings.run_dir, paths.CONTROL_SOCK)
    timeout = settings.timeout_for(cmd)
    try:
        with ControlClient(settings.run_dir, timeout=timeout, endpoint=endpoint) as client:
            result = client.call(cmd, **args)
    except DaemonUnreachable:
        unreachable(paths.ipc_path(endpoint) or endpoint, timeout)
    except WaportError as err:
        fail(settings, err)
    except (ValueError, AttributeError) as exc:  # a reply that is not a JSON object: a daemon bug
        fail(settings, WaportError(INTERNAL, f"malformed reply from waportd: {exc}"))
    if not isinstance(result, dict):
        fail(settings, WaportError(INTERNAL, f"malformed result from waportd: {result!r}"))
    return result


def read_chunks(settings: Settings, cmd: str, write: Callable[[bytes], Any], **args: Any) -> tuple[str, int, dict]:
    """A file on the daemon's side, chunk by chunk (base64 `data` from `offset` until `eof`), handed to
    `write`: its SHA-256, its size, and the last reply."""
    digest, offset = hashlib.sha256(), 0
    while True:
        part = call(settings, cmd, offset=offset, **args)
        data = base64.b64decode(part.get("data") or "")
        write(data)
        digest.update(data)
        offset += len(data)
        if part.get("eof") or not data:
            return digest.hexdigest(), offset, part


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def answer(settings: Any, result: dict[str, Any], text: Callable[[dict[str, Any]], str | None]) -> None:
    """The reply's result as JSON with --json, else as `text` says (None: nothing more to print)."""
    if settings.json:
        print_json(result)
        return
    line = text(result)
    if line is not None:
        click.echo(line)
