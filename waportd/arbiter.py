"""The supervisor's main loop (gunicorn-arbiter style).

Signal handlers only record the signal. One loop reads the sockets, handles the recorded
signals, reaps children and fires due timers, and each time it tells an owner what happened:
a `Company` (its worker's frames, its exit, its timers), the `MessageDesk` (sends and inbound),
the `Controller` (commands), `Ops` (metrics, systemd, strays). It owns no company's data.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq

from ipc import events, paths, protocol
from ipc.errors import BAD_REQUEST, WaportError
from ipc.files import make_dir
from ipc.tokens import TOKENS_FILE
from ipc.zsocket import recv_ready, send_frames
from waportd import helpers, process
from waportd.cluster import CLUSTER_COMMANDS, CLUSTER_LIFECYCLE, Cluster, NoCluster
from waportd.company import Company
from waportd.config import Config, ConfigError
from waportd.controller import Controller
from waportd.eventbus import EventBus
from waportd.forwarding import Forwarder
from waportd.locks import FileLock
from waportd.media import MediaDesk
from waportd.messages import MessageDesk
from waportd.ops import Ops
from waportd.redis_bridge import EVENTS, RedisBridge
from waportd.retention import Retention
from waportd.roster import Roster
from waportd.services import Clock, Kill, Services, Spawner, SystemClock
from waportd.transfer import Transfers
from waportd.webhooks import Webhooks
from waportd.workerlink import WorkerLink

log = logging.getLogger("waport.arbiter")

RECOVER_OUTCOMES = 200  # latest sends looked at for outcomes a killed worker journaled but never reported
TIMER_BUDGET = 0.2  # seconds of timers per turn at most: heartbeats and lease renewals are never held up long
TIMER_BATCH = 20  # timers fired per loop turn: 1,000 companies start a batch a turn, the sockets answer meanwhile
# Keys a reload does not change (a restart of waportd does).
RESTART_ONLY = ("state_dir", "run_dir", "backend", "sim_endpoint", "metrics_listen", "http_listen", "worker_spawn",
                "go_gc", "go_memory_limit", "go_max_procs", "journal_sync", "cluster_dsn", "host_id")
Reap = Callable[[], list[tuple[int, int]]]


class Arbiter:
    def __init__(
        self,
        cfg: Config,
        reload_config: Callable[[], Config] | None = None,
        *,
        clock: Clock | None = None,
        spawner: Spawner | None = None,
        kill: Kill = process.kill,
        reap: Reap = process.reap,
    ) -> None:
        """Everything that touches the system can be replaced (tests/fakes.py): the clock, spawning,
        signals to workers, reaping. Sockets are bound only by `setup`: without it, nothing is sent."""
        self.reload_config = reload_config
        self.reap = reap
        counters: Counter[tuple[Any, ...]] = Counter()
        self.link = WorkerLink(counters)
        self.bridge = RedisBridge(cfg.redis_url, self.wake, cfg.stream_maxlen) if cfg.redis_url else None
        self.bus = EventBus(counters, functools.partial(self.bridge.put_stream, EVENTS) if self.bridge else None)
        self.services = Services(
            cfg, spawner or spawner_for(cfg), kill, self.link.send, self.publish,
            self.bridge.put_mirror if self.bridge else _no_mirror, clock=clock or SystemClock(),
            counters=counters, sim_endpoint=cfg.sim_endpoint,
        )  # fmt: skip
        self.roster = Roster(self.services)
        self.helpers: dict[Any, helpers.Helper] = {}  # the demo network, the HTTP API: by timer key
        self.ops = Ops(self.services, self.roster, self.bridge, helper_pids=self.helper_pids)
        self.media = MediaDesk(self.services)
        self.messages = MessageDesk(self.services, self.roster, self.bridge, self.ops.metrics.observe_send_latency,
                                    lambda: self.media.store, self.wake)
        self.webhooks = Webhooks(self.services, self.bus.publish, self.start_webhook_delivery)
        self.ops.webhook_figures = lambda: (self.webhooks.pending, self.webhooks.latency_counts,
                                            self.webhooks.latency_sum)
        self.retention = Retention(self.services, self.roster, self.messages, self.media)
        self.controller = Controller(self.services, self.roster, self.messages, self.ops, self.reload, self.webhooks,
                                     self.media)
        self.controller.owners["messages_"] = self.retention
        self.transfers = Transfers(self.services, self.roster, self.messages, self.webhooks, self.media, self.wake)
        for prefix in ("export", "backup", "transfer_", "import_"):
            self.controller.owners[prefix] = self.transfers
        self.cluster: Cluster | None = None  # cluster mode (DESIGN.md §12): made by `setup`
        self.cluster_link: Any = None
        self.cluster_listener: Any = None
        self.lease_link: Any = None
        self.forwarder: Forwarder | None = None
        for cmd in CLUSTER_COMMANDS:
            self.controller.owners[cmd] = NoCluster()  # until `setup` joins a cluster
        self.signals: list[int] = []
        self.child_exited = True
        self.next_mirror = 0.0
        self.next_beat_out = 0.0
        self.lock = FileLock(os.path.join(cfg.state_dir, "waportd.lock"))

    @property
    def cfg(self) -> Config:
        return self.services.cfg

    def publish(self, company: str, type_: str, data: dict[str, Any], ts: float | None = None) -> None:
        """Every event: through the webhook record (if an endpoint wants it) to the events socket."""
        self.webhooks.publish(company, type_, data, ts)

    @property
    def counters(self) -> Counter[tuple[Any, ...]]:
        return self.services.counters

    # ---------------------------------------------------------------- set-up

    def setup(self) -> None:
        """Claim the state directory, bind the sockets, queue what should run."""
        cfg = self.cfg
        make_dir(cfg.state_dir, 0o700)
        make_dir(os.path.join(cfg.state_dir, "sessions"), 0o700)
        self.lock.acquire()  # LockBusy names the holder; main() turns it into exit 1
        self.transfers.open()  # an earlier daemon's unfinished transfers go
        make_dir(cfg.run_dir, 0o750)
        self.ctx = zmq.Context.instance()
        self.control = self.bind(zmq.ROUTER, paths.CONTROL_SOCK)
        self.link.sock = self.bind(zmq.ROUTER, paths.WORKERS_SOCK)
        self.link.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.bus.sock = self.bind(zmq.XPUB, paths.EVENTS_SOCK)  # XPUB: it tells us who subscribes to what
        self.webhooks.nudge_sock = self.bind(zmq.PUSH, paths.WEBHOOKS_SOCK)
        if not cfg.cluster_dsn:  # in a cluster: once the schema is there (`open_cluster_webhooks`)
            self.webhooks.open()  # may start the delivery process: after the sockets it talks to
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self.record_signal)
        if self.bridge:
            self.bridge.start()
        if cfg.backend == "sim" and not cfg.sim_endpoint:
            self.add_helper(helpers.simnet(self.services))
        if cfg.http_listen:
            self.add_helper(helpers.http_api(self.services))
        if cfg.cluster_dsn:
            self.join_cluster()
        else:
            self.boot()
        log.info(
            "waportd ready: pid %d, backend %s, %d companies, control %s",
            os.getpid(), cfg.backend, len(self.roster), paths.endpoint(cfg.run_dir, paths.CONTROL_SOCK),
        )  # fmt: skip

    def join_cluster(self) -> None:
        """Cluster mode (DESIGN.md §12): leases and placement (Cluster), commands and events to and from the
        other hosts (Forwarder), both through PostgreSQL on threads of their own."""
        from waportd.clusterstore import ClusterLink, ClusterListener  # psycopg: loaded only in cluster mode
        from waportd.tokensync import ClusterTokens

        cfg = self.cfg
        self.cluster_link = ClusterLink(cfg.cluster_dsn, cfg.host_id, cfg.lease_ttl, self.wake)
        self.lease_link = ClusterLink(cfg.cluster_dsn, cfg.host_id, cfg.lease_ttl, self.wake, role="leases")
        self.cluster_link.start()
        self.lease_link.start()
        self.cluster_listener = ClusterListener(self.cluster_link.store, self.wake, self.cluster_link.ready)
        self.cluster_listener.start()
        self.cluster = cluster = Cluster(self.services, self.roster, self.cluster_link.submit, self.lease_link.submit)
        for cmd in (*CLUSTER_COMMANDS, *CLUSTER_LIFECYCLE):
            self.controller.owners[cmd] = cluster
        self.ops.cluster_figures = cluster.figures
        self.forwarder = Forwarder(cluster, self.cluster_link.submit, self.controller.handle,
                                   self.services.clock.monotonic)
        self.controller.route = self.forwarder.route
        self.controller.here = lambda name: name in cluster.owned
        self.controller.host = cfg.host_id
        self.roster.cluster_wants = lambda name: name in cluster.owned and name not in cluster.releasing
        self.bus.tap = self.forwarder.publish
        # API tokens: PostgreSQL's, this host's file a copy kept in step after each round (the API reads it)
        tokens = ClusterTokens(os.path.join(cfg.state_dir, TOKENS_FILE), self.cluster_link.submit,
                               self.services.clock.time)
        self.controller.owners["token_"] = tokens
        cluster.after_round.append(tokens.after_round)
        tokens.start()
        cluster.after_round.append(self.open_cluster_webhooks)
        cluster.on_claimed.append(self.webhooks.claimed)
        cluster.on_lost.append(self.webhooks.lost)

    def open_cluster_webhooks(self) -> None:
        """The webhook store is in PostgreSQL: opened after the first round that reached it (the schema is
        migrated by then), tried again after each round until it opens."""
        if self.webhooks.store is not None or self.cluster is None or self.cluster.last_ok is None:
            return
        try:
            self.webhooks.open()
        except sqlite3.Error as exc:  # PgUnavailable (the store stays unopened): the next round tries again
            log.warning("webhook store not opened yet: %s", exc)

    def take_cluster_mail(self) -> None:
        """Commands other hosts forwarded here, answers to ours, and their events for our socket."""
        self.lease_link.take_done()  # the cluster's rounds, and its claims and mail, answered on the loop
        self.cluster_link.take_done()
        letters, broadcast = self.cluster_listener.take()
        for event in self.forwarder.relayed(broadcast + self.forwarder.on_letters(letters)):
            self.bus.relay(event)

    def add_helper(self, helper: helpers.Helper) -> None:
        self.helpers[helper.key] = helper
        helper.start()

    def start_webhook_delivery(self) -> None:
        """The first endpoint (config or `webhook set`) starts the delivery process; it stays until we stop."""
        if helpers.WEBHOOKS not in self.helpers and self.webhooks.nudge_sock is not None:
            self.add_helper(helpers.webhook_delivery(self.services))

    def helper_pids(self) -> set[int]:
        return {pid for h in list(self.helpers.values()) if (pid := h.pid) is not None}

    def boot(self) -> None:
        """Queue every company that should run; the loop starts them a batch per turn."""
        self.roster.load()
        for name in self.roster.wanted():
            self.roster.add(name).queue_start()

    def bind(self, kind: int, name: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind in (zmq.XPUB, zmq.PUSH):
            sock.setsockopt(zmq.SNDHWM, 100_000)
        else:
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.SNDHWM, 100_000)
        endpoint = paths.endpoint(self.cfg.run_dir, name)
        sock.bind(endpoint)
        os.chmod(paths.ipc_path(endpoint), 0o660)
        return sock

    # ---------------------------------------------------------------- main loop

    def run(self) -> int:
        self.setup()
        self.ops.started()
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.link.sock, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        poller.register(self.bus.sock, zmq.POLLIN)  # subscriptions come and go
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
            elif sock is self.link.sock:
                self.read_workers()
            elif sock is self.bus.sock:
                self.bus.read_subscriptions()
            else:
                drain(self.wake_r)
        self.handle_signals()
        self.messages.take_bridge_results()
        if self.cluster is not None:
            self.take_cluster_mail()
        self.messages.take_synced()  # journal_sync = "full": the sends whose fsync is done are answered
        self.transfers.take_done()  # bundles built or verified on their threads are answered
        self.messages.flush()  # durable before any send is answered
        if self.webhooks.flush():  # webhook events on disk before they are published
            self.messages.flush_acks()  # and before a worker hears its inbound messages are safe
        self.reap_children()
        now = self.services.clock.monotonic()
        self.fire_timers(now)
        if now >= next_beat:
            self.check_workers(now)
            next_beat = now + min(1.0, self.cfg.heartbeat_interval / 2)
        self.ops.tick(now)
        if self.cluster is not None:
            self.forwarder.flush()  # what this turn mailed to other hosts, in one statement
        return next_beat

    def poll_timeout_ms(self, next_beat: float) -> int:
        now = self.services.clock.monotonic()
        soon = [next_beat, self.ops.next_wakeup(now)]  # heartbeats; watchdog ping, resource samples
        deadline = self.services.timers.next_deadline()
        if deadline is not None:
            soon.append(deadline)
        if self.messages.batch or self.webhooks.batch:  # a store was busy: the next turn tries again
            soon.append(now + 0.005)
        return max(0, int((min(soon) - now) * 1000)) + 1

    def finished(self) -> bool:
        return self.services.shutting_down and not self.roster.running()

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
        if self.services.shutting_down:
            return
        running = self.roster.running()
        log.info("%s: stopping %d workers", why, len(running))
        self.services.shutting_down = True
        self.ops.stopping(len(running))
        for company in running:
            company.stop_worker()

    def wake(self) -> None:
        """Poke the main loop from another thread (the Redis bridge)."""
        try:
            os.write(self.wake_w, b"w")
        except (BlockingIOError, OSError, AttributeError):
            pass  # already awake, or not set up

    def close(self) -> None:
        self.webhooks.close()
        self.media.close()
        self.transfers.close()  # unfinished transfers' files go
        if self.bridge:
            self.bridge.stop()
        if self.cluster is not None:
            self.cluster_listener.stop()
            self.lease_link.stop()
            self.cluster_link.stop()  # its thread ends; what is left runs here, bounded by the store's timeouts
            self.cluster.leave(self.cluster_link.store)
            self.cluster_link.store.close()
        self.messages.close()
        self.services.spawner.close()
        self.ops.close()
        for helper in self.helpers.values():
            helper.stop()
        for name in (paths.CONTROL_SOCK, paths.WORKERS_SOCK, paths.EVENTS_SOCK, paths.WEBHOOKS_SOCK):
            try:
                os.unlink(os.path.join(self.cfg.run_dir, name))
            except OSError:
                pass
        for sock in (self.control, self.link.sock, self.bus.sock, self.webhooks.nudge_sock):
            if sock is not None:
                sock.close(0)
        for company in self.roster:
            company.release_lock()
        self.lock.release()
        log.info("waportd stopped")

    # ---------------------------------------------------------------- children and timers

    def reap_children(self) -> None:
        # waitpid scans every child: with 1,000 workers, call it only after a SIGCHLD.
        if not self.child_exited:
            return
        self.child_exited = False
        for pid, code in self.reap():
            company = self.roster.by_pid(pid)
            if company is not None:
                assert company.worker is not None
                company.worker.child.reaped(code)
                company.exited(code)
                continue
            ours = any(helper.reaped(pid, code) for helper in self.helpers.values())
            if not ours and self.services.spawner.owns(pid):
                log.warning("the fork server exited (%s); it starts again with the next worker", code)

    def fire_timers(self, now: float) -> None:
        """Starts, restarts, lock retries, kill deadlines and request timeouts that are due, a batch per turn
        (1,000 companies at boot start over 50 turns; the sockets are served in between)."""
        due = self.services.timers.due(now)
        self.services.timers.push_back(due[TIMER_BATCH:])
        began = time.monotonic()
        for i, (when, owner, what) in enumerate(due[:TIMER_BATCH]):
            if time.monotonic() - began > TIMER_BUDGET:  # spawns slow on a loaded machine: the rest next turn
                self.services.timers.push_back(due[i:TIMER_BATCH])
                return
            target = self.roster.get(owner) if isinstance(owner, str) else self.helpers.get(owner)
            if target is None:  # a company deleted meanwhile
                continue
            try:
                target.on_timer(what, when, now)
            except Exception:  # noqa: BLE001 - one owner's bug must not cost the other timers of the turn
                self.counters[("loop_errors",)] += 1
                log.exception("%s: error on a timer; carrying on", owner)

    def check_workers(self, now: float) -> None:
        """Heartbeats out, liveness in; keep the Redis session mirror alive (it has a TTL)."""
        wall = self.services.clock.time()
        if now >= self.next_mirror:
            self.next_mirror = now + 30
            self.messages.mirror_all()
            self.messages.limiter.memory.prune(wall)
            self.media.prune(wall, self.messages.queued_media)
            self.transfers.forget_idle(now)
        self.retention.tick(wall)
        if self.cluster is not None:
            self.cluster.tick(now)
            self.forwarder.tick(now)
        beat = now >= self.next_beat_out  # liveness is checked more often than we beat
        if beat:
            self.next_beat_out = now + self.cfg.heartbeat_interval
        for company in self.roster.running():
            company.check_liveness(now, wall, beat)

    # ---------------------------------------------------------------- worker socket

    def read_workers(self) -> None:
        for ident, msg in self.link.receive():
            self.on_worker_frame(ident, msg)

    def on_worker_frame(self, ident: bytes, msg: protocol.Message) -> None:
        company = self.roster.by_routing_id(ident)
        if company is None:
            self.counters[("unknown_worker",)] += 1
            log.warning("frame from unknown worker %r: told it to stop", ident[:64])
            self.services.send(ident, protocol.STOP, {"reason": "unknown worker"})
            return
        if not company.heard_from():
            return
        for one in protocol.unbatch(msg):  # in order: a batch's state change and its messages as they came
            if not company.heard(one):
                self.route(company, one)
            elif one.type == protocol.READY and company.ready and self.webhooks.endpoints:
                self.webhooks.recover_outcomes(company.name, self.messages.journal(company.name).recent_outbound(
                    RECOVER_OUTCOMES))

    def route(self, company: Company, msg: protocol.Message) -> None:
        """What a worker said that is not about its own life: to the owner of each kind."""
        name, body = company.name, msg.body
        if msg.type == protocol.LOG:
            self.ops.worker_log(company, body)
            return
        if msg.type != protocol.EVENT:
            self.counters[("malformed", "worker")] += 1
            return
        type_, data, ts = body["type"], body["data"], body["ts"]
        if type_ not in events.TYPES:
            self.counters[("malformed", "event")] += 1
            return
        if type_ == events.MESSAGE:
            self.messages.on_inbound(name, data, ts)
            return
        if type_ in (events.SENT, events.SEND_FAILED):
            self.messages.on_outcome(name, type_, data)
        elif type_ == events.QR:
            self.counters[("qr", name)] += 1
        elif type_ == events.ERROR:
            self.ops.worker_error(company, data)
        self.counters[("event", name, type_)] += 1
        self.services.publish(name, type_, data, ts)

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

    # ---------------------------------------------------------------- reload

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
        before = self.roster.wanted()
        delivery_changed = helpers.webhook_args(new) != helpers.webhook_args(self.cfg)
        self.services.reconfigure(new)
        self.messages.reconfigure(new)
        self.webhooks.configure(new)
        if delivery_changed and helpers.WEBHOOKS in self.helpers:
            self.helpers.pop(helpers.WEBHOOKS).stop()  # again with the new settings
            self.start_webhook_delivery()
        started, stopped = self.roster.reconfigured(before)
        for name in started:
            self.roster.add(name).start()
        for name in stopped:
            self.roster.add(name).stop()
        return {"started": started, "stopped": stopped}


def spawner_for(cfg: Config) -> process.ExecSpawner | process.ZygoteSpawner:
    """Workers fork from a preloaded fork server (neonize's: its Python side, never its Go library), or
    get a fresh interpreter each (`worker_spawn = "exec"`)."""
    env = process.go_env(cfg.go_gc, cfg.go_memory_limit, cfg.go_max_procs) if cfg.backend == "neonize" else {}
    if cfg.worker_spawn == "exec":
        return process.ExecSpawner(env)
    preload = (("neonize",) if cfg.backend == "neonize" else ()) + (("cluster",) if cfg.cluster_dsn else ())
    return process.ZygoteSpawner(preload, env)


def _no_mirror(_company: str, _record: dict[str, Any] | None) -> None:
    pass


def drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
