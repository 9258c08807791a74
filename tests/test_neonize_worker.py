"""End to end on a machine without network: a real waportd with backend = "neonize" backs off with
a clear `connect_failed` reason, retries quietly, and never loads neonize into the supervisor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, BlackHole, wait_for, whatsapp_resolves

WAPORTCTL = str(Path(sys.executable).with_name("waportctl"))
NEONIZE_SO = "neonize-linux-amd64.so"
REASON = "connect_failed: cannot reach WhatsApp: DNS lookup of web.whatsapp.com failed (no such host)"


def maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""  # gone already


@pytest.mark.skipif(whatsapp_resolves(), reason="this machine can reach WhatsApp: the no-network case needs none")
def test_no_network_means_backoff_with_a_clear_reason(daemon_factory: Any) -> None:
    d = daemon_factory(backend="neonize", companies=["acme"]).start()
    record = d.wait_state("acme", "backoff", timeout=20)
    assert record["reason"] == REASON
    assert record["next_restart_at"] and record["pid"] is None
    # A network failure (exit 75) is retried, again and again, with the same clear reason; all the
    # while the supervisor (which spawns neonize workers) never has neonize's Go library mapped.
    def retried() -> bool:
        assert NEONIZE_SO not in maps(d.proc.pid)
        return d.status("acme")["restarts"] >= 2

    wait_for(retried, timeout=20, what="two restarts")
    record = d.wait_state("acme", "backoff", timeout=20)
    assert record["reason"] == REASON and record["last_error"] == REASON
    shown = subprocess.run([WAPORTCTL, "--run-dir", d.run_dir, "status", "acme"],
                           capture_output=True, text=True, timeout=15)  # fmt: skip
    assert shown.returncode == 0 and "backoff" in shown.stdout and REASON in shown.stdout, shown
    # The daemon's log: a few lines per attempt, no traceback storm.
    d.terminate()
    log = Path(d.log_path).read_text(errors="replace")
    attempts = log.count("connect failed: cannot reach WhatsApp")  # the worker's one line per attempt
    assert attempts >= 3, log
    assert "Traceback" not in log and "Exception ignored" not in log, log
    assert len(log.splitlines()) <= 12 + 8 * attempts, log


def test_supervisor_modules_do_not_import_neonize() -> None:
    """Every module of the supervisor, the CLI and the leaf, and the fork server if there is one."""
    code = (
        "import importlib, importlib.util, pkgutil, sys, waportd, cli, ipc\n"
        "for pkg in (waportd, cli, ipc):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        if m.name != '__main__':\n"
        "            importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "if importlib.util.find_spec('workers.zygote'):  # forks workers: must hold no Go runtime\n"
        "    importlib.import_module('workers.zygote')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'neonize')\n"
        "assert not loaded, loaded\n"
        "assert 'workers.neonize_backend' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def zygote_of(d: Any) -> int:
    import psutil

    return next(c.pid for c in psutil.Process(d.proc.pid).children() if "workers.zygote" in " ".join(c.cmdline()))


def test_neonize_workers_fork_from_a_server_without_go_and_dial_through_their_proxy(daemon_factory: Any) -> None:
    import json
    import os
    import stat

    import psutil

    shared, own = BlackHole(), BlackHole()
    try:
        d = daemon_factory(backend="neonize", companies=["acme", "beta"], proxy=shared.url("op:s3cret@"),
                           connect_timeout=120, go_gc=50, go_max_procs=2).start()
        pids = {c: d.wait_state(c, "connecting", timeout=30)["pid"] for c in ("acme", "beta")}
        zygote = zygote_of(d)
        assert "--preload neonize" in " ".join(psutil.Process(zygote).cmdline())
        # each worker loads Go after the fork; the fork server never does
        wait_for(lambda: all(NEONIZE_SO in maps(p) for p in pids.values()), timeout=30, what="Go in the workers")
        assert NEONIZE_SO not in maps(zygote) and NEONIZE_SO not in maps(d.proc.pid)
        worker = psutil.Process(pids["acme"])
        assert worker.ppid() == d.proc.pid  # forked, then re-parented to the supervisor
        assert "s3cret" not in " ".join(worker.cmdline())
        assert b"s3cret" not in open(f"/proc/{pids['acme']}/environ", "rb").read()
        environ = open(f"/proc/{zygote}/environ", "rb").read()  # every worker's first environment: Go reads it
        assert b"s3cret" not in environ and b"GOGC=50" in environ and b"GOMAXPROCS=2" in environ
        # both dial WhatsApp through the configured proxy, with its credentials
        wait_for(lambda: len(shared.heard) >= 2, timeout=30, what="two dials through the proxy")
        assert all(h.startswith(b"CONNECT ") and b"Proxy-Authorization: Basic" in h for h in shared.heard[:2])
        # one company gets a proxy of its own: its worker restarts and dials through it; kept with it
        record = d.ctl("start", company="beta", proxy=own.url())
        assert record["company"] == "beta"
        wait_for(lambda: own.heard, timeout=30, what="beta dialing through its own proxy")
        assert d.status("beta")["pid"] != pids["beta"] and d.status("acme")["pid"] == pids["acme"]
        path = os.path.join(d.state_dir, "desired.json")
        assert json.load(open(path))["proxies"] == {"beta": own.url()}
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(Exception, match="proxy"):
            d.ctl("start", company="beta", proxy="ftp://nowhere:21")
        # after a restart of the daemon, beta still has its own proxy
        d.terminate()
        heard = len(own.heard)
        d.start()
        wait_for(lambda: len(own.heard) > heard, timeout=30, what="beta's own proxy after a restart")
    finally:
        shared.close()
        own.close()
