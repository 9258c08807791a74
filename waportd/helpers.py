"""Processes waportd runs beside the workers — the demo's simulated network, the HTTP API server —
tied to it (they die with it: PR_SET_PDEATHSIG) and restarted with backoff when they exit."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Hashable
from typing import Any

from ipc import paths
from ipc.files import make_dir
from ipc.webhookstore import CLUSTER_DSN_ENV
from waportd import process
from waportd.backoff import RestartPolicy
from waportd.config import Config
from waportd.services import Services

log = logging.getLogger("waport.arbiter")

# A helper that keeps failing is retried forever, at most about a minute apart.
POLICY = RestartPolicy(base_delay=0.5, factor=2.0, max_delay=60.0, jitter=0.1, reset_after=60.0, max_restarts=0)


class Helper:
    def __init__(self, name: str, argv: list[str], services: Services, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv  # the interpreter's arguments (`-m module ...`)
        self.env = env  # None: ours
        self.services = services
        self.proc: subprocess.Popen | None = None
        self.failures = 0
        self.started_at = 0.0

    @property
    def key(self) -> Hashable:
        return ("helper", self.name)  # its entries in the timer heap (companies are keyed by name)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def start(self) -> None:
        self.proc = process.spawn_tied(self.argv, env=self.env)
        self.started_at = self.services.clock.monotonic()
        log.info("started the %s (pid %d)", self.name, self.proc.pid)

    def reaped(self, pid: int, code: int) -> bool:
        """True if `pid` was this helper's; it starts again after a backoff unless waportd is stopping."""
        if self.proc is None or pid != self.proc.pid:
            return False
        self.proc.returncode = code
        if self.services.shutting_down:
            return True
        now = self.services.clock.monotonic()
        self.failures = POLICY.failures_after_exit(self.failures, now - self.started_at)
        delay = POLICY.delay(self.failures)
        log.error("the %s exited (%s); starting it again in %.1f s", self.name, code, delay)
        self.services.timers.at(now + delay, self.key, ("restart", None))
        return True

    def on_timer(self, what: Any, when: float, now: float) -> None:
        if self.services.shutting_down or self.pid is not None:
            return
        try:
            self.start()
        except OSError as exc:  # fork failed (EAGAIN, ENOMEM): try again after the next delay, never give up
            self.failures += 1
            delay = POLICY.delay(self.failures)
            log.error("cannot start the %s: %s; trying again in %.1f s", self.name, exc, delay)
            self.services.timers.at(now + delay, self.key, ("restart", None))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(8)  # the API's own graceful shutdown takes up to 3 s
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def simnet(services: Services) -> Helper:
    """The demo network: `backend = "sim"` with no `sim_endpoint` runs one of our own (auto-pair on)."""
    cfg = services.cfg
    state = f"{cfg.state_dir}/simnet"
    make_dir(state, 0o700)
    endpoint = paths.endpoint(cfg.run_dir, paths.SIMNET_SOCK)
    services.sim_endpoint = endpoint
    return Helper("simulated network", ["-m", "workers.simnet", "--endpoint", endpoint, "--state-dir", state,
                                        "--auto-pair", "--log-level", cfg.log_level.upper()], services)


def http_api(services: Services) -> Helper:
    """The HTTP API server on `http_listen` (DESIGN.md §9): a process of its own, never in our loop."""
    cfg = services.cfg
    return Helper("HTTP API", ["-m", "api", "--listen", cfg.http_listen, "--run-dir", cfg.run_dir,
                               "--state-dir", cfg.state_dir, "--log-level", cfg.log_level], services)


WEBHOOKS = ("helper", "webhook delivery")


def webhook_args(cfg: Config) -> list[str]:
    return ["--timeout", str(cfg.webhook_timeout), "--max-age", str(cfg.webhook_max_age),
            "--concurrency", str(cfg.webhook_concurrency), "--retry-scale", str(cfg.webhook_retry_scale),
            "--log-level", cfg.log_level]


def webhook_delivery(services: Services) -> Helper:
    """Webhook delivery (DESIGN.md §10): reads the store, posts, records; never in our loop. In a cluster
    the store is in PostgreSQL: the DSN goes in the environment (it may hold a password), never in argv."""
    cfg = services.cfg
    argv = ["-m", "waportd.webhook_delivery", "--run-dir", cfg.run_dir, "--state-dir", cfg.state_dir,
            *webhook_args(cfg)]
    env = None
    if cfg.cluster_dsn:
        argv += ["--host-id", cfg.host_id]
        env = {**os.environ, CLUSTER_DSN_ENV: cfg.cluster_dsn}
    helper = Helper("webhook delivery", argv, services, env)
    assert helper.key == WEBHOOKS
    return helper
