"""The fork server: a preloaded Python that forks workers on request, never with a Go runtime in it.

A cold interpreter per worker costs ~20 MB and ~0.15 s of CPU; a fork of this process shares
the interpreter and the imported modules copy-on-write. With `--preload neonize` it also holds
neonize's Python side (its protobuf modules, Pillow, python-magic, ...), but never neonize's Go
library (workers/neonize_preload.py): each worker loads that after the fork. The supervisor (a child subreaper)
asks over a SOCK_SEQPACKET socket: one JSON datagram `{"argv": [...]}` with the session lock
descriptor attached (SCM_RIGHTS), and `"secrets"` (options kept out of the worker's arguments,
handed to it in its environment); the answer is `{"pid": N}` or `{"error": "..."}`.

Each worker is double-forked so it is re-parented to the supervisor, which reaps it and is
the parent its PR_SET_PDEATHSIG refers to. This process starts no thread and creates no
ZeroMQ context before it forks: only the children do.
"""

from __future__ import annotations

import argparse
import array
import json
import logging
import os
import signal
import socket

# Preload what every worker imports; never neonize's Go library (a Go runtime does not survive fork).
import sqlite3  # noqa: F401
import sys
import time

import setproctitle
import zmq  # noqa: F401

import workers.mediafetch  # noqa: F401
import workers.outbox  # noqa: F401
import workers.sim_backend  # noqa: F401
import workers.worker
from ipc.logfmt import log_to_stderr
from ipc.protocol import SECRETS_ENV

MAX_REQUEST = 1 << 16
log = logging.getLogger("waport.zygote")


def recv_request(sock: socket.socket) -> tuple[dict, list[int]] | None:
    fds = array.array("i")
    msg, ancdata, _flags, _addr = sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4 * fds.itemsize))
    if not msg:
        return None
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return json.loads(msg), list(fds)


def start_worker(argv: list[str], lock_fd: int | None, server: socket.socket, supervisor: int,
                 secrets: dict | None = None) -> int:
    """Double-fork a worker; return its pid (a grandchild that the supervisor inherits)."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # the middle child: fork the worker, report its pid, vanish
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                if secrets:
                    os.environ[SECRETS_ENV] = json.dumps(secrets)
                run_worker(argv, lock_fd, server, supervisor)  # never returns
            os.write(w, str(pid).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(middle, 0)
    data = os.read(r, 32)
    os.close(r)
    if lock_fd is not None:
        os.close(lock_fd)  # the worker has it now; the fork server never holds a session
    if not data:
        raise OSError("the worker fork failed")
    return int(data)


def run_worker(argv: list[str], lock_fd: int | None, server: socket.socket, supervisor: int) -> None:
    try:
        server.close()
        # Wait to be re-parented to the supervisor (the middle child exits at once): the worker's
        # PR_SET_PDEATHSIG must refer to the supervisor, not to the vanishing middle child.
        deadline = time.monotonic() + 5
        while os.getppid() != supervisor and time.monotonic() < deadline:
            time.sleep(0.0005)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.setpgid(0, 0)  # its own process group, as an exec'd worker has
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        if lock_fd is not None:
            argv = [*argv, "--lock-fd", str(lock_fd)]
        if "neonize" in sys.modules:  # preloaded: Go starts now, while the environment strings are intact
            from workers import neonize_preload

            neonize_preload.start_go()
        # Look like an exec'd worker in ps, psutil and the stray scan: `python -m workers --company ...`.
        setproctitle.setproctitle(" ".join([sys.executable, "-m", "workers", *argv]))
        workers.worker.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except BaseException:  # noqa: BLE001 - report, and never return into the fork server's loop
        log.exception("the worker crashed")  # in the one log format, tagged with its company once set up
        logging.shutdown()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def serve(fd: int, supervisor: int) -> None:
    server = socket.socket(fileno=fd)
    while True:
        try:
            got = recv_request(server)
        except (OSError, ValueError) as exc:
            log.warning("bad request: %s", exc)
            continue
        if got is None:
            return  # the supervisor closed its end
        request, fds = got
        lock_fd = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        try:
            argv = request["argv"]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise ValueError("argv must be a list of strings")
            secrets = request.get("secrets")
            if secrets is not None and not isinstance(secrets, dict):
                raise ValueError("secrets must be an object")
            reply = {"pid": start_worker(argv, lock_fd, server, supervisor, secrets)}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reply = {"error": str(exc)}
            if lock_fd is not None:
                try:
                    os.close(lock_fd)
                except OSError:
                    pass
        server.send(json.dumps(reply).encode())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="waport-zygote")
    p.add_argument("--fd", type=int, required=True, help="the SOCK_SEQPACKET socket to the supervisor")
    p.add_argument("--supervisor", type=int, required=True)
    p.add_argument("--preload", action="append", choices=["neonize", "cluster"], default=[],
                   help="also load this backend's Python side (never a Go library), or cluster mode's "
                        "PostgreSQL driver (a worker would import it after each fork: about 0.1 s of CPU)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    log_to_stderr(args.log_level, "zygote")  # each worker sets up its own after the fork
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if "neonize" in args.preload:
        from workers import neonize_preload

        neonize_preload.preload()
    if "cluster" in args.preload:  # modules only: no connection, no thread crosses the fork
        import psycopg  # noqa: F401

        import ipc.pgjournal  # noqa: F401
        import ipc.pgmediastore  # noqa: F401
        import workers.simcreds  # noqa: F401
    serve(args.fd, args.supervisor)


if __name__ == "__main__":
    main()
