"""Configuration: TOML file, then WAPORT_<KEY> environment variables, then flags (DESIGN.md §2)."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ipc import jsonsafe, webhooks
from ipc.errors import WaportError
from ipc.protocol import FENCE_MARGIN
from ipc.validation import parse_duration as parse_seconds
from ipc.validation import parse_listen, validate_company, validate_proxy

DEFAULT_PATH = "/etc/waport/waportd.toml"


class ConfigError(Exception):
    """A configuration the daemon refuses to run with; the message says which key and why."""


@dataclass(frozen=True)
class Config:
    state_dir: str = "/var/lib/waport"
    run_dir: str = "/run/waport"
    backend: str = "neonize"
    companies: tuple[str, ...] = ()
    metrics_listen: str = "127.0.0.1:9477"
    redis_url: str = ""
    sim_endpoint: str = ""
    # Options handed to sim workers as they are (TOML table, or JSON in WAPORT_SIM_OPTIONS): test knobs.
    sim_options: dict[str, Any] = field(default_factory=dict, hash=False)
    restart_base_delay: float = 5.0
    restart_factor: float = 2.0
    restart_max_delay: float = 300.0
    restart_jitter: float = 0.2
    restart_reset_after: float = 60.0
    max_restarts: int = 10
    heartbeat_interval: float = 5.0
    health_check_interval: float = 30.0
    reconnect_timeout: float = 300.0
    stop_timeout: float = 10.0
    memory_limit: int = 0
    rate_limit_max: int = 30
    rate_limit_window: float = 60.0
    rate_limit_company_max: int = 0  # all recipients of one company in the window; 0 = off
    stream_maxlen: int = 100_000  # approximate cap of each Redis stream
    pairing_timeout: float = 170.0
    connect_timeout: float = 60.0  # neonize: a dial that gets no answer ends then (a black-holed network)
    log_level: str = "info"
    worker_spawn: str = "auto"  # zygote (fork server) | exec (fresh interpreter) | auto: zygote for sim
    worker_nice: int = 5  # added to the supervisor's nice value for workers: busy workers never starve it
    http_listen: str = ""  # the HTTP API (DESIGN.md §9), run as a supervised child; "" = off
    max_companies: int = 2000  # companies this host may know; `start` of one more answers `capacity`
    # Webhooks (DESIGN.md §10): the endpoint of every company without one of its own ("" = none).
    webhook_url: str = ""
    webhook_secret: str = field(default="", repr=False)  # whsec_ + base64 of 24-64 random bytes
    webhook_events: tuple[str, ...] = ()  # () = the defaults: message, receipt, sent, send_failed, state
    webhook_timeout: float = 15.0  # a 2xx within it is a success
    webhook_max_age: float = 86400.0  # an event not delivered by then is dead
    webhook_concurrency: int = 16  # requests in flight per endpoint
    media_max_bytes: int = 64 << 20  # DESIGN.md §11: larger media is refused (media_too_large)
    media_retention: float = 7 * 86400.0  # stored media kept this long (unless a queued send needs it)
    webhook_retry_scale: float = 1.0  # multiplies the retry schedule (5 s, 30 s, 2 min, ...): tests, impatient ops
    proxy: str = field(default="", repr=False)  # neonize workers reach WhatsApp through it ("" = direct)
    # The Go runtime of each neonize worker (GOGC, GOMEMLIMIT, GOMAXPROCS; 0 = Go's own default). whatsmeow
    # needs little CPU: two Ps, not one per core of a large host (each P keeps caches and may keep a thread).
    go_gc: int = 0
    go_memory_limit: int = 0
    go_max_procs: int = 2
    journal_retention: float = 0.0  # ended sends and delivered inbound messages older than it are erased; 0 keeps all
    journal_sync: str = "normal"  # normal: survives any process crash; full: a power cut too (grouped fsyncs)
    # Several hosts on PostgreSQL (DESIGN.md §12): "" = this host alone.
    cluster_dsn: str = field(default="", repr=False)  # may hold a password: never in argv, never in a repr
    host_id: str = field(default_factory=socket.gethostname)
    host_capacity: int = 0  # companies this host may run; 0 = unlimited
    lease_ttl: float = 15.0
    lease_renew_interval: float = 2.0
    fence_after: float = 10.0  # unable to renew this long: this host stops its sessions (< ttl - 2 renewals)
    source: str = field(default="", compare=False)  # the file it came from, for messages


_DURATIONS = {
    "restart_base_delay",
    "restart_max_delay",
    "restart_reset_after",
    "heartbeat_interval",
    "health_check_interval",
    "reconnect_timeout",
    "stop_timeout",
    "rate_limit_window",
    "pairing_timeout",
    "connect_timeout",
    "webhook_timeout",
    "webhook_max_age",
    "media_retention",
    "journal_retention",
    "lease_ttl",
    "lease_renew_interval",
    "fence_after",
}
_BACKENDS = ("neonize", "sim")
HOST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,63}")
_UNIT_BYTES = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024**2,
               "g": 1e9, "gb": 1e9, "gib": 1024**3}
KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "source")


def parse_duration(key: str, value: Any) -> float:
    """Seconds from a number or a string such as "500ms", "5 s", "2m" (the parser is ipc's, shared with the CLI)."""
    try:
        return parse_seconds(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def parse_bytes(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size in bytes, got {value!r}")
    if isinstance(value, (int, float)):
        size = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNIT_BYTES:
            raise ConfigError(f"{key}: {value!r} is not a size (examples: 0, 536870912, \"512MiB\")")
        size = float(m.group(1)) * _UNIT_BYTES[m.group(2).lower()]
    if size < 0:
        raise ConfigError(f"{key}: must not be negative")
    return int(size)


def _coerce(key: str, value: Any) -> Any:
    if key in _DURATIONS:
        return parse_duration(key, value)
    if key in ("memory_limit", "media_max_bytes", "go_memory_limit"):
        return parse_bytes(key, value)
    if key in ("max_restarts", "rate_limit_max", "rate_limit_company_max", "stream_maxlen", "worker_nice",
               "max_companies", "webhook_concurrency", "go_gc", "go_max_procs", "host_capacity"):
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not a whole number") from None
        if n < 0 or isinstance(value, bool):
            raise ConfigError(f"{key}: must be a whole number >= 0")
        if key == "worker_nice" and n > 19:
            raise ConfigError("worker_nice: must be between 0 and 19")
        if key in ("max_companies", "webhook_concurrency") and n < 1:
            raise ConfigError(f"{key}: must be a whole number >= 1")
        return n
    if key == "http_listen":
        if not isinstance(value, str):
            raise ConfigError(f"http_listen: expected a string such as \"127.0.0.1:8480\", got {value!r}")
        if value.strip():
            try:
                parse_listen(value, key)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return value.strip()
    if key in ("restart_factor", "restart_jitter", "webhook_retry_scale"):
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not a number") from None
        if key == "restart_factor" and x < 1:
            raise ConfigError("restart_factor: must be >= 1")
        if key == "webhook_retry_scale" and not 0 < x <= 100:
            raise ConfigError("webhook_retry_scale: must be in (0, 100]")
        if key == "restart_jitter" and not 0 <= x < 1:
            raise ConfigError("restart_jitter: must be in [0, 1)")
        return x
    if key == "companies":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError("companies: expected a list of company ids")
        out = []
        for item in items:
            item = item.strip() if isinstance(item, str) else item
            if item == "":
                continue
            try:
                out.append(validate_company(item))
            except WaportError as exc:
                raise ConfigError(f"companies: {exc.message}") from None
        return tuple(dict.fromkeys(out))
    if key == "sim_options":
        if isinstance(value, str):
            try:
                value = jsonsafe.loads(value) if value.strip() else {}
            except ValueError:
                raise ConfigError(f"sim_options: {value!r} is not a JSON object") from None
        if not isinstance(value, dict):
            raise ConfigError("sim_options: expected a table of options for the sim backend")
        return dict(value)
    if key in ("webhook_url", "webhook_secret", "webhook_events"):
        try:
            if key == "webhook_events":
                return webhooks.validate_events(value, key)
            if isinstance(value, str) and not value.strip():
                return ""
            if key == "webhook_url":
                return webhooks.validate_url(value, key)
            webhooks.secret_key(value, key)
            return value
        except WaportError as exc:
            raise ConfigError(exc.message) from None
    if key == "proxy":
        try:
            return validate_proxy(value)
        except WaportError as exc:
            raise ConfigError(exc.message) from None
    if key == "cluster_dsn":
        if not isinstance(value, str) or (value and not value.startswith(("postgres://", "postgresql://"))):
            raise ConfigError("cluster_dsn: expected a postgresql:// URL (or \"\" for one host)")
        return value
    if key == "host_id":
        if not isinstance(value, str) or not HOST_ID_RE.fullmatch(value):
            raise ConfigError(f"host_id: {value!r} must be 1-63 letters, digits, dots, dashes or underscores")
        return value
    if key == "journal_sync":
        if value not in ("normal", "full"):
            raise ConfigError(f"journal_sync: {value!r} is not one of normal, full")
        return value
    if key == "worker_spawn":
        if value not in ("auto", "zygote", "exec"):
            raise ConfigError(f"worker_spawn: {value!r} is not one of auto, zygote, exec")
        return value
    if key == "backend":
        if value not in _BACKENDS:
            raise ConfigError(f"backend: {value!r} is not one of {', '.join(_BACKENDS)}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def load(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config; a missing default file means defaults, a missing named file is an error."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    source = path or DEFAULT_PATH
    explicit = path is not None
    if os.path.exists(source) and os.path.getsize(source) > 0:
        try:
            with open(source, "rb") as fh:
                values.update(tomllib.load(fh))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    elif explicit and not os.path.exists(source):
        raise ConfigError(f"{source}: no such config file")
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(KEYS)}")
    for key in KEYS:
        env = environ.get(f"WAPORT_{key.upper()}")
        if env is not None:
            values[key] = env
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    coerced = {key: _coerce(key, value) for key, value in values.items()}
    if coerced.get("heartbeat_interval", 1) <= 0:
        raise ConfigError("heartbeat_interval: must be > 0")
    if coerced.get("webhook_url") and not coerced.get("webhook_secret"):
        raise ConfigError("webhook_secret: required with webhook_url (`waportctl webhook secret` makes one)")
    for key in ("webhook_timeout", "webhook_max_age", "lease_ttl", "lease_renew_interval", "fence_after"):
        if coerced.get(key, 1) <= 0:
            raise ConfigError(f"{key}: must be > 0")
    ttl = coerced.get("lease_ttl", Config.lease_ttl)
    renew = coerced.get("lease_renew_interval", Config.lease_renew_interval)
    fence = coerced.get("fence_after", Config.fence_after)
    if fence >= ttl - 2 * renew:
        raise ConfigError("fence_after: must be less than lease_ttl minus two lease_renew_interval (a host stops "
                          "its sessions before another may claim them)")
    if fence <= FENCE_MARGIN + 2 * renew:
        raise ConfigError(f"fence_after: must be more than two lease_renew_interval plus {FENCE_MARGIN:g} s (the "
                          "margin a worker keeps), or sessions stop whenever one renewal is late")
    dsn = coerced.get("cluster_dsn", "")
    if dsn and coerced.get("backend", Config.backend) == "neonize" and "sslmode=" not in dsn:
        raise ConfigError("cluster_dsn: say sslmode= in it (require, verify-full, or disable on a trusted network): "
                          "whatsmeow's PostgreSQL driver requires SSL when it is not said, psycopg only prefers it")
    return Config(source=source if os.path.exists(source) else "", **coerced)
