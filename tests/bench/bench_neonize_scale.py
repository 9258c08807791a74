"""Real sessions per host (issue 16): idle neonize workers under waportd, and what each costs.

    python tests/bench/bench_neonize_scale.py --workers 1 100 300 [--spawn zygote|exec] [--go-gc N] ...

Without a network a neonize worker never connects, so "idle" is measured where it waits longest: in
its connect attempt, dialing WhatsApp through a black-hole HTTP proxy (waportd's `proxy` key: a local
socket that takes the connection and never answers). For each count: a fresh waportd with that many
companies; seconds until every worker is dialing (its Go library loaded), then after a settle the
median PSS, USS and RSS per worker (smaps), threads per worker, the fork server's own PSS, and the
supervisor's CPU over 10 s of idling. `host_24gib` is what 24 GiB holds at that PSS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import psutil
from common import BlackHole, Daemon, record, wait_for

MiB = 1 << 20
SO = "neonize-linux-amd64.so"


def go_loaded(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as fh:
            return SO in fh.read()
    except OSError:
        return False


def pids_with_go() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and go_loaded(int(p))]


def cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def measure(base: str, count: int, args: argparse.Namespace, proxy: str) -> dict:
    companies = [f"n{i:03d}" for i in range(count)]
    tuning = {k: v for k, v in (("go_gc", args.go_gc), ("go_max_procs", args.go_max_procs),
                                ("go_memory_limit", args.go_memory_limit)) if v is not None}
    os.makedirs(os.path.join(base, f"w{count}"))
    d = Daemon(os.path.join(base, f"w{count}"), backend="neonize", companies=companies, proxy=proxy,
               connect_timeout=3600, heartbeat_interval=5.0, worker_spawn=args.spawn, log_level="warning",
               max_companies=max(2000, count), **tuning)
    pids: list[int] = []
    try:
        start = time.monotonic()
        d.start()

        def dialing() -> list[int]:
            sessions = d.ctl("list")["sessions"]
            pids = [s["pid"] for s in sessions if s["state"] == "connecting" and s.get("pid")]
            return pids if len(pids) == count and all(go_loaded(p) for p in pids) else []

        pids = wait_for(dialing, timeout=600, interval=0.5, what=f"{count} workers dialing")
        started = time.monotonic() - start
        time.sleep(args.settle)
        infos = [psutil.Process(p).memory_full_info() for p in pids]
        threads = [psutil.Process(p).num_threads() for p in pids]
        sup = d.proc.pid
        zygotes = [c for c in psutil.Process(sup).children() if "workers.zygote" in " ".join(c.cmdline())]
        before = cpu(sup)
        time.sleep(10)
        idle_cpu = (cpu(sup) - before) / 10 * 100
        pss = statistics.median(i.pss for i in infos) / MiB
        return {
            "workers": count, "start_seconds": round(started, 1),
            "pss_mib": round(pss, 1), "uss_mib": round(statistics.median(i.uss for i in infos) / MiB, 1),
            "rss_mib": round(statistics.median(i.rss for i in infos) / MiB, 1),
            "threads": statistics.median(threads),
            "fork_server_pss_mib": round(zygotes[0].memory_full_info().pss / MiB, 1) if zygotes else None,
            "supervisor_idle_cpu_percent": round(idle_cpu, 2),
            "supervisor_rss_mib": round(psutil.Process(sup).memory_info().rss / MiB, 1),
            "host_24gib": int(24 * 1024 / pss),
        }
    finally:
        d.cleanup()
        wait_for(lambda: not any(go_loaded(p) for p in pids_with_go()), timeout=60, interval=0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 100, 300])
    ap.add_argument("--spawn", choices=["zygote", "exec"], default="zygote")
    ap.add_argument("--go-gc", type=int, default=None, help="default: the config's default")
    ap.add_argument("--go-max-procs", type=int, default=None)
    ap.add_argument("--go-memory-limit", default=None)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--name", default="neonize_scale")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="wpn-", dir="/tmp")
    hole = BlackHole()
    figures: dict = {"spawn": args.spawn, "go": {"gc": args.go_gc, "max_procs": args.go_max_procs,
                                                  "memory_limit": args.go_memory_limit}}
    try:
        for count in args.workers:
            figures[f"x{count}"] = measure(base, count, args, hole.url())
            print(figures[f"x{count}"], flush=True)
    finally:
        hole.close()
        shutil.rmtree(base, ignore_errors=True)
    record(args.name, figures)


if __name__ == "__main__":
    main()
