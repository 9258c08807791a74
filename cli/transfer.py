"""The file side of `waportctl export`, `backup` and `import`: waportctl reads and writes the bundle file,
encrypting or decrypting it with the passphrase (which never leaves this process), and streams the
plain bundle to or from waportd in chunks (the format: ipc/bundle.py)."""

from __future__ import annotations

import base64
import contextlib
import os
from typing import Any, BinaryIO

import click

from cli.client import Settings, call, fail, read_chunks
from ipc import bundle
from ipc.control import ControlClient
from ipc.errors import BAD_REQUEST, WaportError
from ipc.files import create_private
from ipc.mediastore import WIRE_CHUNK


def read_passphrase(passphrase_file: str | None, confirm: bool) -> str:
    """From a file (its first line) or a hidden prompt — never from argv, where `ps` shows it."""
    if passphrase_file is not None:
        with open(passphrase_file, encoding="utf-8") as fh:
            text = fh.readline().rstrip("\r\n")
        if not text:
            raise click.BadParameter(f"{passphrase_file} holds no passphrase", param_hint="--passphrase-file")
        return text
    return click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)


def open_partial(output: str) -> tuple[str, int]:
    """The file the bundle is written to before it is renamed to OUTPUT: 0600, made fresh."""
    if os.path.exists(output):
        raise click.BadParameter(f"{output} exists; name a new file", param_hint="-o")
    partial = output + ".partial"
    try:
        fd = create_private(partial)
    except FileExistsError:
        raise click.BadParameter(f"{partial} exists (an interrupted run?); remove it first", param_hint="-o") from None
    except OSError as exc:
        raise click.BadParameter(f"cannot write {partial}: {exc.strerror}", param_hint="-o") from None
    return partial, fd


def fetch(settings: Settings, cmd: str, company: str, output: str, passphrase: str | None) -> dict[str, Any]:
    """Run `export` or `backup`, write the bundle to OUTPUT (0600; through a `.partial` file, renamed once
    complete and checked), then tell waportd it is written (`transfer_done`)."""
    partial, fd = open_partial(output)
    transfer = None
    try:
        with os.fdopen(fd, "wb") as fh:
            started = call(settings, cmd, company=company)
            transfer = started["transfer"]
            sink: Any = bundle.EncryptingWriter(fh, passphrase) if passphrase else fh
            digest, offset, _ = read_chunks(settings, "transfer_read", sink.write, transfer=transfer)
            if passphrase:
                sink.close()
            if offset != started["size"] or digest != started["sha256"]:
                fail(settings, WaportError(BAD_REQUEST, "the bundle received does not match its size or SHA-256"))
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(partial, output)
        sync_dir(output)
        done = call(settings, "transfer_done", transfer=transfer, sha256=started["sha256"])
        return {**started, **done, "file": output, "encrypted": bool(passphrase)}
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        if transfer is not None and not os.path.exists(output):
            quietly(settings, "transfer_abort", transfer=transfer)
            if cmd == "export":
                click.echo(f"export of {company} interrupted: it stays stopped on this host "
                           f"(`waportctl start {company}` brings it back)", err=True)
        raise


def quietly(settings: Settings, cmd: str, **args: Any) -> None:
    """Clean up after a failure already reported: no second error on the terminal."""
    with contextlib.suppress(Exception), ControlClient(settings.run_dir, timeout=5) as client:
        client.call(cmd, **args)


def sync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_stream(settings: Settings, fh: BinaryIO, path: str, passphrase_file: str | None) -> BinaryIO | Any:
    """The plain bundle's bytes of FILE: itself, or decrypted (the passphrase checked before anything is sent)."""
    kind = bundle.sniff(fh.read(4))
    fh.seek(0)
    if kind is None:
        fail(settings, WaportError(BAD_REQUEST, f"{path} is not a waport bundle"))
    if kind == "plain":
        return fh
    try:
        return bundle.DecryptingReader(fh, read_passphrase(passphrase_file, confirm=False))
    except bundle.BundleError as exc:
        fail(settings, WaportError(BAD_REQUEST, f"{path}: {exc}; nothing changed"))


def send(settings: Settings, path: str, passphrase_file: str | None, replace: bool,
         from_backup: bool) -> dict[str, Any]:
    """Stream FILE's plain bundle to waportd and ask it to install it (it verifies everything first)."""
    with open(path, "rb") as fh:
        stream = plain_stream(settings, fh, path, passphrase_file)
        transfer = call(settings, "import_begin")["transfer"]
        committed = False
        try:
            offset = 0
            while True:
                try:
                    data = stream.read(WIRE_CHUNK)
                except bundle.BundleError as exc:
                    fail(settings, WaportError(BAD_REQUEST, f"{path}: {exc}; nothing changed"))
                if not data:
                    break
                call(settings, "import_write", transfer=transfer, offset=offset,
                     data=base64.b64encode(data).decode())
                offset += len(data)
            committed = True  # the daemon ends the transfer whatever the commit answers
            return call(settings, "import_commit", transfer=transfer, replace=replace, from_backup=from_backup)
        finally:
            if not committed:
                quietly(settings, "import_abort", transfer=transfer)
