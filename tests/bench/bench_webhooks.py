"""Webhook delivery (issue 14): deliveries per second to a local receiver, latency from the event to the
receiver at 200 events/s, and what a dead endpoint with 10,000 pending events costs the supervisor.

    python tests/bench/bench_webhooks.py --companies 20

- `drain`: the delivery process is stopped (SIGSTOP) while `--backlog` inbound messages are recorded,
  then let go: deliveries/s from the receiver's first to its last request.
- `latency_200`: inbound messages at 200/s; event `ts` -> the receiver's request (same clock).
- `dead_endpoint`: control-socket sends at 200/s, accept latency and supervisor CPU: with no endpoint,
  with a live one (recording each `sent` event costs the supervisor a little), and with every company's
  endpoint refusing connections and 10,000 events pending (the figure to compare with the live one).
The receiver (tests/webhook_receiver.py) skips signature checks here: its CPU is the daemon's loss.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil
from bench_send import paced
from common import ROOT, Daemon, SimNetProcess, count_state, record, summary, wait_for


def get(url: str):  # noqa: ANN201 - JSON
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def inbound_burst(net: SimNetProcess, companies: list[str], total: int, tag: str, rate: float | None = None) -> None:
    start = time.monotonic()
    for n in range(total):
        if rate:
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        net.call("inbound", company=companies[n % len(companies)], **{"from": "15550100001"}, text=f"b{n}",
                 id=f"{tag}-{n}")


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def delivery_pid(d: Daemon) -> int:
    assert d.proc is not None
    return next(c.pid for c in psutil.Process(d.proc.pid).children()
                if "waportd.webhook_delivery" in " ".join(c.cmdline()))


def pending(d: Daemon, companies: list[str]) -> int:
    return sum(d.ctl("webhook_deliveries", company=c, limit=1)["counts"]["pending"] for c in companies)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--companies", type=int, default=20)
    ap.add_argument("--backlog", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    os.sync()
    base = tempfile.mkdtemp(prefix="wpw-", dir="/tmp")
    receiver = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "webhook_receiver.py"), "--no-verify"],
                                stdout=subprocess.PIPE, cwd=ROOT)
    assert receiver.stdout is not None
    port = int(receiver.stdout.readline())
    hook = f"http://127.0.0.1:{port}"
    net = SimNetProcess(base)
    companies = [f"w{i:03d}" for i in range(args.companies)]
    d = Daemon(base, sim_endpoint=net.endpoint, companies=companies, heartbeat_interval=5.0,
               rate_limit_max=10_000_000)
    figures: dict = {"companies": args.companies}
    try:
        d.start()
        wait_for(lambda: count_state(d, "connected") == args.companies, timeout=120, interval=0.5)

        # A dead endpoint first (the daemon is fresh): sends without, then with, 10,000 events pending.
        time.sleep(3)  # start-up work settles; a window, not synchronization
        sup = d.proc.pid

        def send_phase() -> dict:
            before = cpu_seconds(sup)
            t0 = time.monotonic()
            out = paced(d.run_dir, companies, 200, args.seconds)
            out["supervisor_cpu_percent"] = round((cpu_seconds(sup) - before) / (time.monotonic() - t0) * 100, 1)
            return out

        figures["dead_endpoint"] = {"without_webhooks": send_phase()}
        for c in companies:  # the cost of recording: the same events to a live endpoint
            d.ctl("webhook_set", company=c, url=f"{hook}/hook/{c}", events="message,sent")
        figures["dead_endpoint"]["live_endpoint"] = send_phase()
        for c in companies:
            d.ctl("webhook_set", company=c, url="http://127.0.0.1:9/hook", events="message,sent")  # refused
        inbound_burst(net, companies, args.backlog, "dead")
        wait_for(lambda: pending(d, companies) >= args.backlog, timeout=300, interval=1)
        time.sleep(2)
        with_dead = send_phase()
        with_dead["pending_events"] = pending(d, companies)
        dp = delivery_pid(d)
        before = cpu_seconds(dp)
        time.sleep(5)
        with_dead["delivery_cpu_percent_idle"] = round((cpu_seconds(dp) - before) / 5 * 100, 1)
        figures["dead_endpoint"]["with_10000_pending"] = with_dead
        for c in companies:
            d.ctl("webhook_delete", company=c)

        # Drain: a backlog recorded while delivery is stopped, then delivered as fast as it goes.
        for c in companies:
            d.ctl("webhook_set", company=c, url=f"{hook}/hook/{c}", events="message")
        time.sleep(1)
        dp = delivery_pid(d)
        os.kill(dp, signal.SIGSTOP)
        inbound_burst(net, companies, args.backlog, "drain")
        wait_for(lambda: sum(d.ctl("webhook_deliveries", company=c, limit=1)["counts"]["pending"]
                             for c in companies) >= args.backlog, timeout=300, interval=1)
        start_count = get(f"{hook}/count")
        cpu_before = cpu_seconds(dp)
        os.kill(dp, signal.SIGCONT)
        wait_for(lambda: get(f"{hook}/count") >= start_count + args.backlog, timeout=300, interval=0.5)
        got = get(f"{hook}/received?from={start_count}")
        span = max(r["at"] for r in got) - min(r["at"] for r in got)
        figures["drain"] = {"events": len(got), "seconds": round(span, 2),
                            "deliveries_per_s": round(len(got) / span),
                            "delivery_cpu_us_per_event": round((cpu_seconds(dp) - cpu_before) / len(got) * 1e6)}

        # Latency at 200 events/s.
        wait_for(lambda: pending(d, companies) == 0, timeout=120, interval=0.5)
        start_count = get(f"{hook}/count")
        n = int(200 * args.seconds)
        inbound_burst(net, companies, n, "lat", rate=200)
        wait_for(lambda: get(f"{hook}/count") >= start_count + n, timeout=120, interval=0.5)
        got = get(f"{hook}/received?from={start_count}")
        lat = [(r["at"] - r["event_ts"]) * 1000 for r in got if r.get("event_ts")]
        figures["latency_200"] = {"events": len(got), "event_to_receiver_ms": {k: round(v, 2) for k, v in
                                                                             summary(lat).items()}}
    finally:
        d.cleanup()
        net.stop()
        receiver.kill()
        shutil.rmtree(base, ignore_errors=True)
    record(f"webhooks_{args.companies}", figures)


if __name__ == "__main__":
    main()
