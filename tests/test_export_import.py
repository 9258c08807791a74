"""Moving a company between two hosts with `waportctl export` / `import`, end to end.

Two real daemons ("host A", "host B"), each with its own state and run directories, share one
standalone simulated network, which sees any double session (`replaced`) and every pairing.
waportctl runs as the operator runs it. Bad input — a truncated file, a changed byte, a wrong
passphrase, a company that runs on B — exits 1 with a clear message and changes nothing on B.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, SimNetProcess, processes_using, wait_for

from ipc.errors import WaportError

pytestmark = pytest.mark.e2e

WAPORTCTL = str(Path(sys.executable).with_name("waportctl"))
TO = "+15550001111"


class Hosts:
    def __init__(self, base: str) -> None:
        self.base = base
        self.net = SimNetProcess(base)
        self.a = Daemon(os.path.join(base, "a"), sim_endpoint=self.net.endpoint)
        self.b = Daemon(os.path.join(base, "b"), sim_endpoint=self.net.endpoint)

    def ctl(self, host: Daemon, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([WAPORTCTL, "--run-dir", host.run_dir, *argv], capture_output=True, text=True,
                              input=stdin, timeout=90)

    def sent(self, company: str, text: str) -> list[dict[str, Any]]:
        return [m for m in self.net.call("sent", company=company)["messages"] if m.get("text") == text]

    def close(self) -> None:
        for d in (self.a, self.b):
            d.cleanup()
        self.net.stop()


@pytest.fixture
def hosts(short_tmp: str) -> Iterator[Hosts]:
    for name in ("a", "b"):
        os.makedirs(os.path.join(short_tmp, name))
    h = Hosts(short_tmp)
    h.a.start()
    h.b.start()
    yield h
    h.close()
    wait_for(lambda: not [p for p in processes_using(short_tmp) if "workers.simnet" not in " ".join(
        p.info["cmdline"])], timeout=10, what="workers to follow their daemons")


def connected_on_a(h: Hosts, company: str = "acme") -> None:
    h.a.ctl("start", company=company)
    h.a.wait_state(company, "connected")


def unknown(host: Daemon, company: str) -> bool:
    try:
        host.status(company)
    except WaportError as exc:
        return exc.code == "unknown_company"
    return False


def snapshot(host: Daemon) -> dict[str, Any]:
    """What an operator could see changed on a host: its sessions and the files of its state directory."""
    files = sorted(os.path.relpath(os.path.join(d, f), host.state_dir) for d, _, fs in os.walk(host.state_dir)
                   for f in fs if not f.endswith(("-wal", "-shm")))
    records = {r["company"]: (r["state"], r["pid"]) for r in host.ctl("list")["sessions"]}
    return {"sessions": records, "files": files}


def test_export_moves_a_company_with_its_queued_send_and_no_new_pairing(hosts: Hosts, short_tmp: str) -> None:
    h = hosts
    connected_on_a(h)
    pairings = h.net.stats()["pairings"]
    # The network goes away: acme's send waits in its journal.
    h.net.call("outage", seconds=60)  # until host A has let go of acme
    h.a.wait_state("acme", "disconnected", "backoff")
    queued = h.a.ctl("send", company="acme", to=TO, text="moved along")
    assert queued["status"] == "queued"

    bundle = os.path.join(short_tmp, "acme.wapb")
    out = h.ctl(h.a, "export", "acme", "-o", bundle)
    assert out.returncode == 0, out.stderr
    assert "exported" in out.stdout and "import" in out.stdout
    assert stat.S_IMODE(os.stat(bundle).st_mode) == 0o600
    assert not os.path.exists(bundle + ".partial")
    # Host A forgot it: no worker, no session directory in use, nothing queued there.
    assert unknown(h.a, "acme")
    assert not h.a.worker_pids()
    assert not os.path.exists(os.path.join(h.a.state_dir, "sessions", "acme"))
    assert os.listdir(os.path.join(h.a.state_dir, "retired"))
    assert not os.listdir(os.path.join(h.a.state_dir, "transfers"))
    h.net.call("outage", seconds=0)

    out = h.ctl(h.b, "import", bundle)
    assert out.returncode == 0, out.stderr
    assert "imported" in out.stdout and "started" in out.stdout
    record = h.b.wait_state("acme", "connected", timeout=30)
    assert record["phone"]
    wait_for(lambda: h.sent("acme", "moved along"), timeout=15, what="the queued send at the network")
    # the network has it a moment before the worker journals the outcome
    wait_for(lambda: h.b.ctl("messages", company="acme", message_id=queued["message_id"])["message"]["status"]
             == "sent", what="the queued send journaled as sent on host B")
    stats = h.net.stats()
    assert stats["pairings"] == pairings, "host B paired again instead of using the exported session"
    assert stats["replaced"] == 0
    assert h.net.connections().get("acme") == 1
    # A little later: still one copy at the network, and A never came back.
    h.b.ctl("send", company="acme", to=TO, text="from b")
    wait_for(lambda: h.sent("acme", "from b"), timeout=10, what="a send from host B")
    assert len(h.sent("acme", "moved along")) == 1
    assert h.net.stats()["replaced"] == 0
    assert unknown(h.a, "acme") and not h.a.worker_pids()
    assert not os.listdir(os.path.join(h.b.state_dir, "transfers"))

    # A restarted host A does not bring acme back either.
    h.a.terminate()
    h.a.start()
    assert unknown(h.a, "acme")


def test_encrypted_export_and_the_bad_inputs_change_nothing_on_b(hosts: Hosts, short_tmp: str) -> None:
    h = hosts
    connected_on_a(h)
    h.b.ctl("start", company="bistro")
    h.b.wait_state("bistro", "connected")
    secret = os.path.join(short_tmp, "pass")
    with open(secret, "w") as fh:
        fh.write("correct horse battery staple\n")
    wrong = os.path.join(short_tmp, "wrong")
    with open(wrong, "w") as fh:
        fh.write("not it\n")
    bundle = os.path.join(short_tmp, "acme.enc")
    out = h.ctl(h.a, "export", "acme", "-o", bundle, "--encrypt", "--passphrase-file", secret)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(bundle).st_mode) == 0o600
    data = Path(bundle).read_bytes()
    assert data[:4] == b"WAPE" and b"sim-creds" not in data

    before = snapshot(h.b)
    truncated = os.path.join(short_tmp, "truncated")
    Path(truncated).write_bytes(data[: len(data) * 2 // 3])
    flipped = os.path.join(short_tmp, "flipped")
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x04
    Path(flipped).write_bytes(bytes(changed))
    for path, pass_file, says in [(truncated, secret, "truncated"), (flipped, secret, "damaged"),
                                  (bundle, wrong, "wrong passphrase")]:
        out = h.ctl(h.b, "import", path, "--passphrase-file", pass_file)
        assert out.returncode == 1, (path, out.stdout, out.stderr)
        assert says in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert snapshot(h.b) == before
    assert unknown(h.b, "acme")

    # A plain bundle cut short is refused by waportd's own check.
    plain = os.path.join(short_tmp, "bistro.wapb")
    out = h.ctl(h.b, "backup", "bistro", "-o", plain)
    assert out.returncode == 0, out.stderr
    assert "warning" in out.stderr and "Do not import it while this original runs" in out.stderr
    Path(truncated).write_bytes(Path(plain).read_bytes()[:-40])
    out = h.ctl(h.b, "import", truncated, "--original-stopped", "--replace")
    assert out.returncode == 1 and "truncated" in out.stderr and "nothing changed" in out.stderr, out.stderr
    # bistro runs on B: its own backup is refused, with or without the flags.
    out = h.ctl(h.b, "import", plain)
    assert out.returncode == 1 and "backup" in out.stderr and "--original-stopped" in out.stderr, out.stderr
    out = h.ctl(h.b, "import", plain, "--original-stopped", "--replace")
    assert out.returncode == 1 and "runs on this host" in out.stderr, out.stderr
    assert snapshot(h.b)["sessions"] == before["sessions"]
    assert h.b.status("bistro")["state"] == "connected"

    # The good file with the right passphrase goes in.
    out = h.ctl(h.b, "import", bundle, "--passphrase-file", secret)
    assert out.returncode == 0, out.stderr
    h.b.wait_state("acme", "connected", timeout=30)
    assert h.net.stats()["replaced"] == 0
    # Imported twice: acme now runs on B, so the second time is refused.
    out = h.ctl(h.b, "import", bundle, "--passphrase-file", secret)
    assert out.returncode == 1 and "runs on this host" in out.stderr, out.stderr
    assert not os.listdir(os.path.join(h.b.state_dir, "transfers"))


def test_an_interrupted_export_leaves_the_company_stopped_here_and_startable(hosts: Hosts, short_tmp: str) -> None:
    h = hosts
    connected_on_a(h)
    bundle = os.path.join(short_tmp, "exists.wapb")
    Path(bundle).write_bytes(b"keep me")
    out = h.ctl(h.a, "export", "acme", "-o", bundle)
    assert out.returncode == 2 and "exists" in out.stderr  # refused before anything stopped
    assert h.a.status("acme")["state"] == "connected"
    assert Path(bundle).read_bytes() == b"keep me"
    # The daemon side alone: an export nobody confirms; the company stays stopped, then starts again.
    started = h.a.ctl("export", company="acme")
    assert h.a.status("acme")["state"] == "stopped"
    with pytest.raises(WaportError, match="being exported"):
        h.a.ctl("start", company="acme")
    h.a.ctl("transfer_abort", transfer=started["transfer"])
    assert not os.listdir(os.path.join(h.a.state_dir, "transfers"))
    h.a.ctl("start", company="acme")
    h.a.wait_state("acme", "connected")
    assert h.net.stats()["replaced"] == 0


def test_import_of_a_company_known_and_stopped_needs_replace(hosts: Hosts, short_tmp: str) -> None:
    h = hosts
    connected_on_a(h)
    # Its own media and webhook endpoint travel with it.
    picture = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
    media = h.a.ctl("media_put", data=base64.b64encode(picture).decode(), last=True, mimetype="image/png",
                    company="acme")
    hook = h.a.ctl("webhook_set", company="acme", url="http://127.0.0.1:9/hook")
    bundle = os.path.join(short_tmp, "acme.wapb")
    assert h.ctl(h.a, "export", "acme", "-o", bundle).returncode == 0
    assert h.ctl(h.b, "import", bundle).returncode == 0
    h.b.wait_state("acme", "connected", timeout=30)
    got = h.b.ctl("media_get", media_id=media["media_id"], company="acme")
    assert base64.b64decode(got["data"]) == picture and got["mimetype"] == "image/png"
    assert h.b.ctl("webhook_show", company="acme")["url"] == hook["url"]
    with pytest.raises(WaportError, match="no webhook endpoint"):
        h.a.ctl("webhook_show", company="acme")
    h.b.ctl("stop", company="acme")
    out = h.ctl(h.b, "import", bundle)
    assert out.returncode == 1 and "known on this host (stopped)" in out.stderr and "--replace" in out.stderr, \
        out.stderr
    assert h.b.status("acme")["state"] == "stopped"
    assert not os.path.exists(os.path.join(h.b.state_dir, "retired"))
    out = h.ctl(h.b, "import", bundle, "--replace")
    assert out.returncode == 0, out.stderr
    h.b.wait_state("acme", "connected", timeout=30)
    retired = os.listdir(os.path.join(h.b.state_dir, "retired"))
    assert [name for name in retired if name.startswith("acme.replaced.")]
    assert h.net.stats()["replaced"] == 0
