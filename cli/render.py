"""Plain-text rendering of replies and events: aligned tables and key: value blocks.

Pure functions of their inputs (and `now`), so the formats are tested without a daemon and
stay free of any table library.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

# Session record fields (DESIGN.md §4), in the order `status` prints them.
RECORD_FIELDS = (
    "company",
    "state",
    "reason",
    "pid",
    "since",
    "connected_at",
    "phone",
    "restarts",
    "next_restart_at",
    "last_error",
    "rss_bytes",
    "queued",
)
TIME_FIELDS = frozenset({"since", "connected_at", "next_restart_at"})
SESSION_COLUMNS = ("COMPANY", "STATE", "REASON", "PID", "UPTIME/SINCE", "RESTARTS", "NEXT-RESTART", "PHONE")
NONE = "-"


def compact(value: Any) -> str:
    """One-line JSON for structured values, so a table cell or event line never wraps."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False, default=str)


def scalar(value: Any) -> str:
    if value is None or value == "":
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict | list):
        return compact(value)
    return str(value)


def duration(seconds: float) -> str:
    """Short human duration: 4.2s, 42s, 3m04s, 2h05m, 3d04h."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def iso_time(ts: float) -> str:
    """Local time with its UTC offset, to the millisecond: unambiguous and sortable."""
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


def preview(text: Any, width: int = 40) -> str:
    """A message text shortened to one table cell."""
    if not isinstance(text, str):
        return "-"
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


def content(message: dict[str, Any], width: int = 40) -> str:
    """What a message carries, in one cell: its text, or its kind first (DESIGN.md §11)."""
    kind = message.get("type") or "text"
    text = message.get("text") or ""
    if kind == "text":
        return preview(text, width)
    if kind == "location":
        head = f"[location {message.get('latitude')},{message.get('longitude')}]"
    elif kind == "reaction":
        head = f"[reaction {message.get('emoji') or '(removed)'} to {message.get('reaction_to')}]"
    else:
        media = message.get("media")
        if isinstance(media, dict):  # inbound: the media object
            status = media.get("status")
            head = f"[{kind} {status} {str(media.get('id'))[:12]}]" if status == "stored" else f"[{kind} {status}]"
        else:  # outbound: the stored file it sends
            head = f"[{kind} {str(media)[:12]}]"
    return preview(f"{head} {text}".strip(), width)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def since(ts: Any, now: float) -> str:
    return duration(now - ts) if _is_number(ts) else NONE


def until(ts: Any, now: float) -> str:
    """`in 4.2s` for a future time, `due` once it has passed."""
    if not _is_number(ts):
        return NONE
    return f"in {duration(ts - now)}" if ts > now else "due"


def size(n: Any) -> str:
    if not _is_number(n):
        return NONE
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    rows = [list(headers)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def sessions_table(records: Sequence[dict[str, Any]], now: float | None = None) -> str:
    """A cluster's list (DESIGN.md §12) adds where each session runs: HOST."""
    now = time.time() if now is None else now
    if not records:
        return "no sessions"
    clustered = any("host" in r for r in records)
    rows = [
        [
            scalar(r.get("company")),
            scalar(r.get("state")),
            *([scalar(r.get("host"))] if clustered else []),
            scalar(r.get("reason")),
            scalar(r.get("pid")),
            since(r.get("since"), now),
            scalar(r.get("restarts", 0)),
            until(r.get("next_restart_at"), now),
            scalar(r.get("phone")),
        ]
        for r in sorted(records, key=lambda r: str(r.get("company", "")))
    ]
    columns = (*SESSION_COLUMNS[:2], "HOST", *SESSION_COLUMNS[2:]) if clustered else SESSION_COLUMNS
    return table(columns, rows)


def field_value(name: str, value: Any, now: float) -> str:
    """A record field for humans: times get their ISO form and distance, sizes their unit."""
    if name in TIME_FIELDS and _is_number(value):
        rel = until(value, now) if value > now else f"{duration(now - value)} ago"
        return f"{iso_time(value)} ({rel})"
    if name == "rss_bytes" and _is_number(value):
        return f"{size(value)} ({int(value)})"
    return scalar(value)


def kv_block(record: dict[str, Any], now: float | None = None, indent: str = "") -> str:
    """`key: value` lines, known record fields first, then any others the daemon added."""
    now = time.time() if now is None else now
    keys = [k for k in RECORD_FIELDS if k in record] + [k for k in record if k not in RECORD_FIELDS]
    if not keys:
        return f"{indent}(empty)"
    width = max(len(k) for k in keys) + 1
    return "\n".join(f"{indent}{(k + ':').ljust(width)} {field_value(k, record[k], now)}" for k in keys)


def metrics_table(metrics: Sequence[dict[str, Any]]) -> str:
    if not metrics:
        return "no metrics"
    rows = [
        [
            str(m.get("name", "")),
            ",".join(f"{k}={v}" for k, v in sorted((m.get("labels") or {}).items())) or NONE,
            _number(m.get("value")),
        ]
        for m in metrics
    ]
    return table(("NAME", "LABELS", "VALUE"), rows)


def _number(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:g}"
    return scalar(value)


def bullet_list(title: str, items: Any) -> str:
    if not items:
        return f"{title}:\n  (none)"
    if not isinstance(items, list):
        items = [items]
    return f"{title}:\n" + "\n".join(f"  - {scalar(i)}" for i in items)


