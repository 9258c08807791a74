"""The supervisor's side of export / backup / import (waportd/transfer.py), in-process on fakes: when it
answers, what it refuses, what it leaves behind. The real thing between two daemons is
tests/test_export_import.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time

from fakes import rig

from ipc import states as S
from ipc.journal import Journal
from waportd.transfer import TRANSFER_IDLE


def command(r, cmd: str, **args) -> list[dict]:
    replies: list[dict] = []
    r.arbiter.controller.handle(json.dumps({"id": "1", "cmd": cmd, "args": args}).encode(),
                                lambda raw: replies.append(json.loads(raw)))
    return replies


def settle(r, replies: list[dict], deadline: float = 10.0) -> dict:
    """Run the loop's `take_done` until the command has its answer (its work runs on a thread)."""
    end = time.monotonic() + deadline
    while not replies:
        assert time.monotonic() < end, "no answer"
        r.arbiter.transfers.take_done()
        time.sleep(0.002)
    (reply,) = replies
    return reply


def ok(r, cmd: str, **args) -> dict:
    reply = settle(r, command(r, cmd, **args))
    assert reply["ok"], reply
    return reply["result"]


def error(r, cmd: str, **args) -> dict:
    reply = settle(r, command(r, cmd, **args))
    assert not reply["ok"], reply
    return reply["error"]


def running_with_creds(r, name: str = "acme") -> None:
    ok(r, "start", company=name)
    r.ready(name)
    r.report(name, S.CONNECTED, phone="15550000001")
    session = r.company(name).session_dir
    with open(os.path.join(session, "sim-creds.json"), "w") as fh:
        fh.write('{"token": "tok-' + name + '"}')
    journal = Journal.in_session(session)
    journal.enqueue(name, "15550001111", "queued before the move", None)
    journal.close()


def read_all(r, result: dict) -> bytes:
    data, offset = b"", 0
    while True:
        part = ok(r, "transfer_read", transfer=result["transfer"], offset=offset)
        chunk = base64.b64decode(part["data"])
        data += chunk
        offset += len(chunk)
        if part["eof"]:
            return data


def test_export_answers_once_stopped_and_retires_the_company_only_when_confirmed(tmp_path):
    r = rig(tmp_path)
    running_with_creds(r)
    replies = command(r, "export", company="acme")
    assert replies == []  # the worker is still stopping
    assert not r.arbiter.roster.is_wanted("acme")
    assert error(r, "start", company="acme")["message"].startswith("acme is being exported")
    r.exit("acme", 0)
    result = settle(r, replies)["result"]
    assert result["kind"] == "export" and result["queued"] == 1
    data = read_all(r, result)
    assert hashlib.sha256(data).hexdigest() == result["sha256"] and len(data) == result["size"]
    # A confirmation naming other bytes changes nothing.
    assert "does not match" in error(r, "transfer_done", transfer=result["transfer"], sha256="0" * 64)["message"]
    assert r.arbiter.roster.get("acme") is not None
    done = ok(r, "transfer_done", transfer=result["transfer"], sha256=result["sha256"])
    assert r.arbiter.roster.get("acme") is None
    assert os.path.isfile(os.path.join(done["retired_to"], "sim-creds.json"))
    assert not os.path.exists(os.path.join(r.services.cfg.state_dir, "sessions", "acme"))
    assert os.listdir(r.arbiter.transfers.root) == []


def test_an_export_nobody_collects_is_dropped_and_the_company_may_start_again(tmp_path):
    r = rig(tmp_path)
    running_with_creds(r)
    replies = command(r, "export", company="acme")
    r.exit("acme", 0)
    settle(r, replies)
    assert os.listdir(r.arbiter.transfers.root)
    r.advance(TRANSFER_IDLE + 31)
    assert os.listdir(r.arbiter.transfers.root) == []
    assert r.company().state == S.STOPPED
    assert ok(r, "start", company="acme")["state"] == S.STARTING


