"""Outbound rate limits (DESIGN.md §2, §6): sliding windows per company+recipient, and per company.

`MemoryLimiter` is pure (the caller passes `now`); `RedisLimiter` runs the same rule in one
atomic Lua script so several daemons share the limits; `FallbackLimiter` uses Redis while it
answers and memory while it does not, so a Redis outage never stops a send.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("waport.ratelimit")


@dataclass(frozen=True)
class Limits:
    per_recipient: int = 30
    window: float = 60.0
    per_company: int = 0  # 0: no company-wide limit

    def windows(self, company: str, recipient: str) -> list[tuple[str, int]]:
        out = [(f"waport:rl:{company}:{recipient}", self.per_recipient)]
        if self.per_company:
            out.append((f"waport:rl:{company}", self.per_company))
        return [(k, n) for k, n in out if n > 0]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_ms: int = 0


class MemoryLimiter:
    """Sliding window log: a deque of accepted timestamps per key."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.log: dict[str, deque[float]] = {}

    def check(self, company: str, recipient: str, now: float) -> Decision:
        windows = self.limits.windows(company, recipient)
        horizon = now - self.limits.window
        wait = 0.0
        for key, limit in windows:
            stamps = self.log.get(key)
            if stamps is None:
                continue
            while stamps and stamps[0] <= horizon:
                stamps.popleft()
            if len(stamps) >= limit:
                wait = max(wait, stamps[len(stamps) - limit] + self.limits.window - now)
        if wait > 0:
            return Decision(False, max(1, int(wait * 1000 + 0.999)))
        for key, _ in windows:
            self.log.setdefault(key, deque()).append(now)
        return Decision(True)

    def prune(self, now: float) -> None:
        """Forget idle keys so memory stays bounded by the active recipients."""
        horizon = now - self.limits.window
        for key in [k for k, v in self.log.items() if not v or v[-1] <= horizon]:
            del self.log[key]


# KEYS: the windows; ARGV: now_ms, window_ms, member, limit per key...
# All windows must allow before any is charged: the check and the add are one atomic step.
LUA = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local wait = 0
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local limit = tonumber(ARGV[3 + i])
  local n = redis.call('ZCARD', key)
  if n >= limit then
    local edge = redis.call('ZRANGE', key, n - limit, n - limit, 'WITHSCORES')
    local w = tonumber(edge[2]) + window - now
    if w > wait then wait = w end
  end
end
if wait > 0 then return wait end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[3])
  redis.call('PEXPIRE', key, window)
end
return 0
"""


class RedisLimiter:
    def __init__(self, client: Any, limits: Limits) -> None:
        self.limits = limits
        self.script = client.register_script(LUA)
        self.seq = 0

    def check(self, company: str, recipient: str, now: float) -> Decision:
        windows = self.limits.windows(company, recipient)
        if not windows:
            return Decision(True)
        self.seq += 1
        now_ms = int(now * 1000)
        member = f"{now_ms}-{self.seq}-{id(self)}"
        wait = self.script(keys=[k for k, _ in windows],
                           args=[now_ms, int(self.limits.window * 1000), member, *[n for _, n in windows]])
        wait = int(wait)
        return Decision(True) if wait <= 0 else Decision(False, wait)


class FallbackLimiter:
    """Redis when it answers, memory when it does not; retry Redis after `retry_after` seconds."""

    def __init__(self, limits: Limits, client: Any | None = None, retry_after: float = 5.0) -> None:
        self.memory = MemoryLimiter(limits)
        self.redis = RedisLimiter(client, limits) if client is not None else None
        self.retry_after = retry_after
        self.down_until = 0.0
        self.fallbacks = 0

    @property
    def using_redis(self) -> bool:
        return self.redis is not None and time.monotonic() >= self.down_until

    def check(self, company: str, recipient: str, now: float | None = None) -> Decision:
        now = time.time() if now is None else now
        if self.using_redis:
            try:
                return self.redis.check(company, recipient, now)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - any Redis failure means: fall back
                self.fallbacks += 1
                self.down_until = time.monotonic() + self.retry_after
                log.warning("rate limits fall back to memory for %.0f s: redis: %s", self.retry_after, exc)
        return self.memory.check(company, recipient, now)
