"""Running waportd in production: metrics endpoint, worker resources, systemd, strays, worker logs.

One object the arbiter calls at a few points (`started`, `tick`, `stopping`, `close`, and for
worker LOG frames and error events), so the main loop stays readable and each concern keeps
its own module: `metrics`, `resources`, `sdnotify`, `strays`, `diagnose`. It sees the companies
through the roster and acts on one only through its `Company` (a graceful restart for memory).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ipc import __version__, events, paths
from ipc.files import write_atomic
from waportd import diagnose as diagnosis
from waportd import strays
from waportd.company import Company
from waportd.metrics import Metrics, MetricsServer, SessionView, Snapshot
from waportd.metrics import health as healthz
from waportd.redis_bridge import RedisBridge
from waportd.resources import ResourceMonitor, Sample, human_bytes, over_limit
from waportd.roster import Roster
from waportd.sdnotify import Notifier, status_text
from waportd.services import Services

log = logging.getLogger("waport.ops")

METRICS_PORT_FILE = "metrics.port"
LOOP_STALL_AFTER = 10.0  # seconds without a main-loop round before /healthz says stalled
STATUS_EVERY = 0.5  # seconds between two looks at the session counts for STATUS=
ERRORS_KEPT = 20
SAMPLE_SLICE = 25  # workers sampled per loop round (a psutil sample reads a few /proc files)


class Ops:
    """The production hooks of one arbiter; everything runs on its loop except metric scrapes."""

    def __init__(self, services: Services, roster: Roster, bridge: RedisBridge | None,
                 helper_pids: Callable[[], set[int]]) -> None:
        self.services = services
        self.roster = roster
        self.bridge = bridge
        self.helper_pids = helper_pids  # the demo network, the HTTP API: our children, not strays
        self.started_at = time.time()
        self.resources = ResourceMonitor()
        self.metrics = Metrics(self.snapshot)
        self.server: MetricsServer | None = None
        self.notifier = Notifier.from_env()
        self.reaper = strays.Reaper(services.cfg.stop_timeout)
        self.strays: list[strays.Stray] = []
        self.errors: dict[str, deque[dict[str, Any]]] = {}
        self.last_tick = time.monotonic()
        self.next_sample = 0.0
        self.to_sample: deque[str] = deque()  # companies still to sample in this pass
        self.next_status = 0.0
        # Set by the arbiter: pending per company, latency bucket counts and sum, as the delivery reported them.
        self.webhook_figures: Callable[[], tuple[dict[str, int], list[int], float]] = lambda: ({}, [], 0.0)
        self.cluster_figures: Callable[[], tuple[dict[str, int], int] | None] = lambda: None  # cluster mode

    # ------------------------------------------------------------ arbiter hooks

    def started(self) -> None:
        """Sockets are bound (sessions start from the loop): serve metrics, end strays, tell systemd."""
        now = time.monotonic()
        self.last_tick = now
        self.start_metrics()
        try:
            self.find_strays(now)
        except Exception:  # noqa: BLE001 - a failed scan must not keep the daemon from running
            log.exception("the scan for stray processes failed")
        self.notifier.ready(self.status_text())

    def tick(self, now: float) -> None:
        """Every main-loop round: the watchdog, resource samples when due, strays, STATUS=."""
        self.last_tick = now
        self.notifier.watchdog(now)
        if now >= self.next_sample:
            self.next_sample = now + max(0.1, self.services.cfg.health_check_interval)
            self.sample_workers(now)
        elif self.to_sample:
            self.continue_sampling(now)
        if self.reaper.pending:
            self.reaper.tick(now)
        if self.notifier.enabled and now >= self.next_status:
            self.next_status = now + STATUS_EVERY
            self.notifier.status(self.status_text(), now)
            self.notifier.flush_status(now)

    def next_wakeup(self, now: float) -> float:
        """When the main loop must go round next for us (the watchdog must not wait for traffic)."""
        soon = self.next_sample
        if self.notifier.watchdog_interval is not None:
            soon = min(soon, self.notifier.next_watchdog)
        if self.to_sample:
            soon = now
        if self.reaper.pending or self.notifier.pending_status is not None:
            soon = min(soon, now + 0.25)
        return soon

    def stopping(self, workers: int) -> None:
        self.notifier.stopping(f"stopping {workers} workers")

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            try:
                os.unlink(os.path.join(self.services.cfg.run_dir, METRICS_PORT_FILE))
            except OSError:
                pass
        self.notifier.close()

    def worker_log(self, company: Company, body: dict[str, Any]) -> None:
        """A worker's LOG frame, re-emitted through our handlers with the company tag."""
        level = body["level"]
        name = body["name"][:200] or "waport.worker"
        logger = logging.getLogger(name)
        if not logger.isEnabledFor(level):
            return
        where = body.get("file"), body.get("line"), body.get("func")  # the worker's code (journald's CODE_*)
        record = logger.makeRecord(name, level, str(where[0])[:500] if isinstance(where[0], str) else "worker",
                                   where[1] if type(where[1]) is int else 0, body["msg"], None, None,
                                   str(where[2])[:200] if isinstance(where[2], str) else None)
        record.created = float(body["ts"])
        record.msecs = (record.created - int(record.created)) * 1000
        record.company = company.name
        record.program = "worker"  # its line says worker[company/pid]; journald's SYSLOG_IDENTIFIER
        record.process = company.session.pid or (company.worker.pid if company.worker else 0)  # never None
        if isinstance(body.get("event"), str):
            record.event = body["event"][:64]
        logger.handle(record)

    def worker_error(self, company: Company, data: dict[str, Any]) -> None:
        """An `error` event: counted by kind and kept for diagnose."""
        kind = str(data.get("kind") or "unknown")[:50]
        self.services.counters[("error", company.name, kind)] += 1
        self.remember_error(company.name, kind, str(data.get("message", ""))[:500])

    # ------------------------------------------------------------ metrics

    def start_metrics(self) -> None:
        listen = self.services.cfg.metrics_listen.strip()
        if not listen:
            return
        server = MetricsServer(listen, self.metrics, self.snapshot)
        try:
            host, port = server.start()
        except (OSError, ValueError) as exc:
            log.error("metrics: cannot listen on %s: %s; running without /metrics", listen, exc)
            return
        self.server = server
        log.info("metrics: %s/metrics and /healthz", server.url)
        path = os.path.join(self.services.cfg.run_dir, METRICS_PORT_FILE)
        try:
            write_atomic(path, f"{port}\n", mode=0o640, durable=False)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)

    @property
    def metrics_url(self) -> str | None:
        return self.server.url if self.server else None

    def samples(self) -> list[dict[str, Any]]:
        """The `metrics` command's figures: the same registry /metrics serves."""
        return self.metrics.samples()

    def health(self) -> dict[str, Any]:
        """The /healthz body (its HTTP status follows from `status`: ok 200, degraded 503)."""
        return healthz(self.snapshot())[1]

    def snapshot(self) -> Snapshot:
        """Copies of what the metrics and /healthz need; safe from the HTTP threads."""
        sv = self.services
        mono = sv.clock.monotonic()
        views, live = [], set()
        for c in self.roster:
            w = c.worker  # read once: the loop may end it meanwhile
            if w is not None:
                live.add(c.name)
            s = c.session
            views.append(SessionView(c.name, s.state, s.reason, w is not None,
                                     mono - w.last_heartbeat if w is not None else None, s.queued))
        samples, cpu = self.resources.snapshot()
        hb = sv.cfg.heartbeat_interval
        return Snapshot(
            sessions=views,
            counters=list(sv.counters.items()),
            samples={c: sample for c, sample in samples.items() if c in live},  # gone workers: no figure
            cpu_seconds=cpu,
            loop_age=mono - self.last_tick,
            loop_stall_after=max(LOOP_STALL_AFTER, 3 * hb),
            hung_after=3 * hb + 2,
            shutting_down=sv.shutting_down,
            redis=self.redis_state(),
            version=__version__,
            backend=sv.cfg.backend,
            pid=os.getpid(),
            uptime=time.time() - self.started_at,
            webhook=self.webhook_figures(),
            memory_limit=sv.cfg.memory_limit,
            cluster=self.cluster_figures(),
        )

    def redis_state(self) -> str:
        if self.bridge is None:
            return "disabled"
        return "up" if self.bridge.up else "down"

    # ------------------------------------------------------------ resources

    def sample_workers(self, now: float) -> None:
        """Start a pass over every worker; `continue_sampling` does it in slices."""
        running = [c.name for c in self.roster.running()]
        self.to_sample = deque(running)
        self.resources.retire_all_but(set(running))
        for name in [n for n in list(self.resources.cpu_before) if self.roster.get(n) is None]:
            self.resources.forget(name)
        self.continue_sampling(now)

    def continue_sampling(self, now: float) -> None:
        """psutil figures of up to SAMPLE_SLICE workers (hundreds would hold the loop up); one over
        memory_limit is restarted gracefully."""
        wall = time.time()
        for _ in range(min(SAMPLE_SLICE, len(self.to_sample))):
            company = self.roster.get(self.to_sample.popleft())
            w = company.worker if company is not None else None
            if company is None or w is None:
                continue
            sample = self.resources.sample(company.name, w.pid, wall)
            if sample is None:
                continue
            company.session.rss_bytes = sample.rss_bytes
            if over_limit(sample, self.services.cfg.memory_limit) and not w.ending:
                self.restart_for_memory(company, sample, now)

    def restart_for_memory(self, company: Company, sample: Sample, now: float) -> None:
        """SIGTERM (the worker stops in order), then the normal restart path with reason memory_limit."""
        limit = self.services.cfg.memory_limit
        log.warning("%s: worker %d uses %s, over memory_limit %s; restarting it gracefully",
                    company.name, company.session.pid, human_bytes(sample.rss_bytes), human_bytes(limit))
        self.services.publish(company.name, events.HEALTH_CHECK_FAILED,
                              {"check": "memory_limit", "rss_bytes": sample.rss_bytes, "limit": limit}, None)
        company.restart_worker("memory_limit", now)

    def resource_fields(self, company: Company) -> dict[str, Any]:
        """Figures `status` adds to the record: the last sample of a live worker."""
        sample = self.resources.samples.get(company.name) if company.worker is not None else None
        return {
            "cpu_seconds": round(self.resources.cpu_total(company.name), 3),
            "threads": sample.threads if sample else None,
            "open_files": sample.open_files if sample else None,
        }

    # ------------------------------------------------------------ strays

    def find_strays(self, now: float) -> None:
        sv = self.services
        children = {c.worker.pid for c in self.roster.running() if c.worker is not None}
        children |= self.helper_pids()
        locked = {c.name for c in self.roster if c.lock is not None}
        endpoint = paths.endpoint(sv.cfg.run_dir, paths.WORKERS_SOCK)
        found = strays.find(sv.cfg.state_dir, endpoint, os.getpid(), children, locked)
        for stray in found:
            action = "ending it" if stray.ours else "not a waport worker: leaving it alone"
            message = f"stray process {stray.describe()}; {action}"
            log.warning("%s: %s", stray.company, message)
            sv.counters[("error", stray.company, "stray")] += 1
            self.remember_error(stray.company, "stray", message)
            sv.publish(stray.company, events.ERROR,
                       {"kind": "stray", "message": message, "pid": stray.pid, "ended": stray.ours}, None)
            if stray.ours:
                self.reaper.end(stray.pid, now)
        self.strays = found

    # ------------------------------------------------------------ diagnose, status

    def remember_error(self, company: str, kind: str, message: str) -> None:
        self.errors.setdefault(company, deque(maxlen=ERRORS_KEPT)).append(
            {"ts": time.time(), "kind": kind, "message": message})

    def diagnose(self, company: Company, record: dict[str, Any]) -> dict[str, Any]:
        cfg, name, s, w = self.services.cfg, company.name, company.session, company.worker
        counters = list(self.services.counters.items())
        sample = self.resources.samples.get(name) if w is not None else None
        growth = self.resources.growth(name)
        return diagnosis.diagnose(diagnosis.Inputs(
            company=name,
            record=record,
            now=time.time(),
            history=list(s.history),
            restarts_by_reason={k[2]: n for k, n in counters if k[0] == "restarts" and k[1] == name},
            exits_by_reason={k[2]: n for k, n in counters if k[0] == "exit" and k[1] == name},
            errors=list(self.errors.get(name, ())),
            heartbeat_age=self.services.clock.monotonic() - w.last_heartbeat if w is not None else None,
            resources=sample.public() if sample else None,
            growth=growth.public() if growth else None,
            cpu_seconds_total=self.resources.cpu_total(name),
            strays=[st.public() for st in self.strays if st.company == name],
            heartbeat_interval=cfg.heartbeat_interval,
            memory_limit=cfg.memory_limit,
            reconnect_timeout=cfg.reconnect_timeout,
            messages_queued=s.queued,
        ))

    def status_text(self) -> str:
        return status_text(c.state for c in self.roster)
