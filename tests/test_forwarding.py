"""Commands and events between hosts (waportd/forwarding.py), without PostgreSQL: a real Cluster whose view
is set by hand, a fake store, a fake handler."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fakes import rig

from ipc import control
from ipc.clusterschema import NOTIFY_MAX_BYTES
from waportd.cluster import Cluster, Owned, View
from waportd.clusterstore import Letter
from waportd.forwarding import EVENT, FORWARD_TIMEOUT, GATHER_TIMEOUT, REPLY, REQUEST, Forwarder
from waportd.placement import DOWN, UP, HostView, LeaseView, Wanted


class Store:
    def __init__(self, fail: bool = False) -> None:
        self.posted: list[tuple[str, str, str]] = []
        self.broadcast_: list[str] = []
        self.fail = fail

    def post(self, letters: list[tuple[str, str, str]]) -> None:
        if self.fail:
            raise RuntimeError("database gone")
        self.posted += letters

    def broadcast(self, payloads: list[str]) -> None:
        self.broadcast_ += payloads


class Setup:
    def __init__(self, tmp_path: Any, store: Store | None = None) -> None:
        self.rig = rig(tmp_path, cluster_dsn="postgresql://db/x", host_id="h1")
        self.store = store or Store()
        self.now = 100.0

        def submit(work: Any, done: Any) -> None:
            try:
                result = work(self.store)
            except Exception as exc:  # noqa: BLE001 - as ClusterLink hands it over
                result = exc
            done(result)

        self.cluster = Cluster(self.rig.services, self.rig.arbiter.roster, submit)
        self.handled: list[tuple[dict[str, Any], bool]] = []
        self.answers: dict[str, dict[str, Any]] = {}  # cmd -> the local result
        self.fwd = Forwarder(self.cluster, submit, self.handle, lambda: self.now)
        self.replies: list[dict[str, Any]] = []

    def handle(self, raw: bytes, respond: Any, forwarded: bool) -> None:
        req = control.parse_request(raw)
        self.handled.append((json.loads(raw), forwarded))
        respond(control.ok_reply(req.id, self.answers.get(req.cmd, {"answered_by": "h1"})))

    def view(self, hosts: dict[str, str], leases: dict[str, str], wanted: tuple[str, ...] = ()) -> None:
        self.cluster.view = View(
            [HostView(h, s, 0.5, 0, 0) for h, s in hosts.items()],
            {c: LeaseView(c, owner, 1, 10.0) for c, owner in leases.items()},
            {c: Wanted(c, None, None) for c in wanted})

    def ask(self, cmd: str, **args: Any) -> bool:
        raw = control.encode_request(cmd, args, req_id=f"r-{cmd}")
        return self.fwd.route(control.parse_request(raw), raw, lambda reply: self.replies.append(json.loads(reply)))

    def mail(self, from_host: str, kind: str, body: dict[str, Any]) -> list[str]:
        return self.fwd.on_letters([Letter(from_host, kind, json.dumps(body))])


@pytest.fixture
def s(tmp_path: Any) -> Setup:
    return Setup(tmp_path)


def test_a_command_about_a_company_run_elsewhere_goes_to_its_owner_and_the_answer_comes_back(s):
    s.view({"h1": UP, "h2": UP}, {"acme": "h2"}, wanted=("acme",))
    assert s.ask("send", company="acme", to="15550100001", text="hi") is True
    s.fwd.flush()
    [(to, kind, body)] = s.store.posted
    assert (to, kind) == ("h2", REQUEST)
    forwarded = json.loads(body)
    assert json.loads(forwarded["raw"])["args"]["text"] == "hi"
    assert s.replies == []
    reply = control.ok_reply("r-send", {"message_id": "3EB0X", "status": "queued"}).decode()
    s.mail("h2", REPLY, {"fid": forwarded["fid"], "reply": reply})
    assert s.replies == [{"id": "r-send", "ok": True, "result": {"message_id": "3EB0X", "status": "queued"}}]


def test_a_forwarded_request_is_answered_here_and_never_routed_again(s):
    raw = control.encode_request("status", {"company": "acme"}, req_id="theirs").decode()
    s.mail("h2", REQUEST, {"fid": "f-1", "raw": raw})
    assert s.handled == [({"id": "theirs", "cmd": "status", "args": {"company": "acme"}}, True)]
    s.fwd.flush()
    [(to, kind, body)] = s.store.posted
    assert (to, kind) == ("h2", REPLY) and json.loads(json.loads(body)["reply"])["id"] == "theirs"


def test_what_this_host_runs_or_nobody_knows_is_answered_here(s):
    s.view({"h1": UP, "h2": UP}, {"beta": "h2"})
    s.cluster.owned["acme"] = Owned(1, 200.0)
    assert s.ask("status", company="acme") is False  # mine
    assert s.ask("metrics") is False and s.ask("ping") is False
    assert s.ask("status", company=["not", "a", "name"]) is False  # validated by the handler
    assert s.handled == []
    # Unknown to the last round (started a moment ago elsewhere?): it waits for the next round, which sees it
    # nowhere either, so this host answers (unknown_company).
    assert s.ask("status", company="nobody") is True and s.cluster.next_round == 0.0
    assert s.handled == []
    s.fwd.route_deferred()
    assert s.handled == [({"id": "r-status", "cmd": "status", "args": {"company": "nobody"}}, True)]


def test_a_company_the_next_round_shows_on_another_host_goes_there(s):
    s.view({"h1": UP, "h2": UP}, {})
    s.ask("status", company="acme")
    s.view({"h1": UP, "h2": UP}, {"acme": "h2"}, wanted=("acme",))
    s.fwd.route_deferred()
    s.fwd.flush()
    assert [(to, kind) for to, kind, _ in s.store.posted] == [("h2", REQUEST)] and s.handled == []


def test_a_wanted_company_without_a_host_says_so_and_refuses_sends_with_a_retry(s):
    s.view({"h1": UP, "h2": DOWN}, {"acme": "h2"}, wanted=("acme",))  # its host left: nobody runs it yet
    assert s.ask("status", company="acme") and s.ask("send", company="acme", to="1", text="x")
    assert s.replies == []
    s.fwd.route_deferred()
    status, send = s.replies
    assert status["result"]["state"] == "starting" and status["result"]["host"] is None
    assert send["error"]["code"] == "not_connected" and send["error"]["retry_after_ms"] > 0
    assert s.store.posted == []


def test_commands_on_the_owner_s_files_name_the_host_to_run_them_on(s):
    s.view({"h1": UP, "h2": UP}, {"acme": "h2"}, wanted=("acme",))
    s.ask("delete", company="acme")
    assert s.replies[0]["error"]["code"] == "bad_request" and "runs on host h2" in s.replies[0]["error"]["message"]


def test_bundles_of_single_hosts_are_refused_in_a_cluster(s):
    s.view({"h1": UP}, {"acme": "h1"}, wanted=("acme",))
    s.cluster.owned["acme"] = Owned(1, 200.0)
    for cmd in ("export", "backup"):
        s.ask(cmd, company="acme")
    s.ask("import_begin", size=10)
    assert [r["error"]["code"] for r in s.replies] == ["bad_request"] * 3
    assert all("pg_dump" in r["error"]["message"] for r in s.replies)


def test_an_owner_that_never_answers_or_leaves_gets_a_clear_error(s):
    s.view({"h1": UP, "h2": UP, "h3": UP}, {"acme": "h2", "beta": "h3"}, wanted=("acme", "beta"))
    s.ask("status", company="acme")
    s.ask("qr", company="beta")
    s.fwd.flush()
    s.view({"h1": UP, "h2": UP, "h3": DOWN}, {"acme": "h2", "beta": "h3"})
    s.fwd.tick(s.now)
    assert [r["error"]["code"] for r in s.replies] == ["not_connected"]  # h3 left: at once
    assert "h3 left the cluster" in s.replies[0]["error"]["message"]
    s.fwd.tick(s.now + FORWARD_TIMEOUT)
    assert [r["error"]["code"] for r in s.replies] == ["not_connected", "timeout"]
    assert s.replies[1]["id"] == "r-status"


def test_a_request_the_database_did_not_take_fails_at_once(tmp_path):
    s = Setup(tmp_path, Store(fail=True))
    s.view({"h1": UP, "h2": UP}, {"acme": "h2"})
    s.ask("status", company="acme")
    s.fwd.flush()
    assert s.replies[0]["error"]["code"] == "timeout" and "database gone" in s.replies[0]["error"]["message"]


def test_list_gathers_every_live_host_s_part_and_the_companies_no_host_runs_yet(s):
    s.view({"h1": UP, "h2": UP, "h3": DOWN}, {"acme": "h1", "beta": "h2"}, wanted=("acme", "beta", "gamma"))
    s.answers["list"] = {"sessions": [{"company": "acme", "state": "connected", "host": "h1"}]}
    s.ask("list")
    assert s.replies == []  # h2 has not answered yet
    s.fwd.flush()
    [(to, kind, body)] = s.store.posted  # h3 is down: not asked
    assert (to, kind) == ("h2", REQUEST)
    forwarded = json.loads(body)
    part = {"sessions": [{"company": "beta", "state": "connected", "host": "h2"},
                         {"company": "acme", "state": "stopped", "host": "h2"}]}  # a stale copy: acme is h1's
    s.mail("h2", REPLY, {"fid": forwarded["fid"],
                         "reply": control.ok_reply(json.loads(forwarded["raw"])["id"], part).decode()})
    [answer] = s.replies
    assert answer["id"] == "r-list"
    assert [(r["company"], r["state"], r["host"]) for r in answer["result"]["sessions"]] == [
        ("acme", "connected", "h1"), ("beta", "connected", "h2"), ("gamma", "starting", None)]
    assert "unanswered" not in answer["result"]


def test_list_answers_without_a_silent_host_and_names_it(s):
    s.view({"h1": UP, "h2": UP}, {}, wanted=())
    s.answers["list"] = {"sessions": []}
    s.ask("status")  # status without a company is list
    s.fwd.flush()
    s.fwd.tick(s.now + GATHER_TIMEOUT)
    assert s.replies[0]["result"] == {"sessions": [], "unanswered": ["h2"]}


def test_events_go_to_the_other_hosts_once_and_large_ones_as_mail(s):
    s.view({"h1": UP}, {})
    s.fwd.publish({"type": "sent", "company": "acme", "ts": 1.0, "data": {}})
    s.fwd.flush()
    assert s.store.broadcast_ == []  # alone: nobody to tell
    s.view({"h1": UP, "h2": UP, "h3": UP}, {})
    s.fwd.publish({"type": "sent", "company": "acme", "ts": 1.0, "data": {}})
    big = {"type": "message", "company": "acme", "ts": 1.0, "data": {"text": "é" * NOTIFY_MAX_BYTES}}
    s.fwd.publish(big)
    s.fwd.flush()
    [small] = s.store.broadcast_
    assert json.loads(small) == {"h": "h1", "e": {"type": "sent", "company": "acme", "ts": 1.0, "data": {}}}
    assert sorted((to, kind) for to, kind, _ in s.store.posted) == [("h2", EVENT), ("h3", EVENT)]
    # Received: another host's events are relayed, this host's own broadcast is not (it published it).
    theirs = json.dumps({"h": "h2", "e": big})
    relayed = s.fwd.relayed([small, theirs, "not json"] + s.mail("h3", EVENT, {"h": "h3", "e": big}))
    assert relayed == [big, big]
