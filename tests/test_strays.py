"""Stray processes at start-up: a worker that outlived its daemon is found and ended; another
process holding a session lock is reported and left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
from conftest import ROOT, EventTap, wait_for

from waportd import strays

NOT_A_PID = 999_999_999
SLEEPER = "import sys, time; time.sleep(float(sys.argv[1]))"
LOCKER = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "os.ftruncate(fd, 0); os.write(fd, b'%d\\n' % os.getpid())\n"
    "print('locked', flush=True)\n"
    "time.sleep(60)\n"
)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_worker_command_lines_are_recognised():
    cmd = [sys.executable, "-m", "workers", "--company", "acme", "--endpoint", "ipc:///r/workers.sock",
           "--session-dir", "/s/sessions/acme", "--parent-pid", "4242"]
    assert strays.is_worker_command(cmd)
    assert not strays.is_worker_command([sys.executable, "-m", "workers.simnet", "--endpoint", "x"])
    assert strays.arg_after(cmd, "--company") == "acme"
    assert strays.arg_after(["--company=b"], "--company") == "b"
    assert strays.worker_of(cmd, "/s/sessions", "ipc:///other") == "acme"  # by its session dir
    assert strays.worker_of(cmd, "/t/sessions", "ipc:///r/workers.sock") == "acme"  # by its endpoint
    assert strays.worker_of(cmd, "/t/sessions", "ipc:///other") is None  # another daemon's
    assert strays.from_earlier_daemon(cmd, own_pid=1)
    assert not strays.from_earlier_daemon(cmd, own_pid=4242)
    assert not strays.from_earlier_daemon([*cmd[:-2], "--parent-pid", "0"], own_pid=1)  # run by hand
    # setproctitle (fork-server workers) may leave the whole command line in one string.
    assert strays.split_title([" ".join(cmd)]) == cmd


def test_lock_probe_and_holder(tmp_path):
    path = str(tmp_path / "session.lock")
    open(path, "w").close()
    assert not strays.lock_busy(path)
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert strays.lock_busy(path)
        assert strays.holds_open(holder.pid, path)
        assert not strays.holds_open(os.getpid(), path)
        assert strays.flock_owner(path) == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert not strays.lock_busy(path)


def test_find_reports_workers_and_lock_holders(tmp_path):
    state = tmp_path / "state"
    (state / "sessions" / "acme").mkdir(parents=True)
    (state / "sessions" / "held").mkdir(parents=True)
    lock = str(state / "sessions" / "held" / "session.lock")
    # A sleeper dressed as a worker of this state dir, one of another state dir, and a lock holder.
    ours = subprocess.Popen([sys.executable, "-c", SLEEPER, "30", "-m", "workers", "--company", "acme",
                             "--session-dir", str(state / "sessions" / "acme"), "--parent-pid", "1"])
    other = subprocess.Popen([sys.executable, "-c", SLEEPER, "30", "-m", "workers", "--company", "acme",
                              "--session-dir", str(tmp_path / "elsewhere" / "sessions" / "acme")])
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        wait_for(lambda: "workers" in " ".join(psutil.Process(ours.pid).cmdline()), what="sleeper cmdline")
        # As seen by a daemon that is not our parent (the sleepers are this test's children).
        found = {s.pid: s for s in strays.find(str(state), "ipc:///nowhere", NOT_A_PID, [], [])}
        assert set(found) == {ours.pid, holder.pid}
        assert found[ours.pid].company == "acme" and found[ours.pid].ours
        assert found[holder.pid].company == "held" and not found[holder.pid].ours
        assert "holds the session lock" in found[holder.pid].describe()
        # Our own children and the locks we hold are never strays.
        assert strays.find(str(state), "ipc:///nowhere", NOT_A_PID, [ours.pid], ["held"]) == []
    finally:
        for p in (ours, other, holder):
            p.kill()
            p.wait()


def test_reaper_terms_then_kills(tmp_path):
    stubborn = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                 "print('ready', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    polite = subprocess.Popen([sys.executable, "-c", SLEEPER, "60"])
    try:
        assert stubborn.stdout.readline().strip() == "ready"
        os.kill(polite.pid, signal.SIGSTOP)  # stopped: only SIGCONT lets it act on SIGTERM
        reaper = strays.Reaper(grace=0.5)
        now = time.monotonic()
        assert reaper.end(stubborn.pid, now) and reaper.end(polite.pid, now)
        assert polite.wait(5) == -signal.SIGTERM
        reaper.tick(now + 0.25)  # within the grace, whatever the wait above took
        assert alive(stubborn.pid) and list(reaper.pending) == [stubborn.pid]
        reaper.tick(now + 1)
        assert stubborn.wait(5) == -signal.SIGKILL and not reaper.pending
        assert not reaper.end(999_999_999, now)
    finally:
        for p in (stubborn, polite):
            if p.poll() is None:
                p.kill()
                p.wait()


# Runs a daemon under a child subreaper that reaps whatever is left, as a service manager does.
# Orphans are re-parented to it, so a stopped worker's process group is not orphaned (the kernel
# would SIGHUP it) and the worker outlives its daemon, holding its session lock.
SUBREAPER = (
    "import ctypes, os, subprocess, sys\n"
    "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)\n"
    "daemon = subprocess.Popen(sys.argv[1:])\n"
    "print(daemon.pid, flush=True)\n"
    "while True:\n"
    "    try:\n"
    "        os.wait()\n"
    "    except ChildProcessError:\n"
    "        break\n"
)


def test_worker_that_outlived_its_daemon_is_ended_and_a_lock_holder_reported(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme", "bistro"], stop_timeout=3)
    log = open(d.log_path, "ab")
    manager = subprocess.Popen([sys.executable, "-c", SUBREAPER, sys.executable, "-m", "waportd", "--config",
                                d.config_path], cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    holder = None
    old_daemon = 0
    try:
        old_daemon = int(manager.stdout.readline())
        wait_for(d.ready, timeout=15, what="the first waportd to answer ping")
        old = wait_for(lambda: (r := d.status("acme"))["state"] == "connected"
                       and d.status("bistro")["state"] == "connected" and r, timeout=30, what="connected")
        bistro_pid = d.status("bistro")["pid"]
        # A stopped worker cannot act on the SIGTERM its daemon's death sends: it outlives the daemon,
        # still holding the session lock.
        os.kill(old["pid"], signal.SIGSTOP)
        os.kill(old_daemon, signal.SIGKILL)
        d.client.close()
        wait_for(lambda: not alive(bistro_pid), timeout=20, what="the other worker to follow its daemon")
        # The kernel closes a dying process's sockets (which ends bistro) before it re-parents its children.
        wait_for(lambda: psutil.Process(old["pid"]).ppid() == manager.pid, timeout=10,
                 what="the stopped worker to outlive its daemon, re-parented to the manager")
        # Someone else's process holds bistro's lock (not a worker: it is left alone).
        lock = os.path.join(d.state_dir, "sessions", "bistro", "session.lock")
        holder = subprocess.Popen([sys.executable, "-c", LOCKER, lock], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"

        d.start()
        wait_for(lambda: not alive(old["pid"]), timeout=20, what="the stray worker to be ended")
        new = d.wait_state("acme", "connected", timeout=20)
        assert new["pid"] != old["pid"]
        assert d.status("bistro")["reason"] == f"waiting for the session lock held by pid {holder.pid}"
        assert holder.poll() is None  # not ours: left alone
        logs = d.logs()
        assert f"stray process pid {old['pid']} (a worker of an earlier waportd" in logs, logs
        assert "ending it" in logs and f"stray process pid {holder.pid} (holds the session lock)" in logs
        finding = " ".join(d.ctl("diagnose", company="acme")["findings"])
        assert f"stray process at start-up: pid {old['pid']}" in finding
        errors = {(m["labels"]["company"], m["labels"]["kind"]): m["value"] for m in d.ctl("metrics")["metrics"]
                  if m["name"] == "waport_errors_total"}
        assert errors == {("acme", "stray"): 1, ("bistro", "stray"): 1}
        tap = EventTap(d.run_dir, b"bistro.")
        holder.kill()
        holder.wait()
        tap.wait(lambda e: e["type"] == "connected", timeout=30, what="bistro connected once the lock is free")
        tap.close()
        assert manager.wait(20) == 0  # nothing was left for it to reap
    finally:
        if old_daemon and alive(old_daemon):
            os.kill(old_daemon, signal.SIGKILL)
        for p in (holder, manager):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        log.close()
    assert simnet.stats()["replaced"] == 0


def test_no_stray_on_a_clean_start(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"]).start()
    d.wait_state("acme", "connected")
    assert "stray" not in d.logs()
