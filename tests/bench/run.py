"""Run every benchmark and write BENCHMARKS.md from their figures (`make bench`).

Each benchmark is its own script (and can be run alone); this one runs them one after the other
(never two at once on 2 cores) and turns tests/bench/results/*.json into the table of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results")

RUNS = {
    "scale": ["bench_scale.py", "--companies", "1000"],
    "scale-exec": ["bench_scale.py", "--companies", "200", "--spawn", "exec"],
    "send": ["bench_send.py", "--companies", "100"],
    "send-full": ["bench_send.py", "--companies", "100", "--journal-sync", "full"],
    "http": ["bench_http.py", "--companies", "100"],
    "webhooks": ["bench_webhooks.py", "--companies", "20"],
    "media": ["bench_media.py", "--companies", "100", "--messages", "4000"],
    "neonize_download": ["bench_neonize_download.py", "--mib", "64"],
    "neonize_scale": ["bench_neonize_scale.py", "--workers", "1", "100", "300"],
    "supervisord": ["bench_supervisord.py", "--workers", "500"],
    "hop": ["bench_hop.py", "--messages", "20000"],
    "cluster": ["bench_cluster.py", "--hosts", "3", "--companies", "900", "--runs", "3"],
}


def load(name: str) -> dict | None:
    try:
        with open(os.path.join(RESULTS, f"{name}.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_markdown() -> str:
    lines = ["# Benchmarks", "",
             "Figures printed by `tests/bench/*.py` (`make bench` runs them all and rewrites this file).",
             "Measured with the `sim` backend and a standalone simulated network on the same machine, so the",
             "network's own CPU competes with waport's.", "",
             "`send_100`: `steady` is 30 s at 1,000 sends/s on a fresh daemon, `burst` 20,000 sends with 1,000 in",
             "flight, `steady_after_burst` the same 30 s right after it, when the burst's WAL checkpoints (and",
             "their fsyncs) land. The load client encodes its requests before the clock starts. Accept latency is",
             "the control-socket round trip; delivery latency is accepted -> the network's send time, read from",
             "the journals afterwards. At 1,000 sends/s the whole pipeline (load client, supervisor, 100 workers,",
             "simulated network) keeps the two cores about 92% busy (/proc/stat), so the tail is queueing behind",
             "CPU contention and varies from run to run (see the closing notes of issue 6).",
             "`cpu_us_per_message` is each process's CPU over the phase (supervisor, the sum of the workers, the",
             "simulated network, the load client) over the messages of the phase; in a steady phase it includes",
             "what the 100 idle workers cost meanwhile (heartbeats). `send_100_full` is the same with",
             "`journal_sync = \"full\"`.", "",
             "`neonize_scale`: idle neonize workers under waportd, dialing WhatsApp through a black-hole proxy",
             "(no network here): seconds until all of them dial, median PSS/USS/RSS and threads per worker,",
             "the fork server's PSS, the supervisor's idle CPU; `neonize_scale_exec` the same with",
             "`worker_spawn = \"exec\"`.", "",
             "`http_100`: sends through the HTTP API, driven by wrk with a Lua script: `paced_500` is 10",
             "connections each waiting 20 ms between requests (about 500/s), `max` 64 connections as fast as",
             "answered; CPU per request of the API process and of the supervisor from /proc over each phase.", "",
             "`webhooks_20`: `drain` delivers a backlog of 10,000 events (recorded while the delivery process was",
             "stopped) to a local receiver; `latency_200` is event `ts` -> the receiver's request at 200 inbound",
             "messages/s; `dead_endpoint` is control-socket sends at 200/s with no endpoint, with a live one",
             "(each `sent` event recorded) and with every endpoint refusing connections and 10,000 events pending.",
             "",
             "`media_100`: 4,000 sends of 100 KiB images (each company its own, stored first) then 4,000 texts,",
             "as fast as accepted: messages/s until the network has them all; `copies.file_reads_per_send` is",
             "what the workers read per image beyond a text (/proc/PID/io), over the file's size (1.0: the store",
             "file read once; zmq sends its slices with copy=False); `receive_50mib` is one sim worker",
             "downloading a 50 MiB document into the store: its peak RSS (VmHWM) before and after.",
             "",
             "`neonize_download`: what neonize's `download_any` copies in Python for a 64 MiB file, on a C",
             "buffer laid out as its Go side returns it (only the Go call is stood in for: no network here);",
             "`worst_one_download_mib` adds an idle neonize worker and an estimated Go heap of 2x the file.",
             "",
             "`hop`: the floor under the send path. An echo process (ROUTER, poll loop, JSON in and out, as each",
             "of our processes handles a frame) answers a DEALER client, one message at a time (each wakes it)",
             "and with 1,000 in flight; its CPU per message, times the six process crossings of a send",
             "(client, supervisor, worker, network and back, plus the nudge), is what the pipeline costs before",
             "any journal, rate limit or validation.", "",
             "`cluster_3x300`: three waportd hosts on one PostgreSQL, 300 sim companies each, all on this one",
             "2-core VM with the simulated network and PostgreSQL (given the CPU first: in production both run",
             "elsewhere). `start`: every company started through one host until all are connected; `idle`:",
             "PostgreSQL transactions per second and connections over 45 s with nothing to do; `send_local` /",
             "`send_forwarded`: 5,000 sends (500 in flight) through h2 to its own companies and to h3's;",
             "`send_single_host`: the same on one host alone with SQLite journals; `failover`: one host",
             "SIGKILLed with its workers until its companies are connected elsewhere (leases expire after 15 s);",
             "its `lease_left_s` (on the database's clock when it died), `first_claim_s` / `last_claim_s` (the",
             "survivors' logs) and `first_connected_s` say what the time is made of, in seconds after the kill;",
             "`reconnects`: sessions that dropped during a burst, `not_sent`: the sends whose outcome is not sent.",
             "Each figure is the median of `runs` whole runs; `each_run` lists every run's headline figures.",
             "",
             "`host_speed_kops` (every benchmark): thousands of JSON round trips per second on one core, timed",
             "right after the run. The same VM type is 10-20% slower on some days than on others; compare",
             "figures from different days through it.", ""]
    sections = kept_sections()  # figures of benchmarks not run on this machine stay as they were
    for name in sorted(os.listdir(RESULTS)) if os.path.isdir(RESULTS) else []:
        if not name.endswith(".json"):
            continue
        data = load(name[:-5]) or {}
        table = ["", f"_{data.pop('machine', '')}_", "", "| figure | value |", "|---|---|"]
        table += [f"| {key} | {value} |" for key, value in flatten(data)]
        sections[name[:-5]] = table + [""]
    for name in sorted(sections):
        lines += [f"## {name}", *sections[name]]
    text = "\n".join(lines)
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as fh:
        fh.write(text)
    return text


def kept_sections() -> dict[str, list[str]]:
    """The `## name` sections of the BENCHMARKS.md there is (results/ is not kept in git)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    try:
        with open(os.path.join(ROOT, "BENCHMARKS.md")) as fh:
            for line in fh.read().splitlines():
                if line.startswith("## "):
                    current = sections[line[3:].strip()] = []
                elif current is not None:
                    current.append(line)
    except OSError:
        pass
    return sections


def flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for key, value in sorted(data.items()):
        if isinstance(value, dict):
            out += flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("only", nargs="*", choices=[*RUNS, []], help="benchmarks to run (default: all)")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if not args.render_only:
        for name in args.only or list(RUNS):
            if name == "http" and shutil.which("wrk") is None:
                print("== http: skipped, wrk is missing (apt-get install wrk)", flush=True)
                continue
            print(f"== {name}", flush=True)
            subprocess.run([sys.executable, *RUNS[name]], cwd=HERE, check=True)
        if not args.only:
            out = subprocess.run([sys.executable, "neonize_memory.py", "--json"], cwd=HERE,
                                 capture_output=True, text=True, check=True).stdout
            figures: dict = {"note": "cold `python -m workers` (exec); idle = mid-dial through a black-hole "
                                     "proxy (no network here)"}
            for r in json.loads(out):
                figures[f"{r['backend']}_x{r['workers']}"] = {
                    "rss_mib": round(r["rss"] / 2**20, 1), "uss_mib": round(r["uss"] / 2**20, 1),
                    "pss_mib": round(r["pss"] / 2**20, 1), "threads": r["threads"]}
            sys.path.insert(0, HERE)
            from common import record

            record("neonize_memory", figures)
    print(write_markdown())


if __name__ == "__main__":
    main()
