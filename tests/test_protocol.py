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
        [b"WAP1", b"EVENTS", b'{"events": {}}'],
        [b"WAP1", b"HEARTBEAT", b"{" + b" " * protocol.MAX_FRAME_BYTES + b"}"],
    ],
)
def test_malformed_frames_raise_protocol_error(frames):
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(frames)


def event(n: int, text: str = "") -> dict:
    return {"type": "sent", "ts": 1.5, "data": {"message_id": f"m{n}", "text": text}}


def test_a_turns_events_travel_in_one_frame_and_read_back_in_order():
    bodies = [event(n) for n in range(32)]
    batches = protocol.encode_events(bodies)
    assert len(batches) == 1 and batches[0][1] == b"EVENTS"
    assert protocol.unbatch(protocol.decode(batches[0])) == [protocol.Message(protocol.EVENT, b) for b in bodies]


def test_a_malformed_item_is_dropped_and_counted_and_the_rest_kept():
    good = event(1)
    body = {"events": [good, 7, {"type": "sent", "ts": 1}, {"type": "sent", "ts": "x", "data": {}}, event(2)]}
    msg = protocol.decode([b"WAP1", b"EVENTS", json.dumps(body).encode()])
    assert msg.dropped == 3
    assert [m.body for m in protocol.unbatch(msg)] == [good, event(2)]


def test_a_lone_event_is_a_plain_event_frame():
    assert protocol.encode_events([]) == []
    (frames,) = protocol.encode_events([event(1)])
    assert protocol.unbatch(protocol.decode(frames)) == [protocol.Message(protocol.EVENT, event(1))]


def test_a_batch_too_large_for_one_frame_is_split_in_order():
    bodies = [event(n, "x" * 1000) for n in range(50)]
    batches = protocol.encode_events(bodies, limit=8000)
    assert len(batches) > 1 and all(len(frames[2]) <= 8000 for frames in batches)
    read = [m.body for frames in batches for m in protocol.unbatch(protocol.decode(frames))]
    assert read == bodies


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
