"""Stand-ins for what the supervisor touches in the system: a clock that moves only when told,
a spawner that makes no process, signals that are only recorded, a worker socket that keeps frames.

With them the real `Arbiter`, `Roster` and `Company` run the rules of a company's life in
microseconds (tests/test_company.py, tests/test_arbiter_rules.py). Sessions locks are real
flocks in a temporary directory: cheap, and the real thing.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from ipc import protocol
from waportd.arbiter import Arbiter
from waportd.config import Config


class FakeClock:
    def __init__(self, wall: float = 1_000_000.0) -> None:
        self.mono = 100.0
        self.wall = wall

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@dataclasses.dataclass
class FakeChild:
    pid: int
    args: list[str]
    code: int | None = None

    def reaped(self, code: int) -> None:
        self.code = code


class FakeSpawner:
    def __init__(self) -> None:
        self.pids = itertools.count(40_000)
        self.children: list[FakeChild] = []
        self.fail: str | None = None  # the OSError message of the next spawns

    def spawn_worker(self, args: list[str], lock_fd: int, secrets: dict[str, Any] | None = None) -> FakeChild:
        if self.fail:
            raise OSError(self.fail)
        child = FakeChild(next(self.pids), args)
        self.children.append(child)
        return child

    def owns(self, pid: int) -> bool:
        return False

    def close(self) -> None:
        pass


class FakeSystem:
    """Signals sent, children to reap, frames to workers: what the daemon did to the outside world."""

    def __init__(self) -> None:
        self.signals: list[tuple[int, int]] = []
        self.exits: list[tuple[int, int]] = []
        self.frames: list[tuple[bytes, str, dict[str, Any]]] = []

    def kill(self, pid: int, sig: int) -> bool:
        self.signals.append((pid, sig))
        return True

    def reap(self) -> list[tuple[int, int]]:
        exits, self.exits = self.exits, []
        return exits

    def send(self, ident: bytes, type_: str, body: dict[str, Any]) -> bool:
        self.frames.append((ident, type_, body))
        return True

    def sent(self, type_: str) -> list[tuple[bytes, dict[str, Any]]]:
        return [(ident, body) for ident, t, body in self.frames if t == type_]


@dataclasses.dataclass
class Rig:
    arbiter: Arbiter
    clock: FakeClock
    spawner: FakeSpawner
    system: FakeSystem
    events: list[tuple[str, str, dict[str, Any]]]

    @property
    def services(self) -> Any:
        return self.arbiter.services

    def company(self, name: str = "acme") -> Any:
        company = self.arbiter.roster.get(name)
        assert company is not None, f"{name} is not known"
        return company

    def advance(self, seconds: float) -> None:
        """Time passes and the loop takes its turn (timers, liveness): sockets aside."""
        self.clock.advance(seconds)
        now = self.clock.monotonic()
        timers = self.arbiter.services.timers
        while True:  # as many turns as the batches of due timers take
            self.arbiter.fire_timers(now)
            deadline = timers.next_deadline()
            if deadline is None or deadline > now:
                break
        self.arbiter.check_workers(now)

    def exit(self, name: str, code: int) -> None:
        """The company's worker ends with `code` (negative: a signal); the loop reaps it."""
        company = self.company(name)
        assert company.worker is not None, f"{name} has no worker"
        self.system.exits.append((company.worker.pid, code))
        self.arbiter.child_exited = True
        self.arbiter.reap_children()

    def hear(self, name: str, type_: str, body: dict[str, Any]) -> None:
        """A frame from the company's current worker, as read from the workers socket."""
        company = self.company(name)
        assert company.worker is not None
        self.arbiter.on_worker_frame(company.worker.routing_id, protocol.Message(type_, body))

    def ready(self, name: str = "acme") -> None:
        w = self.company(name).worker
        self.hear(name, protocol.READY, {"company": name, "pid": w.pid, "version": protocol.VERSION,
                                         "generation": w.generation, "backend": "sim"})

    def report(self, name: str, state: str, **data: Any) -> None:
        self.hear(name, protocol.EVENT, {"type": "state", "data": {"state": state, **data}, "ts": self.clock.wall})

    def states(self, name: str = "acme") -> list[str]:
        return [data["state"] for company, type_, data in self.events if company == name and type_ == "state"]

    def types(self, name: str = "acme") -> list[str]:
        return [type_ for company, type_, _ in self.events if company == name]


def rig(tmp_path: Any, reload_config: Any = None, **cfg: Any) -> Rig:
    """A real Arbiter on fakes; `cfg` overrides Config (state_dir and run_dir are under tmp_path)."""
    settings = dict(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"), backend="sim",
                    sim_endpoint="ipc:///nonexistent", metrics_listen="", restart_jitter=0.0,
                    restart_base_delay=1.0, restart_factor=2.0, restart_max_delay=8.0, max_restarts=3)
    settings.update(cfg)
    clock, spawner, system = FakeClock(), FakeSpawner(), FakeSystem()
    arbiter = Arbiter(Config(**settings), reload_config, clock=clock, spawner=spawner, kill=system.kill,
                      reap=system.reap)
    arbiter.services.send = system.send
    events: list[tuple[str, str, dict[str, Any]]] = []
    publish = arbiter.services.publish

    def recording_publish(company: str, type_: str, data: dict[str, Any], ts: float | None = None) -> None:
        events.append((company, type_, data))
        publish(company, type_, data, ts)

    arbiter.services.publish = recording_publish
    (tmp_path / "state" / "sessions").mkdir(parents=True, exist_ok=True)
    return Rig(arbiter, clock, spawner, system, events)
