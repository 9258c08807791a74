"""Every process of ours logs one format, and under systemd its records reach journald with fields.

A real waportd with its own simulated network, the HTTP API, webhook delivery and a worker forked by
the fork server; what each of them wrote to the shared stderr must read back with `ipc.logfmt.parse_log`.
Then the same daemon under a `JOURNAL_STREAM` that names its stderr: first against a datagram socket
the test binds (the native protocol's rules checked here), then against a real systemd-journald run in a
journal namespace of its own, read back with journalctl.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
import pytest
from conftest import ROOT, Daemon, WebhookReceiver, free_port, stop_process, wait_for

from ipc import journald
from ipc.control import ControlClient
from ipc.logfmt import parse_line, parse_log
from ipc.webhooks import new_secret

pytestmark = pytest.mark.e2e

PHONE = "15550100001"


def full_log(d: Daemon) -> str:
    with open(d.log_path, errors="replace") as fh:
        return fh.read()


def child_pid(d: Daemon, module: str) -> int:
    assert d.proc is not None
    return wait_for(lambda: next((c.pid for c in psutil.Process(d.proc.pid).children()
                                  if f"-m {module}" in " ".join(c.cmdline())), None), what=f"the {module} child")


def test_every_process_writes_the_one_format(daemon_factory: Callable[..., Daemon], receiver: WebhookReceiver):
    secret = new_secret()
    receiver.secrets("all", secret)
    d = daemon_factory(companies=["acme"], http_listen=f"127.0.0.1:{free_port()}", worker_spawn="zygote",
                       webhook_url=receiver.url("all"), webhook_secret=secret).start()
    worker = d.wait_state("acme", "connected")["pid"]
    net = ControlClient("", timeout=5, endpoint=f"ipc://{d.run_dir}/simnet.sock")  # the daemon's own network
    http = httpx.Client(base_url=f"http://{d.config['http_listen']}", timeout=15)
    try:
        def healthy() -> bool:
            try:
                return http.get("/v1/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=20, what="the HTTP API")
        auth = {"Authorization": f"Bearer {d.ctl('token_create')['token']}"}
        r = http.post("/v1/sessions/acme/messages", json={"to": PHONE, "text": "secret appointment"}, headers=auth)
        assert r.status_code == 202, r.text
        assert http.get("/v1/sessions/acme", headers={"Authorization": "Bearer wp_wrong"}).status_code == 401
        net.call("inbound", company="acme", **{"from": PHONE}, text="hello there", id="IN-1")
        wait_for(lambda: {x["type"] for x in receiver.delivered("all")} >= {"message", "sent"},
                 what="webhooks delivered")
        wait_for(lambda: net.call("connections")["connections"].get("acme"), what="acme's connection")
        net.call("drop", company="acme")  # a worker WARNING, forwarded to the supervisor
        wait_for(lambda: "connection lost" in full_log(d), what="the worker's warning")
        os.kill(worker, signal.SIGKILL)  # the supervisor's warning, then a fresh worker from the fork server
        d.wait_state("acme", "connected", timeout=20)
    finally:
        net.close()
        http.close()
    assert d.terminate() == 0  # every process says goodbye too
    text = full_log(d)
    lines = list(parse_log(text))  # raises on the first line that is not in the format
    programs = {x.program for x in lines}
    assert {"waportd", "worker", "api", "webhooks", "simnet"} <= programs, programs
    assert any(x.logger == "uvicorn.error" and "Uvicorn running on" in x.message for x in lines)
    assert any(x.program == "worker" and x.company == "acme" and x.pid == worker and x.level == "WARNING"
               and x.message.startswith("connection lost") for x in lines), text[-3000:]
    assert any(x.program == "simnet" and "paired as" in x.message for x in lines)
    assert all(x.time for x in lines)  # not under systemd: every line has its time
    assert PHONE not in text and "secret appointment" not in text and "hello there" not in text


def test_the_fork_server_and_a_crashing_worker_log_in_the_format(short_tmp: str):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    log_path = os.path.join(short_tmp, "zygote.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "workers.zygote", "--fd", str(theirs.fileno()),
                                 "--supervisor", str(os.getpid())], pass_fds=(theirs.fileno(),), cwd=ROOT,
                                stdout=log, stderr=log)
    theirs.close()
    try:
        ours.settimeout(10)
        ours.send(b"{not json")  # a bad request: a warning, and it serves on
        blocker = os.path.join(short_tmp, "a-file")
        open(blocker, "w").close()
        # A worker that cannot start (its session directory cannot be made): its error line, with its company;
        # one that crashes before it runs (a NUL in its arguments): the fork server's line with the traceback.
        for session_dir in (os.path.join(blocker, "acme"), "bad\0dir"):
            ours.send(json.dumps({"argv": ["--company", "acme", "--endpoint", "none",
                                           "--session-dir", session_dir]}).encode())
            assert "pid" in json.loads(ours.recv(4096))
    finally:
        ours.close()
        proc.wait(10)

    def both() -> list[Any]:
        with open(log_path) as fh:
            text = fh.read()
        # Whole lines only, up to the crash's last one (a record is written a line at a time).
        return list(parse_log(text)) if text.endswith("\n") and "cannot start" in text and "null" in text else []

    lines = wait_for(both, timeout=20, what="the fork server's and the worker's lines")  # after its 5 s wait
    assert any(x.program == "zygote" and x.level == "WARNING" and x.message.startswith("bad request") for x in lines)
    assert any(x.program == "worker" and x.company == "acme" and x.level == "ERROR"
               and x.message.startswith("cannot start") for x in lines), lines
    (crash,) = [x for x in lines if x.message.startswith("the worker crashed")]
    assert crash.program == "zygote" and "ValueError: embedded null" in crash.message


def test_waportd_refusing_to_start_says_why_in_the_format(short_tmp: str):
    config = os.path.join(short_tmp, "bad.toml")
    with open(config, "w") as fh:
        fh.write('backend = "carrier-pigeon"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAPORT_")}
    run = subprocess.run([sys.executable, "-m", "waportd", "--config", config], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and run.stdout == ""
    (line,) = parse_log(run.stderr)
    assert (line.program, line.level, line.logger) == ("waportd", "ERROR", "waport.main")
    assert line.message.startswith("configuration error: ") and "carrier-pigeon" in line.message


# ---------------------------------------------------------------- under systemd


class JournalPeer:
    """A datagram socket standing where journald's native socket would, keeping every entry it reads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.entries: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self.read, daemon=True)  # journald reads at once: so do we
        self.thread.start()

    def read(self) -> None:
        while self.running:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
            except TimeoutError:
                continue
            except OSError:
                return
            for level, kind, raw in ancdata:  # a large entry comes as a sealed memfd
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fd = struct.unpack("i", raw[:4])[0]
                    data = os.pread(fd, os.fstat(fd).st_size, 0)
                    os.close(fd)
            entry = {k: v.decode() for k, v in journald.decode(data)}
            with self.lock:
                self.entries.append(entry)

    def find(self, **fields: str) -> list[dict[str, str]]:
        with self.lock:
            return [e for e in self.entries if all(e.get(k) == v for k, v in fields.items())]

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


