"""Fixtures that run the real thing: waportd, its workers and the simulated network as processes.

The suite has two parts. A test that starts a process (directly, through a fixture, or through a helper of
tests/) is end-to-end and gets the `e2e` marker here, at collection; the rest are unit tests, run alone by
`make test-fast` (`pytest -m "not e2e"`) in seconds. The marking is checked, not trusted: a test without
the marker that starts a process anyway fails (see `_unit_tests_start_no_process`).
"""

from __future__ import annotations

import _posixsubprocess
import asyncio
import atexit
import builtins
import contextlib
import copy
import dis
import glob
import inspect
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import zmq

from ipc.control import ControlClient
from ipc.errors import WaportError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


# --- The split: which tests are end-to-end -----------------------------------------------------------------

# Module -> the attributes of it that start a process. A name and an attribute both in one function's code
# (`subprocess.run(...)`, or a local `import subprocess` then `.Popen`) count as a start.
_SPAWNING_ATTRS = {
    "subprocess": {"Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"},
    "os": {"fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "popen", "spawnv", "spawnvp", "spawnl",
           "spawnlp", "spawnve", "spawnvpe", "spawnle", "spawnlpe"},
    "multiprocessing": {"Process", "Pool", "get_context"},
    "asyncio": {"create_subprocess_exec", "create_subprocess_shell"},
}
# The same, imported by name (`from subprocess import Popen`).
_SPAWNING_OBJECTS = [getattr(module, attr) for module in (subprocess, os, multiprocessing, asyncio)
                     for attr in _SPAWNING_ATTRS[module.__name__] if hasattr(module, attr)]
_starts_cache: dict[int, bool] = {}
_IMPORT_NAME = dis.opmap["IMPORT_NAME"]


