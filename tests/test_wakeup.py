"""workers/wakeup.py: one byte per drain, however many pokes."""

import os
import select

from workers.wakeup import Wakeup


def readable(w: Wakeup) -> bool:
    return bool(select.select([w.r], [], [], 0)[0])


def test_pokes_before_a_drain_write_once_and_a_drain_rearms():
    w = Wakeup()
    assert not readable(w)
    w.poke()
    w.poke()
    assert os.read(w.r, 16) == b"x"  # one byte for both
    w.drain()
    assert not readable(w)
    w.poke()
    assert readable(w)
    w.drain()
    assert not readable(w)
    w.close()
    w.pending = False
    w.poke()  # closed: a late poke from another thread is harmless
    w.drain()
