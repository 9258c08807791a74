"""Prometheus metrics (DESIGN.md §5) and `/healthz`, served on `metrics_listen`.

The figures are built at scrape time from a snapshot of the arbiter's state (a custom
collector on a dedicated registry), so there is one source for `/metrics` and for
`waportctl metrics`. Scrapes run on the HTTP server's threads while the main loop changes its
dicts: the snapshot takes copies (`list(...)` of a dict is one C call under the GIL) and never
iterates a live dict. The send latency histogram is the only metric with its own state; the
main loop feeds it (`observe_send_latency`).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ipc import validation, webhooks
from ipc.states import ALL, ATTENTION, CONNECTED
from waportd.resources import Sample

log = logging.getLogger("waport.metrics")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
WEBHOOK_BUCKETS = webhooks.LATENCY_BUCKETS


@dataclass
class SessionView:
    company: str
    state: str
    reason: str
    alive: bool  # a worker process runs
    heartbeat_age: float | None  # seconds; None without a worker
    queued: int


@dataclass
class Snapshot:
    """The arbiter's state at one moment, copied for another thread."""

    sessions: list[SessionView] = field(default_factory=list)
    counters: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    samples: dict[str, Sample] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    loop_age: float = 0.0  # seconds since the main loop last went round
    loop_stall_after: float = 10.0
    hung_after: float = 15.0  # heartbeat age that means a hung worker
    shutting_down: bool = False
    redis: str = "disabled"  # disabled | up | down | unknown
    version: str = ""
    backend: str = ""
    pid: int = 0
    uptime: float = 0.0
    webhook: tuple[dict[str, int], list[int], float] = ({}, [], 0.0)  # pending per company, latency counts, sum
    memory_limit: int = 0  # bytes, 0 = off: exported so alerts can compare worker RSS with it
    cluster: tuple[dict[str, int], int] | None = None  # cluster mode: hosts per state, leases this host holds


# name -> (help, label names) of the per-key counters in Arbiter.counters; the key's first item
# selects the metric, the rest are the label values.
COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "restarts": ("waport_worker_restarts", "Automatic worker restarts, by the reason of the exit before.",
                 ("company", "reason")),
    "exit": ("waport_worker_exits", "Unrequested worker exits, by reason.", ("company", "reason")),
    "sent": ("waport_messages_sent", "Messages the network accepted.", ("company",)),
    "received": ("waport_messages_received", "Inbound messages delivered to the sinks.", ("company",)),
    "accepted": ("waport_messages_accepted", "Messages accepted into the outbox journal.", ("company",)),
    "failed": ("waport_messages_failed", "Messages that ended as send_failed, by reason.", ("company", "reason")),
    "rate_limited": ("waport_rate_limited", "Sends refused by the rate limit.", ("company",)),
    "qr": ("waport_qr_codes", "QR codes handed out for pairing.", ("company",)),
    "error": ("waport_errors", "Errors reported by workers or found by the supervisor, by kind.",
              ("company", "kind")),
    "control": ("waport_control_requests", "Control socket requests, by command and outcome (ok or error code).",
                ("cmd", "outcome")),
    "malformed": ("waport_malformed_frames", "Frames dropped as malformed, by socket.", ("socket",)),
    "events_dropped": ("waport_events_dropped", "Events not published: the PUB queue was full.", ()),
    "loop_errors": ("waport_loop_errors", "Exceptions the supervisor's main loop caught and survived (a bug: "
                    "see the log).", ()),
    "unknown_worker": ("waport_unknown_worker_frames", "Frames from a worker the supervisor does not know (an "
                       "old incarnation, a stray): it is told to stop.", ()),
    "webhook": ("waport_webhook_deliveries", "Webhook delivery attempts and their end, by outcome (ok, retry, "
                "dead, disabled).", ("company", "outcome")),
    "lease_renew_failures": ("waport_lease_renew_failures", "Cluster rounds (beat and lease renewal) that "
                             "PostgreSQL did not answer (DESIGN.md §12).", ()),
    "purged": ("waport_messages_purged", "Journal rows (sends and inbound messages) erased by journal_retention "
               "or `messages purge`.", ("company",)),
    "refused_transition": ("waport_refused_transitions", "State changes the transition table refused (a bug: "
                           "see the log).", ("from", "to")),
}
# Per-company counters shown as 0 for every known company, so rate() works from the first sample.
ZERO_FILLED = ("sent", "received", "rate_limited", "qr")


