"""The companies this host knows — one map of `Company` — and which of them should run.

"Should run" is the config's `companies` plus `waportctl start`, minus `waportctl stop`, kept in
STATE_DIR/desired.json (`desired.py`) so a restarted waportd brings back what was running.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from ipc.errors import UNKNOWN_COMPANY, WaportError
from ipc.validation import validate_company
from waportd import desired as desired_store
from waportd.company import Company
from waportd.services import Services

log = logging.getLogger("waport.arbiter")


class Roster:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.companies: dict[str, Company] = {}
        self.configured = frozenset(services.cfg.companies)
        self.desired_path = os.path.join(services.cfg.state_dir, "desired.json")
        self.desired = desired_store.Desired()
        self._pids: dict[int, Company] = {}  # a cache of who runs which pid, rebuilt when it misses
        # Cluster mode (DESIGN.md §12): the cluster's desired state, not this host's file, says what is wanted.
        self.cluster_wants: Callable[[str], bool] | None = None

    # ------------------------------------------------------------ the map

    def get(self, name: str) -> Company | None:
        return self.companies.get(name)

    def known(self, args: dict[str, Any]) -> Company:
        """The company a command names, or `invalid_company_id` / `unknown_company`."""
        name = validate_company(args.get("company"))
        company = self.companies.get(name)
        if company is None:
            raise WaportError(UNKNOWN_COMPANY, f"no session for company {name!r} on this host; start it first")
        return company

    def add(self, name: str) -> Company:
        company = self.companies.get(name)
        if company is None:
            company = self.companies[name] = Company(name, self.services, proxy=self.desired.proxies.get(name))
        return company

    def __iter__(self) -> Iterator[Company]:
        return iter(list(self.companies.values()))

    def __len__(self) -> int:
        return len(self.companies)

    def running(self) -> list[Company]:
        """Companies with a live worker process."""
        return [c for c in self.companies.values() if c.worker is not None]

    def by_pid(self, pid: int) -> Company | None:
        company = self._pids.get(pid)
        if company is None or company.worker is None or company.worker.pid != pid:
            self._pids = {c.worker.pid: c for c in self.companies.values() if c.worker is not None}
            company = self._pids.get(pid)
        return company

    def by_routing_id(self, ident: bytes) -> Company | None:
        """The company whose *current* worker has this identity (an old incarnation's frames are not its)."""
        name, _, _ = ident.decode(errors="replace").partition("/")
        company = self.companies.get(name)
        if company is None or company.worker is None or company.worker.routing_id != ident:
            return None
        return company

    def forget(self, name: str) -> None:
        """After delete: gone from the map and from what should run (a configured one stays stopped)."""
        self.companies.pop(name, None)
        self.services.mirror(name, None)
        self.desired.forget(name, self.services.cfg.companies)
        self.save()

    # ------------------------------------------------------------ what should run

    def load(self) -> None:
        try:
            self.desired = desired_store.load(self.desired_path)
        except desired_store.CorruptState as exc:
            log.error("%s", exc)

    def wanted(self) -> list[str]:
        """The companies that should run, config order first."""
        return self.desired.wanted(self.services.cfg.companies)

    def is_wanted(self, name: str) -> bool:
        if self.cluster_wants is not None:
            return self.cluster_wants(name)
        return self.desired.is_wanted(name, self.configured)

    def want(self, name: str) -> Company:
        self.desired.start(name)
        self.save()
        return self.add(name)

    def set_proxy(self, name: str, proxy: str | None) -> bool:
        """A company's own proxy (None: back to the config's; "" : direct); whether it changed."""
        company = self.add(name)
        if company.proxy == proxy:
            return False
        if proxy is None:
            self.desired.proxies.pop(name, None)
        else:
            self.desired.proxies[name] = proxy
        company.proxy = proxy
        self.save()
        return True

    def unwant(self, name: str) -> None:
        self.desired.stop(name)
        self.save()

    def save(self) -> None:
        try:
            desired_store.save(self.desired_path, self.desired)
        except OSError as exc:
            log.error("cannot save %s: %s", self.desired_path, exc)

    def reconfigured(self, before: list[str]) -> tuple[list[str], list[str]]:
        """After a reload: (companies to start, companies to stop), by what the new config wants."""
        self.configured = frozenset(self.services.cfg.companies)
        after = self.wanted()
        was = set(before)
        return [c for c in after if c not in was], sorted(was - set(after))
