import json

import pytest

from ipc import control
from ipc.errors import BAD_REQUEST, WaportError


def test_parse_request():
    req = control.parse_request(b'{"id": "7", "cmd": "status", "args": {"company": "acme"}}')
    assert (req.id, req.cmd, req.args) == ("7", "status", {"company": "acme"})


def test_args_default_to_empty():
    assert control.parse_request(b'{"id": "1", "cmd": "ping"}').args == {}


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xff\xfe", b"nope", b"[]", b'"ping"', b'{"id": 1, "cmd": "ping"}', b'{"id": "1"}',
     b'{"id": "1", "cmd": ""}', b'{"id": "1", "cmd": "ping", "args": [1]}'],
)
def test_malformed_requests_are_bad_request(raw):
    with pytest.raises(WaportError) as exc:
        control.parse_request(raw)
    assert exc.value.code == BAD_REQUEST


def test_error_reply_keeps_the_request_id_when_it_can():
    assert control.request_id_of(b'{"id": "abc", "cmd": 5}') == "abc"
    assert control.request_id_of(b"garbage") == ""
    reply = json.loads(control.error_reply("abc", WaportError("rate_limited", "slow down", retry_after_ms=250)))
    assert reply == {"id": "abc", "ok": False,
                     "error": {"code": "rate_limited", "message": "slow down", "retry_after_ms": 250}}


def test_missing_socket_is_unreachable(tmp_path):
    with pytest.raises(control.DaemonUnreachable):
        control.ControlClient(str(tmp_path)).call("ping")