def _ours(obj: Any) -> bool:
    """Defined in a module under tests/ (conftest, the helpers, the test files)."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    path = getattr(module, "__file__", None) or ""
    return os.path.abspath(path).startswith(TESTS + os.sep)


def _referenced(func: types.FunctionType) -> Iterator[tuple[str, Any]]:
    """Every name the code of `func` (nested functions included) uses, with what it resolves to, if known:
    module globals, builtins, and names imported inside the function (`from simnet_helpers import X as Y`)."""
    codes = [func.__code__]
    for code in codes:
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        if _IMPORT_NAME not in code.co_code[::2]:  # no import inside: skip the (slower) disassembly
            instructions: Iterator[dis.Instruction] = iter(())
        else:
            instructions = dis.get_instructions(code)
        imported_from = None
        for ins in instructions:
            if ins.opname == "IMPORT_NAME":
                imported_from = sys.modules.get(ins.argval)
            elif ins.opname == "IMPORT_FROM" and imported_from is not None:
                yield ins.argval, getattr(imported_from, ins.argval, None)
        for name in code.co_names:
            yield name, func.__globals__.get(name, getattr(builtins, name, None))


def starts_processes(obj: Any) -> bool:
    """Whether calling `obj` (a function, or any method of a class) may start a process: it calls a process
    API itself, or something of tests/ that does. Static and conservative: every branch counts."""
    obj = inspect.unwrap(obj)
    inner = getattr(getattr(obj, "hypothesis", None), "inner_test", None)  # a @given test
    if inner is not None:
        obj = inspect.unwrap(inner)
    key = id(obj)
    if key in _starts_cache:
        return _starts_cache[key]
    _starts_cache[key] = False  # a recursion (A calls B calls A) adds nothing
    if isinstance(obj, type):
        members = [m.__func__ if isinstance(m, (staticmethod, classmethod)) else m for m in vars(obj).values()]
        members += [m.fget for m in vars(obj).values() if isinstance(m, property)]
        result = any(starts_processes(m) for m in members if isinstance(m, (types.FunctionType, type)))
    elif isinstance(obj, types.FunctionType):
        result = False
        names: set[str] = set()
        for name, value in _referenced(obj):
            names.add(name)
            if any(value is spawner for spawner in _SPAWNING_OBJECTS) or (
                    value is not obj and _ours(value) and starts_processes(value)):
                result = True
                break
        result = result or any(module in names and names & attrs for module, attrs in _SPAWNING_ATTRS.items())
    else:
        result = False
    _starts_cache[key] = result
    return result


def _is_e2e(item: pytest.Item) -> bool:
    if not isinstance(item, pytest.Function):
        return True  # not a plain test function: nothing to look at, so assume the worst
    if starts_processes(item.function):
        return True
    fixtures = getattr(item, "_fixtureinfo", None)
    for defs in (fixtures.name2fixturedefs.values() if fixtures else ()):
        for fixturedef in defs:
            if _ours(fixturedef.func) and starts_processes(fixturedef.func):
                return True
    return False


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e") is None and _is_e2e(item):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request: pytest.FixtureRequest) -> Iterator[None]:
    """A unit test (no `e2e` marker) that starts a process fails: the fast part stays fast, and a marker
    missed by the detection above shows here rather than as a slow `make test-fast`."""
    if request.node.get_closest_marker("e2e") is not None:
        yield
        return
    started: list[str] = []
    test_thread = threading.get_ident()

    def spy(module: Any, name: str) -> Callable[..., Any]:
        real = getattr(module, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == test_thread:  # a thread an earlier test left behind is not this test
                started.append(f"{module.__name__}.{name}")
            return real(*args, **kwargs)

        return call

    with pytest.MonkeyPatch.context() as mp:
        # Every way a process starts ends in one of these: subprocess in its own reference to
        # _posixsubprocess.fork_exec (or in os.posix_spawn), multiprocessing's spawn in fork_exec too,
        # os.system in libc, the rest in os.fork.
        for module, name in [(subprocess, "_fork_exec"), (_posixsubprocess, "fork_exec"), (os, "fork"),
                             (os, "forkpty"), (os, "posix_spawn"), (os, "posix_spawnp"), (os, "system")]:
            if getattr(module, name, None) is not None:
                mp.setattr(module, name, spy(module, name))
        yield
    if started:
        pytest.fail(f"{request.node.nodeid} started a process ({', '.join(sorted(set(started)))}) but is not "
                    "marked e2e: tests/conftest.py did not see it coming; mark it (pytestmark = pytest.mark.e2e "
                    "for a whole file) or keep the process out of the unit test", pytrace=False)


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
        self.prefix: list[str] = []  # e.g. `ip netns exec NAME`: the daemon on a network of its own (Netns)

    def write_config(self, **changes: Any) -> None:
        self.config.update(changes)
        with open(self.config_path, "w") as fh:
            for key, value in self.config.items():
                fh.write(f"{key} = {toml_value(value)}\n")

    def start(self, wait: bool = True) -> Daemon:
        self.log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("WAPORT_")}
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "waportd", "--config", self.config_path],
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
    try:
        socket.getaddrinfo("web.whatsapp.com", 443)
    except OSError:
        return False
    return True


class BlackHole:
    """An HTTP proxy that takes connections, keeps what they say and never answers: a worker dialing
    WhatsApp through it waits in its connect attempt, which is where an idle worker is measured."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)  # a benchmark's 300 workers dial at once
        self.port = self.sock.getsockname()[1]
        self.heard: list[bytes] = []
        self.conns: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            conn.settimeout(5)
            try:
                self.heard.append(conn.recv(4096))
            except OSError:
                self.heard.append(b"")

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def free_port() -> int:
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


