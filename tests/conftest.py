"""Fixtures that run the real thing: waportd, its workers and the simulated network as processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import zmq

from ipc.control import ControlClient
from ipc.errors import WaportError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy; return its value or fail with what was last seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (WaportError, zmq.ZMQError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """ipc:// paths are limited to ~107 bytes: keep directories short."""
    path = tempfile.mkdtemp(prefix="wp-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class SimNetProcess:
    """A standalone simulated network: outlives any daemon, so it sees any double session."""

    def __init__(self, base: str, auto_pair: bool = True) -> None:
        self.endpoint = f"ipc://{base}/simnet.sock"
        self.state_dir = os.path.join(base, "simnet-state")
        cmd = [sys.executable, "-m", "workers.simnet", "--endpoint", self.endpoint,
               "--state-dir", self.state_dir]
        if auto_pair:
            cmd.append("--auto-pair")
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        self.client = ControlClient("", timeout=5, endpoint=self.endpoint)
        wait_for(lambda: os.path.exists(self.endpoint[6:]) and self.call("ping"), what="simnet ping")

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        return self.client.call(cmd, **args)

    def stats(self) -> dict[str, Any]:
        return self.call("stats")["stats"]

    def connections(self) -> dict[str, int]:
        return self.call("connections")["connections"]

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def simnet(short_tmp: str) -> Iterator[SimNetProcess]:
    net = SimNetProcess(short_tmp)
    yield net
    net.stop()


FAST = {
    "backend": "sim",
    "metrics_listen": "",
    "restart_base_delay": 0.3,
    "restart_factor": 2,
    "restart_max_delay": 2.0,
    "restart_jitter": 0.0,
    "restart_reset_after": 60,
    "max_restarts": 10,
    "heartbeat_interval": 1.0,
    "stop_timeout": 5,
}


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


class Daemon:
    """A real waportd process with its config in a temp dir, and a control client."""

    def __init__(self, base: str, **config: Any) -> None:
        self.base = base
        self.state_dir = os.path.join(base, "state")
        self.run_dir = os.path.join(base, "run")
        self.config_path = os.path.join(base, "waportd.toml")
        self.config = {**FAST, "state_dir": self.state_dir, "run_dir": self.run_dir, **config}
        self.write_config()
        self.log_path = os.path.join(base, "waportd.log")
        self.proc: subprocess.Popen | None = None
        self.client = ControlClient(self.run_dir, timeout=10)

    def write_config(self, **changes: Any) -> None:
        self.config.update(changes)
        with open(self.config_path, "w") as fh:
            for key, value in self.config.items():
                fh.write(f"{key} = {toml_value(value)}\n")

    def start(self, wait: bool = True) -> Daemon:
        self.log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("WAPORT_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "waportd", "--config", self.config_path],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        if wait:
            wait_for(self.ready, timeout=15, what="waportd to answer ping")
        return self

    def ready(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"waportd exited with {self.proc.returncode}:\n{self.logs()}")
        if not os.path.exists(os.path.join(self.run_dir, "control.sock")):
            return False
        try:
            return bool(self.client.call("ping", timeout=1))
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def ctl(self, cmd: str, **args: Any) -> dict[str, Any]:
        return self.client.call(cmd, **args)

    def status(self, company: str) -> dict[str, Any]:
        return self.ctl("status", company=company)

    def wait_state(self, company: str, *states: str, timeout: float = 15) -> dict[str, Any]:
        return wait_for(lambda: (r := self.status(company))["state"] in states and r,
                        timeout=timeout, what=f"{company} in {states}")

    def worker_pids(self) -> list[int]:
        if not self.proc:
            return []
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [c.pid for c in children if c.cmdline()[1:4] == ["-m", "workers", "--company"]]

    def logs(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()[-6000:]
        except OSError:
            return ""

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.client.close()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.client.close()

    def cleanup(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.client.close()
        if hasattr(self, "log"):
            self.log.close()


def processes_using(path_fragment: str) -> list[psutil.Process]:
    """Every live process whose command line mentions `path_fragment` (our temp dir)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and path_fragment in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def daemon_factory(short_tmp: str) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(**config: Any) -> Daemon:
        d = Daemon(short_tmp, **config)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()
    # Nothing of ours may outlive a test.
    # Nothing of ours may outlive a test: workers follow their daemon within seconds.
    def ours() -> list[psutil.Process]:
        return [p for p in processes_using(short_tmp) if "workers.simnet" not in " ".join(p.info["cmdline"])]

    try:
        wait_for(lambda: not ours(), timeout=10, what="workers to follow their daemon")
    except AssertionError:
        leftovers = ours()
        for p in leftovers:
            with contextlib.suppress(psutil.Error):
                p.kill()
        raise AssertionError(f"processes left behind: {[p.info['cmdline'][:6] for p in leftovers]}") from None


@pytest.fixture
def net() -> Iterator[Any]:
    """A simnet process from tests/simnet_helpers.py (manual pairing), for the network's own tests."""
    from simnet_helpers import SimNetProcess as HelperNet

    with HelperNet() as n:
        yield n


@pytest.fixture
def auto_net() -> Iterator[Any]:
    from simnet_helpers import SimNetProcess as HelperNet

    with HelperNet(auto_pair=True) as n:
        yield n


class EventTap:
    """A subscriber on the daemon's events socket that keeps everything it saw."""

    def __init__(self, run_dir: str, prefix: bytes = b"") -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.setsockopt(zmq.SUBSCRIBE, prefix)
        self.sock.connect(f"ipc://{run_dir}/events.sock")
        ok = monitor.poll(5000)
        self.sock.disable_monitor()
        monitor.close(0)
        assert ok, "could not connect to events.sock"
        self.seen: list[dict[str, Any]] = []

    def pump(self, wait_ms: int = 0) -> None:
        import json

        while self.sock.poll(wait_ms):
            topic, body = self.sock.recv_multipart()
            event = json.loads(body)
            assert topic.decode() == f"{event['company']}.{event['type']}"
            self.seen.append(event)
            wait_ms = 0

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15,
             what: str = "event") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for event in self.seen[checked:]:
                if predicate(event):
                    return event
            checked = len(self.seen)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout} s; saw {self.seen[-10:]}")
            self.pump(int(min(left, 0.2) * 1000))

    def close(self) -> None:
        self.sock.close(0)


def whatsapp_resolves() -> bool:
    """The no-network tests need a machine that cannot reach WhatsApp (like this one)."""
    import socket

    try:
        socket.getaddrinfo("web.whatsapp.com", 443)
    except OSError:
        return False
    return True


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A real redis-server of the test's own, on a free port, that a test may stop and start again."""

    def __init__(self, base: str) -> None:
        self.port = free_port()
        self.dir = os.path.join(base, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed: run .ci/install-system-deps")
        self.proc = subprocess.Popen(
            # Persistent like a production Redis: a restart in a test is an outage, not a wipe.
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always",
             "--dir", self.dir, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, timeout=10, what="redis-server to answer")

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=2)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_server(short_tmp: str) -> Iterator[RedisServer]:
    server = RedisServer(short_tmp)
    yield server
    server.stop()
