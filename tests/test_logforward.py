"""Worker logs reach the supervisor's handlers as LOG frames, tagged with the company."""

from __future__ import annotations

import logging
import os
import re

import pytest
from conftest import CollectRecords, wait_for

from ipc import protocol
from workers import logforward


def make(msg: str, level: int = logging.INFO, name: str = "waport.sim", func: str = "f") -> logging.LogRecord:
    r = logging.LogRecord(name, level, __file__, 1, msg, None, None, func=func)
    return r


def test_records_become_log_frames_once_attached():
    fallback = CollectRecords()
    h = logforward.ForwardHandler(fallback)
    h.handle(make("before the loop"))
    assert [r.getMessage() for r in fallback.records] == ["before the loop"]
    frames: list[list[bytes]] = []
    h.sink = frames.append
    h.handle(make("connected as 15550000001", logging.WARNING))
    msg = protocol.decode(frames[0])
    assert msg.type == protocol.LOG
    assert msg.body["level"] == logging.WARNING and msg.body["name"] == "waport.sim"
    assert msg.body["msg"] == "connected as 15550000001" and isinstance(msg.body["ts"], float)
    h.handle(make("x" * (logforward.MAX_MSG_CHARS + 10)))
    assert protocol.decode(frames[1]).body["msg"].endswith("[truncated]")


def test_tracebacks_travel_with_the_message():
    frames: list[list[bytes]] = []
    h = logforward.ForwardHandler(CollectRecords())
    h.sink = frames.append
    try:
        raise RuntimeError("backend exploded")
    except RuntimeError:
        import sys

        r = make("stop failed")
        r.exc_info = sys.exc_info()
        h.handle(r)
    body = protocol.decode(frames[0]).body["msg"]
    assert body.startswith("stop failed\nTraceback") and "RuntimeError: backend exploded" in body


def test_the_socket_never_carries_news_about_itself_nor_a_flood():
    fallback = CollectRecords()
    frames: list[list[bytes]] = []
    now = [100.0]
    h = logforward.ForwardHandler(fallback, clock=lambda: now[0])
    h.sink = frames.append
    h.handle(make("supervisor socket full; dropped a LOG frame", logging.WARNING, "waport.worker", "send_raw"))
    assert not frames and len(fallback.records) == 1
    for i in range(logforward.MAX_PER_SECOND + 50):
        h.handle(make(f"line {i}"))
    assert len(frames) == logforward.MAX_PER_SECOND and len(fallback.records) == 51
    now[0] = 101.0  # the next second forwards again
    h.handle(make("line after"))
    assert len(frames) == logforward.MAX_PER_SECOND + 1 and len(fallback.records) == 51


def test_setup_attach_detach_route_the_root_logger(capfd):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logforward.setup("acme", "info")
        logging.getLogger("waport.sim").info("on stderr")
        frames: list[list[bytes]] = []
        logforward.attach(frames.append)
        logging.getLogger("waport.sim").info("to the supervisor")
        logging.getLogger("waport.sim").debug("below the level")
        logforward.detach()
        logging.getLogger("waport.sim").warning("on stderr again")
        err = capfd.readouterr().err
        assert re.search(rf"worker\[acme/{os.getpid()}\] INFO waport.sim: on stderr\n", err)
        assert "WARNING waport.sim: on stderr again" in err and "to the supervisor" not in err
        assert [protocol.decode(f).body["msg"] for f in frames] == ["to the supervisor"]
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


@pytest.mark.parametrize("journald", [False, True])
def test_worker_lines_reach_the_daemon_log_tagged_and_masked(daemon_factory, simnet, monkeypatch, journald):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"])
    if journald:
        # systemd names the stream it gave us; the daemon's stderr is the test's log file.
        open(d.log_path, "ab").close()
        st = os.stat(d.log_path)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    d.start()
    pid = d.wait_state("acme", "connected")["pid"]
    phone = d.status("acme")["phone"]
    d.ctl("send", company="acme", to="+1 555 010 9999", text="secret appointment at 10")
    simnet.call("drop", company="acme")  # a worker WARNING: connection lost
    line = wait_for(lambda: re.search(rf"^.*worker\[acme/{pid}\] WARNING waport.sim: connection lost.*$", d.logs(),
                                      re.M), what="the worker's warning in the daemon log").group(0)
    logs = d.logs()
    connected = re.search(rf"^.*worker\[acme/{pid}\] INFO waport.sim: connected as (\S+)$", logs, re.M)
    assert connected and connected.group(1) == phone[:2] + "*" * (len(phone) - 4) + phone[-2:]
    assert phone not in logs and "5550109999" not in logs  # numbers masked everywhere
    assert "secret appointment" not in logs  # message texts are never logged at INFO
    if journald:
        assert line.startswith("<4>worker[") and re.search(r"^<6>waportd\[\d+\] INFO waport.arbiter: ", logs, re.M)
        assert not re.search(r"^\d{4}-\d\d-\d\d", logs, re.M)  # the journal adds the time
    else:
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4} worker\[", line)
