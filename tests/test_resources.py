"""Worker resource samples (psutil) and the memory_limit restart with a sim worker that grows."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
from conftest import EventTap, wait_for

from waportd.resources import WARMUP, ResourceMonitor, Sample, human_bytes, over_limit, take


def test_a_sample_of_a_live_process():
    s = take(psutil.Process(os.getpid()), 123.0)
    assert s.pid == os.getpid() and s.ts == 123.0
    assert s.rss_bytes > 1_000_000 and s.threads >= 1 and s.open_files >= 3 and s.cpu_seconds > 0
    assert set(s.public()) == {"pid", "ts", "rss_bytes", "cpu_seconds", "threads", "open_files"}


def test_cpu_adds_up_across_workers_and_gone_ones_are_retired():
    m = ResourceMonitor()
    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile time.process_time() < 0.3: pass\n"
                              "time.sleep(30)"])
    try:
        wait_for(lambda: sum(psutil.Process(child.pid).cpu_times()[:2]) >= 0.2, what="the child to burn CPU")
        first = m.sample("acme", child.pid, 1.0)
        assert first is not None and first.cpu_seconds >= 0.2
        assert m.cpu_total("acme") == first.cpu_seconds
    finally:
        child.kill()
        child.wait()
    assert m.sample("acme", child.pid, 2.0) is None  # gone: no sample
    me = m.sample("acme", os.getpid(), 3.0)  # the next worker of the same company
    assert me is not None
    assert m.cpu_total("acme") == first.cpu_seconds + me.cpu_seconds  # a counter never goes back
    m.retire_all_but(set())
    assert "acme" not in m.samples and m.cpu_total("acme") == first.cpu_seconds + me.cpu_seconds
    samples, cpu = m.snapshot()
    assert samples == {} and cpu == {"acme": m.cpu_total("acme")}
    m.forget("acme")
    assert m.cpu_total("acme") == 0


def test_growth_ignores_the_warm_up():
    m = ResourceMonitor()
    m.sample("acme", os.getpid(), 0.0)
    series = m.rss["acme"]
    series.clear()
    series.extend([(0.0, 10_000_000), (WARMUP / 2, 60_000_000)])
    assert m.growth("acme") is None  # only start-up so far
    series.extend([(WARMUP, 60_000_000), (WARMUP + 3600, 160_000_000), (WARMUP + 7200, 150_000_000)])
    g = m.growth("acme")
    assert (g.first_bytes, g.last_bytes, g.peak_bytes, g.samples) == (60_000_000, 150_000_000, 160_000_000, 3)
    assert g.bytes_per_hour == 45_000_000


def test_over_limit_and_units():
    s = Sample(1, 0.0, 600 * 1024 * 1024, 0.0, 1, 1)
    assert over_limit(s, 512 * 1024 * 1024) and not over_limit(s, 0) and not over_limit(None, 1)
    assert human_bytes(600 * 1024 * 1024) == "600.0 MiB" and human_bytes(512) == "512 B"


def test_status_carries_the_samples(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], health_check_interval=0.2).start()
    # Sampled after it connected: the backend's threads run (the first sample may predate them).
    r = wait_for(lambda: (s := d.status("acme"))["state"] == "connected" and (s["threads"] or 0) >= 2 and s,
                 what="a sample of the connected worker")
    assert r["rss_bytes"] > 5_000_000 and r["open_files"] >= 3 and r["cpu_seconds"] >= 0
    assert d.ctl("stop", company="acme")["threads"] is None  # no worker, no figures


def test_memory_limit_restarts_a_growing_worker_gracefully(daemon_factory, simnet):
    limit = 120 * 1024 * 1024
    d = daemon_factory(sim_endpoint=simnet.endpoint, health_check_interval=0.2,
                       memory_limit="120MiB", sim_options='{"grow_bytes_per_s": 60000000}',
                       restart_base_delay=0.2).start()
    tap = EventTap(d.run_dir, b"acme.")  # before the start: it sees every state
    d.ctl("start", company="acme")
    first = d.wait_state("acme", "connected")
    check = tap.wait(lambda e: e["type"] == "health_check_failed", timeout=20, what="health_check_failed")
    assert check["data"]["check"] == "memory_limit" and check["data"]["limit"] == limit
    assert check["data"]["rss_bytes"] > limit
    backoff = tap.wait(lambda e: e["type"] == "state" and e["data"]["state"] == "backoff", what="backoff")
    assert backoff["data"]["reason"] == "memory_limit"
    restart = tap.wait(lambda e: e["type"] == "restart", what="restart")
    assert restart["data"]["reason"] == "memory_limit"
    # Graceful: SIGTERM, and the worker stopped in order (exit 0), no SIGKILL needed.
    states = [e["data"]["state"] for e in tap.seen if e["type"] == "state"]
    assert states.index("backoff") > states.index("connected")
    second = wait_for(lambda: (s := d.status("acme"))["pid"] not in (None, first["pid"]) and s, what="new worker")
    assert second["restarts"] >= 1
    tap.close()
    assert "memory_limit" in d.logs() and "SIGKILL" not in d.logs()
    metrics = d.ctl("metrics")["metrics"]
    restarts = [m for m in metrics if m["name"] == "waport_worker_restarts_total"
                and m["labels"] == {"company": "acme", "reason": "memory_limit"}]
    assert restarts and restarts[0]["value"] >= 1
    d.ctl("stop", company="acme")
    assert simnet.stats()["replaced"] == 0
