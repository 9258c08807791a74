"""The simulated WhatsApp network (DESIGN.md §7): a stand-in server for tests, the demo and benchmarks.

One ZeroMQ ROUTER socket serves two kinds of peers with the control envelope of DESIGN.md §4
(request ``{"id", "cmd", "args"}``, reply ``{"id", "ok", "result" | "error"}``):

- control clients (tests, the demo; REQ or DEALER) — commands in `SimNet.control_commands`;
- sessions: the `sim` backend of a worker, one DEALER socket per connection attempt.

Session protocol (backend -> network requests; the network also pushes events to the session):

``hello {company, token?}``
    ``{"status": "connected", "phone"}`` for a valid token; ``{"status": "pairing", "qr"}``
    without one. Refusals are ``not_connected`` errors carrying ``reason``: ``logged_out``
    (unknown or revoked token), ``banned`` (with ``until``) or ``outage`` (with ``until``).
    A hello for a company that already has a live connection kicks the older one with a
    ``replaced`` push and counts ``stats.replaced``: that is the double-session detector.
``heartbeat {}``      every second; ``not_connected`` once the network forgot the connection.
``send {to, text, id?, type?, ...}`` -> ``{id, ts}`` (delayed by `latency`); a ``receipt`` push follows.
                      The §11 fields ride along (mimetype, filename, voice, latitude, longitude, name,
                      emoji, reaction_to, reply_to); a media send's bytes follow the request as extra
                      frames of at most 1 MiB, and the network records their SHA-256 and size.
``download {id, offset}`` -> ``{size, offset, eof}`` with the next chunk (at most 1 MiB) of an
                      inbound message's media as an extra frame.
``ack {company, ids}`` the backend took these inbound messages over; unacked ones are redelivered
                      on the next connection (WhatsApp redelivers until the device acknowledges).
``pair_code {phone}`` while pairing -> ``{code}``; ``scan {qr: code}`` accepts it like a QR.
``logout_device {}``  unlink: the account's token is deleted, the connection forgotten.
``bye {}``            clean close; no stats impact.

Pushes are ``{"event": name, "data": {...}}`` frames without an ``id``: ``paired {token, phone}``,
``message {id, from, push_name, text, ts, type?, media? {mimetype, size, sha256, filename?}, ...}``,
``receipt {ids, type, chat}``, ``dropped {reason}``,
``logged_out {}``, ``replaced {}``, ``banned {until}``.

A connection is *live* from its hello until a bye, a fault that kicks it, its socket closing, or
`liveness_timeout` seconds without any message from it (a SIGSTOPped process over tcp).
libzmq's ROUTER_NOTIFY is a draft API missing from the stock pyzmq wheels, so the socket closing
is learnt from a socket monitor: every frame carries the file descriptor it came in on
(ZMQ_SRCFD), each accepted descriptor gets a new generation number, and a DISCONNECTED event
ends the live connection bound to that descriptor generation.

Accounts (company -> token, phone) and bans persist in ``STATE_DIR/simnet.json`` (0600, written
atomically); connections, queued inbound messages and the sent list live in memory.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import heapq
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import stat
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from ipc import paths
from ipc.control import error_reply, ok_reply, parse_request, request_id_of
from ipc.errors import BAD_REQUEST, INTERNAL, NOT_CONNECTED, UNKNOWN_COMPANY, WaportError
from ipc.files import write_json_atomic
from ipc.logfmt import log_to_stderr
from ipc.richmessage import INBOUND_FIELDS
from ipc.validation import (
    normalize_phone,
    validate_company,
    validate_message_ids,
    validate_presence,
    validate_text,
)
from ipc.zsocket import NOBLOCK, readable, send_frames

log = logging.getLogger("waport.simnet")

STATE_FILE = "simnet.json"
LIVENESS_TIMEOUT = 10.0
RECEIPT_DELAY = 0.05
SWEEP_INTERVAL = 0.5
MAX_POLL_MS = 200  # how often the loop looks at the stop event
MAX_SENT = 100_000
MAX_MESSAGE_BYTES = 4 << 20
MEDIA_CHUNK = 1 << 20
MAX_MEDIA = 1000  # inbound media the network keeps for downloads (the oldest go)
SEND_TYPES = ("text", "image", "video", "audio", "document", "location", "reaction")
MEDIA_SEND_TYPES = ("image", "video", "audio", "document")
SEND_FIELDS = ("mimetype", "filename", "voice", "latitude", "longitude", "name", "emoji", "reaction_to", "reply_to")
BATCH = 256  # router messages handled before timers get a turn
_SRCFD = int(zmq.SRCFD)  # a plain int: the enum costs more than the lookup

# A connection's status on the network (hello's `status`, the `connections` command's `states`):
# WhatsApp's side of the link, not a worker's session state (ipc.states), though named alike.
PAIRING = "pairing"
CONNECTED = "connected"

Result = dict[str, Any] | None  # None: the handler replies later itself


@dataclass
class Peer:
    """Where a request came from and how to answer it."""

    rid: bytes
    envelope: list[bytes]  # every frame before the body, echoed back with the reply
    fd: int
    req_id: str
    attachments: list[zmq.Frame] = field(default_factory=list)  # frames after the body: a send's media


@dataclass
class Conn:
    """A live session connection: one backend socket bound to one company."""

    rid: bytes
    company: str
    fd: int  # -1: unknown (no ZMQ_SRCFD); only the liveness timeout ends it then
    gen: int | None  # None: the descriptor's generation is unknown
    state: str
    last_seen: float
    qr: str = ""
    code: str = ""
    code_phone: str = ""


@dataclass
class Stats:
    replaced: int = 0  # genuine double sessions: a live connection kicked by a second hello
    replace_faults: int = 0
    connects: int = 0
    pairings: int = 0
    drops: int = 0
    disconnects: int = 0  # sockets that closed under a live connection (process died)
    timeouts: int = 0  # live connections silent for liveness_timeout
    logouts: int = 0
    device_logouts: int = 0
    bans: int = 0
    outage_refusals: int = 0
    refusals: int = 0
    messages_sent: int = 0
    messages_inbound: int = 0
    redeliveries: int = 0
    bad_requests: int = 0
    downloads: int = 0  # media chunks served

    def as_dict(self, live: int) -> dict[str, int]:
        return {**self.__dict__, "live": live}


class EndpointInUse(Exception):
    """Another server already answers on the ipc endpoint."""


class SimNet:
    """The network: accounts, live connections, queued messages, faults, one poll loop."""

    def __init__(
        self,
        endpoint: str,
        state_dir: str,
        auto_pair: bool = False,
        liveness_timeout: float = LIVENESS_TIMEOUT,
    ) -> None:
        self.endpoint = endpoint
        self.state_dir = state_dir
        self.auto_pair = auto_pair
        self.liveness_timeout = liveness_timeout
        self.stats = Stats()
        self.accounts: dict[str, dict[str, Any]] = {}  # company -> {token, phone}
        self.bans: dict[str, float] = {}  # company -> wall-clock end
        self.phone_counter = 0
        self.by_rid: dict[bytes, Conn] = {}
        self.live: dict[str, Conn] = {}  # company -> its one live connection
        self.pending: dict[str, list[dict[str, Any]]] = {}  # inbound not yet acknowledged
        self.sent: deque[dict[str, Any]] = deque(maxlen=MAX_SENT)
        self.read_marks: deque[dict[str, Any]] = deque(maxlen=MAX_SENT)  # `read` from companies
        self.presences: deque[dict[str, Any]] = deque(maxlen=MAX_SENT)  # typing states from companies
        self.media: OrderedDict[str, bytes | str] = OrderedDict()  # inbound message id -> its bytes, or a file
        self.media_faults = 0  # downloads still to refuse (control `media_fault`)
        self.latency = 0.0
        self.outage_until = 0.0
        self._fd_gen: dict[int, int] = {}
        self._closed_fds: set[int] = set()  # DISCONNECTED, and not ACCEPTED again since
        self._gens = itertools.count(1)
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._socket_inode: tuple[int, int] | None = None
        self.control_commands: dict[str, Callable[[Peer, dict[str, Any]], Result]] = {
            "ping": self._ping,
            "scan": self._scan,
            "inbound": self._inbound,
            "sent": self._sent,
            "connections": self._connections,
            "accounts": self._accounts,
            "stats": self._stats,
            "drop": self._drop,
            "logout": self._logout,
            "replace": self._replace,
            "ban": self._ban,
            "outage": self._outage,
            "media_fault": self._media_fault,
            "pending": self._pending_list,
            "latency": self._latency,
            "reads": self._reads,
            "presence": self._presence_list,
        }
        self.session_commands: dict[str, Callable[[Peer, dict[str, Any]], Result]] = {
            "hello": self._hello,
            "heartbeat": self._heartbeat,
            "send": self._send,
            "ack": self._ack,
            "pair_code": self._pair_code,
            "logout_device": self._logout_device,
            "bye": self._bye,
            "read": self._read,
            "typing": self._presence,
            "download": self._download,
        }
        self._load()

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        """Open the ROUTER socket and its monitor; refuse to steal a live ipc endpoint."""
        path = paths.ipc_path(self.endpoint)
        if path is not None:
            os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
            if _someone_listens(path):
                raise EndpointInUse(f"another server already listens on {self.endpoint}")
        self._ctx = zmq.Context()
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        router.bind(self.endpoint)
        self._router = router
        if path is not None:
            os.chmod(path, 0o660)
            st = os.stat(path)
            self._socket_inode = (st.st_dev, st.st_ino)
        self._at(SWEEP_INTERVAL, self._sweep)
        log.info("simnet listening on %s (auto-pair %s)", self.endpoint, "on" if self.auto_pair else "off")

    def run(self, stop: threading.Event | None = None) -> None:
        """Serve until `stop` is set: one poll loop, then due timers."""
        stop = stop or threading.Event()
        if self._router is None:
            self.bind()
        assert self._router is not None and self._monitor is not None
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while not stop.is_set():
                poller.poll(self._poll_timeout_ms())
                self._drain_monitor()
                self._drain_router()
                self._run_due_timers()
        finally:
            self.close()

    def close(self) -> None:
        """Close the sockets and remove the ipc socket file if it is still the one we created."""
        if self._router is not None:
            self._router.disable_monitor()
            self._router.close(0)
            self._router = None
        if self._monitor is not None:
            self._monitor.close(0)
            self._monitor = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        path = paths.ipc_path(self.endpoint)
        if path is not None and self._socket_inode is not None:
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == self._socket_inode and stat.S_ISSOCK(st.st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass
            self._socket_inode = None

    # ------------------------------------------------------------------ the loop

    def _poll_timeout_ms(self) -> int:
        if not self._timers:
            return MAX_POLL_MS
        wait = self._timers[0][0] - time.monotonic()
        return max(0, min(MAX_POLL_MS, int(wait * 1000) + 1))

    def _drain_monitor(self) -> None:
        """Track descriptor generations; a DISCONNECTED event ends the connection bound to it."""
        assert self._monitor is not None
        while readable(self._monitor):
            event = recv_monitor_message(self._monitor)
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._fd_gen[fd] = next(self._gens)
                self._closed_fds.discard(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                gen = self._fd_gen.pop(fd, None)
                self._closed_fds.add(fd)
                for conn in list(self.by_rid.values()):
                    if conn.fd == fd and conn.gen == gen and gen is not None:
                        log.info("%s: socket closed (process gone?)", conn.company)
                        self.stats.disconnects += 1
                        self._forget(conn)

    def _drain_router(self) -> None:
        assert self._router is not None
        for _ in range(BATCH):
            try:
                frames = self._router.recv_multipart(NOBLOCK, copy=False)
            except zmq.Again:
                return
            # Any DISCONNECTED/ACCEPTED that happened before this frame arrived is seen first.
            self._drain_monitor()
            self._handle(frames)

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:  # a bug must not take the network down
                log.exception("internal error in a timer")

    def _at(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn))

    def _handle(self, frames: list[zmq.Frame]) -> None:
        """Answer one request; anything malformed gets a bad_request reply, never a crash."""
        if len(frames) < 2:
            return
        at = 2 if len(frames) > 2 and not frames[1].bytes else 1  # a REQ peer's empty delimiter
        body = frames[at].bytes
        try:
            fd = int(frames[at].get(_SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            fd = -1
        peer = Peer(frames[0].bytes, [f.bytes for f in frames[:at]], fd, "", frames[at + 1:])
        try:
            req = parse_request(body)
            peer.req_id = req.id
            handler = self.control_commands.get(req.cmd) or self.session_commands.get(req.cmd)
            if handler is None:
                raise WaportError(BAD_REQUEST, f"unknown command {req.cmd[:64]!r}")
            conn = self.by_rid.get(peer.rid)
            if conn is not None:
                conn.last_seen = time.monotonic()
            result = handler(peer, req.args)
        except WaportError as exc:
            exc.extra.pop("id", None)
            peer.req_id = peer.req_id or request_id_of(body)
            if exc.code == BAD_REQUEST:
                self.stats.bad_requests += 1
            self._reply_error(peer, exc)
            return
        except Exception as exc:  # a bug must not take the network down
            log.exception("internal error handling a request")
            self._reply_error(peer, WaportError(INTERNAL, f"internal error: {exc}"))
            return
        if result is not None:
            self._reply(peer, result)

    def _reply(self, peer: Peer, result: dict[str, Any], attach: list[bytes] | None = None) -> None:
        self._send_frames(peer.envelope + [ok_reply(peer.req_id, result)] + (attach or []))

    def _reply_error(self, peer: Peer, error: WaportError) -> None:
        self._send_frames(peer.envelope + [error_reply(peer.req_id, error)])

    def _push(self, conn: Conn, event: str, data: dict[str, Any] | None = None) -> None:
        body = json.dumps({"event": event, "data": data or {}}, separators=(",", ":")).encode()
        self._send_frames([conn.rid, body])

    def _send_frames(self, frames: list[bytes]) -> None:
        assert self._router is not None
        try:
            send_frames(self._router, frames)
        except zmq.Again:  # a peer that stopped reading: drop, like a real network
            log.warning("dropped a frame for a peer that does not read")

    # ------------------------------------------------------------------ connections

    def _attach(self, peer: Peer, company: str, state: str) -> Conn:
        """Make `peer` the live connection of `company`, kicking any other one (a double session)."""
        old = self.live.get(company)
        if old is not None and old.rid != peer.rid:
            if self._socket_gone(old):
                # Its socket is gone already: a dead process, not a double session.
                self.stats.disconnects += 1
            else:
                log.warning("%s: second connection: kicking the first (replaced)", company)
                self.stats.replaced += 1
                self._push(old, "replaced")
            self._forget(old)
        previous = self.by_rid.get(peer.rid)
        if previous is not None:
            self._forget(previous)
        conn = Conn(peer.rid, company, peer.fd, self._fd_gen.get(peer.fd), state, time.monotonic())
        self.by_rid[peer.rid] = conn
        self.live[company] = conn
        return conn

    def _socket_gone(self, conn: Conn) -> bool:
        """The descriptor the connection came in on was closed (maybe reused since): a dead peer."""
        return conn.fd >= 0 and conn.gen is not None and self._fd_gen.get(conn.fd) != conn.gen

    def _forget(self, conn: Conn) -> None:
        self.by_rid.pop(conn.rid, None)
        if self.live.get(conn.company) is conn:
            del self.live[conn.company]

    def _kick(self, conn: Conn, event: str, data: dict[str, Any] | None = None) -> None:
        self._push(conn, event, data)
        self._forget(conn)

    def _session(self, peer: Peer, state: str | None = CONNECTED) -> Conn:
        conn = self.by_rid.get(peer.rid)
        if conn is None:
            raise WaportError(NOT_CONNECTED, "no live session on this connection: send hello first")
        if state is not None and conn.state != state:
            raise WaportError(NOT_CONNECTED, f"the session is {conn.state}, not {state}")
        return conn

    def _sweep(self) -> None:
        """Forget connections that went silent (a stopped process keeps its socket open)."""
        deadline = time.monotonic() - self.liveness_timeout
        for conn in list(self.by_rid.values()):
            if conn.last_seen < deadline:
                log.info("%s: silent for %g s: dropped", conn.company, self.liveness_timeout)
                self.stats.timeouts += 1
                self._kick(conn, "dropped", {"reason": "timeout"})
        self._at(SWEEP_INTERVAL, self._sweep)

    def _complete_pairing(self, conn: Conn, phone: str = "") -> dict[str, Any]:
        account = self.accounts.setdefault(conn.company, {"token": None, "phone": ""})
        account["phone"] = phone or conn.code_phone or account.get("phone") or self._new_phone()
        account["token"] = secrets.token_hex(16)
        self._save()
        conn.state, conn.qr, conn.code = CONNECTED, "", ""
        self.stats.pairings += 1
        self.stats.connects += 1
        log.info("%s: paired as %s", conn.company, account["phone"])
        self._push(conn, "paired", {"token": account["token"], "phone": account["phone"]})
        self._deliver_pending(conn)
        return account

    def _deliver_pending(self, conn: Conn) -> None:
        for msg in self.pending.get(conn.company, []):
            if msg.pop("_pushed", False):
                self.stats.redeliveries += 1
            self._push(conn, "message", _public(msg))
            msg["_pushed"] = True

    def _new_phone(self) -> str:
        self.phone_counter += 1
        return f"1555{self.phone_counter:07d}"

    def _account(self, company: str) -> dict[str, Any]:
        account = self.accounts.get(company)
        if account is None:
            raise WaportError(UNKNOWN_COMPANY, f"no account for company {company!r}", company=company)
        return account

    # ------------------------------------------------------------------ session commands

    def _hello(self, peer: Peer, args: dict[str, Any]) -> Result:
        company = validate_company(args.get("company"))
        token = args.get("token") or None
        if peer.fd in self._closed_fds:
            # Read after its socket closed (a process that said hello and died before the answer): no one
            # to connect; made live, it would look like a double session when the successor says hello.
            log.info("%s: hello from a socket already closed: no session", company)
            return None
        now = time.time()
        if now < self.outage_until:
            self.stats.outage_refusals += 1
            raise _refusal("outage", "network outage: connection refused", until=self.outage_until)
        until = self.bans.get(company, 0.0)
        if now < until:
            self.stats.refusals += 1
            raise _refusal("banned", f"company {company!r} is banned", until=until)
        if token is not None:
            account = self.accounts.get(company)
            if account is None or not account.get("token") or token != account["token"]:
                self.stats.refusals += 1
                raise _refusal("logged_out", "unknown or revoked credentials: the device is logged out")
            conn = self._attach(peer, company, CONNECTED)
            self.stats.connects += 1
            log.info("%s: connected", company)
            self._reply(peer, {"status": CONNECTED, "phone": account["phone"]})
            self._deliver_pending(conn)
            return None
        conn = self._attach(peer, company, PAIRING)
        conn.qr = "SIMQR:" + secrets.token_urlsafe(16)
        self._reply(peer, {"status": PAIRING, "qr": conn.qr})
        if self.auto_pair:
            self._complete_pairing(conn)
        return None

    def _heartbeat(self, peer: Peer, args: dict[str, Any]) -> Result:
        self._session(peer, state=None)
        return {}

    def _send(self, peer: Peer, args: dict[str, Any]) -> Result:
        conn = self._session(peer)
        to = normalize_phone(args.get("to"))
        kind = args.get("type") or "text"
        if kind not in SEND_TYPES:
            raise WaportError(BAD_REQUEST, f"unknown message type {str(kind)[:20]!r}")
        text = validate_text(args.get("text")) if kind == "text" else str(args.get("text") or "")
        msg_id = args.get("id") or "SIM" + secrets.token_hex(8).upper()
        if not isinstance(msg_id, str):
            raise WaportError(BAD_REQUEST, "field 'id' must be a string")
        ts = time.time()
        # DESIGN.md §11: every `sent` entry carries its type
        entry = {"company": conn.company, "to": to, "text": text, "id": msg_id, "ts": ts, "type": kind}
        entry.update({k: args[k] for k in SEND_FIELDS if k in args})
        if kind in MEDIA_SEND_TYPES:
            if not peer.attachments or not isinstance(args.get("mimetype"), str):
                raise WaportError(BAD_REQUEST, f"a {kind} carries its bytes after the request, and a mimetype")
            digest = hashlib.sha256()
            size = 0
            for frame in peer.attachments:
                if len(frame) > MEDIA_CHUNK:
                    raise WaportError(BAD_REQUEST, f"media frames carry at most {MEDIA_CHUNK} bytes")
                digest.update(frame.buffer)
                size += len(frame)
            entry.update(sha256=digest.hexdigest(), size=size)
        self.sent.append(entry)
        self.stats.messages_sent += 1
        company = conn.company

        def answer() -> None:
            self._reply(peer, {"id": msg_id, "ts": ts})
            self._at(RECEIPT_DELAY, lambda: self._receipt(company, msg_id, to))

        if self.latency > 0:
            self._at(self.latency, answer)
        else:
            answer()
        return None

    def _read(self, peer: Peer, args: dict[str, Any]) -> Result:
        """A company marks messages of a chat read (the phone would see blue ticks)."""
        conn = self._session(peer)
        ids = validate_message_ids(args.get("ids"))
        self.read_marks.append({"company": conn.company, "chat": normalize_phone(args.get("chat")), "ids": ids,
                                "ts": time.time()})
        return {"read": len(ids)}

    def _presence(self, peer: Peer, args: dict[str, Any]) -> Result:
        conn = self._session(peer)
        self.presences.append({"company": conn.company, "chat": normalize_phone(args.get("chat")),
                               "state": validate_presence(args.get("state")), "ts": time.time()})
        return {}

    def _reads(self, peer: Peer, args: dict[str, Any]) -> Result:
        company = args.get("company")
        return {"reads": [r for r in self.read_marks if company is None or r["company"] == company]}

    def _presence_list(self, peer: Peer, args: dict[str, Any]) -> Result:
        company = args.get("company")
        return {"presence": [p for p in self.presences if company is None or p["company"] == company]}

    def _download(self, peer: Peer, args: dict[str, Any]) -> Result:
        """The next chunk of an inbound message's media (WhatsApp's media servers, in one command)."""
        self._session(peer)
        media = self.media.get(str(args.get("id")))
        offset = args.get("offset", 0)
        if media is None:
            raise WaportError(BAD_REQUEST, "no media for that message (expired, or never sent)")
        self.stats.downloads += 1
        if self.media_faults > 0:
            self.media_faults -= 1
            raise WaportError(INTERNAL, "media server unavailable (fault)")
        size = len(media) if isinstance(media, bytes) else os.stat(media).st_size
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= size:
            raise WaportError(BAD_REQUEST, f"offset: 0-{size}")
        if isinstance(media, bytes):
            chunk = media[offset:offset + MEDIA_CHUNK]
        else:
            with open(media, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read(MEDIA_CHUNK)
        self._reply(peer, {"size": size, "offset": offset, "eof": offset + len(chunk) >= size}, [chunk])
        return None

    def _pending_list(self, peer: Peer, args: dict[str, Any]) -> Result:
        """Inbound messages the company has not acknowledged yet (they are redelivered on its next connection)."""
        company = validate_company(args.get("company"))
        return {"ids": [m["id"] for m in self.pending.get(company, [])]}

    def _media_fault(self, peer: Peer, args: dict[str, Any]) -> Result:
        count = args.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 1000:
            raise WaportError(BAD_REQUEST, "field 'count' must be 0-1000")
        self.media_faults = count
        return {"count": count}

    def _receipt(self, company: str, msg_id: str, chat: str) -> None:
        conn = self.live.get(company)
        if conn is not None:
            self._push(conn, "receipt", {"ids": [msg_id], "type": "delivered", "chat": chat})

    def _ack(self, peer: Peer, args: dict[str, Any]) -> Result:
        # By company, not by connection: the ack may come after the network forgot the connection.
        company = validate_company(args.get("company"))
        ids = args.get("ids")
        if not isinstance(ids, list):
            raise WaportError(BAD_REQUEST, "field 'ids' must be a list")
        acked = set(map(str, ids))
        queue = self.pending.get(company, [])
        self.pending[company] = [m for m in queue if m["id"] not in acked]
        if not self.pending[company]:
            del self.pending[company]
        return {}

    def _pair_code(self, peer: Peer, args: dict[str, Any]) -> Result:
        conn = self._session(peer, state=PAIRING)
        conn.code_phone = normalize_phone(args.get("phone"))
        conn.code = f"SIMPC-{secrets.randbelow(10000):04d}-{secrets.randbelow(10000):04d}"
        return {"code": conn.code}

    def _logout_device(self, peer: Peer, args: dict[str, Any]) -> Result:
        conn = self._session(peer)
        account = self.accounts.get(conn.company)
        if account is not None:
            account["token"] = None
            self._save()
        self.stats.device_logouts += 1
        self._forget(conn)
        log.info("%s: device logged out", conn.company)
        return {}

    def _bye(self, peer: Peer, args: dict[str, Any]) -> Result:
        conn = self.by_rid.get(peer.rid)
        if conn is not None:
            self._forget(conn)
        return {}

    # ------------------------------------------------------------------ control commands

    def _ping(self, peer: Peer, args: dict[str, Any]) -> Result:
        return {"pong": True, "ts": time.time()}

    def _scan(self, peer: Peer, args: dict[str, Any]) -> Result:
        qr = args.get("qr")
        if not isinstance(qr, str) or not qr:
            raise WaportError(BAD_REQUEST, "field 'qr' must be a QR code or a pair code")
        phone = normalize_phone(args["phone"]) if args.get("phone") else ""
        for conn in self.by_rid.values():
            if conn.state == PAIRING and qr in (conn.qr, conn.code):
                account = self._complete_pairing(conn, phone)
                return {"company": conn.company, "phone": account["phone"]}
        raise WaportError(BAD_REQUEST, "unknown or expired QR / pair code")

    def _inbound(self, peer: Peer, args: dict[str, Any]) -> Result:
        company = validate_company(args.get("company"))
        self._account(company)
        sender = normalize_phone(args.get("from"))
        kind = args.get("type") or "text"
        text = validate_text(args.get("text")) if kind == "text" else str(args.get("text") or "")
        msg_id = args.get("id") or "SIMIN" + secrets.token_hex(8).upper()
        push_name = args.get("push_name") or ""
        if not isinstance(msg_id, str) or not isinstance(push_name, str):
            raise WaportError(BAD_REQUEST, "fields 'id' and 'push_name' must be strings")
        msg = {"id": msg_id, "from": sender, "push_name": push_name, "text": text, "ts": time.time()}
        msg.update(self._inbound_content(msg_id, args))
        self.pending.setdefault(company, []).append(msg)
        self.stats.messages_inbound += 1
        conn = self.live.get(company)
        delivered = conn is not None and conn.state == CONNECTED
        if delivered:
            assert conn is not None
            self._push(conn, "message", _public(msg))
            msg["_pushed"] = True
        return {"id": msg_id, "delivered": delivered}

    def _inbound_content(self, msg_id: str, args: dict[str, Any]) -> dict[str, Any]:
        """The §11 extras of an inbound message; its media kept for `download` (bytes, or the caller's file)."""
        kind = args.get("type") or "text"
        out: dict[str, Any] = {k: args[k] for k in INBOUND_FIELDS if args.get(k) is not None}
        if kind == "text":
            return out
        if kind not in (*SEND_TYPES, "sticker"):
            raise WaportError(BAD_REQUEST, f"unknown message type {str(kind)[:20]!r}")
        out["type"] = kind
        if kind not in (*MEDIA_SEND_TYPES, "sticker"):
            return out
        data: bytes | str
        if isinstance(args.get("media_b64"), str):
            try:
                data = base64.b64decode(args["media_b64"], validate=True)
            except (binascii.Error, ValueError):
                raise WaportError(BAD_REQUEST, "media_b64: not base64") from None
            size, digest = len(data), hashlib.sha256(data).hexdigest()
        elif isinstance(args.get("media_path"), str) and os.path.isfile(args["media_path"]):
            data = args["media_path"]
            digest_obj = hashlib.sha256()
            with open(data, "rb") as fh:
                while chunk := fh.read(MEDIA_CHUNK):
                    digest_obj.update(chunk)
            size, digest = os.stat(data).st_size, digest_obj.hexdigest()
        else:
            raise WaportError(BAD_REQUEST, f"a {kind} needs media_b64 or media_path (a readable file)")
        announced = args.get("size", size)  # a test may announce a size the bytes do not have
        if not isinstance(announced, int) or isinstance(announced, bool) or announced < 0:
            raise WaportError(BAD_REQUEST, "size: a whole number of bytes")
        self.media[msg_id] = data
        while len(self.media) > MAX_MEDIA:
            self.media.popitem(last=False)
        out["media"] = {"mimetype": str(args.get("mimetype") or "application/octet-stream"), "size": announced,
                        "sha256": digest}
        if isinstance(args.get("filename"), str):
            out["media"]["filename"] = args["filename"]
        return out

    def _sent(self, peer: Peer, args: dict[str, Any]) -> Result:
        company = args.get("company")
        if company is not None:
            validate_company(company)
        return {"messages": [m for m in self.sent if company is None or m["company"] == company]}

    def _connections(self, peer: Peer, args: dict[str, Any]) -> Result:
        return {
            "connections": {company: 1 for company in self.live},
            "states": {company: conn.state for company, conn in self.live.items()},
        }

    def _accounts(self, peer: Peer, args: dict[str, Any]) -> Result:
        return {
            "accounts": {
                company: {"phone": a["phone"], "linked": bool(a.get("token"))} for company, a in self.accounts.items()
            }
        }

    def _stats(self, peer: Peer, args: dict[str, Any]) -> Result:
        return {"stats": self.stats.as_dict(live=len(self.live))}

    def _live_conn(self, args: dict[str, Any], state: str | None = None) -> Conn:
        company = validate_company(args.get("company"))
        conn = self.live.get(company)
        if conn is None or (state is not None and conn.state != state):
            raise WaportError(NOT_CONNECTED, f"company {company!r} has no live {state or ''} connection")
        return conn

    def _drop(self, peer: Peer, args: dict[str, Any]) -> Result:
        conn = self._live_conn(args)
        self.stats.drops += 1
        self._kick(conn, "dropped", {"reason": "fault"})
        return {"company": conn.company}

    def _logout(self, peer: Peer, args: dict[str, Any]) -> Result:
        company = validate_company(args.get("company"))
        account = self._account(company)
        account["token"] = None
        self._save()
        self.stats.logouts += 1
        conn = self.live.get(company)
        kicked = conn is not None and conn.state == CONNECTED
        if kicked:
            assert conn is not None
            self._kick(conn, "logged_out")
        return {"company": company, "kicked": kicked}

    def _replace(self, peer: Peer, args: dict[str, Any]) -> Result:
        conn = self._live_conn(args, state=CONNECTED)
        self.stats.replace_faults += 1
        self._kick(conn, "replaced")
        return {"company": conn.company}

    def _ban(self, peer: Peer, args: dict[str, Any]) -> Result:
        company = validate_company(args.get("company"))
        until = time.time() + _seconds(args, "seconds")
        self.bans[company] = until
        self._save()
        self.stats.bans += 1
        conn = self.live.get(company)
        if conn is not None:
            self._kick(conn, "banned", {"until": until})
        return {"company": company, "until": until, "kicked": conn is not None}

    def _outage(self, peer: Peer, args: dict[str, Any]) -> Result:
        self.outage_until = time.time() + _seconds(args, "seconds")
        dropped = list(self.live.values())
        for conn in dropped:
            self.stats.drops += 1
            self._kick(conn, "dropped", {"reason": "outage"})
        log.info("outage until %.3f: %d connections dropped", self.outage_until, len(dropped))
        return {"until": self.outage_until, "dropped": len(dropped)}

    def _latency(self, peer: Peer, args: dict[str, Any]) -> Result:
        ms = args.get("ms")
        if not isinstance(ms, int | float) or isinstance(ms, bool) or not 0 <= ms <= 60_000:
            raise WaportError(BAD_REQUEST, "field 'ms' must be a number of milliseconds, 0-60000")
        self.latency = ms / 1000
        return {"ms": ms}

    # ------------------------------------------------------------------ persistence

    def _load(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        try:
            with open(os.path.join(self.state_dir, STATE_FILE), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        self.accounts = dict(data.get("accounts", {}))
        self.bans = {k: float(v) for k, v in data.get("bans", {}).items() if float(v) > time.time()}
        self.phone_counter = int(data.get("phone_counter", 0))

    def _save(self) -> None:
        data = {"accounts": self.accounts, "bans": self.bans, "phone_counter": self.phone_counter}
        write_json_atomic(os.path.join(self.state_dir, STATE_FILE), data, indent=1, sort_keys=True)


def _public(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if not k.startswith("_")}


def _refusal(reason: str, message: str, **extra: Any) -> WaportError:
    return WaportError(NOT_CONNECTED, message, reason=reason, **extra)


def _seconds(args: dict[str, Any], name: str) -> float:
    value = args.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 86_400 * 365:
        raise WaportError(BAD_REQUEST, f"field {name!r} must be a number of seconds >= 0")
    return float(value)


def _someone_listens(path: str) -> bool:
    """True if a process accepts connections on the unix socket at `path` (a stale file: False)."""
    if not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def main(argv: list[str] | None = None) -> int:
    """`waport-simnet --endpoint ENDPOINT --state-dir DIR [--auto-pair]`; SIGTERM/SIGINT exit 0."""
    parser = argparse.ArgumentParser(prog="waport-simnet", description="The simulated WhatsApp network.")
    parser.add_argument("--endpoint", required=True, help="ZeroMQ endpoint, e.g. ipc:///run/waport/simnet.sock")
    parser.add_argument("--state-dir", required=True, help="where accounts persist")
    parser.add_argument("--auto-pair", action="store_true", help="pair every QR at once")
    parser.add_argument(
        "--liveness-timeout",
        type=float,
        default=LIVENESS_TIMEOUT,
        help="seconds of silence after which a connection is dropped (default %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARN", "WARNING", "ERROR", "CRITICAL"])
    args = parser.parse_args(argv)
    log_to_stderr(args.log_level, "simnet")  # the one format of every process of ours (ipc/logfmt.py)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        net = SimNet(args.endpoint, args.state_dir, args.auto_pair, args.liveness_timeout)
        net.bind()
    except (EndpointInUse, zmq.ZMQError, OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    net.run(stop)
    log.info("simnet stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