def test_a_bundle_goes_from_one_host_to_another_and_starts_there(tmp_path):
    a, b = rig(tmp_path / "a"), rig(tmp_path / "b")
    running_with_creds(a)
    replies = command(a, "export", company="acme")
    a.exit("acme", 0)
    data = read_all(a, settle(a, replies)["result"])
    begun = ok(b, "import_begin")
    for offset in range(0, len(data), 1000):
        ok(b, "import_write", transfer=begun["transfer"], offset=offset,
           data=base64.b64encode(data[offset:offset + 1000]).decode())
    result = ok(b, "import_commit", transfer=begun["transfer"])
    assert (result["company"], result["kind"], result["started"], result["queued"]) == ("acme", "export", True, 1)
    assert b.company("acme").worker is not None  # started: a worker was spawned
    session = b.company("acme").session_dir
    with open(os.path.join(session, "sim-creds.json")) as fh:
        assert json.load(fh) == {"token": "tok-acme"}
    assert Journal.in_session(session).pending() == 1
    assert os.listdir(b.arbiter.transfers.root) == []


def test_import_refuses_bad_bytes_and_chunks_out_of_order_changing_nothing(tmp_path):
    r = rig(tmp_path)
    begun = ok(r, "import_begin")
    chunk = base64.b64encode(b"WAPB garbage").decode()
    assert "offset must be 0" in error(r, "import_write", transfer=begun["transfer"], offset=5, data=chunk)["message"]
    ok(r, "import_write", transfer=begun["transfer"], offset=0, data=chunk)
    err = error(r, "import_commit", transfer=begun["transfer"])
    assert err["code"] == "bad_request" and "nothing changed" in err["message"]
    assert len(r.arbiter.roster) == 0
    assert os.listdir(r.arbiter.transfers.root) == []
    assert "no import" in error(r, "import_commit", transfer=begun["transfer"])["message"]


def test_a_backup_needs_the_flag_and_a_running_company_is_never_replaced(tmp_path):
    a, b = rig(tmp_path / "a"), rig(tmp_path / "b")
    running_with_creds(a)
    result = ok(a, "backup", company="acme")
    assert a.company("acme").worker is not None  # a backup leaves it running
    data = read_all(a, result)
    ok(a, "transfer_done", transfer=result["transfer"], sha256=result["sha256"])
    assert a.arbiter.roster.get("acme") is not None

    def commit(**flags) -> dict:
        begun = ok(b, "import_begin")
        ok(b, "import_write", transfer=begun["transfer"], offset=0, data=base64.b64encode(data).decode())
        return settle(b, command(b, "import_commit", transfer=begun["transfer"], **flags))

    assert "--original-stopped" in commit()["error"]["message"]
    ok(b, "start", company="acme")
    assert "runs on this host" in commit(from_backup=True, replace=True)["error"]["message"]
    assert b.company("acme").worker is not None


def test_a_restarted_daemon_removes_what_transfers_left_behind(tmp_path):
    r = rig(tmp_path)
    ok(r, "import_begin")
    assert os.listdir(r.arbiter.transfers.root)
    r.arbiter.transfers.open()
    assert os.listdir(r.arbiter.transfers.root) == []


def test_waportctl_asks_for_the_passphrase_hidden_and_twice_or_reads_a_file(tmp_path):
    import click
    from click.testing import CliRunner

    from cli.transfer import read_passphrase

    @click.command()
    @click.option("--file")
    @click.option("--confirm", is_flag=True)
    def show(file, confirm):
        click.echo(f"got {read_passphrase(file, confirm)!r}")

    runner = CliRunner()
    result = runner.invoke(show, ["--confirm"], input="one\ntwo\nsame\nsame\n")
    assert result.exit_code == 0 and "got 'same'" in result.output
    assert "one" not in result.output.replace("got 'same'", "")  # never echoed
    path = tmp_path / "pass"
    path.write_text("from a file\nsecond line ignored\n")
    assert "got 'from a file'" in runner.invoke(show, ["--file", str(path)]).output
    path.write_text("\n")
    assert runner.invoke(show, ["--file", str(path)]).exit_code == 2
