"""Side by side (issue 6): the same N sim worker commands under supervisord and under waportd.

Start: from launching the manager until the simulated network sees N live connections.
Recovery: SIGKILL one worker; until the network sees that company connected again.
supervisord is installed into the running venv if missing (`pip install supervisor`).

    python tests/bench/bench_supervisord.py --workers 500
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

import psutil
from common import Daemon, SimNetProcess, record, wait_for

from ipc.control import DaemonUnreachable

# 500 cold starts swamp 2 cores: a worker that gives up its first hello after the default 5 s
# is restarted at once by supervisord and feeds the storm. Both managers get the same patience.
PATIENT = {"connect_timeout": 60}


def live(net: SimNetProcess) -> dict[str, int]:
    """Live connections per company; {} while the network is too busy to answer (500 cold starts)."""
    try:
        return net.connections()
    except DaemonUnreachable:
        net.client.close()
        return {}


def ensure_supervisord() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "supervisord")
    if not os.path.exists(exe):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "supervisor"], check=True)
    return exe


def worker_pid(company: str) -> int:
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "--company" in cmd and cmd[cmd.index("--company") + 1] == company and "--endpoint" in cmd \
                and cmd[cmd.index("--endpoint") + 1] == "none":
            return p.pid
    raise LookupError(company)


def recovery(net: SimNetProcess, company: str, pid: int) -> float:
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: live(net).get(company, 0) == 0, timeout=30, interval=0.005, what="the kill to be seen")
    wait_for(lambda: live(net).get(company, 0) == 1, timeout=60, interval=0.01, what="reconnect")
    return time.monotonic() - killed


def under_supervisord(base: str, net: SimNetProcess, n: int) -> dict:
    exe = ensure_supervisord()
    conf = os.path.join(base, "supervisord.conf")
    options = json.dumps({"sim_endpoint": net.endpoint, **PATIENT}, separators=(",", ":"))
    with open(conf, "w") as fh:
        fh.write(f"[supervisord]\nnodaemon=true\nlogfile={base}/supervisord.log\npidfile={base}/sd.pid\n"
                 f"minfds=20000\n\n[unix_http_server]\nfile={base}/sd.sock\n\n")
        for i in range(n):
            company = f"v{i:04d}"
            sess = os.path.join(base, "sd-sessions", company)
            os.makedirs(sess, exist_ok=True)
            fh.write(f"[program:{company}]\ncommand={sys.executable} -m workers --company {company} "
                     f"--endpoint none --session-dir {sess} --backend sim --options '{options}' "
                     "--heartbeat-interval 5\n"
                     f"directory={os.path.dirname(os.path.dirname(os.path.dirname(__file__)))}\n"
                     "autorestart=true\nstartsecs=0\nstartretries=1000\nstopasgroup=true\nkillasgroup=true\n"
                     "stdout_logfile=NONE\nstderr_logfile=NONE\n\n")
    start = time.monotonic()
    proc = subprocess.Popen([exe, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sum(live(net).values()) >= n, timeout=600, interval=0.25, what="all connected")
        started = time.monotonic() - start
        rec = recovery(net, "v0001", worker_pid("v0001"))
        return {"start_all_connected_s": round(started, 2), "recovery_s": round(rec, 3),
                "replaced_at_network": net.stats()["replaced"]}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def under_waportd(base: str, net: SimNetProcess, n: int, delay: float) -> dict:
    os.makedirs(base, exist_ok=True)
    companies = [f"w{i:04d}" for i in range(n)]
    replaced_before = net.stats()["replaced"]
    d = Daemon(base, sim_endpoint=net.endpoint, companies=companies, heartbeat_interval=5.0,
               restart_base_delay=delay, restart_jitter=0.0, sim_options=PATIENT)
    start = time.monotonic()
    try:
        d.start()
        wait_for(lambda: sum(v for k, v in live(net).items() if k.startswith("w")) >= n, timeout=600,
                 interval=0.25, what="all connected")
        started = time.monotonic() - start
        before = replaced_before
        rec = recovery(net, "w0001", d.status("w0001")["pid"])
        d.terminate(timeout=120)
        return {"start_all_connected_s": round(started, 2), "recovery_s": round(rec, 3),
                "restart_base_delay_s": delay, "replaced_at_network": net.stats()["replaced"] - before}
    finally:
        d.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=500)
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="wpv-", dir="/tmp")
    net = SimNetProcess(base)
    try:
        sd = under_supervisord(base, net, args.workers)
        wp = under_waportd(os.path.join(base, "wp"), net, args.workers, delay=0.0)
    finally:
        net.stop()
        shutil.rmtree(base, ignore_errors=True)
    figures = {"workers": args.workers, "supervisord": sd, "waportd": wp,
               "start_ratio_supervisord_over_waportd": round(sd["start_all_connected_s"] /
                                                             wp["start_all_connected_s"], 2),
               "recovery_ratio_supervisord_over_waportd": round(sd["recovery_s"] / wp["recovery_s"], 2)}
    record(f"supervisord_{args.workers}", figures)


if __name__ == "__main__":
    main()