class JournaledDaemon(Daemon):
    """A waportd started as systemd starts it: JOURNAL_STREAM names its stderr (the log file here)."""

    def __init__(self, base: str, journal_socket: str, **config: Any) -> None:
        super().__init__(base, **config)
        self.journal_socket = journal_socket

    def start(self, wait: bool = True) -> Daemon:
        self.log = open(self.log_path, "ab")
        st = os.fstat(self.log.fileno())
        env = {k: v for k, v in os.environ.items() if not k.startswith("WAPORT_")}
        env.update(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", **{journald.SOCKET_ENV: self.journal_socket})
        self.proc = subprocess.Popen([sys.executable, "-m", "waportd", "--config", self.config_path],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        if wait:
            wait_for(self.ready, timeout=15, what="waportd to answer ping")
        return self


@pytest.fixture
def journaled(short_tmp: str) -> Iterator[Callable[..., JournaledDaemon]]:
    made: list[JournaledDaemon] = []

    def make(journal_socket: str, **config: Any) -> JournaledDaemon:
        d = JournaledDaemon(short_tmp, journal_socket, **config)
        made.append(d)
        return d.start()  # type: ignore[return-value]

    yield make
    for d in made:
        d.cleanup()


def test_under_systemd_records_go_to_the_journal_socket_with_fields(journaled, simnet, short_tmp):
    peer = JournalPeer(os.path.join(short_tmp, "journal.sock"))
    try:
        d = journaled(peer.path, sim_endpoint=simnet.endpoint, companies=["acme"], worker_spawn="exec")
        worker = d.wait_state("acme", "connected")["pid"]
        wait_for(lambda: simnet.connections().get("acme"), what="acme's connection at the network")
        simnet.call("drop", company="acme")
        (lost,) = wait_for(lambda: peer.find(SYSLOG_IDENTIFIER="waport-worker", PRIORITY="4"),
                           what="the worker's warning in the journal")
        assert (lost["WAPORT_COMPANY"], lost["SYSLOG_PID"], lost["SYSLOG_FACILITY"]) == ("acme", str(worker), "3")
        assert lost["MESSAGE"].startswith(f"worker[acme/{worker}] WARNING waport.sim: connection lost")
        assert lost["CODE_FILE"].endswith("workers/sim_backend.py") and int(lost["CODE_LINE"]) > 0
        assert lost["CODE_FUNC"] and lost["LOGGER"] == "waport.sim"
        change = wait_for(lambda: peer.find(SYSLOG_IDENTIFIER="waportd", WAPORT_EVENT="state",
                                            WAPORT_COMPANY="acme"), what="the supervisor's state changes")
        assert change[0]["PRIORITY"] == "6" and change[0]["SYSLOG_PID"] == str(d.proc.pid)
        assert change[0]["CODE_FILE"].endswith("waportd/company.py")
        ready = peer.find(SYSLOG_IDENTIFIER="waportd", LOGGER="waport.arbiter")
        assert any(e["MESSAGE"].startswith(f"waportd[{d.proc.pid}] INFO waport.arbiter: waportd ready") for e in ready)
        assert all(parse_line(e["MESSAGE"].split("\n")[0]) for e in peer.find())
        assert "connection lost" not in d.logs() and "waportd ready" not in d.logs()  # never written twice

        peer.close()
        os.unlink(peer.path)  # journald gone: the lines go to stderr (the journal's stream), <N> first
        d.wait_state("acme", "connected")
        wait_for(lambda: simnet.connections().get("acme"), what="acme connected again")
        simnet.call("drop", company="acme")
        text = wait_for(lambda: (t := d.logs()).count("connection lost") and t, what="the warning on stderr")
        lines = list(parse_log(text))
        assert any(x.priority == 4 and x.company == "acme" and x.message.startswith("connection lost")
                   for x in lines), text
        assert any(x.logger == "waport.log" and "journald's socket" in x.message for x in lines)
        assert all(x.time is None and x.priority is not None for x in lines)  # the journal adds the time
    finally:
        peer.close()


JOURNALD = shutil.which("systemd-journald", path="/lib/systemd:/usr/lib/systemd")
JOURNALCTL = shutil.which("journalctl")


@pytest.mark.skipif(not (JOURNALD and JOURNALCTL and os.geteuid() == 0),
                    reason="needs systemd-journald, journalctl and root (a journal namespace of the test's own)")
def test_a_real_journald_keeps_the_fields(journaled, simnet):
    namespace = f"waporttest{uuid.uuid4().hex[:8]}"
    run = f"/run/systemd/journal.{namespace}"
    with open("/etc/machine-id") as fh:
        store = f"/var/log/journal/{fh.read().strip()}.{namespace}"
    jd = subprocess.Popen([JOURNALD, namespace], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def journal(*match: str) -> list[dict[str, Any]]:
        out = subprocess.run([JOURNALCTL, f"--namespace={namespace}", "-o", "json", "--no-pager", *match],
                             capture_output=True, text=True, timeout=10)
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    try:
        wait_for(lambda: os.path.exists(f"{run}/socket"), what="journald's socket")
        d = journaled(f"{run}/socket", sim_endpoint=simnet.endpoint, companies=["acme"])
        worker = d.wait_state("acme", "connected")["pid"]
        wait_for(lambda: simnet.connections().get("acme"), what="acme's connection at the network")
        simnet.call("drop", company="acme")
        (lost,) = wait_for(lambda: journal("WAPORT_COMPANY=acme", "SYSLOG_IDENTIFIER=waport-worker", "PRIORITY=4"),
                           what="the worker's warning in journalctl")
        assert lost["MESSAGE"].startswith(f"worker[acme/{worker}] WARNING waport.sim: connection lost")
        assert (lost["SYSLOG_PID"], lost["_TRANSPORT"], lost["PRIORITY"]) == (str(worker), "journal", "4")
        assert lost["CODE_FILE"].endswith("workers/sim_backend.py") and lost["CODE_FUNC"]
        assert lost["_PID"] in (str(worker), str(d.proc.pid))  # the sender: the worker, or waportd re-emitting
        # What an operator types: `journalctl -u waportd WAPORT_COMPANY=acme -o cat` reads like our stderr.
        out = subprocess.run([JOURNALCTL, f"--namespace={namespace}", "WAPORT_COMPANY=acme", "-o", "cat",
                              "--no-pager"], capture_output=True, text=True, timeout=10).stdout
        acme = list(parse_log(out))
        assert {x.program for x in acme} == {"waportd", "worker"} and all(x.company in (None, "acme") for x in acme)
        assert any(x.program == "waportd" and "-> connected" in x.message for x in acme)
        assert not journal("SYSLOG_IDENTIFIER=waportd", "WAPORT_COMPANY=bistro")
        assert "connection lost" not in d.logs()
        d.terminate()
    finally:
        stop_process(jd, 10)
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
