"""The worker process: one company, one session, one backend.

It holds the session lock it inherited, connects a DEALER to the supervisor,
says READY, heartbeats both ways, turns supervisor requests into backend calls
and backend reports into events, and exits with a code that says why
(`ipc.exitcodes`). It dies with its supervisor: PR_SET_PDEATHSIG, a parent
check, and supervisor heartbeats; in cluster mode it also stops its session
before the lease deadline the heartbeats carry (`workers.fencing`).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import logging
import os
import queue
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import zmq

from ipc import exitcodes, protocol, states
from ipc.errors import BAD_REQUEST, INTERNAL, NOT_FOUND, TIMEOUT, WaportError
from ipc.journal import Journal, extra_fields, public_inbound
from ipc.mediastore import DEFAULT_MAX_BYTES, MediaStore
from ipc.validation import normalize_phone, validate_message_ids, validate_presence
from ipc.zsocket import NOBLOCK, readable, send_frames
from workers import logforward
from workers.backend import Backend, BackendError, WorkerContext
from workers.backends import load
from workers.fencing import Fence
from workers.mediafetch import PENDING, MediaFetcher, is_pending
from workers.outbox import IDLE_CLOSE, InlineSender, Sender, journal_write_failed
from workers.wakeup import Wakeup

log = logging.getLogger("waport.worker")

PR_SET_PDEATHSIG = 1
MISSED_HEARTBEATS = 3
REDELIVER_AFTER = 5.0  # seconds an inbound message may wait for its ACK before it is sent again
IN_FLIGHT_GRACE = 3.0  # seconds shutdown waits for requests still running, so their replies go out
OUTCOMES = ("sent", "send_failed")  # still reported after the exit report: they are true, and callers wait


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies; then check it did not die already."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if parent_pid and os.getppid() != parent_pid:
        sys.exit(exitcodes.SUPERVISOR_LOST)


def hold_session_lock(lock_fd: int | None, session_dir: str) -> int:
    """Hold the session lock: the inherited descriptor, or our own when run by hand."""
    if lock_fd is None:
        lock_fd = os.open(os.path.join(session_dir, "session.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.error("session lock %s/session.lock is held by another process", session_dir)
        sys.exit(exitcodes.SESSION_LOCKED)
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    return lock_fd


def journal_opener(company: str, session_dir: str, options: dict[str, Any], sync: str) -> Callable[[], Any]:
    """What opens this worker's journal (once for its loop, once more for a sending thread): the session's
    SQLite file, or in cluster mode (options cluster_dsn and epoch) the company's rows in PostgreSQL, each
    connection named for the company and epoch so a new owner can end it (DESIGN.md §12)."""
    dsn, epoch = options.get("cluster_dsn"), options.get("epoch")
    if not dsn:
        return lambda: Journal.in_session(session_dir, sync=sync)
    if not isinstance(dsn, str) or not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise ValueError("cluster mode needs the options cluster_dsn (a PostgreSQL URL) and epoch (an integer >= 1)")
    from ipc.clusterschema import application_name
    from ipc.pgdb import PgDb
    from ipc.pgjournal import PgJournal

    return lambda: PgJournal(PgDb(dsn, application_name(company, epoch)), company, epoch)


def media_store(company: str, options: dict[str, Any]) -> MediaStore | None:
    """The media store the supervisor named (option media_dir); in cluster mode (cluster_dsn and epoch, as
    `journal_opener` checks them) the one in PostgreSQL, that directory its cache: an inbound file this worker
    downloads is there for any host, and a file sent through another host is fetched before it is sent."""
    root = options.get("media_dir")
    if not root:
        return None
    max_bytes = int(options.get("media_max_bytes") or DEFAULT_MAX_BYTES)
    dsn, epoch = options.get("cluster_dsn"), options.get("epoch")
    if not dsn:
        return MediaStore(root, max_bytes)
    from ipc.clusterschema import application_name
    from ipc.pgdb import PgDb
    from ipc.pgmediastore import PgMediaStore

    return PgMediaStore(root, max_bytes, PgDb(dsn, application_name(company, epoch)))


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.company: str = args.company
        self.generation: int = args.generation
        self.parent_pid: int = args.parent_pid
        self.heartbeat_interval: float = args.heartbeat_interval
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, protocol.routing_id(self.company, self.generation))
        self.sock.setsockopt(zmq.LINGER, 2000)
        # `--endpoint none`: run without a supervisor (another process manager, or a benchmark).
        self.standalone = args.endpoint == "none"
        self.sock.connect("inproc://waport-standalone" if self.standalone else args.endpoint)
        self.wakeup = Wakeup()
        self.loop_thread = threading.get_ident()
        self.reports: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self.replies: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="request")
        self.in_flight: set[Future[None]] = set()
        self.state = states.STARTING
        self.exit: dict[str, Any] | None = None
        self.stop_signal: int | None = None
        self.last_supervisor = time.monotonic()
        self.fence = Fence()  # the newest lease deadline heard (cluster mode); none: no fencing
        self.malformed = 0
        options = json.loads(args.options or "{}")
        options.update(json.loads(os.environ.pop(protocol.SECRETS_ENV, "") or "{}"))  # kept out of argv
        context = WorkerContext(self.company, args.session_dir, options)
        self.backend: Backend = load(args.backend)(context, self.emit)
        sync = "full" if options.get("journal_sync") == "full" else "normal"
        open_journal = journal_opener(self.company, args.session_dir, options, sync)
        self.journal = open_journal()
        self.media = media_store(self.company, options)
        self.fetcher = MediaFetcher(self.company, self.backend, self.media, lambda msg: self.emit("media_fetched", msg))
        self.inline = self.backend.runs_inline  # its connection runs in this loop: no thread hand-offs
        self.sender: Sender | InlineSender = (
            InlineSender(self.journal, self.backend, self.emit, self.media) if self.inline
            else Sender(open_journal, self.backend, self.emit, self.media))
        self.duplicates = 0
        self.queued = 0  # the journal's pending sends, as last counted (each heartbeat tells the supervisor)
        self.recount = True
        # Inbound messages journaled but maybe not acknowledged: the redelivery query runs only while some may
        # be (a query per heartbeat per worker is 180/s for 900 idle companies on a shared PostgreSQL).
        self.unacked = True
        self.last_inbound = 0.0
        # The fallback look at the queue: every heartbeat on SQLite (a local read); in cluster mode every 5 min
        # (each send is nudged anyway, and a new owner's first look takes what the dead host had accepted),
        # so an idle company's connection closes (IDLE_CLOSE) instead of being kept open by the looks.
        self.look_every = 300.0 if options.get("cluster_dsn") else 0.0
        self.next_look = 0.0
        self.deferred: list[tuple[str, dict[str, Any]]] = []  # reports not journaled yet (a full disk)

    # Thread-safe entry points: they only enqueue and wake the loop.
    def emit(self, type_: str, data: dict[str, Any]) -> None:
        self.reports.put((type_, data))
        if threading.get_ident() != self.loop_thread:
            self.wakeup.poke()  # on the loop's own thread the turn ends with flush_reports anyway

    def on_signal(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum
        self.wakeup.poke()

    def run(self) -> int:
        self.send(protocol.READY, {"company": self.company, "pid": os.getpid(),
                                   "generation": self.generation, "version": protocol.VERSION})
        self.sender.start()
        self.backend.start()  # inline: on this thread, and this loop drives it from here on
        for msg in self.journal.undelivered(received_before=time.time(), limit=10_000, downloading=True):
            self.fetcher.submit(msg)  # a predecessor ended while it downloaded these
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.wakeup.r, zmq.POLLIN)
        polled: list[Any] = []  # the backend's sockets in the poller (its connection changes on reconnects)
        next_beat = 0.0
        wait = 0.0
        while self.exit is None and self.stop_signal is None:
            now = time.monotonic()
            if self.fenced(now):
                break
            if now >= next_beat:
                self.heartbeat(now)
                self.retry_deferred()
                if self.unacked:
                    self.redeliver()
                next_beat = now + protocol.aligned_delay(self.heartbeat_interval)
                if now >= self.next_look:  # a fallback look at the queue (a nudge is never needed for it)
                    self.next_look = now + self.look_every
                    self.sender.nudge()
            polled = self.repoll(poller, polled)
            now = time.monotonic()
            fence_in = self.fence.seconds_left(now)  # the loop wakes in time to fence, even if nothing arrives
            timeout = min(next_beat - now, wait, 3600.0 if fence_in is None else fence_in)
            ready = dict(poller.poll(max(0, int(timeout * 1000)) + 1))
            if self.sock in ready:
                self.read_supervisor()
                if self.fenced(time.monotonic()):  # a deadline already due: no backend turn, no window
                    break
            if self.wakeup.r in ready:
                self.wakeup.drain()
            wait = self.step_backend(ready, time.monotonic())
            self.flush_reports()
        return self.shutdown()

    def repoll(self, poller: zmq.Poller, polled: list[Any]) -> list[Any]:
        current = self.backend.loop_sockets()
        if current != polled:
            for item in polled:
                poller.unregister(item)
            for item in current:
                poller.register(item, zmq.POLLIN)
        return current

    def step_backend(self, ready: dict[Any, int], now: float) -> float:
        """The inline backend's turn and the sender's; the seconds until either needs the next one."""
        if not isinstance(self.sender, InlineSender):  # a threaded backend and sender keep their own time
            return 3600.0
        waits = [self.backend.loop_step(ready), self.sender.tick(now)]
        return min([w for w in waits if w is not None] or [3600.0])

    def heartbeat(self, now: float) -> None:
        if self.parent_pid and os.getppid() != self.parent_pid:
            self.exit = {"reason": "supervisor_lost", "message": "supervisor process is gone"}
            return
        if not self.standalone and now - self.last_supervisor > MISSED_HEARTBEATS * self.heartbeat_interval:
            self.exit = {"reason": "supervisor_lost", "message": "no heartbeat from the supervisor"}
            return
        if self.recount:  # counted again only after sends were queued or settled: an idle worker reads nothing
            try:
                self.queued, self.recount = self.journal.pending(), False
            except sqlite3.Error as exc:  # PostgreSQL away for a moment (cluster mode): the last count will do
                log.debug("queued count unavailable: %s", exc)
        self.send(protocol.HEARTBEAT, {"state": self.state, "queued": self.queued})
        self.journal.close_if_idle(IDLE_CLOSE)  # cluster mode: an idle company holds no connection
        if self.media is not None:
            self.media.close_if_idle(IDLE_CLOSE)

    def fenced(self, now: float) -> bool:
        """The fence decision: near the lease deadline with no newer one, the session ends (exit `fenced`)."""
        if not self.fence.due(now):
            return False
        self.sender.halt()  # no new window from here on
        deadline = self.fence.deadline
        assert deadline is not None
        message = (f"no newer lease deadline from the supervisor; {deadline - now:.2f} s left of the lease "
                   f"(fence margin {self.fence.margin:.1f} s)")
        log.warning("fenced: %s; stopping the session before the lease can expire", message)
        self.exit = {"reason": "fenced", "message": message}
        return True

    def retry_deferred(self) -> None:
        """Reports whose journal write failed (a full disk) are tried again, in their order."""
        deferred, self.deferred = self.deferred, []
        for report in deferred:
            self.reports.put(report)

    def redeliver(self) -> None:
        """Inbound messages no sink has acknowledged go out again (after a crash, or a Redis outage)."""
        now = time.time()
        try:
            waiting = self.journal.undelivered(received_before=now - REDELIVER_AFTER)
            # Nothing waits, and nothing new came since the query's cut-off: no need to ask again until then.
            self.unacked = bool(waiting) or self.last_inbound >= now - REDELIVER_AFTER
        except sqlite3.Error as exc:  # the journal cannot be read now: the next round tries again
            journal_write_failed(exc)
            return
        self.send_events([{"type": "message", "ts": now, "data": public_inbound(msg)} for msg in waiting])

    def read_supervisor(self) -> None:
        while readable(self.sock):  # one message a turn is usual here: asking beats a failed read
            frames = self.sock.recv_multipart(NOBLOCK)
            try:
                msg = protocol.decode(frames)
            except protocol.ProtocolError as exc:
                self.malformed += 1
                log.warning("dropped a malformed frame from the supervisor: %s", exc)
                continue
            self.last_supervisor = time.monotonic()
            if msg.dropped:
                self.malformed += msg.dropped
                log.warning("dropped a malformed %s from a %s frame", protocol.LEASE_DEADLINE, msg.type)
            if msg.type == protocol.HEARTBEAT:
                self.fence.heard(msg.body.get(protocol.LEASE_DEADLINE))
            elif msg.type == protocol.REQUEST:
                fut = self.pool.submit(self.serve, msg.body)
                self.in_flight.add(fut)
                fut.add_done_callback(self.in_flight.discard)
            elif msg.type == protocol.STOP:
                self.exit = {"reason": "stopped", "message": msg.body.get("reason", "")}
            elif msg.type == protocol.OUTBOX:
                self.recount = True
                self.sender.nudge()
            elif msg.type == protocol.ACK:
                try:
                    self.journal.delivered([i for i in msg.body["ids"] if isinstance(i, str)])
                except sqlite3.Error as exc:  # not marked: redelivered later, and the sinks drop the copy
                    journal_write_failed(exc)

    def flush_reports(self) -> None:
        while not self.replies.empty():
            self.send_raw(self.replies.get_nowait())  # only this thread takes from the queues
        batch: list[dict[str, Any]] = []
        journaled: list[str] = []  # inbound ids now in the journal: the backend may acknowledge them
        while not self.reports.empty():
            type_, data = self.reports.get_nowait()
            if type_ == "exit":
                self.exit = self.exit or data  # the first exit report wins
                continue
            if type_ in OUTCOMES:
                self.recount = True
            if self.exit is not None and type_ not in OUTCOMES:
                if type_ == "message":  # journaled, so the network may forget it: the successor delivers it
                    try:
                        self.journal.inbox_add(data)
                        journaled.append(data["id"])
                    except sqlite3.Error as exc:  # not acknowledged: the network redelivers it to the successor
                        journal_write_failed(exc)
                continue
            try:
                item = self.journal_report(type_, data, journaled)
            except sqlite3.Error as exc:  # a full disk: not journaled, so not acknowledged; again soon
                self.deferred.append((type_, data))
                journal_write_failed(exc)
                continue
            if item is not None:
                batch.append(item)
        if journaled:
            self.backend.journaled(journaled)
        self.send_events(batch)

    def journal_report(self, type_: str, data: dict[str, Any], journaled: list[str]) -> dict[str, Any] | None:
        """One backend report: journaled first where it must be, then the event to publish (None: none)."""
        if type_ == "state":
            self.state = data.get("state", self.state)
            self.sender.nudge(connected=self.state == states.CONNECTED)
        elif type_ == "message":
            if isinstance(data.get("media"), dict):
                data["media"] = {**data["media"], "status": PENDING}
            added = self.journal.inbox_add(data)
            journaled.append(data["id"])
            self.unacked, self.last_inbound = True, time.time()
            if not added:
                self.duplicates += 1  # a redelivery by the network: journaled once, delivered once
                log.debug("dropped a duplicate of inbound message %s", data.get("id"))
                return None
            if is_pending(data):
                self.fetcher.submit(data)  # published once its media is stored, or has failed
                return None
            data = public_inbound(data)
        elif type_ == "media_fetched":
            self.journal.set_inbound_fields(data["id"], extra_fields(data))
            type_, data = "message", public_inbound(data)
        return {"type": type_, "ts": time.time(), "data": data}

    def serve(self, body: dict[str, Any]) -> None:
        """Run one supervisor request on a pool thread; the reply goes back through the loop."""
        req_id = body["id"]
        try:
            if time.time() > body["deadline"]:
                raise WaportError(TIMEOUT, "request expired before the worker could run it")
            result = self.dispatch(body["cmd"], body["args"])
            reply = {"id": req_id, "ok": True, "result": result}
        except WaportError as exc:
            reply = {"id": req_id, "ok": False, "error": exc.to_dict()}
        except BackendError as exc:
            reply = {"id": req_id, "ok": False, "error": {"code": exc.code, "message": exc.message}}
        except Exception as exc:  # noqa: BLE001 - a failed request must not kill the session
            log.exception("request %s failed", body["cmd"])
            reply = {"id": req_id, "ok": False, "error": {"code": INTERNAL, "message": str(exc)}}
        self.replies.put(protocol.encode(protocol.REPLY, reply))
        self.wakeup.poke()

    def dispatch(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        if cmd == "pair_code":
            return {"code": self.backend.pair_code(normalize_phone(args.get("phone")))}
        if cmd == "logout":
            self.backend.logout()
            # Backends report it too; the first exit report wins, so this only covers one that did not.
            self.emit("exit", {"reason": "logged_out", "message": "logged out on request"})
            return {"logged_out": True}
        if cmd == "read":
            chat, ids = normalize_phone(args.get("chat")), validate_message_ids(args.get("message_ids"))
            self.backend.mark_read(chat, ids, self.journal.senders(ids))
            return {"chat": chat, "read": len(ids)}
        if cmd == "typing":
            chat, state = normalize_phone(args.get("chat")), validate_presence(args.get("state", "composing"))
            self.backend.typing(chat, state)
            return {"chat": chat, "state": state}
        if cmd == "media_fetch":
            return self.fetch_again(args.get("message_id"))
        if cmd == "ping":
            return {"pong": True, "state": self.state}
        raise WaportError(BAD_REQUEST, f"unknown worker command {cmd!r}")

    def fetch_again(self, msg_id: Any) -> dict[str, Any]:
        """`waportctl media fetch`: download a journaled message's media once more (it failed, or was pruned)."""
        msg = self.journal.inbound(msg_id) if isinstance(msg_id, str) else None
        if msg is None:
            raise WaportError(NOT_FOUND, f"no inbound message {str(msg_id)[:40]!r} in {self.company}'s journal")
        if not isinstance(msg.get("media"), dict):
            raise WaportError(BAD_REQUEST, f"message {msg_id} carries no media")
        media = self.fetcher.fetch(msg)
        self.journal.set_inbound_fields(msg_id, extra_fields({**msg, "media": media}))
        return {"company": self.company, "message_id": msg_id, "media": media}

    def send(self, type_: str, body: dict[str, Any]) -> None:
        self.send_raw(protocol.encode(type_, body))

    def send_events(self, bodies: list[dict[str, Any]]) -> None:
        for frames in protocol.encode_events(bodies):  # in order, batched: a window's 32 outcomes in one frame
            self.send_raw(frames)

    def send_raw(self, frames: list[bytes]) -> None:
        if self.standalone:
            return
        try:
            send_frames(self.sock, frames)
        except zmq.Again:
            log.warning("supervisor socket full; dropped a %s frame", frames[1].decode())

    def window_grace(self) -> float:
        """How long a window in flight may take to be answered: when fenced, half of what is left of the
        lease, so the backend's connection ends before the deadline."""
        if self.exit is None or self.exit.get("reason") != "fenced" or self.fence.deadline is None:
            return 5.0
        return max(0.0, min(5.0, (self.fence.deadline - time.monotonic()) / 2))

    def shutdown(self) -> int:
        """Stop the backend, tell the supervisor why, and pick the exit code."""
        info = self.exit or {"reason": "stopped", "message": f"signal {self.stop_signal}"}
        code = exitcodes.REASON_TO_CODE.get(info.get("reason", "crash"), exitcodes.CRASH)
        self.sender.stop(self.window_grace())
        self.fetcher.stop()
        try:
            self.backend.stop()
        except Exception:  # noqa: BLE001
            log.exception("backend stop failed")
        # A request that caused the exit (logout) answers after it: let it, briefly, so the caller hears.
        wait_futures(list(self.in_flight), timeout=IN_FLIGHT_GRACE)
        self.flush_reports()
        self.send(protocol.EVENT, {"type": "exit", "ts": time.time(), "data": {**info, "code": code}})
        self.pool.shutdown(wait=False, cancel_futures=True)
        # Frames still queued (the reply, the exit event) go out before we do: a worker forked from
        # the fork server leaves through os._exit, which would drop them.
        self.sock.close(linger=1000)
        self.ctx.destroy(linger=1000)
        return code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="waport-worker", description="one waport worker (spawned by waportd)")
    p.add_argument("--company", required=True)
    p.add_argument("--generation", type=int, default=1)
    p.add_argument("--endpoint", required=True, help="the supervisor's workers.sock endpoint, or `none`")
    p.add_argument("--session-dir", required=True)
    p.add_argument("--backend", default="sim")
    p.add_argument("--lock-fd", type=int, default=None)
    p.add_argument("--parent-pid", type=int, default=0)
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--options", default="{}", help="backend options as JSON")
    p.add_argument("--log-level", default="info")
    p.add_argument("--nice", type=int, default=0, help="added to the inherited nice value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logforward.setup(args.company, args.log_level)  # stderr until the worker loop can forward
    die_with_parent(args.parent_pid)
    if args.nice:
        os.nice(args.nice)  # the supervisor's loop (heartbeats, accepts) runs before a busy worker
    # Terminal Ctrl-C is the supervisor's to handle; it stops us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.makedirs(args.session_dir, mode=0o700, exist_ok=True)
        hold_session_lock(args.lock_fd, args.session_dir)
        worker = Worker(args)
    except (ValueError, OSError) as exc:
        log.error("cannot start: %s", exc)
        sys.exit(exitcodes.USAGE)
    signal.signal(signal.SIGTERM, worker.on_signal)
    # Log records become LOG frames that the loop sends (replies are flushed even at shutdown).
    logforward.attach(lambda frames: (worker.replies.put(frames), worker.wakeup.poke()))
    try:
        code = worker.run()
    finally:
        logforward.detach()  # what follows (a crash's traceback too) goes to stderr: the loop is gone
    sys.exit(code)
