"""JSON nested 100,000 levels deep, and other bad input, at every parser of raw input (DESIGN.md §9)."""

from __future__ import annotations

import json

import pytest

from cli.eventstream import parse as parse_event
from ipc import control, jsonsafe, protocol
from ipc.errors import BAD_REQUEST, WaportError

DEEP = [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 200_000, b'{"id": "d", "cmd": "ping", "args": ' + b"[" * 100_000]


def test_loads_parses_json():
    assert jsonsafe.loads(b'{"a": [1, 2.5, null, "\xc3\xa9"]}') == {"a": [1, 2.5, None, "é"]}
    assert jsonsafe.loads("[[[1]]]") == [[[1]]]
    assert jsonsafe.loads(bytearray(b"1")) == 1
    assert jsonsafe.loads(memoryview(b'"x"')) == "x"


@pytest.mark.parametrize("raw", DEEP)
def test_deep_nesting_is_one_clear_error(raw):
    with pytest.raises(jsonsafe.InvalidJSON, match="JSON nested too deeply"):
        jsonsafe.loads(raw)


@pytest.mark.parametrize("raw,match", [(b"", "not valid JSON"), (b"{", "not valid JSON"),
                                       (b'"\xff"', "not UTF-8"), ("[1,]", "not valid JSON")])
def test_other_bad_input_is_the_same_exception(raw, match):
    with pytest.raises(jsonsafe.InvalidJSON, match=match):
        jsonsafe.loads(raw)


def test_invalid_json_is_a_value_error_for_existing_handlers():
    assert issubclass(jsonsafe.InvalidJSON, ValueError)


@pytest.mark.parametrize("raw", DEEP)
def test_control_requests_nested_too_deeply_are_bad_request(raw):
    with pytest.raises(WaportError) as exc:
        control.parse_request(raw)
    assert exc.value.code == BAD_REQUEST and exc.value.message == "request: JSON nested too deeply"
    assert control.request_id_of(raw) == ""


def test_request_id_of_a_request_too_large_is_not_parsed():
    raw = json.dumps({"id": "big", "x": "y" * control.MAX_REQUEST_BYTES}).encode()
    assert control.request_id_of(raw) == ""


@pytest.mark.parametrize("raw", DEEP[:3])
def test_worker_frames_nested_too_deeply_are_protocol_errors(raw):
    with pytest.raises(protocol.ProtocolError, match="nested too deeply"):
        protocol.decode([protocol.HEADER, protocol.HEARTBEAT.encode(), raw])


def test_events_nested_too_deeply_are_skipped_by_the_cli():
    assert parse_event([b"acme.state", b"[" * 100_000]) is None
    assert parse_event([b"acme.state", b'{"type": "state"}']) == ('{"type": "state"}', {"type": "state"})
