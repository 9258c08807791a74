"""workers/neonize_preload.py: neonize's Python side in a fork server, its Go library only in the children."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

CHILD = """
import os, sys
from workers import neonize_preload as p
loaded = p.preload()
assert not p.go_library_loaded(), "the Go library was mapped by the preload"
assert "neonize.proto.waE2E.WAWebProtobufsE2E_pb2" in loaded and "neonize.events" in loaded
assert "neonize.client" not in sys.modules and "neonize._binder" not in sys.modules
print("preloaded", len(loaded), flush=True)
pid = os.fork()
if pid == 0:
    p.start_go()
    import setproctitle
    setproctitle.setproctitle("python -m workers --company x")  # after Go read its environment
    import neonize
    from neonize.client import NewClient
    assert p.go_library_loaded() and neonize.__version__ and NewClient
    print("child has Go", flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert status == 0 and not p.go_library_loaded(), "the parent must never map the Go library"
print("parent still without Go", flush=True)
"""


def test_the_fork_server_never_maps_go_and_each_child_starts_it_with_the_environment_it_was_given() -> None:
    env = {**os.environ, "GODEBUG": "inittrace=1"}  # Go prints its package inits if it reads this
    run = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == [run.stdout.splitlines()[0], "child has Go", "parent still without Go"]
    assert run.stdout.startswith("preloaded ")
    assert "init runtime" in run.stderr or "init internal/" in run.stderr  # GODEBUG reached the child's Go
