"""Any host answers every command and streams every event for the whole cluster (DESIGN.md §12).

A command about a company another host owns goes to that host as mail through PostgreSQL, and its answer
comes back the same way, byte for byte: the owner's own handler answered it. `list` asks every live host
for its part. Events go the other way: each host broadcasts what it publishes (a NOTIFY), and the others
relay it to their events sockets only — never to their webhooks or Redis stream, which the owner fed.
What is mailed in one loop turn goes out in one statement (`flush`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipc import control
from ipc.clusterschema import NOTIFY_MAX_BYTES
from ipc.errors import BAD_REQUEST, NOT_CONNECTED, TIMEOUT, WaportError

log = logging.getLogger("waport.cluster")

Respond = Callable[[bytes], None]
Handle = Callable[[bytes, Respond, bool], None]  # (frame, respond, forwarded): the controller
Submit = Callable[[Callable[[Any], Any], Callable[[Any], None]], None]

# Commands about one company, answered by the host that runs it. Not media_put and media_get: the media store
# is in PostgreSQL, so any host answers them (an upload's chunks, which name no company until the last, all
# reach the same host's upload; and bytes do not travel twice, through the mail and back).
FORWARDED = frozenset({
    "status", "restart", "logout", "send", "qr", "pair_code", "messages", "messages_purge", "read", "typing",
    "media_fetch", "webhook_set", "webhook_show", "webhook_rotate", "webhook_delete",
    "webhook_deliveries", "webhook_replay",
})
OWNER_ONLY = frozenset({"delete"})  # its files are on the owner: say where to run it
# Bundles hold a company's SQLite journal; in a cluster its journal is in PostgreSQL (back that up instead).
NOT_IN_CLUSTER = frozenset({"export", "backup", "import_begin"})
REQUEST, REPLY, EVENT = "request", "reply", "event"
FORWARD_TIMEOUT = 35.0  # longer than the owner's own worker timeout (30 s), so its answer comes first
GATHER_TIMEOUT = 3.0  # `list`: a host silent this long is named in `unanswered`


@dataclass
class Waiting:
    respond: Respond
    req_id: str
    host: str
    deadline: float


@dataclass
class Gather:
    """A `list` for the whole cluster: this host's part and every live host's, merged when all are in."""

    req_id: str
    respond: Respond
    deadline: float
    waiting: set[str]
    parts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class Forwarder:
    def __init__(self, cluster: Any, submit: Submit, handle: Handle, clock: Callable[[], float]) -> None:
        self.cluster = cluster
        self.submit = submit
        self.handle = handle
        self.clock = clock
        self.me = cluster.cfg.host_id
        self.ids = itertools.count(1)
        self.prefix = f"{os.getpid():x}-"
        self.waiting: dict[str, Waiting] = {}
        self.gathers: dict[str, Gather] = {}
        self.letters: list[tuple[str, str, str]] = []
        self.events: list[str] = []
        self.deferred: list[tuple[control.Request, bytes, Respond]] = []
        cluster.after_round.append(self.route_deferred)

    def route_deferred(self) -> None:
        """After a round: the commands that waited for it go where the cluster now says (or are answered here)."""
        deferred, self.deferred = self.deferred, []
        for req, raw, respond in deferred:
            if not self.route(req, raw, respond, retried=True):
                self.handle(raw, respond, True)

    # ------------------------------------------------------------ commands

    def route(self, req: control.Request, raw: bytes, respond: Respond, retried: bool = False) -> bool:
        """Send `req` where it is answered; False: this host answers it itself. A company the last round did
        not show on any host (started a moment ago, or moving) waits for the next round once."""
        company = req.args.get("company")
        if req.cmd == "list" or (req.cmd == "status" and company is None):
            self.gather(req, raw, respond)
            return True
        if req.cmd in NOT_IN_CLUSTER:
            respond(control.error_reply(req.id, WaportError(
                BAD_REQUEST, f"{req.cmd} moves a company between single hosts; in a cluster every host reaches "
                             "its data in PostgreSQL already (back that up with pg_dump)")))
            return True
        if req.cmd not in FORWARDED and req.cmd not in OWNER_ONLY:
            return False
        if not isinstance(company, str) or company in self.cluster.owned:
            return False
        owner = self.cluster.owner_of(company)
        if owner is None and not retried:
            self.deferred.append((req, raw, respond))
            self.cluster.round_soon()
            return True
        if owner is None:
            if company not in self.cluster.view.wanted:
                return False  # unknown to the cluster: this host's own answer (unknown_company)
            if req.cmd == "status":
                respond(control.ok_reply(req.id, self.cluster.record(company)))
                return True
            respond(control.error_reply(req.id, WaportError(
                NOT_CONNECTED, f"{company} has no host right now (it is being claimed or moved); try again in "
                               f"a few seconds", retry_after_ms=int(self.cluster.cfg.lease_renew_interval * 1000))))
            return True
        if req.cmd in OWNER_ONLY:
            respond(control.error_reply(req.id, WaportError(
                BAD_REQUEST, f"{company} runs on host {owner}: run {req.cmd} there")))
            return True
        self.forward(owner, req.id, raw, respond)
        return True

    def forward(self, host: str, req_id: str, raw: bytes, respond: Respond, timeout: float = FORWARD_TIMEOUT) -> str:
        fid = f"{self.prefix}{next(self.ids)}"
        self.waiting[fid] = Waiting(respond, req_id, host, self.clock() + timeout)
        self.letters.append((host, REQUEST, json.dumps({"fid": fid, "raw": raw.decode("utf-8", "replace")})))
        return fid

    def gather(self, req: control.Request, raw: bytes, respond: Respond) -> None:
        others = self.cluster_hosts() - {self.me}
        g = Gather(req.id, respond, self.clock() + GATHER_TIMEOUT, set(others))
        gid = f"{self.prefix}g{next(self.ids)}"
        self.gathers[gid] = g
        one = control.encode_request("list", {}, req_id=gid)
        self.handle(one, lambda reply: self.part(gid, self.me, reply), True)
        for host in others:
            self.forward(host, gid, one, lambda reply, host=host: self.part(gid, host, reply), GATHER_TIMEOUT)

    def part(self, gid: str, host: str, reply: bytes) -> None:
        g = self.gathers.get(gid)
        if g is None:
            return
        try:
            answer = json.loads(reply)
            sessions = answer["result"]["sessions"] if answer.get("ok") else None
        except (ValueError, KeyError, TypeError):
            sessions = None
        g.waiting.discard(host)
        if sessions is not None:
            g.parts[host] = sessions
        if not g.waiting and self.me in g.parts:
            self.finish(gid)

    def finish(self, gid: str) -> None:
        g = self.gathers.pop(gid)
        owners = self.cluster.live_owners()
        merged: dict[str, dict[str, Any]] = {}
        for host, sessions in g.parts.items():
            for record in sessions:
                name = record.get("company")
                if name not in merged or owners.get(name) == host:
                    merged[name] = record
        for name in self.cluster.view.wanted:
            merged.setdefault(name, self.cluster.record(name))
        result: dict[str, Any] = {"sessions": [merged[n] for n in sorted(merged)]}
        unanswered = sorted(h for h in self.cluster_hosts() if h not in g.parts)
        if unanswered:
            result["unanswered"] = unanswered
        g.respond(control.ok_reply(g.req_id, result))

    def cluster_hosts(self) -> set[str]:
        return self.cluster.up_hosts() | {self.me}

    # ------------------------------------------------------------ what other hosts mail here

    def on_letters(self, letters: list[Any]) -> list[str]:
        """Requests are answered by this host's handler (never forwarded again); replies go to whoever
        waits. The events that came as mail (too large for a NOTIFY) are returned for the events socket."""
        events = []
        for letter in letters:
            try:
                body = json.loads(letter.body)
                if letter.kind == REQUEST:
                    self.answer(letter.from_host, body["fid"], body["raw"].encode())
                elif letter.kind == REPLY:
                    waiting = self.waiting.pop(body["fid"], None)
                    if waiting is not None:
                        waiting.respond(body["reply"].encode())
                elif letter.kind == EVENT:
                    events.append(letter.body)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("cluster: unreadable mail from %s (%s): dropped", letter.from_host, exc)
        return events

    def answer(self, host: str, fid: str, raw: bytes) -> None:
        def respond(reply: bytes) -> None:
            self.letters.append((host, REPLY, json.dumps({"fid": fid, "reply": reply.decode("utf-8", "replace")})))

        self.handle(raw, respond, True)

    def relayed(self, payloads: list[str]) -> list[dict[str, Any]]:
        """Events other hosts broadcast, for this host's events socket (this host's own are skipped)."""
        out = []
        for payload in payloads:
            try:
                note = json.loads(payload)
                if note.get("h") != self.me and isinstance(note.get("e"), dict):
                    out.append(note["e"])
            except (ValueError, AttributeError):
                log.warning("cluster: an unreadable event was broadcast: dropped")
        return out

    # ------------------------------------------------------------ out, once per loop turn

    def publish(self, event: dict[str, Any]) -> None:
        """An event this host published, for every other host."""
        if len(self.cluster_hosts()) < 2:
            return
        payload = json.dumps({"h": self.me, "e": event}, separators=(",", ":"), default=str)
        if len(payload.encode()) <= NOTIFY_MAX_BYTES:
            self.events.append(payload)
            return
        for host in self.cluster_hosts() - {self.me}:
            self.letters.append((host, EVENT, payload))

    def flush(self) -> None:
        if not self.letters and not self.events:
            return
        letters, events = self.letters, self.events
        self.letters, self.events = [], []
        sent = [json.loads(body)["fid"] for _, kind, body in letters if kind == REQUEST]

        def work(store: Any) -> None:
            store.post(letters)
            store.broadcast(events)

        def done(result: Any) -> None:
            if isinstance(result, BaseException):
                log.warning("cluster: mail to other hosts failed: %s", result)
                for fid in sent:
                    self.fail(fid, WaportError(TIMEOUT, f"the cluster database did not take the request: {result}"))

        self.submit(work, done)

    def tick(self, now: float) -> None:
        """Forwarded requests and `list`s that waited too long are answered with what there is."""
        for fid in [f for f, w in self.waiting.items() if now >= w.deadline]:
            w = self.waiting[fid]
            self.fail(fid, WaportError(TIMEOUT, f"host {w.host} did not answer in time"))
        for fid in [f for f, w in self.waiting.items() if not self.cluster.is_up(w.host)]:
            w = self.waiting[fid]  # it left (or died) without answering: whoever asked may try again now
            self.fail(fid, WaportError(NOT_CONNECTED, f"host {w.host} left the cluster before answering; try again",
                                       retry_after_ms=int(self.cluster.cfg.lease_renew_interval * 1000)))
        for gid in [g for g, gather in self.gathers.items() if now >= gather.deadline and self.me in gather.parts]:
            self.finish(gid)

    def fail(self, fid: str, error: WaportError) -> None:
        waiting = self.waiting.pop(fid, None)
        if waiting is not None:
            waiting.respond(control.error_reply(waiting.req_id, error))
