"""Control commands: their rules in-process on fakes (answered once, and only when done), then
against a real daemon: what a user of waportctl sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import zmq
from conftest import EventTap, SimNetProcess, wait_for
from fakes import rig

from ipc import protocol
from ipc import states as S
from ipc.errors import WaportError

WAPORTCTL = os.path.join(os.path.dirname(sys.executable), "waportctl")


def error_of(call, *args, **kwargs) -> WaportError:
    with pytest.raises(WaportError) as exc:
        call(*args, **kwargs)
    return exc.value


# ---------------------------------------------------------------- in-process, on fakes


def command(r, cmd: str, **args) -> list[dict]:
    """Send one request to the controller; the replies it has given so far (decoded)."""
    replies: list[dict] = []
    r.arbiter.controller.handle(json.dumps({"id": "1", "cmd": cmd, "args": args}).encode(),
                                lambda raw: replies.append(json.loads(raw)))
    return replies


def test_stop_answers_only_once_the_worker_has_gone(tmp_path):
    r = rig(tmp_path)
    assert command(r, "start", company="acme")[0]["result"]["state"] == S.STARTING
    replies = command(r, "stop", company="acme")
    assert replies == []  # not yet: the worker is still stopping
    r.exit("acme", 0)
    assert [x["result"]["state"] for x in replies] == [S.STOPPED]
    assert not r.arbiter.roster.is_wanted("acme")


def test_restart_answers_with_the_new_worker(tmp_path):
    r = rig(tmp_path)
    command(r, "start", company="acme")
    first = r.company().worker.pid
    replies = command(r, "restart", company="acme")
    r.exit("acme", 0)
    (reply,) = replies
    assert reply["ok"] and reply["result"]["pid"] not in (None, first) and reply["result"]["state"] == S.STARTING


def test_delete_logs_out_a_connected_session_stops_it_and_forgets_it(tmp_path):
    r = rig(tmp_path)
    command(r, "start", company="acme")
    r.ready()
    r.report("acme", S.CONNECTED)
    replies = command(r, "delete", company="acme")
    (rid, body), = r.system.sent(protocol.REQUEST)
    assert body["cmd"] == "logout" and replies == []
    r.hear("acme", protocol.REPLY, {"id": body["id"], "ok": True, "result": {}})
    assert r.company().state == S.STOPPING and replies == []
    r.exit("acme", 0)
    assert replies == [{"id": "1", "ok": True, "result": {"company": "acme", "deleted": True}}]
    assert r.arbiter.roster.get("acme") is None and not (tmp_path / "state" / "sessions" / "acme").exists()
    assert command(r, "status", company="acme")[0]["error"]["code"] == "unknown_company"


def test_no_start_while_shutting_down_and_bad_ids_are_refused(tmp_path):
    r = rig(tmp_path)
    assert command(r, "start", company="no such/company")[0]["error"]["code"] == "invalid_company_id"
    r.arbiter.begin_shutdown("SIGTERM")
    assert command(r, "start", company="acme")[0]["error"]["message"] == "waportd is shutting down"
    assert r.services.counters[("control", "start", "bad_request")] == 1


def test_start_past_max_companies_is_refused_with_capacity(tmp_path):
    r = rig(tmp_path, max_companies=2)
    assert command(r, "start", company="acme")[0]["ok"] and command(r, "start", company="bistro")[0]["ok"]
    (reply,) = command(r, "start", company="cafe")
    assert reply["error"]["code"] == "capacity" and reply["error"]["limit"] == 2
    assert "max_companies = 2" in reply["error"]["message"]
    assert r.arbiter.roster.get("cafe") is None and not r.arbiter.roster.is_wanted("cafe")
    assert r.services.counters[("control", "start", "capacity")] == 1
    assert command(r, "start", company="acme")[0]["ok"]  # a known company is not a new one
    replies = command(r, "restart", company="bistro")
    r.exit("bistro", 0)
    assert replies[0]["ok"]


def test_health_is_the_healthz_body(tmp_path):
    r = rig(tmp_path)
    command(r, "start", company="acme")
    (reply,) = command(r, "health")
    body = reply["result"]
    assert set(body) == {"status", "services", "counts", "attention", "sessions", "version", "pid",
                         "uptime_seconds", "loop_age_seconds"}
    assert body["sessions"] == 1 and body["counts"] == {S.STARTING: 1} and body["status"] == "ok"


def test_frames_nested_too_deeply_get_bad_request(tmp_path):
    r = rig(tmp_path)
    replies: list[dict] = []
    for raw in (b"[" * 200_000, b'{"a":' * 100_000, b'{"id": "n", "cmd": "ping", "args": ' + b"[" * 100_000):
        r.arbiter.controller.handle(raw, lambda out: replies.append(json.loads(out)))
    assert replies == 3 * [{"id": "", "ok": False,
                            "error": {"code": "bad_request", "message": "request: JSON nested too deeply"}}]
    assert command(r, "ping")[0]["ok"]


def test_a_lone_surrogate_in_a_send_is_bad_request_not_a_journal_error(tmp_path):
    r = rig(tmp_path)
    command(r, "start", company="acme")
    r.ready()
    r.report("acme", S.CONNECTED)
    assert command(r, "send", company="acme", to="15550109999", text="hi \ud800")[0]["error"]["code"] == "bad_request"
    reply = command(r, "send", company="acme", to="15550109999", text="hi", idempotency_key="k\udc80")[0]
    assert reply["error"]["code"] == "bad_request"
    assert r.arbiter.messages.batch == {}


def test_api_tokens_create_list_revoke(tmp_path):
    r = rig(tmp_path)
    path = tmp_path / "state" / "api-tokens.json"
    (reply,) = command(r, "token_create", company="acme", expires="30d")
    created = reply["result"]
    assert set(created) == {"id", "token", "company", "created_at", "expires_at"}
    assert created["company"] == "acme" and created["created_at"] == r.clock.wall
    assert created["expires_at"] == r.clock.wall + 30 * 86400
    assert created["token"] not in path.read_text() and oct(path.stat().st_mode & 0o777) == "0o600"
    admin = command(r, "token_create")[0]["result"]  # a company token needs no session: acme is not known
    assert admin["company"] is None and admin["expires_at"] is None
    listed = command(r, "token_list")[0]["result"]["tokens"]
    assert {t["id"]: t["state"] for t in listed} == {created["id"]: "active", admin["id"]: "active"}
    assert "sha256" not in listed[0] and "token" not in listed[0]
    revoked = command(r, "token_revoke", id=created["id"])[0]["result"]
    assert revoked["state"] == "revoked" and revoked["revoked_at"] == r.clock.wall
    r.clock.advance(10)
    assert command(r, "token_revoke", id=created["id"])[0]["result"]["revoked_at"] == revoked["revoked_at"]
    short = command(r, "token_create", expires=60)[0]["result"]
    r.clock.advance(61)
    states = {t["id"]: t["state"] for t in command(r, "token_list")[0]["result"]["tokens"]}
    assert states == {created["id"]: "revoked", admin["id"]: "active", short["id"]: "expired"}


@pytest.mark.parametrize("cmd,args,code", [
    ("token_create", {"company": "bad id!"}, "invalid_company_id"),
    ("token_create", {"expires": "soon"}, "bad_request"),
    ("token_create", {"expires": 0}, "bad_request"),
    ("token_create", {"expires": [1]}, "bad_request"),
    ("token_revoke", {"id": "tok_000000000000"}, "bad_request"),
    ("token_revoke", {}, "bad_request"),
])
def test_api_token_commands_refuse_bad_input(tmp_path, cmd, args, code):
    r = rig(tmp_path)
    (reply,) = command(r, cmd, **args)
    assert reply["error"]["code"] == code
    assert not (tmp_path / "state" / "api-tokens.json").exists()


def test_a_damaged_token_file_is_reported_and_left_alone(tmp_path):
    r = rig(tmp_path)
    path = tmp_path / "state" / "api-tokens.json"
    path.write_text("{not json")
    for cmd in ("token_create", "token_list"):
        error = command(r, cmd)[0]["error"]
        assert error["code"] == "internal" and str(path) in error["message"] and "fix or remove" in error["message"]
    assert path.read_text() == "{not json"


# ---------------------------------------------------------------- a real daemon


@pytest.fixture
def connected(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"]).start()
    d.wait_state("acme", "connected")
    return d


def test_send_reaches_the_network(connected, simnet):
    tap = EventTap(connected.run_dir, b"acme.sent")
    reply = connected.ctl("send", company="acme", to="+1 (555) 010-9999", text="booking at 10")
    assert reply["status"] == "queued" and reply["message_id"]
    event = tap.wait(lambda e: e["data"]["message_id"] == reply["message_id"], what="sent event")
    tap.close()
    assert event["data"]["to"] == "15550109999"
    sent = simnet.call("sent", company="acme")["messages"]
    assert [(m["to"], m["text"], m["id"]) for m in sent] == [("15550109999", "booking at 10", reply["message_id"])]
    listing = connected.ctl("messages", company="acme")
    assert [(m["message_id"], m["status"]) for m in listing["outbound"]] == [(reply["message_id"], "sent")]


def test_read_and_typing_reach_the_network(connected, simnet):
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, text="hi", id="WA-1")
    wait_for(lambda: connected.ctl("messages", company="acme")["inbound"], what="the inbound message")
    assert connected.ctl("read", company="acme", chat="+1 555 010 0001", message_ids=["WA-1"]) == {
        "company": "acme", "chat": "15550100001", "read": 1}
    assert [(r["chat"], r["ids"]) for r in simnet.call("reads", company="acme")["reads"]] == [
        ("15550100001", ["WA-1"])]
    connected.ctl("typing", company="acme", chat="15550100001", state="recording")
    assert [p["state"] for p in simnet.call("presence", company="acme")["presence"]] == ["recording"]
    for bad in ({"chat": "12", "message_ids": ["x"]}, {"chat": "15550100001", "message_ids": []},
                {"chat": "15550100001", "message_ids": "WA-1"}):
        assert error_of(connected.ctl, "read", company="acme", **bad).code in ("invalid_phone", "bad_request")
    assert error_of(connected.ctl, "typing", company="acme", chat="15550100001", state="dancing").code == \
        "bad_request"
    connected.ctl("stop", company="acme")
    connected.wait_state("acme", "stopped")
    assert error_of(connected.ctl, "read", company="acme", chat="15550100001", message_ids=["x"]).code == \
        "not_connected"


def test_send_validation(connected):
    assert error_of(connected.ctl, "send", company="acme", to="12", text="x").code == "invalid_phone"
    assert error_of(connected.ctl, "send", company="acme", to="15550109999", text="x" * 70000).code == \
        "message_too_long"
    assert error_of(connected.ctl, "send", company="nobody", to="15550109999", text="x").code == \
        "unknown_company"
    assert error_of(connected.ctl, "send", company="bad id!", to="15550109999", text="x").code == \
        "invalid_company_id"


def test_send_while_the_network_is_down_is_queued_and_sent_later(daemon_factory, short_tmp):
    d = daemon_factory(sim_endpoint=f"ipc://{short_tmp}/simnet.sock", companies=["acme"]).start()
    d.wait_state("acme", "backoff", timeout=20)
    reply = d.ctl("send", company="acme", to="15550109999", text="hi", idempotency_key="k1")
    assert reply["status"] == "queued"
    assert d.ctl("send", company="acme", to="15550109999", text="hi", idempotency_key="k1") == reply
    net = SimNetProcess(short_tmp)
    try:
        sent = wait_for(lambda: net.call("sent", company="acme")["messages"], timeout=30, what="the send")
        assert [m["id"] for m in sent] == [reply["message_id"]]
        # the network has it a moment before the worker journals the outcome: poll, as a caller would
        wait_for(lambda: d.ctl("send", company="acme", to="15550109999", text="hi", idempotency_key="k1") ==
                 {"message_id": reply["message_id"], "status": "sent"}, what="the first result, now sent")
    finally:
        net.stop()


def test_send_to_a_stopped_company_is_refused(connected):
    connected.ctl("stop", company="acme")
    err = error_of(connected.ctl, "send", company="acme", to="15550109999", text="hi")
    assert err.code == "not_connected" and "stopped" in err.message


def test_inbound_messages_become_events(connected, simnet):
    tap = EventTap(connected.run_dir, b"acme.message")
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, text="is 10:00 free?", id="M1")
    event = tap.wait(lambda e: e["type"] == "message", what="message event")
    tap.close()
    assert event["data"]["text"] == "is 10:00 free?" and event["data"]["id"] == "M1"
    assert event["data"]["from"] == "15550100001"


def test_pairing_by_qr_scan(daemon_factory, short_tmp):
    net = SimNetProcess(short_tmp, auto_pair=False)
    try:
        d = daemon_factory(sim_endpoint=net.endpoint, companies=["acme"]).start()
        d.wait_state("acme", "pairing")
        qr = wait_for(lambda: d.ctl("qr", company="acme")["code"], what="a QR code")
        assert qr.startswith("SIMQR:")
        net.call("scan", qr=qr, phone="15550107777")
        r = d.wait_state("acme", "connected")
        assert r["phone"] == "15550107777"
        assert d.ctl("qr", company="acme")["code"] is None
    finally:
        net.stop()


def test_pair_code(daemon_factory, short_tmp):
    net = SimNetProcess(short_tmp, auto_pair=False)
    try:
        d = daemon_factory(sim_endpoint=net.endpoint, companies=["acme"]).start()
        d.wait_state("acme", "pairing")
        assert error_of(d.ctl, "pair_code", company="acme", phone="12").code == "invalid_phone"
        code = d.ctl("pair_code", company="acme", phone="+1 555 010 7777")["code"]
        net.call("scan", qr=code)
        assert d.wait_state("acme", "connected")["phone"]
    finally:
        net.stop()


def test_logout_unlinks_and_does_not_restart(connected, simnet):
    r = connected.ctl("logout", company="acme")
    assert r["state"] == "logged_out" and r["pid"] is None
    assert simnet.connections().get("acme", 0) == 0


def test_delete_removes_the_session(connected):
    session_dir = os.path.join(connected.state_dir, "sessions", "acme")
    assert os.path.isdir(session_dir)
    assert connected.ctl("delete", company="acme") == {"company": "acme", "deleted": True}
    assert not os.path.exists(session_dir)
    assert connected.ctl("list")["sessions"] == []
    assert error_of(connected.status, "acme").code == "unknown_company"


def test_stop_and_start(connected):
    r = connected.ctl("stop", company="acme")
    assert r["state"] == "stopped" and r["pid"] is None
    assert connected.ctl("stop", company="acme")["state"] == "stopped"  # idempotent
    connected.ctl("start", company="acme")
    connected.wait_state("acme", "connected")


def test_malformed_frames_get_errors_and_the_daemon_keeps_serving(connected):
    ctx = zmq.Context.instance()
    for kind in (zmq.DEALER, zmq.REQ):
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"ipc://{connected.run_dir}/control.sock")
        for frame in (b"", b"\x00\xff", b"{", b"[1]", b'{"id": 5}', b'{"id": "q", "cmd": "start", "args": 3}',
                      json.dumps({"id": "z", "cmd": "status", "args": {"company": "../../etc"}}).encode()):
            sock.send(frame)
            assert sock.poll(5000), f"no reply to {frame!r}"
            reply = json.loads(sock.recv())
            assert reply["ok"] is False
            assert reply["error"]["code"] in ("bad_request", "invalid_company_id"), reply
        sock.close(0)
    # multipart garbage on a DEALER: still answered or dropped, never a crash
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{connected.run_dir}/control.sock")
    sock.send_multipart([b"a", b"b", b"c"])
    assert sock.poll(5000)
    sock.recv_multipart()
    # JSON nested deeper than the parser's recursion limit: an error reply, not an exception in the loop
    for frame in (b"[" * 200_000, b'{"a":' * 100_000):
        sock.send(frame)
        assert sock.poll(5000), f"no reply to {frame[:10]!r}..."
        reply = json.loads(sock.recv())
        assert reply == {"id": "", "ok": False,
                         "error": {"code": "bad_request", "message": "request: JSON nested too deeply"}}
    sock.close(0)
    assert connected.ctl("ping")["pong"] is True
    assert connected.status("acme")["state"] == "connected"
    samples = connected.ctl("metrics")["metrics"]
    assert [s["value"] for s in samples if s["name"] == "waport_loop_errors_total"] == [0]


def test_waportctl_against_the_real_daemon(connected):
    env = {**os.environ, "WAPORT_RUN_DIR": connected.run_dir}
    out = subprocess.run([WAPORTCTL, "--json", "list"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert [s["company"] for s in json.loads(out.stdout)["sessions"]] == ["acme"]
    out = subprocess.run([WAPORTCTL, "status", "no such"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "invalid_company_id" in out.stderr
    out = subprocess.run([WAPORTCTL, "send", "acme", "15550109999", "hello"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("acme: queued ")
    out = subprocess.run([WAPORTCTL, "send", "--wait", "acme", "15550109999", "hi", "--idempotency-key", "w1"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("acme: sent "), out.stdout + out.stderr
    message_id = out.stdout.split()[-1]
    out = subprocess.run([WAPORTCTL, "messages", "acme"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and message_id in out.stdout and " sent " in out.stdout
    assert "hi" in out.stdout
    connected.terminate()
    out = subprocess.run([WAPORTCTL, "ping"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 3 and "cannot reach waportd" in out.stderr
