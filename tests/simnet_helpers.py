"""Shared helpers for the simulated-network tests: a real simnet process, a control client, event logs,
and a loop that drives the sim backend as the worker does.

Synchronisation is always "poll a condition until a deadline", never a bare sleep.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from ipc.control import ControlClient
from ipc.errors import WaportError
from workers.backend import Backend, Emit
from workers.wakeup import Wakeup

START_TIMEOUT = 10.0


def short_tmpdir() -> str:
    """A temp dir with a short path: ipc:// socket paths must stay under ~107 characters."""
    return tempfile.mkdtemp(prefix="wsn-", dir="/tmp")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], Any], timeout: float = 3.0, what: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


class SimNetClient(ControlClient):
    """A blocking control client for the network: `call(cmd, **args)` returns the result or raises."""

    def __init__(self, endpoint: str, timeout: float = 3.0) -> None:
        super().__init__("", timeout=timeout, endpoint=endpoint)

    def stats(self) -> dict[str, int]:
        return self.call("stats")["stats"]

    def connections(self) -> dict[str, int]:
        return self.call("connections")["connections"]


class SimNetProcess:
    """`python -m workers.simnet` in a subprocess on a temp ipc (or given) endpoint."""

    def __init__(
        self,
        auto_pair: bool = False,
        endpoint: str | None = None,
        state_dir: str | None = None,
        liveness_timeout: float | None = None,
    ) -> None:
        self.dir = short_tmpdir()
        self.endpoint = endpoint or f"ipc://{self.dir}/net.sock"
        self.state_dir = state_dir or os.path.join(self.dir, "state")
        self.auto_pair = auto_pair
        self.liveness_timeout = liveness_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = SimNetClient(self.endpoint)
        self.log_path = os.path.join(self.dir, "simnet.log")

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "workers.simnet", "--endpoint", self.endpoint]
        cmd += ["--state-dir", self.state_dir, "--log-level", "DEBUG"]
        if self.auto_pair:
            cmd.append("--auto-pair")
        if self.liveness_timeout is not None:
            cmd += ["--liveness-timeout", str(self.liveness_timeout)]
        return cmd

    def start(self) -> SimNetProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            problem = ""
            if self.proc.poll() is not None:
                problem = f"simnet exited with {self.proc.returncode}"
            elif time.monotonic() > deadline:
                problem = f"simnet did not answer ping within {START_TIMEOUT} s"
            if problem:
                log = self.log()
                self.cleanup()  # never leave a server behind
                raise AssertionError(f"{problem}: {log}")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        try:
            return bool(self.client.call("ping", timeout=0.2).get("pong"))
        except Exception:
            self.client.close()
            return False

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        return self.client.call(cmd, **args)

    def error(self, cmd: str, **args: Any) -> WaportError:
        """The error a command is expected to fail with."""
        try:
            result = self.client.call(cmd, **args)
        except WaportError as exc:
            return exc
        raise AssertionError(f"{cmd} {args} succeeded unexpectedly: {result}")

    def stats(self) -> dict[str, int]:
        return self.client.stats()

    def connections(self) -> dict[str, int]:
        return self.client.connections()

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-4000:]
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the process and wait for it; returns its exit code."""
        self.client.close()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SimNetProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class EventLog:
    """A thread-safe `emit` that records `(type, data)` for tests to poll."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, type_: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._events.append((type_, dict(data)))

    @property
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self._events)

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [data for t, data in self.events if t == type_]

    def states(self) -> list[str]:
        return [data["state"] for data in self.of("state")]

    def wait_for(
        self, type_: str, pred: Callable[[dict[str, Any]], bool] = lambda _d: True, timeout: float = 3.0
    ) -> dict[str, Any]:
        """The first event of `type_` matching `pred`, waiting for it until the deadline."""

        def find() -> dict[str, Any] | None:
            return next((d for d in self.of(type_) if pred(d)), None)

        return wait_until(find, timeout, f"a {type_!r} event; got {self.events}")

    def wait_state(self, state: str, timeout: float = 3.0, nth: int = 1) -> dict[str, Any]:
        """The nth `state` event with this state."""

        def find() -> dict[str, Any] | None:
            hits = [d for d in self.of("state") if d["state"] == state]
            return hits[nth - 1] if len(hits) >= nth else None

        return wait_until(find, timeout, f"state {state!r} #{nth}; got {self.events}")


