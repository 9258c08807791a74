"""`diagnose COMPANY`: what happened to a session, and what to do about it, in plain words.

Pure: it reads a snapshot (the record, the state history, counters, resource samples) that
the controller gathers, so every rule is unit-tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ipc.states import (
    BACKOFF,
    BANNED,
    CONNECTED,
    DISCONNECTED,
    FAILED,
    LOGGED_OUT,
    OUTDATED,
    PAIRING,
    REPLACED,
    STARTING,
    STOPPED,
    TROUBLE,
)
from waportd.resources import human_bytes

HISTORY_SHOWN = 20
ERRORS_SHOWN = 10
FLAPPING_WINDOW = 3600.0  # seconds in which FLAPPING_RESTARTS restarts are too many
FLAPPING_RESTARTS = 3
GROWTH_MIN_BYTES = 50 * 1024 * 1024  # RSS growth that is worth a word
GROWTH_MIN_RATIO = 1.5
NEAR_LIMIT = 0.8
LONG_PAIRING = 60.0


@dataclass
class Inputs:
    """Everything diagnose looks at, gathered by the caller at one moment."""

    company: str
    record: dict[str, Any]
    now: float
    history: list[tuple[float, str, str]] = field(default_factory=list)
    restarts_by_reason: dict[str, int] = field(default_factory=dict)
    exits_by_reason: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)  # {ts, kind, message}, oldest first
    heartbeat_age: float | None = None  # seconds since the worker was last heard; None: no worker
    resources: dict[str, Any] | None = None  # the last Sample, as a dict
    growth: dict[str, Any] | None = None  # Growth.public()
    cpu_seconds_total: float | None = None
    strays: list[dict[str, Any]] = field(default_factory=list)
    heartbeat_interval: float = 5.0
    memory_limit: int = 0
    reconnect_timeout: float = 300.0
    messages_queued: int = 0


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def diagnose(i: Inputs) -> dict[str, Any]:
    """The reply of `diagnose`: the record, history, figures, findings and recommendations."""
    findings: list[str] = []
    recs: list[str] = []
    r = i.record
    c = i.company
    state, reason = r.get("state"), r.get("reason") or ""
    since = ago(i.now - r["since"]) if isinstance(r.get("since"), (int, float)) and r.get("since") else "?"
    restarts = int(r.get("restarts") or 0)
    recent_exits = [t for t, s, _ in i.history if s in (BACKOFF, BANNED) and i.now - t <= FLAPPING_WINDOW]

    # ---- the state itself
    if state == CONNECTED:
        findings.append(f"connected for {since} as {r.get('phone') or 'an unknown number'}")
    elif state == FAILED and reason.startswith("crash loop"):
        findings.append(f"crash loop: the worker failed repeatedly and waportd gave up ({reason})")
        recs.append(f"look at the worker's last errors below and in the log (journalctl -u waportd | grep "
                    f"'worker\\[{c}/'), fix the cause, then run `waportctl restart {c}`")
    elif state == FAILED and "pairing" in reason:
        findings.append(f"pairing timed out: nobody scanned the QR code in time ({reason})")
        recs.append(f"re-pair: `waportctl restart {c}`, then scan `waportctl qr {c}` with WhatsApp > Linked devices "
                    f"(or `waportctl pair {c} PHONE`) within the pairing timeout")
    elif state == FAILED:
        findings.append(f"failed {since} ago: {reason or 'no reason recorded'}")
        recs.append(f"fix the cause named above, then `waportctl restart {c}`")
    elif state == LOGGED_OUT:
        findings.append(f"the device was unlinked (logged out) {since} ago: {reason}")
        recs.append(f"re-pair needed: `waportctl restart {c}`, then `waportctl qr {c}` "
                    f"(or `waportctl pair {c} PHONE`); it will not restart on its own")
    elif state == REPLACED:
        findings.append(f"another client took over this session {since} ago: {reason}")
        recs.append("stale session copy: make sure no other host or process runs this WhatsApp session (an old "
                    f"deployment, a copied session directory), then `waportctl restart {c}`; waportd does not "
                    "restart it on its own, since two clients would kick each other forever")
    elif state == OUTDATED:
        findings.append(f"WhatsApp rejected the client as outdated: {reason}")
        recs.append("upgrade waport (and its neonize) and restart the daemon")
    elif state == BANNED:
        when = r.get("next_restart_at")
        left = f" in {ago(when - i.now)}" if isinstance(when, (int, float)) else ""
        findings.append(f"temporarily banned by WhatsApp; it restarts on its own{left}")
        recs.append("lower the sending rate (rate_limit_max / rate_limit_window) and avoid bulk messages to "
                    "people who have not written first")
    elif state == BACKOFF:
        when = r.get("next_restart_at")
        left = f"in {ago(when - i.now)}" if isinstance(when, (int, float)) else "soon"
        findings.append(f"the worker exited ({reason}); restarting {left}")
    elif state == DISCONNECTED:
        findings.append(f"the worker is alive but disconnected for {since}: {reason or 'reconnecting'}")
        if isinstance(r.get("since"), (int, float)) and i.now - r["since"] > i.reconnect_timeout / 2:
            recs.append(f"stale connection: if it does not recover, waportd restarts the worker after "
                        f"{i.reconnect_timeout:.0f} s; if it keeps happening, check the network, then re-pair")
    elif state == PAIRING:
        findings.append(f"waiting to be paired for {since}")
        recs.append(f"scan `waportctl qr {c}` with WhatsApp > Linked devices, or use `waportctl pair {c} PHONE`")
    elif state == STARTING and reason.startswith("waiting for the session lock"):
        findings.append(f"cannot start: {reason}")
        recs.append("another process holds the session lock: if it is an old worker it is ended at start-up; "
                    "otherwise find it (`fuser -v <state_dir>/sessions/" + c + "/session.lock`) and stop it")
    elif state == STOPPED:
        findings.append(f"stopped {since} ago{f' ({reason})' if reason else ''}")
        recs.append(f"`waportctl start {c}` to run it")
    else:
        findings.append(f"{state} for {since}{f' ({reason})' if reason else ''}")

    # ---- restarts
    if restarts:
        by = ", ".join(f"{n} {why or 'unknown'}"
                       for why, n in sorted(i.restarts_by_reason.items(), key=lambda x: -x[1]))
        findings.append(f"restarted {restarts} times since waportd started" + (f" ({by})" if by else ""))
    if len(recent_exits) >= FLAPPING_RESTARTS and state != FAILED:
        findings.append(f"{len(recent_exits)} unrequested exits in the last hour: the session is flapping")
        recs.append("frequent restarts: read the last errors below; a session that keeps dropping may need "
                    f"re-pairing (`waportctl logout {c}`, then pair again)")

    # ---- liveness
    if i.heartbeat_age is not None and i.heartbeat_age > 2 * i.heartbeat_interval:
        findings.append(f"the worker was last heard {i.heartbeat_age:.1f} s ago (heartbeat every "
                        f"{i.heartbeat_interval:g} s)")
        recs.append("the worker may be hung: waportd aborts and restarts it after 3 missed heartbeats")

    # ---- memory
    rss = (i.resources or {}).get("rss_bytes")
    if i.memory_limit and isinstance(rss, int) and rss > NEAR_LIMIT * i.memory_limit:
        findings.append(f"memory {human_bytes(rss)} is close to memory_limit {human_bytes(i.memory_limit)}")
    mem_restarts = i.restarts_by_reason.get("memory_limit", 0)
    if mem_restarts:
        findings.append(f"restarted {mem_restarts} times for using more than memory_limit")
    g = i.growth or {}
    first, last = g.get("first_bytes"), g.get("last_bytes")
    grew = (isinstance(first, int) and isinstance(last, int) and first > 0
            and last - first >= GROWTH_MIN_BYTES and last >= GROWTH_MIN_RATIO * first)
    if grew:
        findings.append(f"memory growth: RSS went from {human_bytes(first)} to {human_bytes(last)} in "
                        f"{ago(g.get('seconds', 0))}")
    if mem_restarts or grew:
        if i.memory_limit:
            recs.append("memory growth: memory_limit restarts the worker gracefully; if it happens often, "
                        "report it with the figures above (a leak in the backend)")
        else:
            recs.append("memory growth: set memory_limit (e.g. \"512MiB\") so the worker is restarted gracefully "
                        "before the host runs short")

    # ---- outbox and strays
    if i.messages_queued and state != CONNECTED:
        findings.append(f"{i.messages_queued} message(s) wait in the outbox; they are sent once it connects")
    for stray in i.strays:
        findings.append(f"stray process at start-up: pid {stray.get('pid')} ({stray.get('why')})"
                        + (", ended" if stray.get("ours") else ", not ours: left alone"))

    trouble = [{"ts": t, "kind": s, "message": why} for t, s, why in i.history if s in TROUBLE and why]
    reported = [{"ts": e.get("ts"), "kind": e.get("kind"), "message": e.get("message")} for e in i.errors]
    last_errors = sorted(trouble + reported, key=lambda e: e["ts"] if isinstance(e["ts"], (int, float)) else 0)

    return {
        "company": c,
        "record": r,
        "findings": findings,
        "recommendations": recs,
        "history": [{"ts": t, "state": s, "reason": why} for t, s, why in i.history[-HISTORY_SHOWN:]],
        "last_errors": last_errors[-ERRORS_SHOWN:],
        "restarts": restarts,
        "restarts_by_reason": dict(i.restarts_by_reason),
        "exits_by_reason": dict(i.exits_by_reason),
        "heartbeat_age": None if i.heartbeat_age is None else round(i.heartbeat_age, 3),
        "resources": {
            **(i.resources or {}),
            "cpu_seconds_total": None if i.cpu_seconds_total is None else round(i.cpu_seconds_total, 3),
            "growth": i.growth,
            "memory_limit": i.memory_limit or None,
        },
    }
