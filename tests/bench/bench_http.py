"""The HTTP API (issue 13): sends through `POST /v1/sessions/{company}/messages` across 100 companies,
driven by wrk with a Lua script (a Python load client would eat the cores it measures).

- `max`: as many sends as the API answers with 64 connections → accepted/s (target ≥ 2,000);
- `paced`: 500 sends/s (10 connections, each waiting 20 ms between requests) → accept latency p50/p99
  (target p99 < 10 ms);
- CPU per request of the API process and of the supervisor (the control socket's side of the same
  sends), from /proc over each phase (target: API < 150 µs).

    python tests/bench/bench_http.py --companies 100
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time

import httpx
import psutil
from common import Daemon, SimNetProcess, count_state, record, wait_for
from conftest import free_port

LUA = r"""
local companies, token, n = %(companies)d, "%(token)s", 0
local pause = %(pause_ms)d
counts = {}
function setup(thread) thread:set("id", #counts + 1); table.insert(counts, thread) end
function init(args) n = tonumber(id) * 1000003; ok, bad = 0, 0 end
function request()
  n = n + 1
  local path = string.format("/v1/sessions/s%%03d/messages", n %% companies)
  local body = string.format('{"to":"1555%%07d","text":"bench %%d"}', n %% 9973, n)
  return wrk.format("POST", path, {["Authorization"] = "Bearer " .. token,
                                  ["Content-Type"] = "application/json"}, body)
end
function response(status, headers, body) if status == 202 then ok = ok + 1 else bad = bad + 1 end end
function delay() return pause end
function done(summary, latency, requests)
  local good, other = 0, 0
  for _, t in ipairs(counts) do good = good + t:get("ok"); other = other + t:get("bad") end
  io.write(string.format("ACCEPTED %%d OTHER %%d\n", good, other))
  for _, p in ipairs({50, 90, 99, 99.9}) do
    io.write(string.format("P%%g %%.3f\n", p, latency:percentile(p) / 1000))
  end
end
"""


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def api_pid(d: Daemon) -> int:
    assert d.proc is not None
    for child in psutil.Process(d.proc.pid).children():
        if "api" in child.cmdline() and "--listen" in child.cmdline():
            return child.pid
    raise RuntimeError("no API process")


def wrk(base: str, url: str, token: str, companies: int, connections: int, seconds: float, pause_ms: int) -> dict:
    script = os.path.join(base, f"send-{pause_ms}.lua")
    with open(script, "w") as fh:
        fh.write(LUA % {"companies": companies, "token": token, "pause_ms": pause_ms})
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "10s", "-s", script, url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    figures = {"accepted": int(re.search(r"ACCEPTED (\d+)", out).group(1)),
               "other": int(re.search(r"OTHER (\d+)", out).group(1))}
    figures["latency_ms"] = {f"p{p}": float(v) for p, v in re.findall(r"P([\d.]+) ([\d.]+)", out)}
    return figures


def phase(d: Daemon, base: str, url: str, token: str, companies: int, connections: int, seconds: float,
          pause_ms: int) -> dict:
    api, sup = api_pid(d), d.proc.pid
    cpu_api, cpu_sup, start = cpu_seconds(api), cpu_seconds(sup), time.monotonic()
    figures = wrk(base, url, token, companies, connections, seconds, pause_ms)
    elapsed = time.monotonic() - start
    n = figures["accepted"] + figures["other"]
    figures["accepted_per_s"] = round(figures["accepted"] / elapsed)
    figures["api_cpu_us_per_request"] = round((cpu_seconds(api) - cpu_api) / max(1, n) * 1e6, 1)
    figures["supervisor_cpu_us_per_request"] = round((cpu_seconds(sup) - cpu_sup) / max(1, n) * 1e6, 1)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--companies", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=15)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench_http needs wrk: apt-get install wrk")
    os.sync()
    base = tempfile.mkdtemp(prefix="wph-", dir="/tmp")
    net = SimNetProcess(base)
    companies = [f"s{i:03d}" for i in range(args.companies)]
    port = free_port()
    d = Daemon(base, sim_endpoint=net.endpoint, companies=companies, heartbeat_interval=5.0,
               rate_limit_max=10_000_000, http_listen=f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"
    figures: dict = {"companies": args.companies, "load": "wrk -t1, a Lua script: one POST per request"}
    try:
        d.start()
        wait_for(lambda: count_state(d, "connected") == args.companies, timeout=120, interval=0.5)
        token = d.ctl("token_create")["token"]
        wait_for(lambda: healthy(url), timeout=30, what="the HTTP API")
        time.sleep(5)  # let start-up work settle (as bench_send does); a window, not synchronization
        figures["paced_500"] = phase(d, base, url, token, args.companies, 10, args.seconds, 20)
        figures["max"] = phase(d, base, url, token, args.companies, 64, args.seconds, 0)
        sent = figures["paced_500"]["accepted"] + figures["max"]["accepted"]
        wait_for(lambda: net.stats()["messages_sent"] >= sent, timeout=300, interval=0.5)
        figures["network_sent"] = net.stats()["messages_sent"]
    finally:
        d.cleanup()
        net.stop()
        shutil.rmtree(base, ignore_errors=True)
    record(f"http_{args.companies}", figures)


if __name__ == "__main__":
    main()