class InlineLoop:
    """Drives an inline backend (sim) the way workers/worker.py does, without the rest of a worker.

    Its thread is the worker's loop: it starts the backend, polls `loop_sockets()`, calls `loop_step`
    every turn, and ends with an `exit` report or `stop()`, then stops the backend. Other threads
    call `send_text`, `pair_code` and `logout` as the worker's sender and request threads do.
    """

    def __init__(self, emit: Emit) -> None:
        self.reports = emit
        self.backend: Backend | None = None
        self.exited = False
        self.stopping = False
        self.wakeup = Wakeup()  # our own, so stop() ends a poll at once
        self.started = threading.Event()
        self.thread: threading.Thread | None = None
        self.journal = True  # say each message journaled at once, as the worker does after its commit

    def emit(self, type_: str, data: dict[str, Any]) -> None:
        """The emit to build the backend with: recorded, and an exit ends the loop as in the worker."""
        self.reports(type_, data)
        if type_ == "message" and self.journal and self.backend is not None:
            self.backend.journaled([data["id"]])
        if type_ == "exit":
            self.exited = True
            self.wakeup.poke()

    def start(self, backend: Backend) -> None:
        """Run the loop on a thread of its own; return once the backend has started on it."""
        self.thread = threading.Thread(target=self.run, args=(backend,), name="inline-loop", daemon=True)
        self.thread.start()
        self.started.wait(5)

    def run(self, backend: Backend) -> None:
        """The loop, on the calling thread, until an exit report or `stop()`; then the backend stops."""
        self.backend = backend
        poller = zmq.Poller()
        poller.register(self.wakeup.r, zmq.POLLIN)
        polled: list[Any] = []
        try:
            backend.start()
            self.started.set()
            wait = 0.0
            while not self.exited and not self.stopping:
                current = backend.loop_sockets()  # the connection changes on reconnects
                if current != polled:
                    for item in polled:
                        poller.unregister(item)
                    for item in current:
                        poller.register(item, zmq.POLLIN)
                    polled = current
                ready = dict(poller.poll(max(0, int(wait * 1000)) + 1))
                if self.wakeup.r in ready:
                    self.wakeup.drain()
                step = backend.loop_step(ready)
                wait = 1.0 if step is None else step
        finally:
            self.started.set()
            backend.stop()

    def stop(self) -> None:
        """End the loop and wait for it: the backend has stopped (bye said) when this returns."""
        self.stopping = True
        self.wakeup.poke()
        if self.thread is not None:
            self.thread.join(5)
            assert not self.thread.is_alive(), "the inline loop did not stop"
            self.wakeup.close()


# A sim backend alone in a process, for tests that kill or stop the process holding a session.
BACKEND_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[4])
from simnet_helpers import InlineLoop
from workers.backend import WorkerContext
from workers.sim_backend import SimBackend
endpoint, company, session_dir = sys.argv[1:4]
def emit(type_, data):
    print(json.dumps([type_, data]), flush=True)
loop = InlineLoop(emit)
loop.run(SimBackend(WorkerContext(company, session_dir, {"sim_endpoint": endpoint}), loop.emit))
"""


def spawn_backend(endpoint: str, company: str, session_dir: str) -> subprocess.Popen[bytes]:
    """Run a SimBackend in a child process, on its main thread's loop (its emits go to stdout as JSON lines)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.Popen(
        [sys.executable, "-c", BACKEND_SCRIPT, endpoint, company, session_dir, here],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