class ArbiterCollector(Collector):
    """Builds the waport_* families from a fresh snapshot on every collect()."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        snap = self.source()
        companies = sorted(v.company for v in snap.sessions)
        info = GaugeMetricFamily("waport_info", "The running waportd.", labels=["version", "backend"])
        info.add_metric([snap.version, snap.backend], 1)
        yield info

        by_state = dict.fromkeys(ALL, 0)
        for v in snap.sessions:
            by_state[v.state] = by_state.get(v.state, 0) + 1
        sessions = GaugeMetricFamily("waport_sessions", "Sessions per state.", labels=["state"])
        for state, n in by_state.items():
            sessions.add_metric([state], n)
        yield sessions

        up = GaugeMetricFamily("waport_session_up", "1 when the session is connected.", labels=["company"])
        age = GaugeMetricFamily("waport_heartbeat_age_seconds", "Seconds since the worker was last heard.",
                                labels=["company"])
        pending = GaugeMetricFamily("waport_outbox_pending", "Messages queued in the outbox journal.",
                                    labels=["company"])
        for v in sorted(snap.sessions, key=lambda v: v.company):
            up.add_metric([v.company], 1 if v.state == CONNECTED else 0)
            pending.add_metric([v.company], v.queued)
            if v.heartbeat_age is not None:
                age.add_metric([v.company], round(v.heartbeat_age, 3))
        yield up
        yield age
        yield pending
        # One series per company, its current state: alerts on failed/logged_out/banned can name the company.
        state = GaugeMetricFamily("waport_session_state", "1 for the company's current session state.",
                                  labels=["company", "state"])
        for v in sorted(snap.sessions, key=lambda v: v.company):
            state.add_metric([v.company, v.state], 1)
        yield state

        families = {key: CounterMetricFamily(name, help_, labels=list(labels))
                    for key, (name, help_, labels) in COUNTERS.items()}
        seen: dict[str, set[tuple[str, ...]]] = {key: set() for key in COUNTERS}
        for key, n in sorted(snap.counters):
            kind, labels = key[0], key[1:]
            if kind in families and len(labels) == len(COUNTERS[kind][2]):
                families[kind].add_metric([str(x) for x in labels], n)
                seen[kind].add(labels)
        for kind in ZERO_FILLED:
            for company in companies:
                if (company,) not in seen[kind]:
                    families[kind].add_metric([company], 0)
        for kind, (_, _, labels) in COUNTERS.items():
            if not labels and not seen[kind]:  # a plain counter exists from the start, at 0
                families[kind].add_metric([], 0)
        yield from families.values()

        rss = GaugeMetricFamily("waport_worker_resident_memory_bytes", "Resident memory of the worker process.",
                                labels=["company"])
        threads = GaugeMetricFamily("waport_worker_threads", "Threads of the worker process.", labels=["company"])
        fds = GaugeMetricFamily("waport_worker_open_fds", "Open file descriptors of the worker process.",
                                labels=["company"])
        for company, s in sorted(snap.samples.items()):
            rss.add_metric([company], s.rss_bytes)
            threads.add_metric([company], s.threads)
            fds.add_metric([company], s.open_files)
        cpu = CounterMetricFamily("waport_worker_cpu_seconds", "CPU seconds (user + system) of the company's "
                                  "workers, all restarts included.", labels=["company"])
        for company, seconds in sorted(snap.cpu_seconds.items()):
            cpu.add_metric([company], round(seconds, 3))
        yield rss
        limit = GaugeMetricFamily("waport_worker_memory_limit_bytes", "memory_limit: worker RSS above it restarts "
                                  "the worker (0 = off).")
        limit.add_metric([], snap.memory_limit)
        yield limit
        if snap.cluster is not None:
            by_state, owned = snap.cluster
            hosts = GaugeMetricFamily("waport_cluster_hosts", "Hosts of the cluster per state, as this host last "
                                      "saw them (DESIGN.md §12).", labels=["state"])
            for state in ("up", "draining", "down"):
                hosts.add_metric([state], by_state.get(state, 0))
            yield hosts
            leases = GaugeMetricFamily("waport_leases_owned", "Company leases this host holds.")
            leases.add_metric([], owned)
            yield leases
        yield cpu
        yield threads
        yield fds

        pending_by_company, counts, total = snap.webhook
        webhook = GaugeMetricFamily("waport_webhook_pending", "Webhook events not delivered yet (not dead).",
                                    labels=["company"])
        for company, n in sorted(dict(pending_by_company).items()):
            webhook.add_metric([company], n)
        yield webhook
        latency = HistogramMetricFamily("waport_webhook_delivery_seconds", "From an event to its webhook "
                                        "endpoint's 2xx.")
        cumulative, buckets = 0, []
        for bound, n in zip([*map(str, WEBHOOK_BUCKETS), "+Inf"], list(counts) or [0] * (len(WEBHOOK_BUCKETS) + 1),
                            strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        latency.add_metric([], buckets, total)
        yield latency

        if snap.redis != "disabled":
            redis_up = GaugeMetricFamily("waport_redis_up", "1 when Redis answers.")
            redis_up.add_metric([], 1 if snap.redis == "up" else 0)
            yield redis_up


class Metrics:
    """The registry: our collector, the send latency histogram, and the supervisor's own process."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ArbiterCollector(source))
        self.send_latency = Histogram(
            "waport_send_latency_seconds", "From accepting a message to the network accepting it.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def observe_send_latency(self, seconds: float) -> None:
        self.send_latency.observe(max(0.0, float(seconds)))

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its content type (OpenMetrics when the scraper asks for it)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def samples(self) -> list[dict[str, Any]]:
        """Every sample as {name, labels, value}: the reply of the `metrics` command."""
        out = []
        for family in self.registry.collect():
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                out.append({"name": s.name, "labels": dict(s.labels), "value": s.value})
        return out


def health(snap: Snapshot) -> tuple[int, dict[str, Any]]:
    """/healthz: 200 with status `ok`, else 503 with status `degraded` and what is wrong.

    Degraded: the main loop has not gone round for `loop_stall_after` seconds (control and
    workers are served by it), the daemon is shutting down, Redis is configured but down, or
    a session needs a person (failed, logged_out, replaced, outdated, banned) or has a hung worker.
    """
    loop_ok = snap.loop_age < snap.loop_stall_after
    attention = {v.company: v.state for v in snap.sessions if v.state in ATTENTION}
    for v in snap.sessions:
        if v.alive and v.heartbeat_age is not None and v.heartbeat_age > snap.hung_after:
            attention[v.company] = "hung"
    counts: dict[str, int] = {}
    for v in snap.sessions:
        counts[v.state] = counts.get(v.state, 0) + 1
    services = {
        "control": "stopping" if snap.shutting_down else ("ok" if loop_ok else "stalled"),
        "main_loop": "ok" if loop_ok else "stalled",
        "workers": "ok" if not attention else "degraded",
        "redis": snap.redis,
    }
    ok = loop_ok and not snap.shutting_down and not attention and snap.redis != "down"
    body = {
        "status": "ok" if ok else "degraded",
        "services": services,
        "counts": dict(sorted(counts.items())),
        "attention": dict(sorted(attention.items())),
        "sessions": len(snap.sessions),
        "version": snap.version,
        "pid": snap.pid,
        "uptime_seconds": round(snap.uptime, 1),
        "loop_age_seconds": round(snap.loop_age, 3),
    }
    return (200 if ok else 503), body


def parse_listen(listen: str) -> tuple[str, int]:
    """`metrics_listen` as (host, port); the parser is ipc's, shared with `http_listen`."""
    return validation.parse_listen(listen, "metrics_listen")


class MetricsServer:
    """A small threaded HTTP server: /metrics, /healthz, nothing else."""

    def __init__(self, listen: str, metrics: Metrics, snapshot: Callable[[], Snapshot]) -> None:
        self.listen = listen
        self.metrics = metrics
        self.snapshot = snapshot
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    def start(self) -> tuple[str, int]:
        host, port = parse_listen(self.listen)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        self.httpd = server_class(sockaddr[:2], self.handler_class())
        bound = self.httpd.server_address
        self.address = (str(bound[0]), int(bound[1]))
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="metrics-http", daemon=True)
        self.thread.start()
        return self.address

    @property
    def url(self) -> str | None:
        if self.address is None:
            return None
        host = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        return f"http://{host}:{self.address[1]}"

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "waportd"
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        body, ctype = server.metrics.exposition(self.headers.get("Accept"))
                        self.reply(200, body, ctype)
                    elif path == "/healthz":
                        code, report = health(server.snapshot())
                        self.reply(code, json.dumps(report).encode() + b"\n", "application/json")
                    elif path == "/":
                        self.reply(200, b'waportd: <a href="/metrics">/metrics</a> <a href="/healthz">/healthz</a>\n',
                                   "text/html; charset=utf-8")
                    else:
                        self.reply(404, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")
                except Exception as exc:  # noqa: BLE001 - a scrape never takes the daemon down
                    log.exception("serving %s failed", path)
                    self.reply(500, f"internal error: {exc}\n".encode(), "text/plain; charset=utf-8")

            def reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                log.debug("%s %s", self.address_string(), format % args)

        return Handler

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
