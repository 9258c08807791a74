"""What each worker process costs: psutil samples every health_check_interval.

The samples feed the metrics (`waport_worker_resident_memory_bytes`, `..._cpu_seconds_total`),
`status` and `diagnose`, and the memory_limit check. The arbiter's loop calls `sample`; the
metrics thread only reads, through `snapshot` (copies, so a scrape never sees a dict change
size under it).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import psutil

log = logging.getLogger("waport.resources")

RSS_HISTORY = 240  # samples kept per worker for growth figures (2 h at 30 s)
WARMUP = 60.0  # seconds after a worker's first sample that growth figures ignore


@dataclass(frozen=True)
class Sample:
    pid: int
    ts: float  # wall clock
    rss_bytes: int
    cpu_seconds: float  # user + system of this worker process
    threads: int
    open_files: int  # open file descriptors: files, sockets, pipes

    def public(self) -> dict[str, Any]:
        return asdict(self)


def take(proc: psutil.Process, now: float) -> Sample:
    """One sample of `proc`; raises psutil.Error when it is gone."""
    with proc.oneshot():
        cpu = proc.cpu_times()
        return Sample(
            pid=proc.pid,
            ts=now,
            rss_bytes=proc.memory_info().rss,
            cpu_seconds=cpu.user + cpu.system,
            threads=proc.num_threads(),
            open_files=proc.num_fds(),
        )


@dataclass(frozen=True)
class Growth:
    """RSS of the current worker from its first sample to its last."""

    first_bytes: int
    last_bytes: int
    peak_bytes: int
    seconds: float
    samples: int

    @property
    def bytes_per_hour(self) -> float:
        return (self.last_bytes - self.first_bytes) * 3600 / self.seconds if self.seconds > 0 else 0.0

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_per_hour": round(self.bytes_per_hour)}


class ResourceMonitor:
    """Samples per company; CPU seconds add up across a company's successive workers."""

    def __init__(self) -> None:
        self.procs: dict[str, psutil.Process] = {}
        self.samples: dict[str, Sample] = {}
        self.rss: dict[str, deque[tuple[float, int]]] = {}
        self.cpu_before: dict[str, float] = {}  # CPU seconds of the company's earlier workers

    def sample(self, company: str, pid: int, now: float) -> Sample | None:
        """Sample the company's worker `pid`; None when it is gone (reaping sorts that out)."""
        proc = self.procs.get(company)
        if proc is None or proc.pid != pid:
            self.retire(company)
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                return None
            self.procs[company] = proc
            self.rss[company] = deque(maxlen=RSS_HISTORY)
        try:
            s = take(proc, now)
        except psutil.Error:
            return None
        self.samples[company] = s
        self.rss[company].append((now, s.rss_bytes))
        return s

    def retire(self, company: str) -> None:
        """The company's worker is gone: keep its CPU seconds in the total, drop the rest."""
        self.procs.pop(company, None)
        last = self.samples.pop(company, None)
        if last is not None:
            self.cpu_before[company] = self.cpu_before.get(company, 0.0) + last.cpu_seconds

    def retire_all_but(self, live: set[str]) -> None:
        for company in [c for c in self.procs if c not in live]:
            self.retire(company)

    def forget(self, company: str) -> None:
        """A deleted company: nothing of it stays."""
        self.retire(company)
        self.cpu_before.pop(company, None)
        self.rss.pop(company, None)

    def cpu_total(self, company: str) -> float:
        last = self.samples.get(company)
        return self.cpu_before.get(company, 0.0) + (last.cpu_seconds if last else 0.0)

    def growth(self, company: str) -> Growth | None:
        """RSS change of the current worker after its warm-up (start-up allocations are not growth)."""
        series = list(self.rss.get(company, ()))
        if not series:
            return None
        series = [x for x in series if x[0] >= series[0][0] + WARMUP]
        if len(series) < 2:
            return None
        return Growth(series[0][1], series[-1][1], max(r for _, r in series), series[-1][0] - series[0][0],
                      len(series))

    def snapshot(self) -> tuple[dict[str, Sample], dict[str, float]]:
        """Copies for another thread: the current samples and every company's CPU total."""
        samples = dict(list(self.samples.items()))
        companies = set(samples) | set(list(self.cpu_before))
        return samples, {c: self.cpu_total(c) for c in companies}


def over_limit(sample: Sample | None, limit: int) -> bool:
    """memory_limit (bytes, 0 = off) exceeded by the sample."""
    return bool(limit) and sample is not None and sample.rss_bytes > limit


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
