import json

import pytest

from ipc import protocol


def test_round_trip():
    frames = protocol.encode(protocol.READY, {"company": "acme", "pid": 7, "generation": 3, "version": 1})
    msg = protocol.decode(frames)
    assert msg.type == protocol.READY and msg.body["pid"] == 7


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"WAP1", b"READY"],
        [b"WAP0", b"HEARTBEAT", b"{}"],
        [b"WAP1", b"NOPE", b"{}"],
        [b"WAP1", b"\xff\xfe", b"{}"],
        [b"WAP1", b"HEARTBEAT", b"not json"],
        [b"WAP1", b"HEARTBEAT", b"[1, 2]"],
        [b"WAP1", b"HEARTBEAT", b"\xff"],
        [b"WAP1", b"READY", b'{"company": "acme"}'],
        [b"WAP1", b"READY", json.dumps({"company": "a", "pid": True, "generation": 1, "version": 1}).encode()],
        [b"WAP1", b"REQUEST", b'{"id": "1", "cmd": "send", "args": [], "deadline": 1}'],
        [b"WAP1", b"EVENT", b'{"type": "qr", "ts": "now", "data": {}}'],
        [b"WAP1", b"HEARTBEAT", b"{}", b"extra"],
        [b"WAP1", b"HEARTBEAT", b"{" + b" " * protocol.MAX_FRAME_BYTES + b"}"],
    ],
)
def test_malformed_frames_raise_protocol_error(frames):
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(frames)


def test_routing_id_is_unique_per_generation():
    assert protocol.routing_id("acme", 1) != protocol.routing_id("acme", 2)


@pytest.mark.parametrize("now", [1000.0, 1000.03, 1000.0999, 1234.5678])
def test_periodic_frames_land_on_the_shared_grid(now):
    delay = protocol.aligned_delay(5.0, now_wall=now)
    assert 5.0 <= delay < 5.0 + protocol.HEARTBEAT_GRID
    due = now + delay
    assert abs(due / protocol.HEARTBEAT_GRID - round(due / protocol.HEARTBEAT_GRID)) < 1e-6


def test_workers_started_apart_beat_together():
    slots = {round(t + protocol.aligned_delay(5.0, now_wall=t), 6) for t in [100.01 + i / 1000 for i in range(80)]}
    assert slots == {105.1}
