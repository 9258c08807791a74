"""Which companies should run: config companies plus `waportctl start`, minus `waportctl stop`.

Persisted in STATE_DIR/desired.json so that a restarted waportd brings back what was running.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ipc import jsonsafe
from ipc.files import write_atomic


@dataclass
class Desired:
    started: set[str] = field(default_factory=set)  # started by waportctl, beside the config
    stopped: set[str] = field(default_factory=set)  # stopped by waportctl, even if configured
    proxies: dict[str, str] = field(default_factory=dict)  # a company's own proxy ("": direct), over the config's

    def wanted(self, configured: tuple[str, ...] | list[str]) -> list[str]:
        """The companies that should run, config order first."""
        ordered = list(dict.fromkeys([*configured, *sorted(self.started)]))
        return [c for c in ordered if c not in self.stopped]

    def is_wanted(self, company: str, configured: frozenset[str] | set[str]) -> bool:
        """`company in wanted(...)` without building the list: asked on every send."""
        return company not in self.stopped and (company in configured or company in self.started)

    def start(self, company: str) -> None:
        self.started.add(company)
        self.stopped.discard(company)

    def stop(self, company: str) -> None:
        self.started.discard(company)
        self.stopped.add(company)

    def forget(self, company: str, configured: tuple[str, ...] | list[str]) -> None:
        """After delete: not started again, unless the config still names it (then kept stopped)."""
        self.started.discard(company)
        self.proxies.pop(company, None)
        if company in configured:
            self.stopped.add(company)
        else:
            self.stopped.discard(company)

    def to_json(self) -> str:
        out: dict[str, object] = {"started": sorted(self.started), "stopped": sorted(self.stopped)}
        if self.proxies:
            out["proxies"] = dict(sorted(self.proxies.items()))
        return json.dumps(out)

    @classmethod
    def from_json(cls, text: str) -> Desired:
        data = jsonsafe.loads(text)
        proxies = data.get("proxies") or {}
        if not isinstance(proxies, dict) or not all(isinstance(v, str) for v in proxies.values()):
            raise ValueError("proxies: expected an object of URLs")
        return cls(set(data.get("started", [])), set(data.get("stopped", [])), dict(proxies))


def load(path: str) -> Desired:
    try:
        with open(path) as fh:
            return Desired.from_json(fh.read())
    except FileNotFoundError:
        return Desired()
    except (OSError, ValueError, AttributeError) as exc:
        # A damaged file must not stop the daemon; keep it for inspection.
        os.replace(path, path + ".corrupt")
        raise CorruptState(f"{path} was unreadable ({exc}); moved to {path}.corrupt") from None


def save(path: str, desired: Desired) -> None:
    write_atomic(path, desired.to_json())


class CorruptState(Exception):
    pass
