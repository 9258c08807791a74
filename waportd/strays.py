"""Stray processes at start-up: workers of an earlier waportd, and other holders of session locks.

A worker dies with its supervisor (PR_SET_PDEATHSIG, parent checks), but one that was stopped
(SIGSTOP), stuck in the kernel, or started by hand can outlive it — and while it holds the
session lock, no new worker may run the session. At start-up the daemon looks for:

- processes with a worker's command line (`-m workers`) for this state directory or workers
  socket that are not its children. One whose `--parent-pid` names another process is a worker
  of an earlier daemon (only one waportd runs per state directory: waportd.lock), so it is ours
  and is ended: SIGCONT (a stopped worker cannot act), SIGTERM, SIGKILL after stop_timeout. One
  run by hand (`--parent-pid 0`) is reported and left to whoever started it;
- live processes holding a session lock of this state directory: reported; ended only when they
  are such workers (anything else is not ours to kill — the session waits for its lock).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil

from waportd.locks import read_holder

log = logging.getLogger("waport.strays")


@dataclass
class Stray:
    pid: int
    company: str
    why: str  # what gave it away, in words
    ours: bool  # a worker of this state directory from an earlier daemon: we end it
    cmdline: list[str] = field(default_factory=list)

    def describe(self) -> str:
        cmd = " ".join(self.cmdline)[:200] or "?"
        return f"pid {self.pid} ({self.why}): {cmd}"

    def public(self) -> dict[str, object]:
        return {"pid": self.pid, "company": self.company, "why": self.why, "ours": self.ours,
                "cmdline": " ".join(self.cmdline)[:500]}


def arg_after(cmdline: list[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE` in a command line."""
    for i, item in enumerate(cmdline):
        if item == flag and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if item.startswith(flag + "="):
            return item[len(flag) + 1 :]
    return None


def split_title(cmdline: list[str]) -> list[str]:
    """A command line set with setproctitle (forked workers) may come back as one string."""
    return cmdline[0].split() if len(cmdline) == 1 else cmdline


def from_earlier_daemon(cmdline: list[str], own_pid: int) -> bool:
    """A worker started by another supervisor (not by hand: --parent-pid 0)."""
    parent = arg_after(cmdline, "--parent-pid") or "0"
    return parent.isdigit() and int(parent) not in (0, own_pid)


def is_worker_command(cmdline: list[str]) -> bool:
    return any(a == "-m" and b == "workers" for a, b in zip(cmdline, cmdline[1:], strict=False))


def worker_of(cmdline: list[str], sessions_dir: str, endpoint: str) -> str | None:
    """The company when `cmdline` is a worker of this state directory or workers socket."""
    if not is_worker_command(cmdline):
        return None
    session_dir = arg_after(cmdline, "--session-dir") or ""
    if arg_after(cmdline, "--endpoint") == endpoint or os.path.abspath(session_dir).startswith(sessions_dir + os.sep):
        return arg_after(cmdline, "--company") or os.path.basename(session_dir.rstrip(os.sep)) or "?"
    return None


def lock_busy(path: str) -> bool:
    """Whether someone holds the flock on `path` (we take and drop it when it is free)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock if we got it
    return False


def holds_open(pid: int, path: str) -> bool:
    """Whether process `pid` has `path` open (how a lock holder is recognised)."""
    real = os.path.realpath(path)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == real:
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def flock_owner(path: str) -> int | None:
    """The pid /proc/locks gives for an flock on `path` (the process that took it)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want and parts[4].isdigit():
            return int(parts[4])
    return None


def cmdline_of(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def find(state_dir: str, endpoint: str, own_pid: int, children: Iterable[int], held: Iterable[str]) -> list[Stray]:
    """Strays of this state directory; `children` are ours, `held` the companies whose lock we hold."""
    sessions_dir = os.path.abspath(os.path.join(state_dir, "sessions"))
    skip = {own_pid, *children}
    found: dict[int, Stray] = {}
    for p in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        try:
            if p.pid in skip or p.info["ppid"] == own_pid or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = split_title(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        company = worker_of(cmd, sessions_dir, endpoint)
        if company is not None:
            ours = from_earlier_daemon(cmd, own_pid)
            why = "a worker of an earlier waportd" if ours else "a worker started by hand"
            found[p.pid] = Stray(p.pid, company, why, ours, cmd)
    held = set(held)
    try:
        companies = sorted(os.listdir(sessions_dir))
    except OSError:
        companies = []
    for company in companies:
        path = os.path.join(sessions_dir, company, "session.lock")
        if company in held or not os.path.exists(path) or not lock_busy(path):
            continue
        holders = [pid for pid in (read_holder(path), flock_owner(path)) if pid and pid not in skip]
        holder = next((pid for pid in holders if holds_open(pid, path)), None)
        if holder is None:
            holder = next((pid for pid in holders if psutil.pid_exists(pid)), None)
        if holder is None:
            log.warning("%s: the session lock is held by a process we cannot name", company)
            continue
        if holder in found:
            found[holder].why += ", holding the session lock"
            continue
        cmd = split_title(cmdline_of(holder))
        ours = worker_of(cmd, sessions_dir, endpoint) is not None and from_earlier_daemon(cmd, own_pid)
        found[holder] = Stray(holder, company, "holds the session lock", ours, cmd)
    return sorted(found.values(), key=lambda s: s.pid)


class Reaper:
    """Ends strays without blocking the main loop: SIGCONT + SIGTERM now, SIGKILL when due."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.pending: dict[int, tuple[psutil.Process, float]] = {}

    def end(self, pid: int, now: float) -> bool:
        try:
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            return False
        self.pending[pid] = (proc, now + self.grace)
        return True

    def tick(self, now: float) -> None:
        for pid, (proc, due) in list(self.pending.items()):
            try:
                gone = not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                gone = True
            if gone:
                log.info("stray pid %d has exited", pid)
                del self.pending[pid]
            elif now >= due:
                log.warning("stray pid %d ignored SIGTERM for %.0f s; SIGKILL", pid, self.grace)
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
                del self.pending[pid]
