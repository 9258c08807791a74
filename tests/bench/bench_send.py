"""The send path (issue 6): accepted messages per second through the control socket across 100
companies, accept latency at a steady 1,000 messages/s (before and right after the burst), and
delivery latency to the simulated network.

    python tests/bench/bench_send.py --companies 100 --burst 20000 --rate 1000 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable

import psutil
import zmq
from common import Daemon, SimNetProcess, count_state, record, summary, wait_for


def dealer(run_dir: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(f"ipc://{run_dir}/control.sock")
    return sock


def requests(count: int, companies: list[str], args_of: Callable[[int], dict] | None = None) -> list[tuple[str, bytes]]:
    """Encoded before the clock starts: the load client's CPU is taken from the daemon on 2 cores.
    `args_of(n)`: the n-th send's own arguments (default a text)."""
    out = []
    for n in range(count):
        rid = uuid.uuid4().hex
        own = args_of(n) if args_of else {"text": f"bench {n}"}
        body = {"id": rid, "cmd": "send", "args": {"company": companies[n % len(companies)],
                                                   "to": f"1555{n % 9973:07d}", **own}}
        out.append((rid, json.dumps(body).encode()))
    return out


def burst(run_dir: str, companies: list[str], total: int, window: int = 1000,
          args_of: Callable[[int], dict] | None = None) -> dict:
    """As fast as the daemon answers, with `window` requests in flight."""
    sock = dealer(run_dir)
    frames = [frame for _, frame in requests(total, companies, args_of)]
    sent = answered = ok = 0
    refused: dict[str, int] = {}
    start = time.monotonic()
    while answered < total:
        while sent < total and sent - answered < window:
            sock.send(frames[sent])
            sent += 1
        if sock.poll(10_000):
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                answered += 1
                reply = json.loads(sock.recv())
                if reply.get("ok"):
                    ok += 1
                else:
                    code = (reply.get("error") or {}).get("code", "?")
                    refused[code] = refused.get(code, 0) + 1
        else:
            raise RuntimeError("the daemon stopped answering")
    elapsed = time.monotonic() - start
    sock.close(0)
    out = {"messages": total, "accepted": ok, "seconds": round(elapsed, 2), "accepted_per_s": round(ok / elapsed)}
    if refused:
        out["refused"] = refused
    return out


def paced(run_dir: str, companies: list[str], rate: float, seconds: float) -> dict:
    """A steady `rate` of sends; the latency of each answer."""
    sock = dealer(run_dir)
    frames = requests(int(rate * seconds) + 1, companies)
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    interval = 1.0 / rate
    start = time.monotonic()
    next_send = start
    n = 0
    end = start + seconds
    while time.monotonic() < end or len(latencies) < n:
        now = time.monotonic()
        if now >= next_send and now < end and n < len(frames):
            rid, frame = frames[n]
            sent_at[rid] = time.monotonic()
            sock.send(frame)
            n += 1
            next_send += interval
            continue
        wait = max(0.0, min(next_send, end) - time.monotonic()) if now < end else 5.0
        if sock.poll(max(1, round(wait * 1000))):  # never a busy loop: its CPU is the daemon's loss
            latencies.append((time.monotonic() - sent_at.pop(json.loads(sock.recv())["id"])) * 1000)
        elif now >= end:
            break
    sock.close(0)
    return {"rate_per_s": rate, "messages": n, "accept_latency_ms": {k: round(v, 2) for k, v in
                                                                      summary(latencies).items()}}


def delivery_latencies(state_dir: str, companies: list[str], since: float) -> list[float]:
    out: list[float] = []
    for company in companies:
        db = sqlite3.connect(f"file:{state_dir}/sessions/{company}/journal.db?mode=ro", uri=True)
        rows = db.execute("SELECT sent_ts - created FROM outbox WHERE status = 'sent' AND created >= ?",
                          (since,)).fetchall()
        db.close()
        out += [r[0] * 1000 for r in rows]
    return out


class CpuMeter:
    """CPU seconds of each process of the pipeline over a phase: µs per message for each."""

    def __init__(self, d: Daemon, net: SimNetProcess) -> None:
        assert d.proc is not None
        self.sup = psutil.Process(d.proc.pid)
        self.net = psutil.Process(net.proc.pid)
        self.me = psutil.Process()
        self.workers = [psutil.Process(r["pid"]) for r in d.ctl("list")["sessions"] if r.get("pid")]
        self.before = self.read()

    @staticmethod
    def seconds(procs: list[psutil.Process]) -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total

    def read(self) -> dict[str, float]:
        return {"supervisor": self.seconds([self.sup]), "workers": self.seconds(self.workers),
                "network": self.seconds([self.net]), "load_client": self.seconds([self.me])}

    def per_message(self, messages: int) -> dict[str, float]:
        after = self.read()
        out = {k: round((after[k] - self.before[k]) / messages * 1e6) for k in after}
        out["total"] = sum(out.values())
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--companies", type=int, default=100)
    ap.add_argument("--burst", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--journal-sync", choices=["normal", "full"], default="normal")
    args = ap.parse_args()
    os.sync()  # the previous benchmark's dirty pages are written back before this one measures
    base = tempfile.mkdtemp(prefix="wps-", dir="/tmp")
    net = SimNetProcess(base)
    companies = [f"s{i:03d}" for i in range(args.companies)]
    d = Daemon(base, sim_endpoint=net.endpoint, companies=companies, heartbeat_interval=5.0,
               rate_limit_max=10_000_000, journal_sync=args.journal_sync)
    figures: dict = {"companies": args.companies, "journal_sync": args.journal_sync}
    try:
        d.start()
        wait_for(lambda: count_state(d, "connected") == args.companies, timeout=120, interval=0.5)
        sent = 0

        def steady(name: str) -> None:
            """A paced phase; delivery latencies from the journals afterwards (accepted -> the network's
            send time), so no event subscriber competes with the daemon while it is measured."""
            nonlocal sent
            since = time.time()
            meter = CpuMeter(d, net)
            figures[name] = paced(d.run_dir, companies, args.rate, args.seconds)
            sent += figures[name]["messages"]
            wait_for(lambda: net.stats()["messages_sent"] >= sent, timeout=120, interval=0.5)
            figures[name]["cpu_us_per_message"] = meter.per_message(figures[name]["messages"])
            delivery = delivery_latencies(d.state_dir, companies, since)
            figures[name]["delivery_latency_ms"] = {k: round(v, 2) for k, v in summary(delivery).items()}

        time.sleep(5)  # let start-up work settle (as bench_scale does); a window, not synchronization
        steady("steady")
        meter = CpuMeter(d, net)
        figures["burst"] = burst(d.run_dir, companies, args.burst)
        sent += args.burst
        wait_for(lambda: net.stats()["messages_sent"] >= sent, timeout=300, interval=0.5,
                 what="the burst to reach the network")
        figures["burst"]["cpu_us_per_message"] = meter.per_message(args.burst)
        # Right after the burst: 100 journals' WAL checkpoints (with their fsyncs) land at once.
        steady("steady_after_burst")
        figures["network_sent"] = net.stats()["messages_sent"]
        d.terminate(timeout=60)
    finally:
        d.cleanup()
        net.stop()
        shutil.rmtree(base, ignore_errors=True)
    record(f"send_{args.companies}" + ("_full" if args.journal_sync == "full" else ""), figures)


if __name__ == "__main__":
    main()
