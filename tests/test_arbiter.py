"""The main loop: its rules in-process on fakes (boot, reload, routing, shutdown), then end to end
with a real waportd, real workers and the simulated network as a separate process."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from conftest import ROOT, EventTap, processes_using, wait_for
from fakes import rig

from ipc import protocol
from ipc import states as S
from waportd.arbiter import TIMER_BATCH
from waportd.config import ConfigError

COMPANIES = ["acme", "bistro", "salon_1", "dental-2", "gym"]


def all_in(d, companies, state):
    sessions = {r["company"]: r for r in d.ctl("list")["sessions"]}
    return all(sessions.get(c, {}).get("state") == state for c in companies) and sessions


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------- the loop's rules, in-process


def test_boot_starts_config_and_started_companies_a_batch_per_turn(tmp_path):
    names = [f"c{i:03d}" for i in range(TIMER_BATCH * 2 + 5)]
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "desired.json").write_text(json.dumps({"started": ["extra"], "stopped": ["c001"]}))
    r = rig(tmp_path, companies=tuple(names))
    r.arbiter.boot()
    assert {c.name: c.session.reason for c in r.arbiter.roster}["c000"] == "queued for start"
    now = r.clock.monotonic()
    r.arbiter.fire_timers(now)
    assert len(r.spawner.children) == TIMER_BATCH  # the sockets get their turn between batches
    r.advance(0)
    spawned = [ch.args[ch.args.index("--company") + 1] for ch in r.spawner.children]
    assert spawned == [n for n in names if n != "c001"] + ["extra"]  # config order first; stopped stays stopped


def test_a_reload_keeps_restart_only_keys_and_acts_on_changed_wishes(tmp_path):
    configs = iter([])
    r = rig(tmp_path, companies=("a", "b"), reload_config=lambda: next(configs))
    r.arbiter.boot()
    r.advance(0)
    cfg = r.arbiter.cfg
    configs = iter([dataclasses.replace(cfg, companies=("b", "c"), state_dir="/elsewhere", max_restarts=1)])
    assert r.arbiter.reload() == {"started": ["c"], "stopped": ["a"]}
    assert r.company("a").state == S.STOPPING and r.company("b").state == S.STARTING
    assert r.arbiter.cfg.state_dir == cfg.state_dir  # only a restart changes it
    assert r.services.policy.max_restarts == 1

    def broken():
        raise ConfigError("line 3: bad value")

    r.arbiter.reload_config = broken
    with pytest.raises(Exception, match="config not reloaded: line 3"):
        r.arbiter.reload()


def test_a_sighup_reloads_and_a_sigterm_stops_every_worker(tmp_path):
    r = rig(tmp_path, companies=("a", "b"), reload_config=lambda: r.arbiter.cfg)
    r.arbiter.boot()
    r.advance(0)
    r.arbiter.record_signal(signal.SIGHUP, None)
    r.arbiter.handle_signals()
    assert r.system.signals == []
    r.arbiter.record_signal(signal.SIGTERM, None)
    r.arbiter.handle_signals()
    assert sorted(sig for _, sig in r.system.signals) == [signal.SIGTERM] * 2
    assert not r.arbiter.finished()
    r.exit("a", 0)
    r.exit("b", -9)
    assert r.arbiter.finished()
    assert r.company("b").state == S.STOPPED and r.company("b").lock is None
    r.advance(3600)
    assert len(r.spawner.children) == 2  # nothing restarts while shutting down


def test_frames_of_an_unknown_or_old_worker_are_counted_and_told_to_stop(tmp_path):
    r = rig(tmp_path)
    company = r.arbiter.roster.want("acme")
    company.start()
    old = company.worker.routing_id
    r.exit("acme", 1)
    r.advance(2)
    r.arbiter.on_worker_frame(old, protocol.Message(protocol.HEARTBEAT, {}))
    r.arbiter.on_worker_frame(b"nobody/1", protocol.Message(protocol.HEARTBEAT, {}))
    assert r.services.counters[("unknown_worker",)] == 2
    assert [ident for ident, _ in r.system.sent(protocol.STOP)] == [old, b"nobody/1"]


def test_worker_events_go_to_their_owners(tmp_path):
    r = rig(tmp_path)
    r.arbiter.roster.want("acme").start()
    r.ready()
    batch = [{"type": "qr", "data": {"code": "SIMQR:1"}, "ts": 1.0},
             {"type": "error", "data": {"kind": "pairing", "message": "no phone"}, "ts": 1.0},
             {"type": "no_such_type", "data": {}, "ts": 1.0}]
    r.hear("acme", protocol.EVENTS, {"events": batch})
    c = r.services.counters
    assert r.company().session.qr == "SIMQR:1" and r.company().session.last_error == "no phone"
    assert c[("qr", "acme")] == 1 and c[("error", "acme", "pairing")] == 1 and c[("malformed", "event")] == 1
    assert r.types()[-2:] == ["qr", "error"]


def test_a_batch_is_heard_in_order_state_changes_among_the_messages(tmp_path):
    r = rig(tmp_path)
    r.arbiter.roster.want("acme").start()
    r.ready()
    batch = [{"type": "qr", "data": {"code": "SIMQR:1"}, "ts": 1.0},
             {"type": "state", "data": {"state": "connected", "phone": "15550100001"}, "ts": 1.0},
             {"type": "sent", "data": {"message_id": "m1", "latency": 0.01}, "ts": 1.0}]
    r.hear("acme", protocol.EVENTS, {"events": batch})
    assert r.types()[-4:] == ["qr", "state", "connected", "sent"]


def test_a_failing_timer_costs_only_itself(tmp_path, monkeypatch):
    r = rig(tmp_path)
    a, b = r.arbiter.roster.want("a"), r.arbiter.roster.want("b")
    a.start()
    b.start()
    r.exit("a", 1)
    r.exit("b", 1)

    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(a, "on_due", broken)
    r.advance(10)
    assert r.services.counters[("loop_errors",)] == 1
    assert b.worker is not None  # b's restart was not lost with a's


# ---------------------------------------------------------------- end to end


def test_starts_one_worker_per_company(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=COMPANIES).start()
    sessions = wait_for(lambda: all_in(d, COMPANIES, "connected"), timeout=30, what="all connected")
    pids = {r["pid"] for r in sessions.values()}
    assert len(pids) == len(COMPANIES) and set(d.worker_pids()) == pids
    assert simnet.connections() == {c: 1 for c in COMPANIES}
    for r in sessions.values():
        assert r["phone"] and r["connected_at"] and r["restarts"] == 0
    # The session lock names the worker that holds it.
    lock = os.path.join(d.state_dir, "sessions", "acme", "session.lock")
    assert int(open(lock).read()) == sessions["acme"]["pid"]
    assert os.stat(os.path.join(d.state_dir, "sessions", "acme")).st_mode & 0o777 == 0o700
    assert simnet.stats()["replaced"] == 0
    # Workers run `worker_nice` (default 5) nicer than the supervisor, whose loop must not starve.
    assert {psutil.Process(p).nice() for p in pids} == {psutil.Process(d.proc.pid).nice() + 5}


def test_killed_worker_restarts_after_the_computed_delay(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], restart_base_delay=0.8).start()
    first = d.wait_state("acme", "connected")
    tap = EventTap(d.run_dir, b"acme.")
    os.kill(first["pid"], signal.SIGKILL)
    backoff = tap.wait(lambda e: e["type"] == "state" and e["data"]["state"] == "backoff", what="backoff")
    restart = tap.wait(lambda e: e["type"] == "restart", what="restart")
    tap.close()
    planned = backoff["data"]["next_restart_at"] - backoff["ts"]
    assert planned == pytest.approx(0.8, abs=0.05)  # base delay, jitter 0
    assert restart["ts"] >= backoff["data"]["next_restart_at"] - 0.01
    second = d.wait_state("acme", "connected")
    assert second["pid"] != first["pid"] and second["restarts"] == 1
    assert "SIGKILL" in second["last_error"]
    assert simnet.stats()["replaced"] == 0


def test_crash_loop_ends_in_failed_and_restart_clears_it(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], max_restarts=2,
                       restart_base_delay=0.1).start()
    killed = set()
    for _ in range(3):
        r = wait_for(lambda: (s := d.status("acme"))["pid"] and s["pid"] not in killed and s,
                     what="a new worker")
        killed.add(r["pid"])
        os.kill(r["pid"], signal.SIGKILL)
    failed = d.wait_state("acme", "failed")
    assert failed["reason"].startswith("crash loop: 3 consecutive failures")
    assert failed["next_restart_at"] is None and failed["pid"] is None
    assert d.ctl("restart", company="acme")["state"] == "starting"
    assert d.wait_state("acme", "connected")["pid"] not in killed


def test_second_daemon_on_the_same_state_dir_refuses(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint).start()
    second = subprocess.run(
        [sys.executable, "-m", "waportd", "--config", d.config_path, "--run-dir", d.run_dir + "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert second.returncode == 1
    assert f"pid {d.proc.pid}" in second.stderr and "waportd.lock" in second.stderr
    assert d.ctl("ping")["pid"] == d.proc.pid


def test_killed_daemon_takes_its_workers_along_and_a_new_one_takes_over(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=COMPANIES).start()
    old = wait_for(lambda: all_in(d, COMPANIES, "connected"), timeout=30, what="all connected")
    old_pids = [r["pid"] for r in old.values()]
    d.kill()
    wait_for(lambda: not any(alive(p) for p in old_pids), timeout=10, what="orphan workers to exit")
    d.start()
    new = wait_for(lambda: all_in(d, COMPANIES, "connected"), timeout=30, what="all connected again")
    assert not {r["pid"] for r in new.values()} & set(old_pids)
    assert simnet.stats()["replaced"] == 0
    assert simnet.connections() == {c: 1 for c in COMPANIES}


def test_sigterm_stops_everything_and_leaves_nothing_behind(daemon_factory, short_tmp):
    # No sim_endpoint: the daemon runs its own simulated network, which must go too.
    d = daemon_factory(companies=["acme", "bistro"]).start()
    wait_for(lambda: all_in(d, ["acme", "bistro"], "connected"), timeout=30, what="connected")
    assert len(processes_using(short_tmp)) >= 4  # daemon, two workers, simnet
    assert d.terminate() == 0
    wait_for(lambda: not processes_using(short_tmp), timeout=10, what="no process left")
    assert not os.path.exists(os.path.join(d.run_dir, "control.sock"))


def test_hung_worker_is_aborted_killed_and_restarted(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], heartbeat_interval=0.3).start()
    first = d.wait_state("acme", "connected")
    tap = EventTap(d.run_dir, b"acme.")
    os.kill(first["pid"], signal.SIGSTOP)  # a worker that no longer answers
    tap.wait(lambda e: e["type"] == "health_check_failed", what="health_check_failed")
    backoff = tap.wait(lambda e: e["type"] == "state" and e["data"]["state"] == "backoff", what="backoff")
    tap.close()
    assert backoff["data"]["reason"] == "hung"
    assert not alive(first["pid"])
    second = d.wait_state("acme", "connected")
    assert second["pid"] != first["pid"]
    assert simnet.stats()["replaced"] == 0


def test_a_worker_of_another_protocol_version_is_restarted_with_the_reason(daemon_factory, simnet, short_tmp,
                                                                        monkeypatch):
    # As after an upgrade on disk under a running daemon: exec'd workers load the new code.
    upgraded = os.path.join(short_tmp, "upgraded")
    os.makedirs(upgraded)
    with open(os.path.join(upgraded, "sitecustomize.py"), "w") as fh:
        fh.write("with open('/proc/self/cmdline', 'rb') as f:\n"
                 "    if b'-m\\x00workers\\x00' in f.read():\n"
                 "        import ipc.protocol\n"
                 "        ipc.protocol.VERSION += 1\n")
    monkeypatch.setenv("PYTHONPATH", upgraded)
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=[], worker_spawn="exec").start()
    tap = EventTap(d.run_dir, b"acme.")
    d.ctl("start", company="acme")
    backoff = tap.wait(lambda e: e["type"] == "state" and e["data"]["state"] == "backoff", timeout=30,
                       what="backoff")
    assert backoff["data"]["reason"].startswith("protocol_mismatch: the worker speaks protocol version")
    record = d.status("acme")
    assert record["last_error"].endswith("restart waportd after an upgrade")
    assert record["state"] != "connected"
    tap.pump()
    assert not [e for e in tap.seen if e["type"] == "connected"]  # nothing it said was believed
    tap.close()
    assert d.proc.poll() is None


def test_worker_reported_exits_map_to_states(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["out", "rep", "ban"]).start()
    wait_for(lambda: all_in(d, ["out", "rep", "ban"], "connected"), timeout=30, what="connected")
    simnet.call("logout", company="out")
    simnet.call("replace", company="rep")
    simnet.call("ban", company="ban", seconds=1.5)
    assert d.wait_state("out", "logged_out")["pid"] is None
    assert d.wait_state("rep", "replaced")["pid"] is None
    banned = d.wait_state("ban", "banned")
    assert banned["next_restart_at"] is not None
    # A ban ends: the session comes back on its own; logged_out and replaced do not.
    assert d.wait_state("ban", "connected", timeout=20)["restarts"] == 1
    assert d.status("out")["state"] == "logged_out" and d.status("rep")["state"] == "replaced"


def test_dropped_connection_reconnects_inside_the_worker(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"]).start()
    pid = d.wait_state("acme", "connected")["pid"]
    tap = EventTap(d.run_dir, b"acme.")
    simnet.call("drop", company="acme")
    tap.wait(lambda e: e["type"] == "disconnected", what="disconnected")
    tap.wait(lambda e: e["type"] == "connected", what="connected again")
    tap.close()
    assert d.status("acme")["pid"] == pid  # no restart needed


def test_network_down_at_start_backs_off_and_recovers(daemon_factory, short_tmp):
    from conftest import SimNetProcess

    endpoint = f"ipc://{short_tmp}/simnet.sock"  # where the network will be, once it is up
    d = daemon_factory(sim_endpoint=endpoint, companies=["acme"]).start()
    r = d.wait_state("acme", "backoff", timeout=20)
    assert r["reason"].startswith("connect_failed") and r["next_restart_at"]
    net = SimNetProcess(short_tmp)  # the network comes back: the next restart connects
    try:
        assert net.endpoint == endpoint
        assert d.wait_state("acme", "connected", timeout=30)["restarts"] >= 1
    finally:
        net.stop()


def test_reload_starts_and_stops_only_what_changed(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["a", "b"]).start()
    before = wait_for(lambda: all_in(d, ["a", "b"], "connected"), timeout=20, what="connected")
    d.write_config(companies=["b", "c"])
    assert d.ctl("reload") == {"started": ["c"], "stopped": ["a"]}
    d.wait_state("c", "connected")
    assert d.wait_state("a", "stopped")["pid"] is None
    assert d.status("b")["pid"] == before["b"]["pid"]  # untouched
    d.write_config(companies=["b"])
    d.proc.send_signal(signal.SIGHUP)
    d.wait_state("c", "stopped")


def test_bad_config_on_reload_keeps_the_running_one(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["a"]).start()
    d.wait_state("a", "connected")
    with open(d.config_path, "a") as fh:
        fh.write("no_such_key = 1\n")
    with pytest.raises(Exception) as exc:
        d.ctl("reload")
    assert exc.value.code == "bad_request" and "no_such_key" in exc.value.message
    assert d.status("a")["state"] == "connected"


def test_desired_state_survives_a_daemon_restart(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["cfg1", "cfg2"]).start()
    d.ctl("start", company="extra")
    wait_for(lambda: all_in(d, ["cfg1", "cfg2", "extra"], "connected"), timeout=20, what="connected")
    assert d.ctl("stop", company="cfg2")["state"] == "stopped"
    assert d.terminate() == 0
    d.start()
    wait_for(lambda: all_in(d, ["cfg1", "extra"], "connected"), timeout=20, what="back after restart")
    assert "cfg2" not in {r["company"] for r in d.ctl("list")["sessions"]}
    assert simnet.stats()["replaced"] == 0