def postgres_bin() -> str | None:
    """The bin directory of the newest PostgreSQL installed the Debian way, or None."""
    found = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    found.sort(key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def _ended(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


_PG_TEMPLATE: str | None = None


class PgServer:
    """A real PostgreSQL of the test's own: initdb into a temporary directory (as user `postgres` when the
    tests run as root: initdb refuses root), trust authentication, a free port on 127.0.0.1, its unix socket
    in that directory. A test may stop it, start it again (same data, same port), kill it (SIGKILL of the
    postmaster and every backend: a crash) or pause it (SIGSTOP: a server that answers nothing).
    fsync=off: a killed server keeps every commit (the OS has it), only a machine crash would lose some.
    initdb + start take about 1 s, so each test gets a server of its own rather than a shared one."""

    def __init__(self, max_connections: int = 300) -> None:
        bindir = postgres_bin()
        self.max_connections = max_connections
        if bindir is None:
            pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres): "
                        "run .ci/install-system-deps")
        self.bin = bindir
        self.dir = tempfile.mkdtemp(prefix="wp-pg-", dir="/tmp")
        self.data = os.path.join(self.dir, "data")
        self.logfile = os.path.join(self.dir, "postgres.log")
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.proc: subprocess.Popen | None = None
        self.listen = ["127.0.0.1"]
        # Root runs the server as `postgres`; anyone else as themselves.
        self.as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        # initdb once per test session; each server starts from a copy of that fresh cluster (cp -a keeps
        # the owner and modes), which takes a tenth of initdb's time.
        global _PG_TEMPLATE
        if _PG_TEMPLATE is None or not os.path.isdir(_PG_TEMPLATE):
            template = tempfile.mkdtemp(prefix="wp-pgt-", dir="/tmp")
            if self.as_user:
                os.chown(template, self.as_user["user"], self.as_user["group"])
            subprocess.run([os.path.join(self.bin, "initdb"), "-D", os.path.join(template, "data"), "-A", "trust",
                            "-U", "postgres", "-N", "-E", "UTF8", "--locale", "C"], cwd=template, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **self.as_user)
            _PG_TEMPLATE = os.path.join(template, "data")
            atexit.register(shutil.rmtree, template, True)
        subprocess.run(["cp", "-a", _PG_TEMPLATE, self.data], check=True)
        self.start()

    def start(self) -> None:
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [os.path.join(self.bin, "postgres"), "-D", self.data, "-p", str(self.port), "-k", self.dir,
                 "-c", f"listen_addresses={','.join(self.listen)}", "-c", "fsync=off",
                 "-c", "full_page_writes=off", "-c", "shared_buffers=16MB",
                 "-c", f"max_connections={self.max_connections}"],
                cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self.as_user)
        wait_for(self.ready, timeout=30, what="postgres to accept connections")

    def also_listen(self, address: str) -> str:
        """Listen on `address` too (a veth's end: hosts in network namespaces reach it), trusting whoever
        comes from there; restarts the server. The DSN through that address."""
        with open(os.path.join(self.data, "pg_hba.conf"), "a") as hba:
            hba.write(f"host all all {address}/24 trust\n")
        self.listen.append(address)
        self.stop()
        self.start()
        return self.dsn.replace("@127.0.0.1:", f"@{address}:")

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"postgres exited: {self.log()[-2000:]}")
        try:
            with self.connect(connect_timeout=2):
                return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def connect(self, **kwargs: Any):
        """A psycopg connection (autocommit) as the superuser; keywords go to psycopg.connect."""
        import psycopg

        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.dsn, **kwargs)

    def sql(self, query: str, *params: Any) -> list[tuple]:
        """Run one statement on a connection of its own; the rows it returns (none: [])."""
        with self.connect() as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    def log(self) -> str:
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def _signal_all(self, sig: int) -> list[psutil.Process]:
        """Signal the postmaster and every backend (each backend is a session of its own: no killpg)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            main = psutil.Process(self.proc.pid)
            procs = [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        return procs

    def stop(self) -> None:
        """A fast shutdown (SIGINT): clients are disconnected, the data stays."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal_all(signal.SIGCONT)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole server at once, like a machine that dies; `start` then recovers from the WAL."""
        if self.proc is None:
            return
        procs = self._signal_all(signal.SIGKILL)
        self.proc.wait(10)
        # A backend holds the shared memory until it is gone, and a new postmaster refuses to start before.
        wait_for(lambda: all(map(_ended, procs)), timeout=10, what="postgres backends to end")

    def pause(self) -> None:
        """SIGSTOP the server: connections open and queries hang (what a client's timeouts are for)."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Netns:
    """A network namespace joined to this one by a veth pair: a "host" on a network of its own, whose
    processes reach this namespace's `outside` address (and unix sockets, which live in the file system).
    `cut` drops whatever it sends to `outside` (a blackhole route: existing connections hear nothing), `heal`
    undoes it. Needs root and iproute2."""

    def __init__(self, index: int) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            pytest.skip("network namespaces need root and iproute2 (`ip`)")
        tag = f"{os.getpid() % 10000}x{index}"
        self.name, self.veth = f"wp{tag}", f"wpv{tag}"
        net = f"10.{200 + index}.{os.getpid() % 250}"
        self.outside, self.inside = f"{net}.1", f"{net}.2"
        for c in (f"netns add {self.name}", f"link add {self.veth}a type veth peer name {self.veth}b",
                  f"link set {self.veth}b netns {self.name}", f"addr add {self.outside}/24 dev {self.veth}a",
                  f"link set {self.veth}a up"):
            self.ip(c)
        for c in (f"addr add {self.inside}/24 dev {self.veth}b", f"link set {self.veth}b up", "link set lo up"):
            self.ip(c, inside=True)

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def ip(self, args: str, inside: bool = False) -> None:
        subprocess.run([*(self.prefix if inside else []), "ip", *args.split()], check=True, capture_output=True)

    def cut(self) -> None:
        self.ip(f"route add blackhole {self.outside}/32", inside=True)

    def heal(self) -> None:
        self.ip(f"route del blackhole {self.outside}/32", inside=True)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.veth}a"], capture_output=True)


@pytest.fixture
def netns() -> Iterator[Callable[[], Netns]]:
    """Network namespaces for a test, removed after it: `netns()` makes one more."""
    made: list[Netns] = []

    def make() -> Netns:
        made.append(Netns(len(made)))
        return made[-1]

    yield make
    for ns in made:
        ns.close()


_SHARED_PG: PgServer | None = None


@pytest.fixture
def pg(request: pytest.FixtureRequest) -> Iterator[PgServer]:
    """PostgreSQL for a test (skipped, with the reason, where it is not installed): a database of its own on
    a server the session shares, or, for a test marked `pg_server` (it stops, pauses, kills or reconfigures
    the server), a server of its own. Sharing saves a server start per test."""
    if request.node.get_closest_marker("pg_server") is not None:
        server = PgServer()
        yield server
        server.close()
        return
    global _SHARED_PG
    if _SHARED_PG is None or _SHARED_PG.proc is None or _SHARED_PG.proc.poll() is not None:
        _SHARED_PG = PgServer()
        atexit.register(_SHARED_PG.close)
    name = f"t{uuid.uuid4().hex[:12]}"
    _SHARED_PG.sql(f"CREATE DATABASE {name}")
    own = copy.copy(_SHARED_PG)
    own.dsn = _SHARED_PG.dsn.rsplit("/", 1)[0] + f"/{name}"
    yield own
    _SHARED_PG.sql(f"DROP DATABASE {name} WITH (FORCE)")  # its connections (a test's workers) end with it


@pytest.fixture
def pgdb(pg: PgServer) -> Iterator[Callable[[str], Any]]:
    """The cluster's schema migrated in the test's database, and `pgdb(application_name)`: a bounded
    connection to it (ipc/pgdb.py), each closed after the test."""
    from ipc.pgdb import PgDb
    from waportd.clusterstore import ClusterStore

    schema = ClusterStore(pg.dsn, "h1", 15)
    schema.migrate()
    schema.close()
    made: list[Any] = []

    def open_db(application_name: str = "waportd/h1/journal") -> Any:
        made.append(PgDb(pg.dsn, application_name))
        return made[-1]

    yield open_db
    for db in made:
        db.close()


class WebhookReceiver:
    """tests/webhook_receiver.py as a process: it checks signatures with the `standardwebhooks` library and
    records every request; it can go down and come back on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "webhook_receiver.py"),
                                      "--port", str(self.port)], stdout=subprocess.PIPE, cwd=ROOT)
        assert self.proc.stdout is not None
        assert int(self.proc.stdout.readline()) == self.port

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{name}"

    def admin(self, what: str, body: dict[str, Any]) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/admin/{what}", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
        urllib.request.urlopen(req, timeout=5).read()

    def secrets(self, name: str, *secrets: str) -> None:
        self.admin("secrets", {"path": f"/hook/{name}", "secrets": list(secrets)})

    def behave(self, name: str = "*", **how: Any) -> None:
        self.admin("behave", {"path": f"/hook/{name}" if name != "*" else "*", **how})

    def received(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/received", timeout=5) as resp:
            return json.loads(resp.read())

    def delivered(self, name: str | None = None) -> list[dict[str, Any]]:
        """Requests answered 2xx (the ones that count as delivered), at `name`'s path or all."""
        return [r for r in self.received() if 200 <= r["answered"] < 300
                and (name is None or r["path"] == f"/hook/{name}")]


    @staticmethod
    def all_valid(records: list[dict[str, Any]]) -> bool:
        """Every request verified by the reference library with one of the secrets set for its path."""
        return all(r.get("valid") and any(v is True for v in r["valid"].values()) for r in records)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver()
    yield r
    r.stop()


def api_pid(d: Daemon) -> int | None:
    """The daemon's HTTP API server: its child run as `python -m api`."""
    assert d.proc is not None
    for child in psutil.Process(d.proc.pid).children():
        try:
            if child.cmdline()[1:3] == ["-m", "api"] and child.status() != psutil.STATUS_ZOMBIE:
                return child.pid
        except psutil.Error:
            continue
    return None


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, and SIGKILL if it is still there after `timeout`."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class CollectRecords(logging.Handler):
    """A log handler that keeps what it is given, for tests to read."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
