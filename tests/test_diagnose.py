"""diagnose: the pure rules, then a crash-looping company end to end (daemon and waportctl)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from conftest import wait_for

from waportd.diagnose import Inputs, diagnose

WAPORTCTL = os.path.join(os.path.dirname(sys.executable), "waportctl")
NOW = 1_000_000.0


def record(state: str, reason: str = "", **extra) -> dict:
    return {"company": "acme", "state": state, "reason": reason, "pid": None, "since": NOW - 600,
            "connected_at": None, "phone": None, "restarts": 0, "next_restart_at": None, "last_error": None,
            "rss_bytes": None, "queued": 0, **extra}


def run(state: str, reason: str = "", rec: dict | None = None, **inputs) -> dict:
    return diagnose(Inputs(company="acme", record=rec or record(state, reason), now=NOW, **inputs))


def text(result: dict, key: str) -> str:
    return " | ".join(result[key])


def test_connected_and_healthy():
    r = run("connected", rec=record("connected", pid=42, phone="15550000001", connected_at=NOW - 600),
            heartbeat_age=0.5, resources={"rss_bytes": 40_000_000, "threads": 7}, cpu_seconds_total=1.234)
    assert r["findings"] == ["connected for 10 min as 15550000001"]
    assert r["recommendations"] == []
    assert r["heartbeat_age"] == 0.5 and r["resources"]["rss_bytes"] == 40_000_000
    assert r["resources"]["cpu_seconds_total"] == 1.234 and r["restarts"] == 0


def test_crash_loop_recommends_reading_the_errors_then_restart():
    history = [(NOW - 30, "starting", ""), (NOW - 29, "backoff", "killed by SIGKILL"),
               (NOW - 20, "starting", ""), (NOW - 19, "backoff", "killed by SIGKILL"),
               (NOW - 10, "failed", "crash loop: 3 consecutive failures (last: killed by SIGKILL)")]
    r = run("failed", "crash loop: 3 consecutive failures (last: killed by SIGKILL)",
            rec=record("failed", "crash loop: 3 consecutive failures (last: killed by SIGKILL)", restarts=2),
            history=history, restarts_by_reason={"killed by SIGKILL": 2},
            errors=[{"ts": NOW - 25, "kind": "crash", "message": "boom"}])
    assert "crash loop" in text(r, "findings")
    assert "restarted 2 times since waportd started (2 killed by SIGKILL)" in text(r, "findings")
    assert "waportctl restart acme" in text(r, "recommendations")
    assert [e["kind"] for e in r["last_errors"]] == ["backoff", "crash", "backoff", "failed"]  # oldest first
    assert [h["state"] for h in r["history"]] == ["starting", "backoff", "starting", "backoff", "failed"]


def test_logged_out_needs_re_pairing():
    r = run("logged_out", "logged out from the phone")
    assert "unlinked" in text(r, "findings")
    assert "re-pair needed" in text(r, "recommendations") and "waportctl qr acme" in text(r, "recommendations")


def test_replaced_points_at_a_stale_session_elsewhere():
    r = run("replaced", "another client connected")
    assert "stale session copy" in text(r, "recommendations")


def test_pairing_timeout_and_waiting_for_a_scan():
    assert "re-pair" in text(run("failed", "pairing_timeout: not paired within 170 s"), "recommendations")
    assert "waportctl qr acme" in text(run("pairing", "waiting for QR scan"), "recommendations")


def test_long_disconnection_is_a_stale_connection():
    r = run("disconnected", "connection lost", rec=record("disconnected", "connection lost", since=NOW - 200),
            reconnect_timeout=300)
    assert "stale connection" in text(r, "recommendations")
    short = run("disconnected", "x", rec=record("disconnected", "x", since=NOW - 5), reconnect_timeout=300)
    assert short["recommendations"] == []


def test_late_heartbeat_and_flapping():
    history = [(NOW - 3000 + i * 100, "backoff", "crash") for i in range(4)]
    r = run("connected", rec=record("connected", restarts=4), history=history, heartbeat_age=12.0,
            heartbeat_interval=5.0)
    assert "last heard 12.0 s ago" in text(r, "findings") and "hung" in text(r, "recommendations")
    assert "4 unrequested exits in the last hour" in text(r, "findings")


def test_memory_growth_and_memory_limit_restarts():
    growth = {"first_bytes": 100_000_000, "last_bytes": 400_000_000, "seconds": 7200}
    r = run("connected", growth=growth)
    assert "memory growth: RSS went from 95.4 MiB to 381.5 MiB in 2.0 h" in text(r, "findings")
    assert "set memory_limit" in text(r, "recommendations")
    r = run("connected", growth=growth, memory_limit=450_000_000, resources={"rss_bytes": 400_000_000},
            restarts_by_reason={"memory_limit": 3})
    assert "close to memory_limit" in text(r, "findings")
    assert "restarted 3 times for using more than memory_limit" in text(r, "findings")
    assert "memory_limit restarts the worker gracefully" in text(r, "recommendations")
    assert run("connected", growth={"first_bytes": 100_000_000, "last_bytes": 120_000_000, "seconds": 60})[
        "recommendations"] == []  # a little growth is not worth a word


def test_waiting_for_a_lock_names_the_holder_and_strays_are_listed():
    r = run("starting", "waiting for the session lock held by pid 4242",
            strays=[{"pid": 4242, "why": "holds the session lock", "ours": False}])
    assert "pid 4242" in text(r, "findings") and "session.lock" in text(r, "recommendations")
    assert "stray process at start-up: pid 4242 (holds the session lock), not ours: left alone" in text(r, "findings")


def test_outbox_waiting_while_not_connected():
    assert "3 message(s) wait in the outbox" in text(run("backoff", "crash", messages_queued=3), "findings")


def test_crash_looping_company_end_to_end(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], max_restarts=2,
                       restart_base_delay=0.1, health_check_interval=0.2).start()
    killed: set[int] = set()
    for _ in range(3):
        r = wait_for(lambda: (s := d.status("acme"))["pid"] and s["pid"] not in killed and s, what="a new worker")
        killed.add(r["pid"])
        os.kill(r["pid"], signal.SIGKILL)
    d.wait_state("acme", "failed")
    result = d.ctl("diagnose", company="acme")
    assert result["company"] == "acme" and result["record"]["state"] == "failed"
    assert "crash loop" in " ".join(result["findings"])
    assert any("waportctl restart acme" in rec for rec in result["recommendations"])
    assert result["restarts"] == 2 and sum(result["restarts_by_reason"].values()) == 2
    assert [h["state"] for h in result["history"]].count("backoff") == 2
    assert "SIGKILL" in result["last_errors"][-1]["message"]
    assert result["heartbeat_age"] is None  # no worker
    out = subprocess.run([WAPORTCTL, "--run-dir", d.run_dir, "diagnose", "acme"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert "findings:" in out.stdout and "crash loop" in out.stdout
    assert "recommendations:" in out.stdout and "waportctl restart acme" in out.stdout
    history = out.stdout.split("history:\n", 1)[1].split("\nlast errors:\n", 1)[0]
    assert re.search(r"^  \d{4}-\d\d-\d\dT\S+  backoff: killed by SIGKILL", history, re.M), out.stdout
    assert "  failed: crash loop: 3 consecutive failures" in out.stdout.split("last errors:\n", 1)[1]
    assert "resources:\n" in out.stdout and "details:\n  restarts:" in out.stdout
    unknown = subprocess.run([WAPORTCTL, "--run-dir", d.run_dir, "diagnose", "nobody"], capture_output=True,
                             text=True, timeout=30)
    assert unknown.returncode == 1 and "unknown_company" in unknown.stderr + unknown.stdout
