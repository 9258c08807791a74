"""The supervisor's main loop (gunicorn-arbiter style).

Signal handlers only record the signal. One loop reads sockets, handles the
recorded signals, reaps children and fires due timers. Everything that decides
(backoff, transitions, exit meaning) lives in pure modules; this one acts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from ipc import events, exitcodes, paths, protocol
from ipc.errors import BAD_REQUEST, NOT_CONNECTED, TIMEOUT, WaportError
from ipc.states import (
    ALIVE,
    BACKOFF,
    BANNED,
    CONNECTED,
    DISCONNECTED,
    LOGGED_OUT,
    REPLACED,
    STARTING,
    STOPPED,
    STOPPING,
    WORKER_REPORTED,
)
from ipc.zsocket import readable, recv_ready, send_frames
from waportd import desired as desired_store
from waportd import process
from waportd.backoff import RestartPolicy
from waportd.config import Config, ConfigError
from waportd.locks import FileLock, LockBusy
from waportd.messages import MessageDesk
from waportd.session import Session, exit_outcome
from waportd.subscriptions import Subscriptions

log = logging.getLogger("waport.arbiter")

MISSED_HEARTBEATS = 3
STARTUP_GRACE = 10.0  # extra seconds a fresh worker gets for its first READY
LOCK_RETRY = 0.5
BOOT_BATCH = 20  # sessions started per loop turn at boot
KILL_SCAN = 0.1  # how often overdue SIGKILLs are looked for
_BODILESS = {t: protocol.encode(t, {}) for t in (protocol.HEARTBEAT, protocol.OUTBOX)}  # encoded once
ABORT_GRACE = 2.0  # SIGABRT -> SIGKILL for a hung worker
RESTART_ONLY = ("state_dir", "run_dir", "backend", "sim_endpoint", "metrics_listen")  # not changed by a reload
Reply = Callable[[dict[str, Any]], None]


@dataclass
class WorkerRequest:
    company: str
    deadline: float  # monotonic
    on_reply: Reply


@dataclass
class Worker:
    """The live process of one session, and what the supervisor has asked of it."""

    proc: process.Child
    generation: int
    stop_requested: bool = False
    then: Callable[[], None] | None = None  # what to do once it has exited on request
    kill_due: float | None = None  # monotonic: SIGKILL if still alive then
    killed_reason: str | None = None  # we killed it (hung, health check)
    exit_info: dict[str, Any] | None = None
    mismatched: bool = False  # speaks another protocol version: nothing it says is read


def policy_of(cfg: Config) -> RestartPolicy:
    return RestartPolicy(
        base_delay=cfg.restart_base_delay,
        factor=cfg.restart_factor,
        max_delay=cfg.restart_max_delay,
        jitter=cfg.restart_jitter,
        reset_after=cfg.restart_reset_after,
        max_restarts=cfg.max_restarts,
    )


class Arbiter:
    def __init__(self, cfg: Config, reload_config: Callable[[], Config] | None = None) -> None:
        self.cfg = cfg
        self.configured = frozenset(cfg.companies)
        self.policy = policy_of(cfg)
        self.reload_config = reload_config
        self.sessions: dict[str, Session] = {}
        self.workers: dict[str, Worker] = {}  # company -> live process
        self.pids: dict[int, str] = {}
        self.locks: dict[str, FileLock] = {}
        self.due: dict[str, float] = {}  # company -> monotonic time of its next restart / lock retry
        self.requests: dict[str, WorkerRequest] = {}
        self.exit_waiters: dict[str, list[Callable[[], None]]] = {}
        self.generation = 0
        self.counters: Counter[tuple[str, ...]] = Counter()
        self.signals: list[int] = []
        self.shutting_down = False
        self.started_at = time.time()
        self.simnet: subprocess.Popen | None = None
        self.sim_endpoint = cfg.sim_endpoint
        self.desired_path = os.path.join(cfg.state_dir, "desired.json")
        self.desired = desired_store.Desired()
        self.ctx = zmq.Context.instance()
        self.lock = FileLock(os.path.join(cfg.state_dir, "waportd.lock"))
        self.spawner = spawner_for(cfg)
        from waportd.controller import Controller

        self.controller = Controller(self)
        self.messages = MessageDesk(self)
        self.next_mirror = 0.0
        self.next_beat_out = 0.0
        self.child_exited = True
        self.next_kill_scan = 0.0
        self.subscriptions = Subscriptions()
        self.boot_queue: deque[str] = deque()  # started a batch per turn: the sockets answer meanwhile
        from waportd.ops import Ops

        self.ops = Ops(self)  # metrics, resources, systemd notify, strays, worker logs

    # ---------------------------------------------------------------- set-up

    def setup(self) -> None:
        """Claim the state directory, bind the sockets, start what should run."""
        cfg = self.cfg
        make_dir(cfg.state_dir, 0o700)
        make_dir(os.path.join(cfg.state_dir, "sessions"), 0o700)
        self.lock.acquire()  # LockBusy names the holder; main() turns it into exit 1
        make_dir(cfg.run_dir, 0o750)
        self.control = self.bind(zmq.ROUTER, paths.CONTROL_SOCK)
        self.workers_sock = self.bind(zmq.ROUTER, paths.WORKERS_SOCK)
        self.workers_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.events = self.bind(zmq.XPUB, paths.EVENTS_SOCK)  # XPUB: it tells us who subscribes to what
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self.record_signal)
        self.messages.start()
        if cfg.backend == "sim" and not cfg.sim_endpoint:
            self.start_simnet()
        try:
            self.desired = desired_store.load(self.desired_path)
        except desired_store.CorruptState as exc:
            log.error("%s", exc)
        for company in self.desired.wanted(cfg.companies):
            self.session(company).reason = "queued for start"
            self.boot_queue.append(company)
        log.info(
            "waportd ready: pid %d, backend %s, %d companies, control %s",
            os.getpid(), cfg.backend, len(self.sessions), paths.endpoint(cfg.run_dir, paths.CONTROL_SOCK),
        )  # fmt: skip

    def bind(self, kind: int, name: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.XPUB:
            sock.setsockopt(zmq.SNDHWM, 100_000)
        else:
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.SNDHWM, 100_000)
        endpoint = paths.endpoint(self.cfg.run_dir, name)
        sock.bind(endpoint)
        os.chmod(paths.ipc_path(endpoint), 0o660)
        return sock

    def start_simnet(self) -> None:
        """The demo network: `backend = "sim"` with no `sim_endpoint` runs one of our own."""
        self.sim_endpoint = paths.endpoint(self.cfg.run_dir, paths.SIMNET_SOCK)
        state = os.path.join(self.cfg.state_dir, "simnet")
        make_dir(state, 0o700)
        cmd = ["-m", "workers.simnet", "--endpoint", self.sim_endpoint, "--state-dir", state, "--auto-pair"]
        self.simnet = process.spawn_tied(cmd)
        log.info("started the simulated network (pid %d) on %s", self.simnet.pid, self.sim_endpoint)

    # ---------------------------------------------------------------- main loop

    def run(self) -> int:
        self.setup()
        self.ops.started()
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.workers_sock, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)  # subscriptions come and go
        next_beat = 0.0
        while not self.finished():
            try:
                next_beat = self.turn(poller, next_beat)
            except Exception:  # noqa: BLE001 - a bug in one step must not take every session down
                self.counters[("loop_errors",)] += 1
                log.exception("error in the main loop; carrying on")
                time.sleep(0.01)
        self.close()
        return 0

    def turn(self, poller: zmq.Poller, next_beat: float) -> float:
        """One pass of the main loop: sockets, signals, children, timers."""
        for sock, _ in poller.poll(self.poll_timeout_ms(next_beat)):
            if sock is self.control:
                self.read_control()
            elif sock is self.workers_sock:
                self.read_workers()
            elif sock is self.events:
                self.read_subscriptions()
            else:
                drain(self.wake_r)
        self.handle_signals()
        self.messages.take_bridge_results()
        self.messages.flush()  # durable before any send is answered
        self.messages.flush_acks()
        self.reap_children()
        for _ in range(min(BOOT_BATCH, len(self.boot_queue))):
            self.start_session(self.boot_queue.popleft())
        now = time.monotonic()
        self.fire_due(now)
        self.expire_requests(now)
        if now >= next_beat:
            self.heartbeat_workers(now)
            next_beat = now + min(1.0, self.cfg.heartbeat_interval / 2)
        self.ops.tick(now)
        return next_beat

    def poll_timeout_ms(self, next_beat: float) -> int:
        now = time.monotonic()
        soon = [next_beat, *self.due.values()]
        soon.append(self.ops.next_wakeup(now))  # watchdog ping, resource samples
        if self.requests:
            soon.append(now + 0.1)
        if self.messages.batch:  # a journal was busy: its sends wait for the next turn
            soon.append(now + 0.005)
        if self.boot_queue:
            soon.append(now)
        return max(0, int((min(soon) - now) * 1000)) + 1

    def finished(self) -> bool:
        return self.shutting_down and not self.workers

    def record_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.begin_shutdown(signal.Signals(signum).name)
            elif signum == signal.SIGCHLD:
                self.child_exited = True
            elif signum == signal.SIGHUP:
                try:
                    result = self.reload()
                    log.info("reloaded: started %s, stopped %s", result["started"], result["stopped"])
                except WaportError as exc:
                    log.error("reload refused: %s", exc.message)

    def begin_shutdown(self, why: str) -> None:
        if self.shutting_down:
            return
        log.info("%s: stopping %d workers", why, len(self.workers))
        self.shutting_down = True
        self.boot_queue.clear()
        self.ops.stopping()
        for company in list(self.workers):
            self.stop_worker(company)

    def wake(self) -> None:
        """Poke the main loop from another thread (the Redis bridge)."""
        try:
            os.write(self.wake_w, b"w")
        except (BlockingIOError, OSError):
            pass  # already awake

    def close(self) -> None:
        self.messages.stop()
        self.spawner.close()
        self.ops.close()
        if self.simnet and self.simnet.poll() is None:
            self.simnet.terminate()
            try:
                self.simnet.wait(5)
            except subprocess.TimeoutExpired:
                self.simnet.kill()
                self.simnet.wait()
        for name in (paths.CONTROL_SOCK, paths.WORKERS_SOCK, paths.EVENTS_SOCK):
            try:
                os.unlink(os.path.join(self.cfg.run_dir, name))
            except OSError:
                pass
        for sock in (self.control, self.workers_sock, self.events):
            sock.close(0)
        for lock in self.locks.values():
            lock.release()
        self.lock.release()
        log.info("waportd stopped")

    # ---------------------------------------------------------------- sessions

    def session(self, company: str) -> Session:
        s = self.sessions.get(company)
        if s is None:
            s = self.sessions[company] = Session(company, since=time.time())
        return s

    def set_state(self, s: Session, state: str, reason: str = "") -> None:
        before = s.state
        if not s.set_state(state, reason, time.time()):
            return
        log.info("%s: %s -> %s%s", s.company, before, state, f" ({reason})" if reason else "")
        data = {"state": state, "previous": before, "reason": reason, "pid": s.pid,
                "next_restart_at": s.next_restart_at}
        self.publish(s.company, events.STATE, data)
        self.messages.mirror(s.company, s.record())
        if state == CONNECTED:
            self.publish(s.company, events.CONNECTED, {"phone": s.phone})
        elif state == DISCONNECTED:
            self.publish(s.company, events.DISCONNECTED, {"reason": reason})
        elif state in (LOGGED_OUT, REPLACED):
            self.publish(s.company, state, {"reason": reason})
        self.counters[("transition", state)] += 1

    def start_session(self, company: str) -> Session:
        s = self.session(company)
        if company not in self.workers and s.state not in ALIVE:
            s.failures = 0
            self.spawn(s)
        return s

    def spawn(self, s: Session) -> None:
        """Start the worker once the session lock is ours; else wait for whoever holds it."""
        self.due.pop(s.company, None)
        if self.shutting_down:
            return
        session_dir = os.path.join(self.cfg.state_dir, "sessions", s.company)
        lock = self.locks.get(s.company)
        if lock is None:
            make_dir(session_dir, 0o700)
            lock = FileLock(os.path.join(session_dir, "session.lock"))
            try:
                lock.acquire()
            except LockBusy as exc:
                self.set_state(s, STARTING, f"waiting for the session lock held by pid {exc.holder}")
                self.due[s.company] = time.monotonic() + LOCK_RETRY
                return
            self.locks[s.company] = lock
        self.generation += 1
        options = {"sim_endpoint": self.sim_endpoint, "pairing_timeout": self.cfg.pairing_timeout}
        if self.cfg.backend == "neonize":
            options["connect_timeout"] = self.cfg.connect_timeout
        if self.cfg.backend == "sim":
            options.update(self.cfg.sim_options)  # test knobs of the sim backend (e.g. grow_bytes_per_s)
        args = process.worker_args(
            s.company, self.generation, paths.endpoint(self.cfg.run_dir, paths.WORKERS_SOCK), session_dir,
            self.cfg.backend, self.cfg.heartbeat_interval, options, self.cfg.log_level, self.cfg.worker_nice,
        )  # fmt: skip
        try:
            child = self.spawner.spawn_worker(args, lock.fd)
        except OSError as exc:
            s.last_error = f"spawn failed: {exc}"
            log.error("%s: %s", s.company, s.last_error)
            self.after_exit(s, None, 127)
            return
        self.workers[s.company] = Worker(child, self.generation)
        self.pids[child.pid] = s.company
        s.pid, s.generation, s.ready = child.pid, self.generation, False
        s.spawned_at, s.last_heartbeat = time.time(), time.monotonic()
        self.set_state(s, STARTING, "")

    def stop_worker(self, company: str, then: Callable[[], None] | None = None, reason: str = "") -> None:
        """Ask a live worker to stop: SIGTERM now, SIGKILL after stop_timeout."""
        w = self.workers[company]
        w.stop_requested = True
        w.then = then
        if w.kill_due is None:
            w.kill_due = time.monotonic() + self.cfg.stop_timeout
        process.kill(w.proc.pid, signal.SIGTERM)
        self.set_state(self.sessions[company], STOPPING, reason)

    def stop_session(self, company: str, then: Callable[[], None] | None = None) -> None:
        s = self.session(company)
        self.due.pop(company, None)
        if company in self.boot_queue:
            self.boot_queue.remove(company)
        if company in self.workers:
            self.stop_worker(company, then, "stop requested")
            return
        self.set_state(s, STOPPED, "stopped on request")
        self.release_lock(company)
        if then:
            then()

    def release_lock(self, company: str) -> None:
        lock = self.locks.pop(company, None)
        if lock:
            lock.release()

    def reap_children(self) -> None:
        # waitpid scans every child: with 1,000 workers, call it only after a SIGCHLD.
        if not self.child_exited:
            return
        self.child_exited = False
        for pid, code in process.reap():
            company = self.pids.pop(pid, None)
            if company is None:
                if self.simnet and pid == self.simnet.pid:
                    self.simnet.returncode = code
                    log.error("the simulated network exited (%s); restarting it", code)
                    if not self.shutting_down:
                        self.start_simnet()
                elif self.spawner.owns(pid):
                    log.warning("the fork server exited (%s); it starts again with the next worker", code)
                continue
            w = self.workers.pop(company)
            w.proc.reaped(code)
            self.after_exit(self.sessions[company], w, code)

    def after_exit(self, s: Session, w: Worker | None, code: int) -> None:
        s.pid, s.ready, s.rss_bytes = None, False, None
        for rid, req in list(self.requests.items()):
            if req.company == s.company:
                del self.requests[rid]
                req.on_reply(error_dict(NOT_CONNECTED, "the worker exited before it answered"))
        info = w.exit_info if w else None
        if w and w.stop_requested and not w.killed_reason:
            log.info("%s: worker exited (%s) after stop", s.company, describe_exit(code, info))
            if w.then:
                self.set_state(s, STOPPED, "restarting")
                w.then()
            else:
                self.set_state(s, STOPPED, "stopped on request")
                self.release_lock(s.company)
        else:
            self.apply_outcome(s, w, code, info)
        for waiter in self.exit_waiters.pop(s.company, []):
            waiter()

    def apply_outcome(self, s: Session, w: Worker | None, code: int, info: dict[str, Any] | None) -> None:
        now = time.time()
        outcome = exit_outcome(self.policy, s, code, info, now, w.killed_reason if w else None)
        s.failures = outcome.failures
        s.last_error = outcome.reason
        self.counters[("exit", s.company, outcome.reason.split(":")[0])] += 1
        log.warning("%s: worker exited (%s)", s.company, describe_exit(code, info))
        if self.shutting_down:
            self.set_state(s, STOPPED, "daemon shutting down")
            return
        s.next_restart_at = outcome.restart_at
        self.set_state(s, outcome.state, outcome.reason)
        if outcome.restart_at is not None:
            self.due[s.company] = time.monotonic() + outcome.delay

    def fire_due(self, now: float) -> None:
        for company, when in list(self.due.items()):
            if when <= now:
                s = self.sessions[company]
                del self.due[company]
                if s.state in (BACKOFF, BANNED):
                    s.restarts += 1
                    reason = (s.last_error or "").split(":")[0]
                    self.counters[("restarts", company, reason)] += 1
                    self.publish(company, events.RESTART, {"attempt": s.failures, "reason": s.last_error,
                                                           "restarts": s.restarts})
                    self.spawn(s)
                elif s.state == STARTING and company not in self.workers:
                    self.spawn(s)  # retry the session lock
        if now < self.next_kill_scan:
            return
        self.next_kill_scan = now + KILL_SCAN  # a scan of every worker: not on every turn
        for company, w in list(self.workers.items()):
            if w.kill_due is not None and w.kill_due <= now:
                log.warning("%s: worker %d did not exit in time; SIGKILL", company, w.proc.pid)
                process.kill(w.proc.pid, signal.SIGKILL)
                w.kill_due = None

    # ---------------------------------------------------------------- liveness

    def heartbeat_workers(self, now: float) -> None:
        hb = self.cfg.heartbeat_interval
        if now >= self.next_mirror:  # keep the Redis session mirror alive (it has a TTL)
            self.next_mirror = now + 30
            for s in self.sessions.values():
                self.messages.mirror(s.company, s.record())
            self.messages.limiter.memory.prune(time.time())
        beat = now >= self.next_beat_out  # liveness is checked more often than we beat
        if beat:
            self.next_beat_out = now + hb
        for company, w in list(self.workers.items()):
            s = self.sessions[company]
            if beat and s.ready:
                self.send_worker(s, protocol.HEARTBEAT, {})
            limit = MISSED_HEARTBEATS * hb + (0 if s.ready else STARTUP_GRACE)
            if now - s.last_heartbeat > limit and w.killed_reason is None and not w.stop_requested:
                log.error("%s: no heartbeat for %.1f s: worker %d is hung; SIGABRT",
                          company, now - s.last_heartbeat, w.proc.pid)
                w.killed_reason = "hung"
                w.kill_due = now + ABORT_GRACE
                process.kill(w.proc.pid, signal.SIGABRT)
                self.publish(company, events.HEALTH_CHECK_FAILED, {"check": "heartbeat",
                                                                    "age": now - s.last_heartbeat})
            elif (s.state == DISCONNECTED and time.time() - s.since > self.cfg.reconnect_timeout
                  and w.killed_reason is None and not w.stop_requested):
                log.warning("%s: disconnected for over %.0f s; restarting the worker",
                            company, self.cfg.reconnect_timeout)
                self.publish(company, events.HEALTH_CHECK_FAILED, {"check": "reconnect_timeout"})
                self.restart_worker(w, "reconnect_timeout", now)

    def restart_worker(self, w: Worker, reason: str, now: float) -> None:
        """Our own restart of a live worker: SIGTERM (it stops in order), SIGKILL after stop_timeout,
        then the normal restart path with `reason` (its metrics label is the part before a colon)."""
        w.killed_reason = reason
        w.kill_due = now + self.cfg.stop_timeout
        process.kill(w.proc.pid, signal.SIGTERM)

    # ---------------------------------------------------------------- worker socket

    def read_workers(self) -> None:
        sock = self.workers_sock
        for _ in range(1000):
            frames = recv_ready(sock)
            if frames is None:
                return
            ident, rest = frames[0], frames[1:]
            try:
                msg = protocol.decode(rest)
            except protocol.ProtocolError as exc:
                self.counters[("malformed", "worker")] += 1
                log.warning("dropped a malformed worker frame: %s", exc)
                continue
            s = self.session_of(ident)
            if s is None:
                self.counters[("unknown_worker",)] += 1
                log.warning("frame from unknown worker %r: told it to stop", ident[:64])
                self.send_ident(ident, protocol.STOP, {"reason": "unknown worker"})
                continue
            if self.workers[s.company].mismatched:
                continue
            s.last_heartbeat = time.monotonic()
            if msg.dropped:
                self.counters[("malformed", "worker")] += msg.dropped
                log.warning("%s: dropped %d malformed events of a batch", s.company, msg.dropped)
            for one in protocol.unbatch(msg):
                self.on_worker_message(s, one)

    def session_of(self, ident: bytes) -> Session | None:
        company, _, gen = ident.decode(errors="replace").partition("/")
        w = self.workers.get(company)
        if w is None or str(w.generation) != gen:
            return None
        return self.sessions[company]

    def on_worker_message(self, s: Session, msg: protocol.Message) -> None:
        body = msg.body
        if msg.type == protocol.READY:
            if body["company"] != s.company or body["pid"] != s.pid:
                log.error("%s: READY names %s pid %s", s.company, body["company"], body["pid"])
                self.counters[("malformed", "worker")] += 1
                return
            if body["version"] != protocol.VERSION:
                self.restart_mismatched(s, body["version"])
                return
            s.ready = True
            self.send_worker(s, protocol.OUTBOX, {})  # whatever was queued meanwhile
        elif msg.type == protocol.HEARTBEAT:
            if isinstance(body.get("queued"), int):
                s.queued = body["queued"]
        elif msg.type == protocol.REPLY:
            req = self.requests.pop(body["id"], None)
            if req is not None:
                req.on_reply(body)
        elif msg.type == protocol.EVENT:
            self.on_worker_event(s, body["type"], body["data"], body["ts"])
        elif msg.type == protocol.LOG:
            self.ops.worker_log(s, body)
        else:
            self.counters[("malformed", "worker")] += 1

    def on_worker_event(self, s: Session, type_: str, data: dict[str, Any], ts: float) -> None:
        w = self.workers[s.company]
        if type_ == "exit":
            w.exit_info = data
            return
        if type_ == events.STATE:
            state = data.get("state")
            if state in WORKER_REPORTED and not w.stop_requested:
                if isinstance(data.get("phone"), str):
                    s.phone = data["phone"]
                self.set_state(s, state, str(data.get("reason", "")))
            return
        if type_ not in events.TYPES:
            self.counters[("malformed", "event")] += 1
            return
        if type_ == events.MESSAGE:
            self.messages.on_inbound(s.company, data, ts)
            return
        if type_ in (events.SENT, events.SEND_FAILED):
            self.messages.on_outcome(s.company, type_, data)
        if type_ == events.QR:
            s.qr = data.get("code")
            self.counters[("qr", s.company)] += 1
        elif type_ == events.ERROR:
            s.last_error = str(data.get("message", ""))[:500]
            self.ops.worker_error(s, data)
        self.counters[("event", s.company, type_)] += 1
        self.publish(s.company, type_, data, ts)

    def restart_mismatched(self, s: Session, version: int) -> None:
        """A worker from other code than ours (upgraded on disk, daemon not restarted): its frames would be
        misread, so it is stopped and restarted with backoff, saying why."""
        w = self.workers[s.company]
        why = (f"protocol_mismatch: the worker speaks protocol version {version}, this waportd "
               f"{protocol.VERSION}; restart waportd after an upgrade")
        log.error("%s: %s", s.company, why)
        w.mismatched = True
        if w.killed_reason is None and not w.stop_requested:
            self.restart_worker(w, why, time.monotonic())

    def send_worker(self, s: Session, type_: str, body: dict[str, Any]) -> bool:
        return self.send_ident(protocol.routing_id(s.company, s.generation), type_, body)

    def send_ident(self, ident: bytes, type_: str, body: dict[str, Any]) -> bool:
        frames = (None if body else _BODILESS.get(type_)) or protocol.encode(type_, body)
        try:
            send_frames(self.workers_sock, [ident, *frames])
            return True
        except (zmq.Again, zmq.ZMQError):
            return False  # not connected (yet) or gone: heartbeats and reaping sort it out

    def request_worker(
        self, company: str, cmd: str, args: dict[str, Any], timeout: float, on_reply: Reply
    ) -> None:
        """Forward a request; `on_reply` gets the worker's reply, or a timeout / not_connected error."""
        s = self.sessions.get(company)
        if s is None or company not in self.workers or not s.ready:
            state = s.state if s else "unknown"
            on_reply(error_dict(NOT_CONNECTED, f"{company} has no running worker (state {state})"))
            return
        rid = uuid.uuid4().hex
        body = {"id": rid, "cmd": cmd, "args": args, "deadline": time.time() + timeout}
        self.requests[rid] = WorkerRequest(company, time.monotonic() + timeout, on_reply)
        if not self.send_worker(s, protocol.REQUEST, body):
            del self.requests[rid]
            on_reply(error_dict(NOT_CONNECTED, f"{company}: worker socket is not connected"))

    def expire_requests(self, now: float) -> None:
        for rid, req in list(self.requests.items()):
            if req.deadline <= now:
                del self.requests[rid]
                req.on_reply(error_dict(TIMEOUT, f"{req.company}: the worker did not answer in time"))

    # ---------------------------------------------------------------- control socket

    def read_control(self) -> None:
        sock = self.control
        for _ in range(1000):
            frames = recv_ready(sock)
            if frames is None:
                return
            envelope, body = frames[:-1], frames[-1]
            if len(frames) < 2:
                self.counters[("malformed", "control")] += 1
                continue

            def respond(reply: bytes, envelope: list[bytes] = envelope) -> None:
                try:
                    send_frames(sock, [*envelope, reply])
                except zmq.ZMQError:
                    pass  # the client went away

            self.controller.handle(body, respond)

    # ---------------------------------------------------------------- events

    def publish(self, company: str, type_: str, data: dict[str, Any], ts: float | None = None) -> None:
        event = events.make(company, type_, data, ts)
        topic = events.topic(company, type_)
        if self.listened(topic):
            try:  # XPUB drops for slow subscribers itself; it never blocks us
                send_frames(self.events, [topic, events.body(event)])
            except zmq.ZMQError:
                self.counters[("events_dropped",)] += 1
        self.messages.event_to_stream(event)

    def listened(self, topic: bytes) -> bool:
        """Whether a subscriber wants `topic`: an event nobody listens to is not even encoded."""
        if self.subscriptions.wants(topic):
            return True
        if readable(self.events):  # a subscription the socket has seen and we have not read yet
            self.read_subscriptions()
            return self.subscriptions.wants(topic)
        return False

    def read_subscriptions(self) -> None:
        while (frames := recv_ready(self.events)) is not None:
            self.subscriptions.feed(frames[0])

    # ---------------------------------------------------------------- desired state

    def save_desired(self) -> None:
        try:
            desired_store.save(self.desired_path, self.desired)
        except OSError as exc:
            log.error("cannot save %s: %s", self.desired_path, exc)

    def reload(self) -> dict[str, list[str]]:
        """Re-read the config; start and stop only the companies whose wish changed."""
        if self.reload_config is None:
            return {"started": [], "stopped": []}
        try:
            new = self.reload_config()
        except ConfigError as exc:
            raise WaportError(BAD_REQUEST, f"config not reloaded: {exc}") from None
        fixed = [k for k in RESTART_ONLY if getattr(new, k) != getattr(self.cfg, k)]
        if fixed:
            log.warning("reload: %s change only at restart; keeping the running values", ", ".join(fixed))
            new = dataclasses.replace(new, **{k: getattr(self.cfg, k) for k in fixed})
        before = set(self.desired.wanted(self.cfg.companies))
        self.cfg, self.policy = new, policy_of(new)
        self.configured = frozenset(new.companies)
        self.messages.reconfigure(new)
        after = self.desired.wanted(new.companies)
        started = [c for c in after if c not in before]
        stopped = sorted(before - set(after))
        for company in started:
            self.start_session(company)
        for company in stopped:
            self.stop_session(company)
        return {"started": started, "stopped": stopped}

    def delete_session(self, company: str) -> None:
        """Remove a stopped session's data and forget it."""
        self.release_lock(company)
        self.messages.forget(company)
        self.messages.mirror(company, None)
        shutil.rmtree(os.path.join(self.cfg.state_dir, "sessions", company), ignore_errors=True)
        self.sessions.pop(company, None)
        self.desired.forget(company, self.cfg.companies)
        self.save_desired()


def spawner_for(cfg: Config) -> process.ExecSpawner | process.ZygoteSpawner:
    """Sim workers fork from the preloaded fork server; neonize workers get a fresh interpreter each."""
    mode = cfg.worker_spawn
    if mode == "auto":
        mode = "zygote" if cfg.backend == "sim" else "exec"
    return process.ZygoteSpawner() if mode == "zygote" else process.ExecSpawner()


def error_dict(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


def describe_exit(code: int, info: dict[str, Any] | None) -> str:
    text = exitcodes.describe(code)
    if info and info.get("reason") and info["reason"] != text:
        text += f", {info['reason']}"
    return text


def make_dir(path: str, mode: int) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)
    os.chmod(path, mode)


def drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass

