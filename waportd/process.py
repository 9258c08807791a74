"""Thin shell around worker processes: spawn, signal, reap. No policy here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from ipc import protocol

PR_SET_CHILD_SUBREAPER = 36

# Exec'd as `python -c` so a helper process (the embedded simnet) dies with us too:
# PR_SET_PDEATHSIG survives execve.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def worker_args(
    company: str,
    generation: int,
    endpoint: str,
    session_dir: str,
    backend: str,
    heartbeat_interval: float,
    options: dict[str, Any],
    log_level: str,
    nice: int = 0,
) -> list[str]:
    """The worker's arguments after `python -m workers` (the lock descriptor is added by the spawner)."""
    return [
        "--company", company,
        "--generation", str(generation),
        "--endpoint", endpoint,
        "--session-dir", session_dir,
        "--backend", backend,
        "--parent-pid", str(os.getpid()),
        "--heartbeat-interval", repr(heartbeat_interval),
        "--options", json.dumps(options, separators=(",", ":")),
        "--log-level", log_level,
        "--nice", str(nice),
    ]  # fmt: skip


@dataclass
class Child:
    """A process we reap ourselves; `popen` is kept so subprocess never waits for it behind our back."""

    pid: int
    popen: subprocess.Popen | None = None

    def reaped(self, code: int) -> None:
        if self.popen is not None:
            self.popen.returncode = code


class ExecSpawner:
    """A fresh interpreter per worker: slower and larger, but nothing is shared (`worker_spawn = "exec"`)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env or {}  # the Go runtime's tuning (GOGC, ...): read from the environment it starts with

    def spawn_worker(self, args: list[str], lock_fd: int, secrets: dict[str, Any] | None = None) -> Child:
        env = {**os.environ, **self.env}
        if secrets:
            env[protocol.SECRETS_ENV] = json.dumps(secrets)
        popen = spawn([sys.executable, "-m", "workers", *args, "--lock-fd", str(lock_fd)], pass_fds=(lock_fd,),
                      env=env)
        return Child(popen.pid, popen)

    def owns(self, pid: int) -> bool:
        return False

    def close(self) -> None:
        pass


class ZygoteSpawner:
    """Forks workers from a preloaded fork server (`python -m workers.zygote`).

    Workers are double-forked and re-parented to us: this process must be a child subreaper.
    """

    TIMEOUT = 30.0  # the first spawn waits for the fork server to preload (neonize's: about a second)

    def __init__(self, preload: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.preload = preload  # backends whose Python side the fork server loads (`neonize`: never its Go)
        self.env = env or {}  # the fork server's environment is every worker's: a Go runtime reads it at start
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        become_subreaper()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = ["-m", "workers.zygote", "--fd", str(theirs.fileno()), "--supervisor", str(os.getpid())]
        for backend in self.preload:
            cmd += ["--preload", backend]
        self.proc = spawn_tied(cmd, pass_fds=(theirs.fileno(),), env={**os.environ, **self.env})
        theirs.close()
        ours.settimeout(self.TIMEOUT)
        self.sock = ours

    def owns(self, pid: int) -> bool:
        """True for the fork server itself; it is restarted on the next spawn."""
        if self.proc is not None and pid == self.proc.pid:
            self.close()
            return True
        return False

    def spawn_worker(self, args: list[str], lock_fd: int, secrets: dict[str, Any] | None = None) -> Child:
        if self.sock is None:
            self.start()
        assert self.sock is not None
        request: dict[str, Any] = {"argv": args}
        if secrets:
            request["secrets"] = secrets
        try:
            socket.send_fds(self.sock, [json.dumps(request).encode()], [lock_fd])
            reply = json.loads(self.sock.recv(4096) or b"{}")
        except (OSError, ValueError) as exc:
            self.close()
            raise OSError(f"fork server: {exc}") from None
        if "pid" not in reply:
            raise OSError(f"fork server: {reply.get('error', 'no answer')}")
        return Child(int(reply["pid"]))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
            self.proc = None


def missing_for(backend: str, find_spec: Any = None, find_library: Any = None) -> str | None:
    """What a backend's workers need and this host lacks, said so that one line tells what to install
    (else every worker would crash on its import and back off forever). Nothing is imported here: the
    supervisor never loads neonize."""
    if backend != "neonize":
        return None
    import ctypes.util
    import importlib.util

    find_spec = find_spec or importlib.util.find_spec
    find_library = find_library or ctypes.util.find_library
    missing = []
    if find_spec("neonize") is None:
        missing.append("the neonize package (pip install neonize==0.5.2: a requirement of waport, missing here)")
    if find_library("magic") is None:
        missing.append("the system's libmagic (apt-get install libmagic1)")
    if not missing:
        return None
    return f'backend "neonize" needs {" and ".join(missing)}; or set backend = "sim" for the simulated network'


def go_env(gc: int, memory_limit: int, max_procs: int) -> dict[str, str]:
    """The Go runtime's tuning for neonize workers (0: Go's own default). Go reads its environment once,
    as the library loads — from the process's first environment, not from a later setenv — so these go in
    the environment a worker (or the fork server it comes from) is started with."""
    env = {}
    if gc:
        env["GOGC"] = str(gc)
    if memory_limit:
        env["GOMEMLIMIT"] = f"{memory_limit}B"
    if max_procs:
        env["GOMAXPROCS"] = str(max_procs)
    return env


def raise_fd_limit() -> int:
    """Each worker costs the supervisor a lock descriptor and a socket: lift the soft limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def become_subreaper() -> None:
    """Orphaned descendants (double-forked workers) are re-parented to us, so we reap them."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def spawn(cmd: list[str], pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a child in its own process group (terminal signals are ours to relay).

    Its stdout goes to our stderr: the Go side of neonize prints there, and stdout is
    never used for IPC.
    """
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr.fileno(),
        close_fds=True,
        pass_fds=pass_fds,
        process_group=0,
        env=env,
    )


def spawn_tied(cmd: list[str], pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    """Spawn a Python helper (`cmd` are the interpreter's arguments) that the kernel ends when we die."""
    return spawn([sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), sys.executable, *cmd], pass_fds, env)


def kill(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def reap() -> list[tuple[int, int]]:
    """Collect every exited child: [(pid, returncode)], negative for a signal."""
    done = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        done.append((pid, os.waitstatus_to_exitcode(status)))
    return done

