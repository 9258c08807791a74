"""What one idle neonize worker costs in memory (RSS, USS, PSS), beside a sim worker for scale.

Without network a neonize worker never connects, so "idle" is measured where it waits longest: in
its connect attempt, dialing through a black-hole proxy (a local socket that accepts and never
answers) — neonize and its Go runtime loaded, whatsmeow's client and SQLite store open. A real,
connected session adds whatsmeow's session state and buffers on top (not measurable here).

    .venv/bin/python tests/bench/neonize_memory.py [--settle 8] [--workers 3] [--json]

The worker is a real `python -m workers` process; this script plays its supervisor (a ROUTER on
workers.sock answering heartbeats), as tests/test_worker.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from ipc import protocol  # noqa: E402

MiB = 1024 * 1024


class Supervisor:
    """Just enough of waportd for one worker: READY, heartbeats, and its events."""

    def __init__(self, base: str, name: str) -> None:
        self.endpoint = f"ipc://{base}/{name}.sock"
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.ident: bytes | None = None
        self.events: list[dict[str, Any]] = []
        self.next_beat = 0.0

    def pump(self, wait_ms: int = 100) -> None:
        while self.sock.poll(wait_ms):
            ident, *frames = self.sock.recv_multipart()
            self.ident = ident
            for msg in protocol.unbatch(protocol.decode(frames)):
                if msg.type == protocol.EVENT:
                    self.events.append(msg.body)
            wait_ms = 0
        now = time.monotonic()
        if self.ident is not None and now >= self.next_beat:  # the worker leaves after 3 silent intervals
            self.sock.send_multipart([self.ident, *protocol.encode(protocol.HEARTBEAT)])
            self.next_beat = now + 1.0

    def close(self) -> None:
        self.sock.close(0)


def measure(base: str, backend: str, options: dict[str, Any], settle: float, count: int = 1) -> dict[str, Any]:
    """Start `count` workers of one backend together; per-worker medians over the settled samples."""
    sups, procs = [], []
    try:
        for i in range(count):
            sup = Supervisor(base, f"{backend}{i}")
            sups.append(sup)
            cmd = [sys.executable, "-m", "workers", "--company", f"bench{i}", "--generation", "1",
                   "--endpoint", sup.endpoint, "--session-dir", os.path.join(base, f"sess-{backend}{i}"),
                   "--backend", backend, "--heartbeat-interval", "1", "--options", json.dumps(options),
                   "--log-level", "warning"]  # fmt: skip
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while not all(any(e["type"] == "state" for e in sup.events) for sup in sups):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise SystemExit(f"{backend} workers did not start: {[s.events for s in sups]}")
            for sup in sups:
                sup.pump(20)
        samples: list[list[Any]] = [[] for _ in procs]
        end = time.monotonic() + settle
        while time.monotonic() < end:
            for sup in sups:
                sup.pump(50)
            for proc, got in zip(procs, samples, strict=True):
                if proc.poll() is not None:
                    raise SystemExit(f"{backend} worker exited early ({proc.returncode})")
                got.append(psutil.Process(proc.pid).memory_full_info())
        exits = [e for sup in sups for e in sup.events if e["type"] == "exit"]
        if exits:
            raise SystemExit(f"{backend} worker ended during the measurement: {exits}")
        settled = [s for got in samples for s in got[len(got) // 2 :]]  # the settled half of each
        return {
            "backend": backend,
            "workers": count,
            "state": [e["data"]["state"] for e in sups[0].events if e["type"] == "state"][-1],
            "rss": int(statistics.median(s.rss for s in settled)),
            "uss": int(statistics.median(s.uss for s in settled)),
            "pss": int(statistics.median(s.pss for s in settled)),
            "threads": psutil.Process(procs[0].pid).num_threads(),
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for sup in sups:
            sup.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=8.0, help="seconds to let the worker settle and sample")
    parser.add_argument("--workers", type=int, default=3, help="also measure this many neonize workers at once")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="wp-mem-", dir="/tmp")
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    try:
        proxy = f"http://127.0.0.1:{hole.getsockname()[1]}"
        connect_timeout = args.settle + 30
        neonize = {"proxy": proxy, "connect_timeout": connect_timeout}
        results = [measure(base, "neonize", neonize, args.settle)]
        if args.workers > 1:  # the Go library's pages are shared between workers: PSS and USS drop
            results.append(measure(base, "neonize", neonize, args.settle, args.workers))
        sim = {"sim_endpoint": f"ipc://{base}/nobody.sock", "connect_timeout": connect_timeout}
        results.append(measure(base, "sim", sim, args.settle))
    finally:
        hole.close()
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("per worker (median):")
    print(f"{'backend':8} {'workers':>7} {'state':11} {'RSS MiB':>8} {'USS MiB':>8} {'PSS MiB':>8} {'threads':>7}")
    for r in results:
        print(f"{r['backend']:8} {r['workers']:7d} {r['state']:11} {r['rss'] / MiB:8.1f} {r['uss'] / MiB:8.1f} "
              f"{r['pss'] / MiB:8.1f} {r['threads']:7d}")  # fmt: skip


if __name__ == "__main__":
    main()
