"""A server install as README "Install on a server" says: the built wheel in a fresh venv, waportd from
there with the example config (systemd/waportd.toml), driven with that venv's waportctl; then an upgrade
(stop, reinstall, start) that keeps the sessions."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, free_port, processes_using, wait_for

PREFIX = "/opt/waport"  # where README installs the venv; the unit's ExecStart runs PREFIX/bin/waportd
UNIT = os.path.join(ROOT, "systemd", "waportd.service")
EXAMPLE_CONFIG = os.path.join(ROOT, "systemd", "waportd.toml")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[str, str]:
    """`make wheel`, then `python3 -m venv PREFIX && PREFIX/bin/pip install dist/waport-*.whl`, under a temp dir."""
    base = tmp_path_factory.mktemp("install")
    dist = base / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), ROOT],
                   check=True, timeout=300, cwd=base)
    wheel, = glob.glob(str(dist / "waport-*-py3-none-any.whl"))
    prefix = str(base) + PREFIX
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", prefix], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", f"{prefix}/bin/python", "install", "--quiet", wheel],
                   check=True, timeout=900, cwd=base)
    return prefix, wheel


@pytest.fixture
def venv(installed) -> str:
    return installed[0]


def run(prefix: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([f"{prefix}/bin/{args[0]}", *args[1:]], capture_output=True, text=True, timeout=timeout,
                          cwd="/", env=clean_env())


def clean_env(**extra: str) -> dict[str, str]:
    """No WAPORT_* of the test run and no path to the source tree: only what the install brought."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAPORT_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def test_the_unit_runs_what_the_install_creates(venv):
    exec_start = next(line for line in open(UNIT) if line.startswith("ExecStart="))
    program, *args = exec_start.removeprefix("ExecStart=").split()
    assert program == f"{PREFIX}/bin/waportd" and args == ["--config", "/etc/waport/waportd.toml"]
    for script in ("waportd", "waportctl", "waport-simnet"):
        assert os.access(f"{venv}/bin/{script}", os.X_OK), script
    where = run(venv, "python", "-c", "import waportd, api; print(waportd.__file__); print(api.__file__)")
    assert where.returncode == 0 and all(line.startswith(venv) for line in where.stdout.split()), where
    # The default backend works after a plain install: neonize came with it, and the daemon's check agrees.
    check = run(venv, "python", "-c", "from waportd.process import missing_for; print(missing_for('neonize'))")
    assert check.stdout.strip() == "None", check


def test_the_installed_daemon_runs_the_example_config_and_keeps_sessions_over_an_upgrade(installed, short_tmp):
    venv, wheel = installed
    state, run_dir = os.path.join(short_tmp, "state"), os.path.join(short_tmp, "run")
    metrics = free_port()
    http = next(port for port in iter(free_port, None) if port != metrics)  # neither is bound yet: never the same
    env = clean_env(WAPORT_STATE_DIR=state, WAPORT_RUN_DIR=run_dir, WAPORT_BACKEND="sim",
                    WAPORT_METRICS_LISTEN=f"127.0.0.1:{metrics}", WAPORT_HTTP_LISTEN=f"127.0.0.1:{http}")
    log = open(os.path.join(short_tmp, "waportd.log"), "ab")

    def start() -> subprocess.Popen:
        return subprocess.Popen([f"{venv}/bin/waportd", "--config", EXAMPLE_CONFIG], cwd="/", env=env,
                                stdout=log, stderr=subprocess.STDOUT)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return run(venv, "waportctl", "--run-dir", run_dir, *args)

    def status() -> dict:
        out = ctl("--json", "status", "acme")
        return json.loads(out.stdout) if out.returncode == 0 else {}

    daemon = start()
    try:
        wait_for(lambda: ctl("ping").returncode == 0, timeout=30, what="the installed waportd to answer")
        assert ctl("start", "acme").returncode == 0
        first = wait_for(lambda: (s := status()).get("state") == "connected" and s, timeout=30, what="acme connected")
        sent = ctl("send", "acme", "+1 555 010 9999", "hello from the installed daemon", "--wait")
        assert sent.returncode == 0 and "sent" in sent.stdout, sent
        assert ctl("diagnose", "acme").returncode == 0
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        assert 'waport_session_up{company="acme"} 1.0' in scrape

        def health() -> int | None:  # the API is a child process of its own: it may still be starting
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/health", timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError:
                return None

        assert wait_for(health, timeout=30, what="the API to answer GET /v1/health") == 200

        # Upgrade: stop, install the package again over itself, start. Nothing is paired again.
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
        subprocess.run([sys.executable, "-m", "pip", "--python", f"{venv}/bin/python", "install", "--quiet",
                        "--force-reinstall", "--no-deps", wheel], check=True, timeout=300)
        daemon = start()
        again = wait_for(lambda: (s := status()).get("state") == "connected" and s, timeout=30,
                         what="acme back after the upgrade (the desired state kept it)")
        assert again["phone"] == first["phone"]  # the same device: its credentials survived
        listed = ctl("messages", "acme")
        assert listed.returncode == 0 and "hello from the installed daemon" in listed.stdout
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        log.close()
    wait_for(lambda: not processes_using(short_tmp), timeout=15, what="every process of the install to end")
