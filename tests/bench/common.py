"""Shared pieces of the benchmarks: the test harness's real processes, figures, BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from conftest import (  # noqa: E402
    BlackHole,
    Daemon,
    EventTap,
    PgServer,
    RedisServer,
    SimNetProcess,
    processes_using,
    wait_for,
)

__all__ = ["BlackHole", "Daemon", "EventTap", "PgServer", "RedisServer", "SimNetProcess", "processes_using", "wait_for",
           "percentile", "machine", "record"]

RESULTS = os.path.join(HERE, "results")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(p / 100 * (len(ordered) - 1)))))
    return ordered[k]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values) if values else float("nan"),
            "mean": statistics.fmean(values) if values else float("nan")}


def machine() -> str:
    import psutil

    return (f"{platform.node()}: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def host_speed(seconds: float = 0.5) -> int:
    """Thousands of JSON round trips of one event per second on one core, measured after the run.

    The same VM type has run every benchmark 10-20% slower on one day than on another (issue 6):
    this fixed workload says which kind of day a run had.
    """
    body = {"type": "sent", "company": "s001", "ts": 1763930000.123,
            "data": {"message_id": "abc123def456", "to": "15550001234", "latency": 0.0123}}
    count = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(1000):
            json.loads(json.dumps(body))
        count += 1000
    return round(count / elapsed / 1000)


def record(name: str, figures: dict[str, Any]) -> None:
    """Keep the figures as JSON beside the scripts; run.py turns them into BENCHMARKS.md."""
    os.makedirs(RESULTS, exist_ok=True)
    figures = {"machine": machine(), "host_speed_kops": host_speed(), **figures}
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as fh:
        json.dump(figures, fh, indent=2, sort_keys=True)
    print(json.dumps(figures, indent=2, sort_keys=True))


def sessions(d: Daemon) -> dict[str, dict[str, Any]]:
    return {r["company"]: r for r in d.ctl("list")["sessions"]}


def count_state(d: Daemon, state: str) -> int:
    return sum(1 for r in d.ctl("list")["sessions"] if r["state"] == state)
