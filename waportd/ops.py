"""Running waportd in production: metrics endpoint, worker resources, systemd, strays, worker logs.

One object the arbiter calls at a few points (`started`, `tick`, `stopping`, `close`, and for
worker LOG frames and error events), so the main loop stays readable and each concern keeps
its own module: `metrics`, `resources`, `sdnotify`, `strays`, `diagnose`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ipc import __version__, events, paths
from waportd import diagnose as diagnosis
from waportd import strays
from waportd.metrics import Metrics, MetricsServer, SessionView, Snapshot
from waportd.resources import ResourceMonitor, Sample, human_bytes, over_limit
from waportd.sdnotify import Notifier, status_text

if TYPE_CHECKING:
    from waportd.arbiter import Arbiter, Worker
    from waportd.session import Session

log = logging.getLogger("waport.ops")

METRICS_PORT_FILE = "metrics.port"
LOOP_STALL_AFTER = 10.0  # seconds without a main-loop round before /healthz says stalled
STATUS_EVERY = 0.5  # seconds between two looks at the session counts for STATUS=
ERRORS_KEPT = 20
SAMPLE_SLICE = 25  # workers sampled per loop round (a psutil sample reads a few /proc files)


class Ops:
    """The production hooks of one arbiter; everything runs on its loop except metric scrapes."""

    def __init__(self, arbiter: Arbiter) -> None:
        self.a = arbiter
        self.resources = ResourceMonitor()
        self.metrics = Metrics(self.snapshot)
        self.server: MetricsServer | None = None
        self.notifier = Notifier.from_env()
        self.reaper = strays.Reaper(arbiter.cfg.stop_timeout)
        self.strays: list[strays.Stray] = []
        self.errors: dict[str, deque[dict[str, Any]]] = {}
        self.last_tick = time.monotonic()
        self.next_sample = 0.0
        self.to_sample: deque[str] = deque()  # companies still to sample in this pass
        self.next_status = 0.0

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
            self.next_sample = now + max(0.1, self.a.cfg.health_check_interval)
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

    def stopping(self) -> None:
        self.notifier.stopping(f"stopping {len(self.a.workers)} workers")

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            try:
                os.unlink(os.path.join(self.a.cfg.run_dir, METRICS_PORT_FILE))
            except OSError:
                pass
        self.notifier.close()

    def worker_log(self, s: Session, body: dict[str, Any]) -> None:
        """A worker's LOG frame, re-emitted through our handlers with the company tag."""
        level = body["level"]
        name = body["name"][:200] or "waport.worker"
        logger = logging.getLogger(name)
        if not logger.isEnabledFor(level):
            return
        record = logger.makeRecord(name, level, "worker", 0, body["msg"], None, None)
        record.created = float(body["ts"])
        record.msecs = (record.created - int(record.created)) * 1000
        record.company = s.company
        record.process = s.pid
        logger.handle(record)

    def worker_error(self, s: Session, data: dict[str, Any]) -> None:
        """An `error` event: counted by kind and kept for diagnose."""
        kind = str(data.get("kind") or "unknown")[:50]
        self.a.counters[("error", s.company, kind)] += 1
        self.remember_error(s.company, kind, str(data.get("message", ""))[:500])

    # ------------------------------------------------------------ metrics

    def start_metrics(self) -> None:
        listen = self.a.cfg.metrics_listen.strip()
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
        path = os.path.join(self.a.cfg.run_dir, METRICS_PORT_FILE)
        try:
            with open(path + ".tmp", "w") as fh:
                fh.write(f"{port}\n")
            os.chmod(path + ".tmp", 0o640)
            os.replace(path + ".tmp", path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)

    @property
    def metrics_url(self) -> str | None:
        return self.server.url if self.server else None

    def samples(self) -> list[dict[str, Any]]:
        """The `metrics` command's figures: the same registry /metrics serves."""
        return self.metrics.samples()

    def snapshot(self) -> Snapshot:
        """Copies of what the metrics and /healthz need; safe from the HTTP threads."""
        a = self.a
        mono = time.monotonic()
        live = set(list(a.workers))
        views = [
            SessionView(s.company, s.state, s.reason, s.company in live,
                        mono - s.last_heartbeat if s.company in live else None, s.queued)
            for s in list(a.sessions.values())
        ]
        samples, cpu = self.resources.snapshot()
        hb = a.cfg.heartbeat_interval
        return Snapshot(
            sessions=views,
            counters=list(a.counters.items()),
            samples={c: sample for c, sample in samples.items() if c in live},  # gone workers: no figure
            cpu_seconds=cpu,
            loop_age=mono - self.last_tick,
            loop_stall_after=max(LOOP_STALL_AFTER, 3 * hb),
            hung_after=3 * hb + 2,
            shutting_down=a.shutting_down,
            redis=self.redis_state(),
            version=__version__,
            backend=a.cfg.backend,
            pid=os.getpid(),
            uptime=time.time() - a.started_at,
        )

    def redis_state(self) -> str:
        if not self.a.cfg.redis_url:
            return "disabled"
        bridge = getattr(getattr(self.a, "messages", None), "bridge", None)
        if bridge is None:
            return "unknown"
        return "up" if getattr(bridge, "up", False) else "down"

    # ------------------------------------------------------------ resources

    def sample_workers(self, now: float) -> None:
        """Start a pass over every worker; `continue_sampling` does it in slices."""
        a = self.a
        self.to_sample = deque(a.workers)
        self.resources.retire_all_but(set(a.workers))
        for company in [c for c in list(self.resources.cpu_before) if c not in a.sessions]:
            self.resources.forget(company)
        self.continue_sampling(now)

    def continue_sampling(self, now: float) -> None:
        """psutil figures of up to SAMPLE_SLICE workers (hundreds would hold the loop up); one over
        memory_limit is restarted gracefully."""
        a = self.a
        wall = time.time()
        for _ in range(min(SAMPLE_SLICE, len(self.to_sample))):
            company = self.to_sample.popleft()
            w = a.workers.get(company)
            sample = self.resources.sample(company, w.proc.pid, wall) if w else None
            if w is None or sample is None:
                continue
            a.sessions[company].rss_bytes = sample.rss_bytes
            if over_limit(sample, a.cfg.memory_limit) and w.killed_reason is None and not w.stop_requested:
                self.restart_for_memory(company, w, sample, now)

    def restart_for_memory(self, company: str, w: Worker, sample: Sample, now: float) -> None:
        """SIGTERM (the worker stops in order), then the normal restart path with reason memory_limit."""
        a = self.a
        limit = a.cfg.memory_limit
        log.warning("%s: worker %d uses %s, over memory_limit %s; restarting it gracefully",
                    company, w.proc.pid, human_bytes(sample.rss_bytes), human_bytes(limit))
        a.publish(company, events.HEALTH_CHECK_FAILED,
                  {"check": "memory_limit", "rss_bytes": sample.rss_bytes, "limit": limit})
        a.restart_worker(w, "memory_limit", now)

    def resource_fields(self, company: str) -> dict[str, Any]:
        """Figures `status` adds to the record: the last sample of a live worker."""
        sample = self.resources.samples.get(company) if company in self.a.workers else None
        return {
            "cpu_seconds": round(self.resources.cpu_total(company), 3) if company in self.a.sessions else None,
            "threads": sample.threads if sample else None,
            "open_files": sample.open_files if sample else None,
        }

    # ------------------------------------------------------------ strays

    def find_strays(self, now: float) -> None:
        a = self.a
        children = set(a.pids)
        if a.simnet is not None:
            children.add(a.simnet.pid)
        endpoint = paths.endpoint(a.cfg.run_dir, paths.WORKERS_SOCK)
        found = strays.find(a.cfg.state_dir, endpoint, os.getpid(), children, set(a.locks))
        for stray in found:
            action = "ending it" if stray.ours else "not a waport worker: leaving it alone"
            message = f"stray process {stray.describe()}; {action}"
            log.warning("%s: %s", stray.company, message)
            a.counters[("error", stray.company, "stray")] += 1
            self.remember_error(stray.company, "stray", message)
            a.publish(stray.company, events.ERROR,
                      {"kind": "stray", "message": message, "pid": stray.pid, "ended": stray.ours})
            if stray.ours:
                self.reaper.end(stray.pid, now)
        self.strays = found

    # ------------------------------------------------------------ diagnose, status

    def remember_error(self, company: str, kind: str, message: str) -> None:
        self.errors.setdefault(company, deque(maxlen=ERRORS_KEPT)).append(
            {"ts": time.time(), "kind": kind, "message": message})

    def diagnose(self, company: str, record: dict[str, Any]) -> dict[str, Any]:
        a = self.a
        s = a.sessions[company]
        counters = list(a.counters.items())
        alive = company in a.workers
        sample = self.resources.samples.get(company) if alive else None
        growth = self.resources.growth(company)
        return diagnosis.diagnose(diagnosis.Inputs(
            company=company,
            record=record,
            now=time.time(),
            history=list(s.history),
            restarts_by_reason={k[2]: n for k, n in counters if k[0] == "restarts" and k[1] == company},
            exits_by_reason={k[2]: n for k, n in counters if k[0] == "exit" and k[1] == company},
            errors=list(self.errors.get(company, ())),
            heartbeat_age=time.monotonic() - s.last_heartbeat if alive else None,
            resources=sample.public() if sample else None,
            growth=growth.public() if growth else None,
            cpu_seconds_total=self.resources.cpu_total(company),
            strays=[st.public() for st in self.strays if st.company == company],
            heartbeat_interval=a.cfg.heartbeat_interval,
            memory_limit=a.cfg.memory_limit,
            reconnect_timeout=a.cfg.reconnect_timeout,
            messages_queued=s.queued,
        ))

    def status_text(self) -> str:
        return status_text(s.state for s in list(self.a.sessions.values()))
