"""waportd/media.py through the real controller (tests/fakes.py): media_put in chunks, media_get, scopes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

from fakes import rig

from ipc.mediastore import WIRE_CHUNK
from waportd.media import UPLOAD_IDLE


def call(r: Any, cmd: str, **args: Any) -> dict[str, Any]:
    replies: list[bytes] = []
    r.arbiter.controller.handle(json.dumps({"id": "1", "cmd": cmd, "args": args}).encode(), replies.append)
    (reply,) = replies
    return json.loads(reply)


def put(r: Any, data: bytes, **last: Any) -> dict[str, Any]:
    upload = None
    chunks = [data[i:i + WIRE_CHUNK] for i in range(0, len(data), WIRE_CHUNK)] or [b""]
    for n, chunk in enumerate(chunks):
        args: dict[str, Any] = {"data": base64.b64encode(chunk).decode()}
        if upload:
            args["upload"] = upload
        if n == len(chunks) - 1:
            args.update(last=True, **last)
        reply = call(r, "media_put", **args)
        if not reply["ok"] or n == len(chunks) - 1:
            return reply
        upload = reply["result"]["upload"]
    raise AssertionError("unreachable")


def get(r: Any, media_id: str, **scope: Any) -> bytes:
    out, offset = b"", 0
    while True:
        reply = call(r, "media_get", media_id=media_id, offset=offset, **scope)
        assert reply["ok"], reply
        out += base64.b64decode(reply["result"]["data"])
        offset = len(out)
        if reply["result"]["eof"]:
            return out


def test_a_file_in_chunks_comes_back_whole(tmp_path) -> None:
    r = rig(tmp_path)
    data = os.urandom(2 * WIRE_CHUNK + 17)
    reply = put(r, data, mimetype="image/png", company="acme", filename="menu.png")
    assert reply["ok"], reply
    result = reply["result"]
    assert result == {"media_id": hashlib.sha256(data).hexdigest(), "size": len(data), "mimetype": "image/png",
                      "sha256": hashlib.sha256(data).hexdigest()}
    assert get(r, result["media_id"]) == data  # an admin
    assert get(r, result["media_id"], company="acme") == data  # its owner
    other = call(r, "media_get", media_id=result["media_id"], company="beta")
    assert other["error"]["code"] == "not_found"


def test_too_large_bad_chunks_and_unknown_uploads_are_refused(tmp_path) -> None:
    r = rig(tmp_path, media_max_bytes=WIRE_CHUNK)
    assert put(r, b"x" * (WIRE_CHUNK + 1), mimetype="image/png")["error"]["code"] == "media_too_large"
    assert call(r, "media_put", data="@@@", last=True)["error"]["code"] == "bad_request"
    assert call(r, "media_put", data="", upload="up_nope")["error"]["code"] == "bad_request"
    assert put(r, b"abc", mimetype="not a type")["error"]["code"] == "bad_request"
    assert call(r, "media_get", media_id="../../etc/passwd")["error"]["code"] == "bad_request"
    assert os.listdir(os.path.join(r.services.cfg.state_dir, "media", "tmp")) == []  # nothing left behind


def test_an_idle_upload_is_dropped(tmp_path) -> None:
    r = rig(tmp_path)
    first = call(r, "media_put", data=base64.b64encode(b"part").decode())["result"]["upload"]
    r.clock.advance(UPLOAD_IDLE + 1)
    late = call(r, "media_put", data=base64.b64encode(b"rest").decode(), upload=first, last=True,
                mimetype="image/png")
    assert late["error"]["code"] == "bad_request" and "idle" in late["error"]["message"]


def test_waportctl_puts_and_gets_a_file_through_a_real_daemon(daemon_factory, short_tmp) -> None:
    import subprocess
    import sys

    d = daemon_factory(sim_endpoint=f"ipc://{short_tmp}/none.sock").start()
    src = os.path.join(short_tmp, "price list.pdf")
    data = os.urandom(3 * WIRE_CHUNK + 5)
    with open(src, "wb") as fh:
        fh.write(data)
    ctl = [os.path.join(os.path.dirname(sys.executable), "waportctl"), "--run-dir", d.run_dir]
    put_ = subprocess.run([*ctl, "media", "put", src, "--company", "acme"], capture_output=True, text=True)
    assert put_.returncode == 0, put_.stderr
    media_id = put_.stdout.split()[0]
    assert media_id == hashlib.sha256(data).hexdigest() and "application/pdf" in put_.stdout
    out = os.path.join(short_tmp, "out.bin")
    got = subprocess.run([*ctl, "media", "get", media_id, "-o", out], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    with open(out, "rb") as fh:
        assert fh.read() == data
    stored = os.path.join(d.state_dir, "media", media_id[:2], media_id)
    assert oct(os.stat(stored).st_mode & 0o777) == "0o600"
    missing = subprocess.run([*ctl, "media", "get", "0" * 64, "-o", out], capture_output=True, text=True)
    assert missing.returncode == 1 and "no media" in missing.stderr


def test_media_past_retention_goes_on_the_hourly_look(tmp_path) -> None:
    r = rig(tmp_path, media_retention=60)
    media_id = put(r, b"old menu", mimetype="image/png")["result"]["media_id"]
    import time

    r.arbiter.media.prune(time.time() + 30)  # media times are the host's clock
    assert get(r, media_id) == b"old menu"
    r.arbiter.media.next_prune = 0.0
    r.arbiter.media.prune(time.time() + 10_000)
    assert call(r, "media_get", media_id=media_id)["error"]["code"] == "not_found"


def test_media_a_queued_send_needs_outlives_media_retention(tmp_path) -> None:
    import time

    r = rig(tmp_path, media_retention=60)
    needed = put(r, b"tonight's menu", mimetype="image/png")["result"]["media_id"]
    spare = put(r, b"last year's menu", mimetype="image/png")["result"]["media_id"]
    r.arbiter.media.prune(time.time() + 10_000, lambda: {needed})
    assert get(r, needed) == b"tonight's menu"
    assert call(r, "media_get", media_id=spare)["error"]["code"] == "not_found"