def diagnosis(result: dict[str, Any], now: float | None = None) -> str:
    """Record, findings and recommendations, then any further keys of the reply."""
    now = time.time() if now is None else now
    parts = [f"company: {scalar(result.get('company'))}"]
    record = result.get("record")
    parts.append("record:\n" + (kv_block(record, now, "  ") if isinstance(record, dict) else f"  {NONE}"))
    parts.append(bullet_list("findings", result.get("findings")))
    parts.append(bullet_list("recommendations", result.get("recommendations")))
    shown = {"company", "record", "findings", "recommendations"}
    for key, title in (("history", "history"), ("last_errors", "last errors")):
        if isinstance(result.get(key), list):
            parts.append(timeline(title, result[key]))
            shown.add(key)
    if isinstance(result.get("resources"), dict):
        figures = {k: v for k, v in result["resources"].items() if v is not None}
        parts.append("resources:\n" + kv_block(figures, now, "  "))
        shown.add("resources")
    extra = {k: v for k, v in result.items() if k not in shown}
    if extra:
        parts.append("details:\n" + kv_block(extra, now, "  "))
    return "\n".join(parts)


def timeline(title: str, items: list[Any]) -> str:
    """`time  what: why` lines for diagnose's history and errors ({ts, state|kind, reason|message})."""
    if not items:
        return f"{title}:\n  (none)"
    lines = []
    for item in items:
        item = item if isinstance(item, dict) else {"message": item}
        ts = item.get("ts")
        what = item.get("state") or item.get("kind") or ""
        why = item.get("reason") or item.get("message") or ""
        lines.append(f"  {iso_time(ts) if _is_number(ts) else NONE}  {what}" + (f": {why}" if why else ""))
    return f"{title}:\n" + "\n".join(lines)


def reload_summary(result: dict[str, Any]) -> str:
    lines = []
    for key in ("started", "stopped"):
        names = result.get(key) or []
        lines.append(f"{key}: {', '.join(map(str, names)) if names else NONE}")
    return "\n".join(lines)


def event_line(event: dict[str, Any]) -> str:
    """ISO time, company, type, compact data: one event per line, greppable."""
    ts = event.get("ts")
    when = iso_time(ts) if _is_number(ts) else NONE
    data = compact(event.get("data") if event.get("data") is not None else {})
    return f"{when} {scalar(event.get('company'))} {scalar(event.get('type'))} {data}"


TOKEN_COLUMNS = ("ID", "COMPANY", "STATE", "CREATED", "EXPIRES", "REVOKED")


def iso_seconds(ts: Any) -> str:
    """An ISO time to the second: token times need no milliseconds."""
    if not _is_number(ts):
        return NONE
    try:
        return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):  # a time no calendar holds: say it, never crash the listing
        return str(ts)


def tokens_table(tokens: Sequence[dict[str, Any]]) -> str:
    """`waportctl token list`: a token without company is an admin token (all companies)."""
    if not tokens:
        return "no API tokens"
    rows = [
        [
            scalar(t.get("id")),
            scalar(t.get("company")) if t.get("company") else "(all)",
            scalar(t.get("state")),
            iso_seconds(t.get("created_at")),
            iso_seconds(t.get("expires_at")) if t.get("expires_at") is not None else "never",
            iso_seconds(t.get("revoked_at")),
        ]
        for t in tokens
    ]
    return table(TOKEN_COLUMNS, rows)


DELIVERY_COLUMNS = ("SEQ", "TYPE", "STATUS", "ATTEMPTS", "LAST-ATTEMPT", "LAST-RESULT", "NEXT-ATTEMPT", "ID")


def webhook_endpoint(ep: dict[str, Any]) -> str:
    """`waportctl webhook show`: where a company's events go, and whether that endpoint still takes them."""
    scope = "the config's webhook_url" if ep.get("scope") == "global" else "own"
    lines = [f"url:      {scalar(ep.get('url'))} ({scope})",
             f"events:   {','.join(ep.get('events') or [])}"]
    if ep.get("previous_secret_valid_until"):
        lines.append(f"rotated:  the previous secret signs too until {iso_seconds(ep['previous_secret_valid_until'])}")
    disabled = ep.get("disabled")
    lines.append(f"state:    disabled since {iso_seconds(disabled.get('at'))} ({scalar(disabled.get('reason'))}); "
                 "`waportctl webhook set` enables it" if disabled else "state:    enabled")
    return "\n".join(lines)


def deliveries(result: dict[str, Any]) -> str:
    """`waportctl webhooks COMPANY`: counts, then the events (pending and dead first)."""
    counts = result.get("counts") or {}
    ep = result.get("endpoint")
    head = f"{scalar(result.get('company'))}: " + (
        f"{scalar(ep.get('url'))}{' (disabled)' if ep.get('disabled') else ''}" if ep else "no webhook endpoint")
    head += f"; pending {counts.get('pending', 0)}, dead {counts.get('dead', 0)}, delivered {counts.get('ok', 0)}"
    rows = []
    for e in result.get("events") or []:
        last = scalar(e.get("last_status")) if e.get("last_status") is not None else scalar(e.get("last_error"))
        rows.append([scalar(e.get("seq")), scalar(e.get("type")), scalar(e.get("status")), scalar(e.get("attempts")),
                     iso_seconds(e.get("last_attempt_at")), last[:60], iso_seconds(e.get("next_attempt_at")),
                     scalar(e.get("id"))])
    return head + ("\n" + table(DELIVERY_COLUMNS, rows) if rows else "")
