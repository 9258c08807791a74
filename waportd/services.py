"""What the owners inside the supervisor share, handed to them instead of the arbiter.

A `Company` gets a `Services`, never the `Arbiter`: it can spawn, signal, schedule, talk to its
worker and announce its state, and nothing else. Each piece is replaceable, so the rules of a
company's life run in tests without a process, a socket or a real clock (tests/fakes.py).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from waportd.backoff import RestartPolicy
from waportd.config import Config
from waportd.timers import Timers

Counters = Counter[tuple[Any, ...]]  # (kind, *labels) -> n; metrics.COUNTERS names the kinds it exports


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


class Child(Protocol):
    pid: int

    def reaped(self, code: int) -> None: ...


class Spawner(Protocol):
    def spawn_worker(self, args: list[str], lock_fd: int, secrets: dict[str, Any] | None = None) -> Child: ...

    def owns(self, pid: int) -> bool: ...

    def close(self) -> None: ...


Publish = Callable[[str, str, dict[str, Any], float | None], None]
SendFrame = Callable[[bytes, str, dict[str, Any]], bool]
Kill = Callable[[int, int], bool]


def policy_of(cfg: Config) -> RestartPolicy:
    return RestartPolicy(
        base_delay=cfg.restart_base_delay,
        factor=cfg.restart_factor,
        max_delay=cfg.restart_max_delay,
        jitter=cfg.restart_jitter,
        reset_after=cfg.restart_reset_after,
        max_restarts=cfg.max_restarts,
    )


@dataclass
class Services:
    cfg: Config  # replaced by a reload: read it at use, never keep a copy
    spawner: Spawner
    kill: Kill  # (pid, signal) -> False if the process is gone
    send: SendFrame  # (routing id, frame type, body) to a worker -> False if it is not connected
    publish: Publish  # (company, event type, data, ts) to the events socket and the streams
    mirror: Callable[[str, dict[str, Any] | None], None]  # the Redis session mirror
    clock: Clock = field(default_factory=SystemClock)
    timers: Timers = field(default_factory=Timers)
    counters: Counters = field(default_factory=Counter)
    sim_endpoint: str | None = None
    generations: itertools.count = field(default_factory=lambda: itertools.count(1))  # worker incarnations
    shutting_down: bool = False
    policy: RestartPolicy = field(init=False)

    def __post_init__(self) -> None:
        self.policy = policy_of(self.cfg)

    def reconfigure(self, cfg: Config) -> None:
        self.cfg, self.policy = cfg, policy_of(cfg)
