"""The demo's simulated network: `backend = "sim"` with no `sim_endpoint` runs one of our own,
as a child that dies with us and is restarted if it exits."""

from __future__ import annotations

import logging
import os
import subprocess

from ipc import paths
from ipc.files import make_dir
from waportd import process

log = logging.getLogger("waport.arbiter")


class SimnetChild:
    def __init__(self, run_dir: str, state_dir: str) -> None:
        self.endpoint = paths.endpoint(run_dir, paths.SIMNET_SOCK)
        self.state_dir = os.path.join(state_dir, "simnet")
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        make_dir(self.state_dir, 0o700)
        cmd = ["-m", "workers.simnet", "--endpoint", self.endpoint, "--state-dir", self.state_dir, "--auto-pair"]
        self.proc = process.spawn_tied(cmd)
        log.info("started the simulated network (pid %d) on %s", self.proc.pid, self.endpoint)

    def reaped(self, pid: int, code: int, restart: bool) -> bool:
        """True if `pid` was ours (then restarted unless `restart` is False)."""
        if self.proc is None or pid != self.proc.pid:
            return False
        self.proc.returncode = code
        log.error("the simulated network exited (%s); restarting it", code)
        if restart:
            self.start()
        return True

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
