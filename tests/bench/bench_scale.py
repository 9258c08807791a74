"""How far one machine goes: N sim companies under one waportd (issue 6).

Prints and records: time until all are connected, the supervisor's idle CPU and RSS with N
heartbeating workers, per-worker RSS/USS/PSS, recovery of a SIGKILLed worker against its
backoff delay, and a SIGKILL + restart of waportd (time until all are back, `replaced` at the
simulated network).

    python tests/bench/bench_scale.py --companies 1000
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time

import psutil
from common import Daemon, EventTap, SimNetProcess, count_state, record, sessions, wait_for


def connected_within(d: Daemon, n: int, timeout: float) -> float:
    start = time.monotonic()
    wait_for(lambda: count_state(d, "connected") == n, timeout=timeout, interval=0.25,
             what=f"{n} sessions connected")
    return time.monotonic() - start


def memory(pids: list[int]) -> dict[str, float]:
    rss, uss, pss = [], [], []
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        rss.append(info.rss / 2**20)
        uss.append(info.uss / 2**20)
        pss.append(info.pss / 2**20)
    return {"workers_sampled": len(pss), "rss_mib_mean": sum(rss) / len(rss), "uss_mib_mean": sum(uss) / len(uss),
            "pss_mib_mean": sum(pss) / len(pss), "pss_mib_total": sum(pss)}


def cpu_percent(pid: int, seconds: float) -> float:
    proc = psutil.Process(pid)
    before = proc.cpu_times()
    time.sleep(seconds)  # a benchmark measures over a window; this is not synchronization
    after = proc.cpu_times()
    return 100 * ((after.user - before.user) + (after.system - before.system)) / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--companies", type=int, default=1000)
    ap.add_argument("--idle-seconds", type=float, default=30)
    ap.add_argument("--spawn", default="auto", choices=("auto", "zygote", "exec"))
    args = ap.parse_args()
    n = args.companies
    base = tempfile.mkdtemp(prefix="wpb-", dir="/tmp")
    net = SimNetProcess(base)
    companies = [f"c{i:04d}" for i in range(n)]
    d = Daemon(base, sim_endpoint=net.endpoint, companies=companies, heartbeat_interval=5.0,
               restart_base_delay=1.0, restart_jitter=0.0, worker_spawn=args.spawn, stop_timeout=10)
    figures: dict = {"companies": n, "worker_spawn": args.spawn}
    try:
        t0 = time.monotonic()
        d.start()
        connected_within(d, n, timeout=300)
        figures["all_connected_s"] = round(time.monotonic() - t0, 2)
        time.sleep(5)  # let start-up work settle before measuring idle figures
        sup = psutil.Process(d.proc.pid)
        figures["supervisor_idle_cpu_percent"] = round(cpu_percent(d.proc.pid, args.idle_seconds), 2)
        figures["supervisor_rss_mib"] = round(sup.memory_info().rss / 2**20, 1)
        pids = [r["pid"] for r in sessions(d).values() if r["pid"]]
        figures["worker_memory"] = {k: round(v, 2) for k, v in memory(pids).items()}
        figures["simnet_cpu_percent"] = round(cpu_percent(net.proc.pid, 5), 1)

        # Recovery: SIGKILL one worker; it must run again after its backoff delay (1 s, no jitter).
        tap = EventTap(d.run_dir, b"c0001.")
        victim = d.status("c0001")["pid"]
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        restart = tap.wait(lambda e: e["type"] == "restart", timeout=30)
        up = tap.wait(lambda e: e["type"] == "connected", timeout=30)
        tap.close()
        figures["worker_recovery"] = {"backoff_delay_s": 1.0,
                                      "restart_after_kill_s": round(restart["ts"] - killed_at, 3),
                                      "connected_after_kill_s": round(up["ts"] - killed_at, 3)}

        # SIGKILL waportd itself, start a new one: everything back, no double session.
        old = [r["pid"] for r in sessions(d).values() if r["pid"]]
        d.kill()
        t1 = time.monotonic()
        wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                 for p in old), timeout=60, interval=0.2, what="old workers gone")
        figures["orphans_gone_after_daemon_kill_s"] = round(time.monotonic() - t1, 2)
        d.start()
        connected_within(d, n, timeout=300)
        figures["all_back_after_daemon_kill_s"] = round(time.monotonic() - t1, 2)
        figures["replaced_at_network"] = net.stats()["replaced"]
        d.terminate(timeout=120)
    finally:
        d.cleanup()
        net.stop()
        shutil.rmtree(base, ignore_errors=True)
    figures["latencies_note"] = "times from this script's clock; events carry the daemon's timestamps"
    record(f"scale_{n}_{args.spawn}", figures)


if __name__ == "__main__":
    main()
