"""One company on this host, its whole life: the session record, the worker process, the session
lock, when it next starts, and everything waiting on the worker (requests, exits).

Modelled on supervisord's `Subprocess` and circus's `Watcher`: the arbiter's loop only tells a
company what happened (a frame, an exit, a timer, a heartbeat tick); the company decides through
the pure rules (`transitions`, `session.exit_outcome`, `backoff`) and acts through `Services`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipc import events, exitcodes, paths, protocol
from ipc.errors import NOT_CONNECTED, TIMEOUT
from ipc.files import make_dir
from ipc.logfmt import About
from ipc.states import ALIVE, BACKOFF, BANNED, CONNECTED, DISCONNECTED, STARTING, STOPPED, STOPPING, WORKER_REPORTED
from waportd import process
from waportd.locks import FileLock, LockBusy
from waportd.services import Child, Services
from waportd.session import Session, exit_outcome
from waportd.transitions import InvalidTransition

log = logging.getLogger("waport.arbiter")

MISSED_HEARTBEATS = 3
STARTUP_GRACE = 10.0  # extra seconds a fresh worker gets for its first READY
LOCK_RETRY = 0.5  # seconds between two tries for a session lock another process holds
ABORT_GRACE = 2.0  # SIGABRT -> SIGKILL for a hung worker

Reply = Callable[[dict[str, Any]], None]
# Timer kinds (`Timers` entries are (when, company, (kind, token))).
DUE, KILL, REQUEST = "due", "kill", "request"


@dataclass
class Worker:
    """The live process of one session, and what the supervisor has asked of it."""

    child: Child
    generation: int
    routing_id: bytes  # its DEALER's identity on the workers socket: <company>/<generation>
    last_heartbeat: float  # monotonic
    ready: bool = False  # READY heard: it takes requests and heartbeats
    stop_requested: bool = False
    keep_lock: bool = False  # stopped to start again at once (restart): the session lock stays ours
    kill_due: float | None = None  # monotonic: SIGKILL if still alive then
    killed_reason: str | None = None  # we ended it ourselves (hung, health check): the exit's reason
    exit_info: dict[str, Any] | None = None  # its own last word (`exit` event), if it said one
    mismatched: bool = False  # speaks another protocol version: nothing it says is read

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def ending(self) -> bool:
        """Already on its way out: liveness checks leave it alone."""
        return self.stop_requested or self.killed_reason is not None


@dataclass
class WorkerRequest:
    deadline: float  # monotonic
    on_reply: Reply


def no_lease_deadline() -> float | None:
    """Single-host mode: heartbeats carry no lease deadline, and the worker never fences."""
    return None


@dataclass
class Company:
    name: str
    services: Services
    session: Session = field(init=False)
    worker: Worker | None = None
    lock: FileLock | None = None  # the session lock, held from the first spawn until stop or delete
    due: float | None = None  # monotonic: start (again) then — backoff, ban expiry, lock retry, boot
    requests: dict[str, WorkerRequest] = field(default_factory=dict)
    exit_waiters: list[Callable[[], None]] = field(default_factory=list)
    restarting: bool = False  # a restart waits for the worker to go; a stop meanwhile cancels it
    proxy: str | None = None  # this company's own proxy ("": direct), kept with the desired state; None: the config's
    # Cluster mode (waportd/cluster.py sets it): the monotonic moment the worker must have stopped by,
    # sent with each heartbeat so the worker fences itself even when this process is frozen.
    lease_deadline: Callable[[], float | None] = no_lease_deadline
    # Cluster mode (waportd/cluster.py sets it on acquiring the lease): the epoch the worker writes with,
    # passed to it with the cluster's DSN (a secret); None: one host, credentials in the session directory.
    cluster_epoch: int | None = None

    def __post_init__(self) -> None:
        self.session = Session(self.name, since=self.services.clock.time())
        self.log = About(log, self.name)  # its records carry the company (journald's WAPORT_COMPANY)

    # ------------------------------------------------------------ facts

    @property
    def state(self) -> str:
        return self.session.state

    @property
    def ready(self) -> bool:
        return self.worker is not None and self.worker.ready

    @property
    def session_dir(self) -> str:
        return os.path.join(self.services.cfg.state_dir, "sessions", self.name)

    def record(self) -> dict[str, Any]:
        return self.session.record()

    # ------------------------------------------------------------ state

    def set_state(self, state: str, reason: str = "") -> bool:
        """Move to `state` if the table allows it, and say so (log, events, mirror); a refusal is a bug
        somewhere: logged and counted, and the state stays."""
        s, sv = self.session, self.services
        before = s.state
        try:
            if not s.set_state(state, reason, sv.clock.time()):
                return False
        except InvalidTransition as exc:
            sv.counters[("refused_transition", before, state)] += 1
            self.log.error("%s: refused state change %s (%s)", self.name, exc, reason or "no reason")
            return False
        self.log.info("%s: %s -> %s%s", self.name, before, state, f" ({reason})" if reason else "",
                      extra={"event": "state"})
        sv.publish(self.name, events.STATE, {"state": state, "previous": before, "reason": reason, "pid": s.pid,
                                             "next_restart_at": s.next_restart_at}, None)
        sv.mirror(self.name, s.record())
        if state == CONNECTED:
            sv.publish(self.name, events.CONNECTED, {"phone": s.phone}, None)
        elif state == DISCONNECTED:
            sv.publish(self.name, events.DISCONNECTED, {"reason": reason}, None)
        elif state in (events.LOGGED_OUT, events.REPLACED):
            sv.publish(self.name, state, {"reason": reason}, None)
        sv.counters[("transition", state)] += 1
        return True

    # ------------------------------------------------------------ starting

    def start(self, paced: bool = False) -> None:
        """A start someone asked for: a fresh failure count; nothing if a worker already runs. `paced`: at
        the next turns, a batch at a time (a cluster host claiming hundreds at once keeps its loop turning)."""
        if self.worker is None and self.state not in ALIVE:
            self.session.failures = 0
            if paced:
                self.queue_start()
            else:
                self.spawn()

    def queue_start(self) -> None:
        """Start at the next turns, paced with the others (boot): the sockets answer meanwhile."""
        self.session.reason = "queued for start"
        self.schedule(self.services.clock.monotonic())

    def schedule(self, when: float) -> None:
        self.due = when
        self.services.timers.at(when, self.name, (DUE, None))

    def spawn(self) -> None:
        """Start the worker once the session lock is ours; else wait for whoever holds it."""
        sv, s = self.services, self.session
        self.due = None
        if sv.shutting_down:
            return
        try:
            if self.lock is None:
                make_dir(self.session_dir, 0o700)
                lock = FileLock(os.path.join(self.session_dir, "session.lock"))
                try:
                    lock.acquire()
                except LockBusy as exc:
                    self.set_state(STARTING, f"waiting for the session lock held by pid {exc.holder}")
                    self.schedule(sv.clock.monotonic() + LOCK_RETRY)
                    return
                self.lock = lock
            generation = next(sv.generations)
            assert self.lock.fd is not None
            child = sv.spawner.spawn_worker(self.worker_args(generation), self.lock.fd, self.worker_secrets())
        except OSError as exc:  # no fork server, no descriptors left, a full disk: a failed run, backed off
            self.log.error("%s: spawn failed: %s", self.name, exc)
            self.set_state(STARTING, "spawn failed")
            self.exited(127, {"reason": "spawn failed", "message": str(exc)})
            return
        self.worker = Worker(child, generation, protocol.routing_id(self.name, generation),
                             last_heartbeat=sv.clock.monotonic())
        s.pid, s.spawned_at = child.pid, sv.clock.time()
        self.set_state(STARTING, "")

    def worker_args(self, generation: int) -> list[str]:
        cfg = self.services.cfg
        options: dict[str, Any] = {"sim_endpoint": self.services.sim_endpoint, "pairing_timeout": cfg.pairing_timeout,
                                   "media_dir": os.path.join(cfg.state_dir, "media"),
                                   "media_max_bytes": cfg.media_max_bytes, "journal_sync": cfg.journal_sync}
        if cfg.backend == "neonize":
            options["connect_timeout"] = cfg.connect_timeout
        if cfg.backend == "sim":
            options.update(cfg.sim_options)  # test knobs of the sim backend (e.g. grow_bytes_per_s)
        if self.cluster_epoch is not None:
            options["epoch"] = self.cluster_epoch  # its writes carry it; cluster_dsn is among the secrets
        return process.worker_args(
            self.name, generation, paths.endpoint(cfg.run_dir, paths.WORKERS_SOCK), self.session_dir,
            cfg.backend, cfg.heartbeat_interval, options, cfg.log_level, cfg.worker_nice,
        )  # fmt: skip

    def worker_secrets(self) -> dict[str, Any]:
        """Options kept out of the worker's arguments: the proxy and the cluster's DSN (their URLs may hold
        a password)."""
        cfg = self.services.cfg
        proxy = cfg.proxy if self.proxy is None else self.proxy
        secrets: dict[str, Any] = {"proxy": proxy} if proxy else {}
        if self.cluster_epoch is not None and cfg.cluster_dsn:
            secrets["cluster_dsn"] = cfg.cluster_dsn
        return secrets

    # ------------------------------------------------------------ stopping

    def stop(self) -> None:
        """A stop someone asked for: the worker ends in order, the lock is released, nothing restarts
        (a restart still waiting for the worker to go is cancelled)."""
        self.due, self.restarting = None, False
        if self.worker is not None:
            self.stop_worker("stop requested")
            return
        self.set_state(STOPPED, "stopped on request")
        self.release_lock()

    def stop_worker(self, reason: str = "", keep_lock: bool = False) -> None:
        """Ask the live worker to stop: SIGTERM now, SIGKILL after stop_timeout."""
        w = self.worker
        assert w is not None
        w.stop_requested, w.keep_lock = True, keep_lock
        if w.kill_due is None:
            self.kill_at(self.services.clock.monotonic() + self.services.cfg.stop_timeout)
        self.services.kill(w.pid, signal.SIGTERM)
        self.set_state(STOPPING, reason)

    def restart(self, then: Callable[[], None]) -> None:
        """`waportctl restart`: a fresh start (failure count 0), after the live worker, if any, has gone."""

        def fresh_start() -> None:
            if self.restarting:  # not cancelled by a stop meanwhile
                self.restarting = False
                self.session.failures = 0
                self.spawn()
            then()

        self.restarting = True
        if self.worker is not None:
            self.stop_worker("restart requested", keep_lock=True)
            self.when_exited(fresh_start)
        else:
            fresh_start()

    def restart_worker(self, reason: str, now: float) -> None:
        """Our own restart of a live worker: SIGTERM (it stops in order), SIGKILL after stop_timeout,
        then the normal restart path with `reason` (its metrics label is the part before a colon)."""
        w = self.worker
        assert w is not None
        w.killed_reason = reason
        self.kill_at(now + self.services.cfg.stop_timeout, force=True)
        self.services.kill(w.pid, signal.SIGTERM)

    def kill_at(self, when: float, force: bool = False) -> None:
        w = self.worker
        assert w is not None
        if w.kill_due is None or force:
            w.kill_due = when
            self.services.timers.at(when, self.name, (KILL, w.generation))

    def when_exited(self, then: Callable[[], None]) -> None:
        """Run `then` once the worker has gone (at once if none runs)."""
        if self.worker is not None:
            self.exit_waiters.append(then)
        else:
            then()

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def delete_data(self) -> None:
        """The session is gone for good: its lock, credentials and journal."""
        self.release_lock()
        shutil.rmtree(self.session_dir, ignore_errors=True)

    # ------------------------------------------------------------ exits

    def exited(self, code: int, info: dict[str, Any] | None = None) -> None:
        """The worker process ended (or never started: code 127). Everything waiting on it hears now.
        `info` is what it said about why (its `exit` event), if anything."""
        s, w = self.session, self.worker
        self.worker = None
        s.pid, s.rss_bytes = None, None
        for rid, req in list(self.requests.items()):
            del self.requests[rid]
            req.on_reply(error_dict(NOT_CONNECTED, "the worker exited before it answered"))
        info = w.exit_info if w is not None else info
        if w is not None and w.stop_requested and not w.killed_reason:
            self.log.info("%s: worker exited (%s) after stop", self.name, describe_exit(code, info))
            if w.keep_lock:
                self.set_state(STOPPED, "restarting")
            else:
                self.set_state(STOPPED, "stopped on request")
                self.release_lock()
        else:
            self.apply_outcome(code, info, w.killed_reason if w else None)
        waiters, self.exit_waiters = self.exit_waiters, []
        for waiter in waiters:
            waiter()

    def apply_outcome(self, code: int, info: dict[str, Any] | None, killed_reason: str | None) -> None:
        sv, s = self.services, self.session
        outcome = exit_outcome(sv.policy, s, code, info, sv.clock.time(), killed_reason)
        s.failures = outcome.failures
        s.last_error = outcome.reason
        sv.counters[("exit", self.name, outcome.reason.split(":")[0])] += 1
        self.log.warning("%s: worker exited (%s)", self.name, describe_exit(code, info), extra={"event": "exit"})
        if sv.shutting_down:
            self.set_state(STOPPED, "daemon shutting down")
            return
        s.next_restart_at = outcome.restart_at
        self.set_state(outcome.state, outcome.reason)
        if outcome.state == STOPPED:  # fenced: stopped like a stop request, the session lock freed
            self.release_lock()
        if outcome.restart_at is not None:
            self.schedule(sv.clock.monotonic() + outcome.delay)

    # ------------------------------------------------------------ timers

    def on_timer(self, what: tuple[str, Any], when: float, now: float) -> None:
        """A deadline set earlier has come; one that no longer holds is ignored."""
        kind, token = what
        w = self.worker
        if kind == DUE and self.due == when:
            self.due = None
            self.on_due()
        elif kind == KILL and w is not None and w.generation == token and w.kill_due is not None and w.kill_due <= now:
            self.log.warning("%s: worker %d did not exit in time; SIGKILL", self.name, w.pid)
            self.services.kill(w.pid, signal.SIGKILL)
            w.kill_due = None
        elif kind == REQUEST and token in self.requests and self.requests[token].deadline <= now:
            req = self.requests.pop(token)
            req.on_reply(error_dict(TIMEOUT, f"{self.name}: the worker did not answer in time"))

    def on_due(self) -> None:
        s, sv = self.session, self.services
        if s.state in (BACKOFF, BANNED):
            s.restarts += 1
            reason = (s.last_error or "").split(":")[0]
            sv.counters[("restarts", self.name, reason)] += 1
            sv.publish(self.name, events.RESTART, {"attempt": s.failures, "reason": s.last_error,
                                                   "restarts": s.restarts}, None)
            self.spawn()
        elif self.worker is None:
            if s.state == STARTING:
                self.spawn()  # retry the session lock
            else:
                self.start()  # queued at boot

    # ------------------------------------------------------------ liveness

    def check_liveness(self, now: float, wall: float, beat: bool) -> None:
        """Every liveness tick: heartbeat the worker (`beat`), end it if it hangs or stays disconnected."""
        w, s, cfg = self.worker, self.session, self.services.cfg
        if w is None:
            return
        hb = cfg.heartbeat_interval
        if beat and w.ready:
            self.beat()
        if w.ending:
            return
        limit = MISSED_HEARTBEATS * hb + (0 if w.ready else STARTUP_GRACE)
        age = now - w.last_heartbeat
        if age > limit:
            self.log.error("%s: no heartbeat for %.1f s: worker %d is hung; SIGABRT", self.name, age, w.pid)
            w.killed_reason = "hung"
            self.kill_at(now + ABORT_GRACE, force=True)
            self.services.kill(w.pid, signal.SIGABRT)
            self.services.publish(self.name, events.HEALTH_CHECK_FAILED, {"check": "heartbeat", "age": age}, None)
        elif s.state == DISCONNECTED and wall - s.since > cfg.reconnect_timeout:
            self.log.warning("%s: disconnected for over %.0f s; restarting the worker", self.name,
                             cfg.reconnect_timeout)
            self.services.publish(self.name, events.HEALTH_CHECK_FAILED, {"check": "reconnect_timeout"}, None)
            self.restart_worker("reconnect_timeout", now)

    # ------------------------------------------------------------ the worker's frames

    def beat(self, only_with_deadline: bool = False) -> bool:
        """A heartbeat to the live worker, with the lease deadline in cluster mode; the cluster may call it
        right after a renewal so the worker hears the new deadline at once."""
        try:
            deadline = self.lease_deadline()
        except Exception:  # noqa: BLE001 - no deadline sent: the worker keeps the last one and fences by it
            self.services.counters[("loop_errors",)] += 1
            self.log.exception("%s: lease deadline unavailable; heartbeat sent without it", self.name)
            deadline = None
        if deadline is None and only_with_deadline:
            return False
        return self.send(protocol.HEARTBEAT, {} if deadline is None else {protocol.LEASE_DEADLINE: deadline})

    def heard_from(self) -> bool:
        """A frame from the live worker arrived: a sign of life. False if nothing it says is to be read."""
        w = self.worker
        assert w is not None
        if w.mismatched:
            return False
        w.last_heartbeat = self.services.clock.monotonic()
        return True

    def heard(self, msg: protocol.Message) -> bool:
        """One message of the live worker's frame, in order. True if it was about the worker's life and
        handled here; False for the rest (inbound messages, outcomes, logs, other events) to be routed."""
        w = self.worker
        assert w is not None
        body, s = msg.body, self.session
        if msg.type == protocol.READY:
            if body["company"] != self.name or body["pid"] != w.pid:
                self.log.error("%s: READY names %s pid %s", self.name, body["company"], body["pid"])
                self.services.counters[("malformed", "worker")] += 1
            elif body["version"] != protocol.VERSION:
                self.restart_mismatched(w, body["version"])
            else:
                w.ready = True
                self.send(protocol.OUTBOX, {})  # whatever was queued meanwhile
                self.beat(only_with_deadline=True)  # cluster mode: the worker knows its deadline at once
            return True
        if msg.type == protocol.HEARTBEAT:
            if isinstance(body.get("queued"), int):
                s.queued = body["queued"]
            return True
        if msg.type == protocol.REPLY:
            req = self.requests.pop(body["id"], None)
            if req is not None:
                req.on_reply(body)
            return True
        if msg.type != protocol.EVENT:
            return False
        type_, data = body["type"], body["data"]
        if type_ == "exit":
            w.exit_info = data
            return True
        if type_ == events.STATE:
            state = data.get("state")
            if state in WORKER_REPORTED and not w.stop_requested:
                if isinstance(data.get("phone"), str):
                    s.phone = data["phone"]
                self.set_state(state, str(data.get("reason", "")))
            return True
        if type_ == events.QR:
            s.qr = data.get("code")
        elif type_ == events.ERROR:
            s.last_error = str(data.get("message", ""))[:500]
        return False

    def restart_mismatched(self, w: Worker, version: int) -> None:
        """A worker from other code than ours (upgraded on disk, daemon not restarted): its frames would be
        misread, so it is stopped and restarted with backoff, saying why."""
        why = (f"protocol_mismatch: the worker speaks protocol version {version}, this waportd "
               f"{protocol.VERSION}; restart waportd after an upgrade")
        self.log.error("%s: %s", self.name, why)
        w.mismatched = True
        if not w.ending:
            self.restart_worker(why, self.services.clock.monotonic())

    def send(self, type_: str, body: dict[str, Any]) -> bool:
        """A frame to the live worker; False if there is none or it is not connected (yet)."""
        w = self.worker
        return w is not None and self.services.send(w.routing_id, type_, body)

    def nudge(self) -> None:
        """New sends in the journal: a ready worker looks at once (one that is not yet looks at READY)."""
        if self.ready:
            self.send(protocol.OUTBOX, {})

    def request(self, cmd: str, args: dict[str, Any], timeout: float, on_reply: Reply) -> None:
        """Forward a request; `on_reply` gets the worker's reply, or a timeout / not_connected error."""
        if not self.ready:
            on_reply(error_dict(NOT_CONNECTED, f"{self.name} has no running worker (state {self.state})"))
            return
        clock = self.services.clock
        rid = uuid.uuid4().hex
        deadline = clock.monotonic() + timeout
        self.requests[rid] = WorkerRequest(deadline, on_reply)
        if not self.send(protocol.REQUEST, {"id": rid, "cmd": cmd, "args": args, "deadline": clock.time() + timeout}):
            del self.requests[rid]
            on_reply(error_dict(NOT_CONNECTED, f"{self.name}: worker socket is not connected"))
            return
        self.services.timers.at(deadline, self.name, (REQUEST, rid))


def error_dict(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


def describe_exit(code: int, info: dict[str, Any] | None) -> str:
    text = exitcodes.describe(code)
    if info and info.get("reason") and info["reason"] != text:
        text += f", {info['reason']}"
    return text

