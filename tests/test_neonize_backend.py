"""The neonize backend without a network: real neonize protobuf events through the backend's real
(guarded) handlers, the watchdog, requests against a stand-in client, and real worker processes
that fail to connect (DNS here; a black-hole proxy for the watchdog)."""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ROOT, wait_for, whatsapp_resolves
from test_worker import FakeSupervisor

from ipc import exitcodes, protocol, states
from ipc import journal as J
from ipc.mediastore import MediaStore
from workers.backend import BackendError, SendItem, WorkerContext
from workers.outbox import Sender

NZ = pytest.importorskip("neonize.proto.Neonize_pb2")
E2E = pytest.importorskip("neonize.proto.waE2E.WAWebProtobufsE2E_pb2")
from neonize.exc import DownloadError, PairPhoneError, SendMessageError, UploadError  # noqa: E402
from neonize.proto.waCommon.WACommon_pb2 import MessageKey  # noqa: E402
from neonize.utils.enum import MediaType  # noqa: E402

from workers import neonize_backend as nb  # noqa: E402
from workers.neonize_backend import NeonizeBackend, describe_connect_error  # noqa: E402

OWN = "15550001111"
# What neonize's upload answers (neonize.proto.Neonize_pb2.UploadResponse): the keys a media message carries.
UPLOADED = NZ.UploadResponse(url="https://mmg.whatsapp.net/v/t62/abc", DirectPath="/v/t62/abc", Handle="h",
                             MediaKey=b"K" * 32, FileEncSHA256=b"E" * 32, FileSHA256=b"S" * 32, FileLength=11)
MEDIA_ID = "cd" * 32
DNS_ERROR = (
    'failed to dial whatsapp web websocket: failed to WebSocket dial: failed to send handshake request: Get '
    '"https://web.whatsapp.com/ws/chat": dial tcp: lookup web.whatsapp.com on 10.255.255.53:53: no such host'
)


def jid(user: str, server: str = "s.whatsapp.net", device: int = 0) -> Any:
    return NZ.JID(User=user, Server=server, Device=device)


class Reports:
    """What the backend emitted, in order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.backend: NeonizeBackend | None = None  # journals each message at once, as the worker does
        self.journal = True

    def __call__(self, type_: str, data: dict[str, Any]) -> None:
        self.items.append((type_, data))
        if type_ == "message" and self.journal and self.backend is not None:
            self.backend.journaled([data["id"]])

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [d for t, d in self.items if t == type_]

    def states(self) -> list[str]:
        return [d["state"] for d in self.of("state")]


class FakeClient:
    """Stands in for NewClient where a Go call would need WhatsApp (send, pair code, logout, stop)."""

    def __init__(self) -> None:
        self.me = NZ.Device(JID=jid(OWN))
        self.sent: list[tuple[Any, Any]] = []
        self.send_error: Exception | None = None
        self.pair_error: Exception | None = None
        self.paired_phone = ""
        self.logouts = 0
        self.stops = 0
        self.stop_delay = 0.0
        self.reads: list[tuple[Any, ...]] = []
        self.presences: list[tuple[Any, ...]] = []
        self.uploads: list[tuple[bytes, Any]] = []
        self.upload_error: Exception | None = None
        self.downloads: list[Any] = []
        self.download_result: bytes | Exception = b""
        self.hold = threading.Event()  # set: Go calls answer at once; clear: they hang until it is set
        self.hold.set()

    def send_message(self, to: Any, message: Any) -> Any:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append((to, message))
        return NZ.SendResponse(ID="3EB0AABBCCDD", Timestamp=1_700_000_000)

    def upload(self, binary: bytes, media_type: Any = None) -> Any:
        self.hold.wait()
        if self.upload_error is not None:
            raise self.upload_error
        self.uploads.append((binary, media_type))
        return UPLOADED

    def download_any(self, message: Any, path: str | None = None) -> bytes:
        self.downloads.append(message)
        self.hold.wait()
        if isinstance(self.download_result, Exception):
            raise self.download_result
        return self.download_result

    def mark_read(self, *message_ids: str, chat: Any, sender: Any, receipt: Any, timestamp: Any = None) -> None:
        self.reads.append((message_ids, chat, sender, receipt))

    def send_chat_presence(self, jid: Any, state: Any, media: Any) -> None:
        self.presences.append((jid, state, media))

    def PairPhone(self, phone: str, show_push_notification: bool) -> str:  # noqa: N802 - neonize's name
        if self.pair_error is not None:
            raise self.pair_error
        self.paired_phone = phone
        return "ABCD-EFGH"

    def logout(self) -> None:
        self.logouts += 1

    def stop(self) -> None:
        time.sleep(self.stop_delay)
        self.stops += 1

    def get_me(self) -> Any:
        return self.me


@pytest.fixture
def session_dir(short_tmp: str) -> str:
    path = os.path.join(short_tmp, "sess")
    os.makedirs(path, mode=0o700)
    return path


@pytest.fixture
def make(session_dir: str) -> Iterator[Any]:
    """A backend with a stand-in client attached as if connect() were running (no Go client here)."""
    made: list[NeonizeBackend] = []

    def make_(**options: Any) -> tuple[NeonizeBackend, Reports, FakeClient]:
        reports = Reports()
        backend = NeonizeBackend(WorkerContext("acme", session_dir, options), reports)
        reports.backend = backend
        client = FakeClient()
        backend._client, backend._nz, backend.phase = client, nb.load_neonize(), states.CONNECTING
        made.append(backend)
        return backend, reports, client

    yield make_
    for backend in made:
        backend.stop()


def connected(make: Any, **options: Any) -> tuple[NeonizeBackend, Reports, FakeClient]:
    backend, reports, client = make(**options)
    backend.deliver(client, NZ.Connected(status=True))
    assert reports.of("state")[-1] == {"state": "connected", "reason": "", "phone": OWN}
    return backend, reports, client


def message_event(message: Any, *, chat: Any = None, sender: Any = None, from_me: bool = False,
                  group: bool = False, msg_id: str = "3EB0MSG1", ts: int = 1_700_000_000_500, **source: Any) -> Any:
    sender = sender or jid("15557654321")
    info = NZ.MessageInfo(
        ID=msg_id, Pushname="Ana", Timestamp=ts,
        MessageSource=NZ.MessageSource(Chat=chat or sender, Sender=sender, IsFromMe=from_me, IsGroup=group, **source),
    )  # fmt: skip
    return NZ.Message(Info=info, Message=message)


# ---------------------------------------------------------------------------------- isolation


def test_importing_the_backend_does_not_load_neonize(session_dir: str) -> None:
    """Only connecting loads the Go runtime; the supervisor's imports never do."""
    code = (
        "import sys, workers.worker, workers.neonize_backend as nb, workers.backend as b, workers.backends\n"
        f"nb.NeonizeBackend(b.WorkerContext('acme', {session_dir!r}, {{}}), lambda t, d: None)\n"
        "workers.backends.load('neonize')\n"
        "assert 'neonize' not in sys.modules, sorted(m for m in sys.modules if 'neonize' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)


def test_a_real_client_is_wired_before_connect(session_dir: str) -> None:
    """On a real NewClient (in its own process: one client per process), without connecting."""
    code = f"""
import threading, neonize.client, neonize.events as ev
import workers.neonize_backend as nb, workers.backend as b
backend = nb.NeonizeBackend(b.WorkerContext('acme', {session_dir!r}, {{}}), lambda t, d: None)
client = backend._new_client()
wanted = {{ev.EVENT_TO_INT[getattr(ev, cls)] for cls, _ in nb.EVENTS.values()}}
assert set(client.event.list_func) == wanted, client.event.list_func
assert client.event._qr.__name__ == 'on_qr'
assert client._NewClient__onLoginStatus == backend._login_status_callback
assert client._stop_finalizer.atexit is False
assert client.uuid == b'acme' and client.name == backend.store
assert client.device_props.os == 'waport'
assert neonize.client.Thread(target=print).daemon
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)


# ---------------------------------------------------------------------------------- pairing


def test_qr_codes_put_the_session_in_pairing(make: Any) -> None:
    backend, reports, client = make(pairing_timeout=100)
    backend.on_qr(client, b"2@first,code")
    deadline = backend._pairing_deadline
    backend.on_qr(client, b"2@second,code")
    assert reports.of("qr") == [{"code": "2@first,code"}, {"code": "2@second,code"}]
    assert set(reports.states()) == {"pairing"}
    assert backend.qr == "2@second,code"
    assert deadline is not None and backend._pairing_deadline == deadline  # counted from the first code
    assert backend._connect_deadline is None  # WhatsApp answered: no black hole


def test_pairing_timeout_is_reported_by_the_watchdog(make: Any) -> None:
    backend, reports, client = make(pairing_timeout=0.2)
    backend.on_qr(client, b"2@code")
    watchdog = threading.Thread(target=backend._watch, daemon=True)
    watchdog.start()
    wait_for(lambda: reports.of("exit"), timeout=5, what="pairing_timeout")
    assert reports.of("exit") == [{"reason": "pairing_timeout", "message": "not paired within 0.2 s"}]
    watchdog.join(2)
    assert not watchdog.is_alive()


def test_no_answer_at_all_is_connect_failed(make: Any) -> None:
    backend, reports, _ = make(connect_timeout=30)
    backend._connect_deadline = time.monotonic() + 30
    assert backend._check_deadlines(time.monotonic() + 29) is False
    assert backend._check_deadlines(time.monotonic() + 31) is True
    assert reports.of("exit") == [{"reason": "connect_failed", "message": "no answer from WhatsApp within 30 s"}]


@pytest.mark.parametrize(
    ("event", "report"),
    [
        ("timeout", ("exit", {"reason": "pairing_timeout", "message": "the QR codes expired without a scan"})),
        ("err-client-outdated",
         ("exit", {"reason": "outdated", "message": "WhatsApp refused pairing: client outdated"})),
        ("err-scanned-without-multidevice",
         ("error", {"kind": "pairing", "message": "pairing: err-scanned-without-multidevice"})),
    ],
)
def test_end_of_the_qr_channel(make: Any, event: str, report: tuple[str, dict[str, Any]]) -> None:
    backend, reports, _ = make()
    buf = ctypes.create_string_buffer(event.encode())
    backend._login_status_callback(None, ctypes.addressof(buf))  # as Go calls it: a C string
    assert reports.items == [report]


def test_pair_code_only_while_pairing_after_the_first_qr(make: Any) -> None:
    backend, reports, client = make()
    with pytest.raises(BackendError) as err:
        backend.pair_code(OWN)
    assert err.value.code == "bad_request" and "while pairing" in err.value.message
    backend.on_qr(client, b"2@code")
    assert backend.pair_code("15557654321@s.whatsapp.net") == "ABCD-EFGH"
    assert client.paired_phone == "15557654321"
    assert reports.of("pair_code") == [{"code": "ABCD-EFGH"}]
    client.pair_error = PairPhoneError("phone number too short")
    with pytest.raises(BackendError) as err:
        backend.pair_code("123")
    assert err.value.code == "bad_request" and "too short" in err.value.message
    with pytest.raises(BackendError) as err:
        backend.pair_code("1203630@g.us")
    assert err.value.code == "invalid_phone"
    backend.deliver(client, NZ.Connected(status=True))
    with pytest.raises(BackendError) as err:
        backend.pair_code(OWN)
    assert "already paired" in err.value.message


def test_pair_success_then_connected(make: Any) -> None:
    backend, reports, client = make(connect_timeout=45)
    backend.on_qr(client, b"2@code")
    success = NZ.PairStatus(ID=jid(OWN), Status=NZ.PairStatus.SUCCESS, Platform="android")
    backend.deliver(client, success)
    assert reports.of("state")[-1] == {"state": "connecting", "reason": "paired; connecting", "phone": OWN}
    assert backend._pairing_deadline is None and backend._connect_deadline is not None
    backend.deliver(client, NZ.Connected(status=True))
    assert reports.states() == ["pairing", "connecting", "connected"]
    assert reports.of("state")[-1]["phone"] == OWN
    assert backend._connect_deadline is None


def test_pair_error_is_an_error_report(make: Any) -> None:
    backend, reports, client = make()
    backend.deliver(client, NZ.PairStatus(Status=NZ.PairStatus.ERROR, Error="bad signature"))
    assert reports.items == [("error", {"kind": "pairing", "message": "bad signature"})]


# ---------------------------------------------------------------------------------- connection


def test_connected_asks_go_for_the_phone_when_neonize_has_none(make: Any) -> None:
    backend, reports, client = make()
    client.me = None
    client.get_me = lambda: NZ.Device(JID=jid("15559998888", device=3))  # type: ignore[method-assign]
    backend.deliver(client, NZ.Connected(status=True))
    assert reports.of("state") == [{"state": "connected", "reason": "", "phone": "15559998888"}]


def test_drops_and_reconnects(make: Any) -> None:
    backend, reports, client = make()
    backend.deliver(client, NZ.Disconnected(status=True))  # not connected yet (pairing restart): not a drop
    assert reports.items == []
    backend.deliver(client, NZ.Connected(status=True))
    backend.deliver(client, NZ.Disconnected(status=True))
    backend.deliver(client, NZ.Connected(status=True))
    assert reports.states() == ["connected", "disconnected", "connected"]
    assert reports.of("state")[1]["reason"] == "connection lost; reconnecting"
    backend.deliver(client, NZ.KeepAliveTimeout(ErrorCount=2, LastSuccess=1))
    assert reports.of("state")[-1]["state"] == "disconnected" and "2 missed" in reports.of("state")[-1]["reason"]
    backend.deliver(client, NZ.KeepAliveRestored())
    assert reports.states()[-1] == "connected"
    assert reports.of("exit") == []


@pytest.mark.parametrize(
    ("event", "exit_"),
    [
        (NZ.LoggedOut(OnConnect=True, Reason=NZ.LOGGED_OUT),
         {"reason": "logged_out", "message": "device unlinked at connect (logged_out)"}),
        (NZ.LoggedOut(), {"reason": "logged_out", "message": "device unlinked while connected"}),
        (NZ.StreamReplaced(), {"reason": "replaced", "message": "another client connected with this session"}),
        (NZ.ClientOutdated(),
         {"reason": "outdated", "message": "WhatsApp refused this client version: update neonize"}),
        (NZ.TemporaryBan(), {"reason": "banned", "message": "temporarily banned"}),
        (NZ.ConnectFailure(Reason=NZ.MAIN_DEVICE_GONE),
         {"reason": "logged_out", "message": "WhatsApp refused the connection (main_device_gone)"}),
        (NZ.ConnectFailure(Reason=NZ.TEMP_BANNED),
         {"reason": "banned", "message": "WhatsApp refused the connection (temp_banned)"}),
        (NZ.ConnectFailure(Reason=NZ.GENERIC, Message="bad request"),
         {"reason": "connect_failed", "message": "WhatsApp refused the connection (bad request)"}),
        (NZ.ConnectFailure(),
         {"reason": "connect_failed", "message": "WhatsApp refused the connection (unknown reason)"}),
    ],
)
def test_events_that_end_the_session(make: Any, event: Any, exit_: dict[str, Any]) -> None:
    backend, reports, client = connected(make)
    backend.deliver(client, event)
    assert reports.of("exit") == [exit_]
    # The first exit wins; nothing is reported after it.
    backend.deliver(client, NZ.StreamReplaced())
    backend.deliver(client, NZ.Connected(status=True))
    assert reports.items[-1] == ("exit", exit_) and len(reports.of("exit")) == 1


def test_temporary_ban_carries_its_expiry(make: Any) -> None:
    backend, reports, client = connected(make)
    before = time.time()
    backend.deliver(client, NZ.TemporaryBan(Code=NZ.TemporaryBan.SEND_TO_TOO_MANY_PEOPLE, Expire=3600))
    (exit_,) = reports.of("exit")
    assert exit_["reason"] == "banned" and exit_["message"] == "temporarily banned (send_to_too_many_people)"
    assert before + 3600 <= exit_["until"] <= time.time() + 3600


def test_server_side_trouble_is_a_disconnect_not_an_exit(make: Any) -> None:
    backend, reports, client = connected(make)
    backend.deliver(client, NZ.ConnectFailure(Reason=NZ.SERVICE_UNAVAILABLE))
    assert reports.of("state")[-1]["state"] == "disconnected" and reports.of("exit") == []
    backend.deliver(client, NZ.StreamError(Code="999"))
    assert reports.items[-1] == ("error", {"kind": "stream_error", "message": "WhatsApp stream error 999"})


def test_a_failing_handler_reports_and_never_raises_into_go(make: Any) -> None:
    class Broken:
        @property
        def me(self) -> Any:
            raise RuntimeError("boom")

    backend, reports, _ = make()
    backend.deliver(Broken(), NZ.Connected(status=True))
    assert reports.items == [("error", {"kind": "handler", "message": "on_connected: RuntimeError('boom')"})]


def test_nothing_is_reported_after_stop(make: Any) -> None:
    backend, reports, client = make()
    backend.stop()
    backend.deliver(client, NZ.Connected(status=True))
    backend.deliver(client, message_event(E2E.Message(conversation="late")))
    assert reports.items == [] and client.stops == 1


# ---------------------------------------------------------------------------------- inbound


def test_a_direct_text_message(make: Any) -> None:
    backend, reports, client = connected(make)
    backend.deliver(client, message_event(E2E.Message(conversation="hello")))
    assert reports.of("message") == [{
        "id": "3EB0MSG1", "chat": "15557654321", "from": "15557654321", "push_name": "Ana",
        "type": "text", "text": "hello", "ts": 1_700_000_000.5, "is_group": False,
    }]  # fmt: skip


def test_group_media_and_extended_text(make: Any) -> None:
    backend, reports, client = connected(make)
    group = jid("120363025246125486", "g.us")
    sender = jid("15557654321", device=4)
    image = E2E.Message(imageMessage=E2E.ImageMessage(caption="menu", mimetype="image/jpeg"))
    backend.deliver(client, message_event(image, chat=group, sender=sender, group=True, msg_id="A1"))
    text = E2E.Message(extendedTextMessage=E2E.ExtendedTextMessage(text="@all see https://x.y"))
    backend.deliver(client, message_event(text, chat=group, sender=sender, group=True, msg_id="A2"))
    got = [(m["id"], m["chat"], m["from"], m["type"], m["text"], m["is_group"]) for m in reports.of("message")]
    assert got == [
        ("A1", "120363025246125486@g.us", "15557654321", "image", "menu", True),
        ("A2", "120363025246125486@g.us", "15557654321", "text", "@all see https://x.y", True),
    ]


def test_hidden_number_senders_use_the_phone_number_when_given(make: Any) -> None:
    backend, reports, client = connected(make)
    lid = jid("98765432109876", "lid")
    ev = message_event(E2E.Message(conversation="hi"), chat=lid, sender=lid, SenderAlt=jid("15557654321"))
    backend.deliver(client, ev)
    backend.deliver(client, message_event(E2E.Message(conversation="hi"), chat=lid, sender=lid, msg_id="B2"))
    first, second = reports.of("message")
    assert (first["chat"], first["from"]) == ("15557654321", "15557654321")
    assert (second["chat"], second["from"]) == ("98765432109876@lid", "98765432109876@lid")


def test_own_messages_protocol_traffic_and_empty_events_are_not_inbound(make: Any) -> None:
    backend, reports, client = connected(make)
    backend.deliver(client, message_event(E2E.Message(conversation="typed on the phone"), from_me=True))
    revoke = E2E.Message(protocolMessage=E2E.ProtocolMessage(type=E2E.ProtocolMessage.REVOKE))
    backend.deliver(client, message_event(revoke))
    backend.deliver(client, NZ.Message(Info=NZ.MessageInfo(ID="X")))
    assert reports.of("message") == [] and reports.of("error") == []


def test_receipts_trust_the_type_only_when_it_is_set(make: Any) -> None:
    backend, reports, client = connected(make)
    source = NZ.MessageSource(Chat=jid("15557654321"), Sender=jid("15557654321"))
    backend.deliver(client, NZ.Receipt(MessageSource=source, MessageIDs=["M1", "M2"], Type=NZ.Receipt.READ))
    unset = NZ.Receipt(MessageSource=source, MessageIDs=["M3"])
    assert unset.Type == NZ.Receipt.DELIVERED  # what an unset proto2 enum reads as: not to be believed
    backend.deliver(client, unset)
    backend.deliver(client, NZ.Receipt(MessageSource=source, Type=NZ.Receipt.DELIVERED))  # no ids: nothing
    assert reports.of("receipt") == [
        {"ids": ["M1", "M2"], "type": "read", "chat": "15557654321"},
        {"ids": ["M3"], "type": "unknown", "chat": "15557654321"},
    ]


# ---------------------------------------------------------------------------------- requests


def test_send_text_needs_a_connection(make: Any) -> None:
    backend, _, client = make()
    with pytest.raises(BackendError) as err:
        backend.send_text(OWN, "hi")
    assert err.value.code == "not_connected" and client.sent == []


def test_send_text(make: Any) -> None:
    backend, _, client = connected(make)
    assert backend.send_text("15557654321", "hello", message_id="journal-1") == {
        "message_id": "3EB0AABBCCDD", "ts": 1_700_000_000.0}  # fmt: skip
    backend.send_text("120363025246125486@g.us", "to the group")
    backend.send_text("15557654321:5@s.whatsapp.net", "to the user, not one device")
    recipients = [(to.User, to.Server, to.Device) for to, _ in client.sent]
    assert recipients == [("15557654321", "s.whatsapp.net", 0), ("120363025246125486", "g.us", 0),
                          ("15557654321", "s.whatsapp.net", 0)]  # fmt: skip
    assert [m.conversation for _, m in client.sent] == ["hello", "to the group", "to the user, not one device"]


def test_read_receipts_name_each_sender_and_typing_maps_to_chat_presence(make: Any) -> None:
    from neonize.utils.enum import ChatPresence, ChatPresenceMedia, ReceiptType

    backend, _, client = make()
    with pytest.raises(BackendError) as err:
        backend.mark_read("15557654321", ["A"], {})
    assert err.value.code == "not_connected"
    backend, _, client = connected(make)
    group = "120363025246125486@g.us"
    backend.mark_read(group, ["A", "B", "C"], {"A": "15550000001", "B": "15550000002"})
    calls = [(ids, chat.User, chat.Server, sender.User, receipt) for ids, chat, sender, receipt in client.reads]
    assert calls == [(("A",), "120363025246125486", "g.us", "15550000001", ReceiptType.READ),
                     (("B",), "120363025246125486", "g.us", "15550000002", ReceiptType.READ),
                     (("C",), "120363025246125486", "g.us", "120363025246125486", ReceiptType.READ)]
    for state in ("composing", "recording", "paused"):
        backend.typing("15557654321", state)
    assert [(p[0].User, p[1], p[2]) for p in client.presences] == [
        ("15557654321", ChatPresence.CHAT_PRESENCE_COMPOSING, ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT),
        ("15557654321", ChatPresence.CHAT_PRESENCE_COMPOSING, ChatPresenceMedia.CHAT_PRESENCE_MEDIA_AUDIO),
        ("15557654321", ChatPresence.CHAT_PRESENCE_PAUSED, ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT)]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ("websocket not connected", "not_connected"),  # nothing went out: the outbox keeps it queued
        ("the store doesn't contain a device JID", "not_connected"),
        ("failed to get device list: info query timed out", "timeout"),  # outcome unknown
        ("server returned error 479", "internal"),
    ],
)
def test_send_errors(make: Any, error: str, code: str) -> None:
    backend, _, client = connected(make)
    client.send_error = SendMessageError(error)
    with pytest.raises(BackendError) as err:
        backend.send_text(OWN, "hi")
    assert err.value.code == code and error in err.value.message


def test_logout_unlinks_stops_and_deletes_the_store(make: Any, session_dir: str) -> None:
    backend, reports, client = connected(make)
    backend._prepare_store()
    assert os.path.exists(os.path.join(session_dir, "whatsapp.db"))
    backend.logout()
    assert client.logouts == 1 and client.stops == 1
    assert not os.path.exists(os.path.join(session_dir, "whatsapp.db"))
    assert reports.of("exit") == [{"reason": "logged_out", "message": "logged out on request"}]
    backend.stop()  # the worker stops it again on its way out: a no-op
    assert client.stops == 1


def test_logout_while_not_connected_deletes_the_local_session(make: Any, session_dir: str) -> None:
    backend, reports, client = make()
    backend._prepare_store()
    backend.logout()
    assert client.logouts == 0 and not os.path.exists(os.path.join(session_dir, "whatsapp.db"))
    assert reports.of("exit") == [
        {"reason": "logged_out", "message": "local session deleted; remove the linked device on the phone"}]


def test_stop_is_bounded_when_go_hangs(make: Any) -> None:
    backend, _, client = make()
    client.stop_delay = 30  # neonize's Stop during a dial into a black hole
    started = time.monotonic()
    backend.stop()
    assert time.monotonic() - started < nb.STOP_WAIT + 1
    backend.stop()
    assert time.monotonic() - started < nb.STOP_WAIT + 1.5


# ---------------------------------------------------------------------------------- rich sends (DESIGN.md §11)


def uploaded_keys() -> dict[str, Any]:
    return {"URL": UPLOADED.url, "directPath": UPLOADED.DirectPath, "mediaKey": UPLOADED.MediaKey,
            "fileEncSHA256": UPLOADED.FileEncSHA256, "fileSHA256": UPLOADED.FileSHA256, "fileLength": 11}


@pytest.fixture
def media_file(short_tmp: str) -> str:
    """A stored file as the outbox finds it: MEDIA_ROOT/cd/<id>."""
    os.makedirs(os.path.join(short_tmp, "media", "cd"), mode=0o700)
    path = os.path.join(short_tmp, "media", "cd", MEDIA_ID)
    with open(path, "wb") as fh:
        fh.write(b"not-a-photo")  # 11 bytes; not an image Pillow reads: no preview
    return path


def media_item(kind: str, path: str, text: str = "", **fields: Any) -> SendItem:
    return SendItem("15557654321", text, "journal-1", kind, {"media": MEDIA_ID, **fields}, path)


@pytest.mark.parametrize(
    ("item", "media_type", "expected"),
    [
        (("image", "menu", {"mimetype": "image/png"}), MediaType.MediaImage,
         E2E.Message(imageMessage=E2E.ImageMessage(**uploaded_keys(), mimetype="image/png", caption="menu"))),
        (("video", "clip", {"mimetype": "video/mp4"}), MediaType.MediaVideo,
         E2E.Message(videoMessage=E2E.VideoMessage(**uploaded_keys(), mimetype="video/mp4", caption="clip"))),
        (("audio", "", {"mimetype": "audio/mpeg"}), MediaType.MediaAudio,
         E2E.Message(audioMessage=E2E.AudioMessage(**uploaded_keys(), mimetype="audio/mpeg"))),
        (("audio", "", {"mimetype": "audio/ogg", "voice": True}), MediaType.MediaAudio,
         E2E.Message(audioMessage=E2E.AudioMessage(**uploaded_keys(), mimetype="audio/ogg; codecs=opus", PTT=True))),
        (("document", "the bill", {"mimetype": "application/pdf", "filename": "invoice.pdf"}),
         MediaType.MediaDocument,
         E2E.Message(documentMessage=E2E.DocumentMessage(**uploaded_keys(), mimetype="application/pdf",
                                                         caption="the bill", fileName="invoice.pdf"))),
        (("document", "", {"mimetype": "text/plain"}), MediaType.MediaDocument,
         E2E.Message(documentMessage=E2E.DocumentMessage(**uploaded_keys(), mimetype="text/plain"))),
    ],
    ids=["image", "video", "audio", "voice", "document", "document-bare"],
)
def test_a_media_send_uploads_the_stored_file_and_sends_its_keys(
        make: Any, media_file: str, item: tuple[str, str, dict[str, Any]], media_type: Any, expected: Any) -> None:
    backend, _, client = connected(make)
    kind, text, fields = item
    assert backend.send(media_item(kind, media_file, text, **fields)) == {"message_id": "3EB0AABBCCDD",
                                                                           "ts": 1_700_000_000.0}
    assert client.uploads == [(b"not-a-photo", media_type)]
    ((to, message),) = client.sent
    assert (to.User, to.Server) == ("15557654321", "s.whatsapp.net")
    assert message == expected


def test_an_image_carries_a_preview_and_its_size(make: Any, media_file: str) -> None:
    from PIL import Image

    picture = io.BytesIO()
    Image.new("RGB", (640, 320), (200, 30, 30)).save(picture, format="PNG")
    with open(media_file, "wb") as fh:
        fh.write(picture.getvalue())
    backend, _, client = connected(make)
    backend.send(media_item("image", media_file, mimetype="image/png"))
    image = client.sent[0][1].imageMessage
    assert (image.width, image.height, image.mimetype) == (640, 320, "image/png")
    with Image.open(io.BytesIO(image.JPEGThumbnail)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (nb.THUMB_EDGE, nb.THUMB_EDGE // 2)
    assert client.uploads[0][0] == picture.getvalue()


INBOUND_REF = {"id": "WA-IN-1", "chat": "15557654321", "from": "15557654321", "from_me": False, "type": "text",
               "text": "what's on today?"}
OWN_REF = {"id": "3EB0OWN", "chat": "15557654321", "from": "", "from_me": True, "type": "image", "text": "menu",
           "status": "sent"}
GROUP_REF = {"id": "WA-G-1", "chat": "120363025246125486@g.us", "from": "15552223333", "from_me": False,
             "type": "text", "text": "lunch?"}


def test_a_reply_quotes_the_journaled_message(make: Any, media_file: str) -> None:
    backend, _, client = connected(make)
    backend.send(SendItem("15557654321", "soup", "j1", "text", {"reply_to": "WA-IN-1"}, quoted=INBOUND_REF))
    backend.send(dataclasses.replace(media_item("image", media_file, "again", mimetype="image/png",
                                                reply_to="3EB0OWN"), quoted=OWN_REF))
    backend.send(SendItem("120363025246125486@g.us", "yes", "j3", "location",
                          {"latitude": 52.5, "longitude": 13.4, "reply_to": "WA-G-1"}, quoted=GROUP_REF))
    text, image, location = (m for _, m in client.sent)
    assert text == E2E.Message(extendedTextMessage=E2E.ExtendedTextMessage(text="soup", contextInfo=E2E.ContextInfo(
        stanzaID="WA-IN-1", participant="15557654321@s.whatsapp.net",
        quotedMessage=E2E.Message(conversation="what's on today?"))))
    assert image.imageMessage.caption == "again"
    assert image.imageMessage.contextInfo == E2E.ContextInfo(  # our own message: we are its author
        stanzaID="3EB0OWN", participant=f"{OWN}@s.whatsapp.net",
        quotedMessage=E2E.Message(imageMessage=E2E.ImageMessage(caption="menu")))
    assert location.locationMessage.contextInfo == E2E.ContextInfo(
        stanzaID="WA-G-1", participant="15552223333@s.whatsapp.net",
        quotedMessage=E2E.Message(conversation="lunch?"))


def test_a_location(make: Any) -> None:
    backend, _, client = connected(make)
    backend.send(SendItem("15557654321", "Office", "j1", "location",
                          {"latitude": -33.8688, "longitude": 151.2093, "name": "Office"}))
    backend.send(SendItem("15557654321", "", "j2", "location", {"latitude": 0.0, "longitude": 0.5}))
    assert [m for _, m in client.sent] == [
        E2E.Message(locationMessage=E2E.LocationMessage(degreesLatitude=-33.8688, degreesLongitude=151.2093,
                                                        name="Office")),
        E2E.Message(locationMessage=E2E.LocationMessage(degreesLatitude=0.0, degreesLongitude=0.5)),
    ]
    assert client.uploads == []


@pytest.mark.parametrize(
    ("target", "emoji", "key"),
    [
        (INBOUND_REF, "👍", MessageKey(remoteJID="15557654321@s.whatsapp.net", fromMe=False, ID="WA-IN-1")),
        (OWN_REF, "❤️", MessageKey(remoteJID="15557654321@s.whatsapp.net", fromMe=True, ID="3EB0OWN")),
        (GROUP_REF, "", MessageKey(remoteJID="120363025246125486@g.us", fromMe=False, ID="WA-G-1",
                                   participant="15552223333@s.whatsapp.net")),  # "": the reaction is removed
        ({**GROUP_REF, "from": "", "from_me": True},
         "🎉", MessageKey(remoteJID="120363025246125486@g.us", fromMe=True, ID="WA-G-1")),
    ],
    ids=["direct", "own", "group-remove", "group-own"],
)
def test_a_reaction_keys_the_message_it_is_to(make: Any, target: dict[str, Any], emoji: str, key: Any) -> None:
    backend, _, client = connected(make)
    before = int(time.time() * 1000)
    backend.send(SendItem(target["chat"], "", "j1", "reaction", {"reaction_to": target["id"], "emoji": emoji},
                          target=target))
    ((to, message),) = client.sent
    reaction = message.reactionMessage
    assert (to.User, reaction.key, reaction.text) == (target["chat"].split("@")[0], key, emoji)
    assert before <= reaction.senderTimestampMS <= int(time.time() * 1000)
    assert [f.name for f, _ in message.ListFields()] == ["reactionMessage"]


def test_a_reaction_to_a_message_the_journal_no_longer_has(make: Any) -> None:
    backend, _, client = connected(make)
    with pytest.raises(BackendError) as err:
        backend.send(SendItem("15557654321", "", "j1", "reaction", {"reaction_to": "gone", "emoji": "👍"}))
    assert err.value.code == "not_found" and "no longer in the journal" in err.value.message
    assert client.sent == [] and backend._in_flight == 0


def test_a_missing_media_file_is_not_found_and_nothing_goes_out(make: Any, media_file: str) -> None:
    backend, _, client = connected(make)
    os.unlink(media_file)
    with pytest.raises(BackendError) as err:
        backend.send(media_item("image", media_file, mimetype="image/png"))
    assert err.value.code == "not_found"
    assert err.value.message == f"media {MEDIA_ID[:12]}… is no longer in the store"
    with pytest.raises(BackendError) as err:
        backend.send(media_item("document", None, mimetype="application/pdf"))  # type: ignore[arg-type]
    assert err.value.code == "not_found" and "no media store" in err.value.message
    assert client.uploads == [] and client.sent == [] and backend._in_flight == 0


def test_media_sends_need_a_connection_and_unknown_types_are_refused(make: Any, media_file: str) -> None:
    backend, _, client = make()
    with pytest.raises(BackendError) as err:
        backend.send(media_item("image", media_file, mimetype="image/png"))
    assert err.value.code == "not_connected" and client.uploads == []
    backend, _, client = connected(make)
    with pytest.raises(BackendError) as err:
        backend.send(SendItem("15557654321", "", "j1", "poll"))
    assert err.value.code == "not_implemented"


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        ('failed to upload media: Post "https://mmg.whatsapp.net/mms/image/x": dial tcp: lookup mmg.whatsapp.net '
         'on 10.255.255.53:53: no such host', "internal",
         "media upload failed, nothing was sent: cannot reach WhatsApp: DNS lookup of mmg.whatsapp.net failed "
         "(no such host)"),
        # An upload that times out sent nothing: send_failed, never `timeout` (which makes a send uncertain).
        ("failed to refresh media connections: failed to query media connections: info query timed out",
         "internal", "media upload failed, nothing was sent: cannot reach WhatsApp: no answer (timed out)"),
        ("failed to refresh media connections: failed to query media connections: websocket not connected",
         "not_connected", "not connected to WhatsApp (media upload: failed to refresh media connections: failed "
                          "to query media connections: websocket not connected)"),
        ("upload failed with status code 500", "internal",
         "media upload failed, nothing was sent: upload failed with status code 500"),
    ],
)
def test_an_upload_failure_says_why_and_sends_nothing(make: Any, media_file: str, error: str, code: str,
                                                      message: str) -> None:
    backend, _, client = connected(make)
    client.upload_error = UploadError(error)  # what neonize's upload raises on the Go side's error
    (outcome,) = backend.send_many([media_item("video", media_file, mimetype="video/mp4")])
    assert isinstance(outcome, BackendError) and (outcome.code, outcome.message) == (code, message)
    assert client.sent == [] and backend._in_flight == 0


def test_an_upload_during_a_drop_is_not_connected(make: Any, media_file: str) -> None:
    backend, _, client = connected(make)
    client.upload_error = UploadError("failed to upload media: Post \"https://mmg.whatsapp.net/x\": EOF")
    client.hold.clear()
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.extend(
        backend.send_many([media_item("image", media_file, mimetype="image/png")])))
    thread.start()
    wait_for(lambda: backend._in_flight == 2, timeout=5, what="the upload in flight")
    backend.deliver(client, NZ.Disconnected(status=True))
    client.hold.set()
    thread.join(5)
    assert isinstance(result[0], BackendError) and result[0].code == "not_connected"  # requeued, sent later
    assert client.sent == []


def test_an_upload_that_hangs_is_cut_short_and_stays_counted_until_go_returns(make: Any, media_file: str) -> None:
    backend, _, client = connected(make, media_timeout=0.2)
    client.hold.clear()
    with pytest.raises(BackendError) as err:
        backend.send(media_item("image", media_file, mimetype="image/png"))
    assert err.value.code == "internal"
    assert err.value.message == "media upload: no answer from WhatsApp's media servers within 0.2 s; nothing was sent"
    assert backend._in_flight == 1 and client.sent == []  # stop() would wait for the Go call still running
    client.hold.set()
    wait_for(lambda: backend._in_flight == 0, timeout=5, what="the late upload to return")
    assert client.sent == []  # its late answer sends nothing


def test_the_outbox_journals_each_media_failure_with_its_reason(make: Any, media_file: str, short_tmp: str) -> None:
    """The outbox contract: a failed upload is send_failed with why (reported, not swallowed); a missing
    file likewise; an upload that found no connection is queued again; a good one is sent."""
    backend, _, client = connected(make)
    journal = J.Journal(os.path.join(short_tmp, "journal.db"))
    media = {"media": MEDIA_ID, "mimetype": "image/png", "size": 11}
    for caption in ("dns", "gone", "down", "fine"):
        fields = {**media, "media": "ef" * 32} if caption == "gone" else media  # not in the store
        journal.enqueue("acme", "15557654321", caption, None, "control", "image", fields)
    reports: list[tuple[str, dict[str, Any]]] = []
    sender = Sender(journal.path, backend, lambda t, d: reports.append((t, d)),
                    MediaStore(os.path.join(short_tmp, "media")))
    sender.connected = True
    sender.wakeup.set()  # no retry pause in the test
    errors = [UploadError("dial tcp: lookup mmg.whatsapp.net: no such host"),  # "dns"
              UploadError("failed to query media connections: websocket not connected")]  # "down", once
    upload = client.upload

    def scripted_upload(binary: bytes, media_type: Any = None) -> Any:
        if errors:
            raise errors.pop(0)
        return upload(binary, media_type)

    client.upload = scripted_upload  # type: ignore[method-assign]
    sender.drain(journal)  # stops at "down": no connection, so it waits for the next drain
    assert {m.text: m.status for m in journal.recent_outbound(10)} == {
        "dns": J.SEND_FAILED, "gone": J.SEND_FAILED, "down": J.QUEUED, "fine": J.QUEUED}
    sender.drain(journal)
    status = {m.text: (m.status, m.error) for m in journal.recent_outbound(10)}
    assert status["dns"] == (J.SEND_FAILED, "internal: media upload failed, nothing was sent: cannot reach "
                                            "WhatsApp: DNS lookup of mmg.whatsapp.net failed (no such host)")
    assert status["gone"] == (J.SEND_FAILED, f"not_found: media {'ef' * 6}… is no longer in the store")
    assert status["down"][0] == J.SENT and status["fine"][0] == J.SENT
    ids = {m.message_id: m.text for m in journal.recent_outbound(10)}
    failed = {ids[d["message_id"]]: (d["reason"], d["message"]) for t, d in reports if t == "send_failed"}
    assert failed == {"dns": ("internal", status["dns"][1].removeprefix("internal: ")),
                      "gone": ("not_found", status["gone"][1].removeprefix("not_found: "))}
    assert [m.imageMessage.caption for _, m in client.sent] == ["down", "fine"]
    journal.close()


# ---------------------------------------------------------------------------------- inbound media (DESIGN.md §11)


def media_keys(**extra: Any) -> dict[str, Any]:
    return {"URL": "https://mmg.whatsapp.net/d/f/x.enc", "directPath": "/v/t62.7118-24/x.enc",
            "mediaKey": b"k" * 32, "fileSHA256": bytes(range(32)), "fileEncSHA256": b"e" * 32,
            "fileLength": 70_000, "mediaKeyTimestamp": 1_700_000_000, **extra}


SHA_HEX = bytes(range(32)).hex()
CONTEXT = E2E.ContextInfo(stanzaID="WA-PREV", participant="15557654321@s.whatsapp.net",
                          quotedMessage=E2E.Message(conversation="earlier"))


@pytest.mark.parametrize(
    ("message", "expected", "download_field"),
    [
        (E2E.Message(imageMessage=E2E.ImageMessage(**media_keys(), mimetype="image/jpeg", caption="menu",
                                                   JPEGThumbnail=b"t" * 5000)),
         {"type": "image", "text": "menu", "media": {"mimetype": "image/jpeg", "size": 70_000, "sha256": SHA_HEX}},
         "imageMessage"),
        (E2E.Message(videoMessage=E2E.VideoMessage(**media_keys(), mimetype="video/mp4", contextInfo=CONTEXT)),
         {"type": "video", "text": "", "reply_to": "WA-PREV",
          "media": {"mimetype": "video/mp4", "size": 70_000, "sha256": SHA_HEX}}, "videoMessage"),
        (E2E.Message(ptvMessage=E2E.VideoMessage(**media_keys(), mimetype="video/mp4")),
         {"type": "video", "text": "", "media": {"mimetype": "video/mp4", "size": 70_000, "sha256": SHA_HEX}},
         "videoMessage"),  # whatsmeow's DownloadAny knows no ptvMessage: the handle holds a videoMessage
        (E2E.Message(audioMessage=E2E.AudioMessage(**media_keys(), mimetype="audio/ogg; codecs=opus", PTT=True)),
         {"type": "audio", "text": "",
          "media": {"mimetype": "audio/ogg; codecs=opus", "size": 70_000, "sha256": SHA_HEX}}, "audioMessage"),
        (E2E.Message(documentMessage=E2E.DocumentMessage(**media_keys(), mimetype="application/pdf",
                                                         fileName="invoice.pdf")),
         {"type": "document", "text": "invoice.pdf",
          "media": {"mimetype": "application/pdf", "size": 70_000, "filename": "invoice.pdf", "sha256": SHA_HEX}},
         "documentMessage"),
        (E2E.Message(documentWithCaptionMessage=E2E.FutureProofMessage(message=E2E.Message(
            documentMessage=E2E.DocumentMessage(**media_keys(), mimetype="application/pdf", fileName="a.pdf",
                                                caption="signed", contextInfo=CONTEXT)))),
         {"type": "document", "text": "signed", "reply_to": "WA-PREV",
          "media": {"mimetype": "application/pdf", "size": 70_000, "filename": "a.pdf", "sha256": SHA_HEX}},
         "documentMessage"),
        (E2E.Message(stickerMessage=E2E.StickerMessage(**media_keys(), mimetype="image/webp")),
         {"type": "sticker", "text": "", "media": {"mimetype": "image/webp", "size": 70_000, "sha256": SHA_HEX}},
         "stickerMessage"),
        (E2E.Message(ephemeralMessage=E2E.FutureProofMessage(message=E2E.Message(
            viewOnceMessageV2=E2E.FutureProofMessage(message=E2E.Message(
                imageMessage=E2E.ImageMessage(**media_keys(), mimetype="image/jpeg", viewOnce=True)))))),
         {"type": "image", "text": "", "media": {"mimetype": "image/jpeg", "size": 70_000, "sha256": SHA_HEX}},
         "imageMessage"),
    ],
    ids=["image", "video-reply", "ptv", "voice", "document", "document-with-caption", "sticker", "view-once"],
)
def test_inbound_media_announces_itself_with_a_handle(make: Any, message: Any, expected: dict[str, Any],
                                                      download_field: str) -> None:
    backend, reports, client = connected(make)
    backend.deliver(client, message_event(message))
    (report,) = reports.of("message")
    handle = report.pop("_fetch")
    assert report == {"id": "3EB0MSG1", "chat": "15557654321", "from": "15557654321", "push_name": "Ana",
                      "ts": 1_700_000_000.5, "is_group": False, **expected}
    json.dumps(handle)  # journaled with the message: JSON, and small (no thumbnail, no quote)
    held = E2E.Message.FromString(base64.b64decode(handle["message"]))
    assert [f.name for f, _ in held.ListFields()] == [download_field]
    assert getattr(held, download_field) == type(getattr(held, download_field))(
        **media_keys(), mimetype=expected["media"]["mimetype"])
    assert len(handle["message"]) < 400


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (E2E.Message(locationMessage=E2E.LocationMessage(degreesLatitude=52.52, degreesLongitude=13.405,
                                                         name="Office", JPEGThumbnail=b"map")),
         {"type": "location", "text": "Office", "latitude": 52.52, "longitude": 13.405, "name": "Office"}),
        (E2E.Message(locationMessage=E2E.LocationMessage(degreesLatitude=-1.5, degreesLongitude=0.0)),
         {"type": "location", "text": "-1.5,0.0", "latitude": -1.5, "longitude": 0.0}),
        (E2E.Message(reactionMessage=E2E.ReactionMessage(
            key=MessageKey(remoteJID="15557654321@s.whatsapp.net", fromMe=True, ID="3EB0OURS"), text="👍")),
         {"type": "reaction", "text": "👍", "reaction_to": "3EB0OURS", "emoji": "👍"}),
        (E2E.Message(reactionMessage=E2E.ReactionMessage(key=MessageKey(ID="3EB0OURS"), text="")),
         {"type": "reaction", "text": "", "reaction_to": "3EB0OURS", "emoji": ""}),  # the reaction was removed
        (E2E.Message(extendedTextMessage=E2E.ExtendedTextMessage(text="yes please", contextInfo=CONTEXT)),
         {"type": "text", "text": "yes please", "reply_to": "WA-PREV"}),
    ],
    ids=["location", "location-bare", "reaction", "reaction-removed", "reply"],
)
def test_inbound_locations_reactions_and_replies(make: Any, message: Any, expected: dict[str, Any]) -> None:
    backend, reports, client = connected(make)
    backend.deliver(client, message_event(message))
    assert reports.of("message") == [{"id": "3EB0MSG1", "chat": "15557654321", "from": "15557654321",
                                      "push_name": "Ana", "ts": 1_700_000_000.5, "is_group": False, **expected}]


def fetch_handle(message: Any) -> dict[str, Any]:
    return {"message": base64.b64encode(message.SerializeToString()).decode(), "kind": "documentMessage"}


HANDLE = fetch_handle(E2E.Message(documentMessage=E2E.DocumentMessage(**media_keys(), mimetype="application/pdf")))


def test_fetch_media_writes_the_download_in_slices_of_one_mib(make: Any) -> None:
    backend, _, client = connected(make)
    payload = os.urandom(2 * nb.CHUNK + 12345)
    client.download_result = payload
    chunks: list[Any] = []
    backend.fetch_media(HANDLE, chunks.append)
    assert [len(c) for c in chunks] == [nb.CHUNK, nb.CHUNK, 12345]
    assert all(isinstance(c, memoryview) and c.obj is payload for c in chunks)  # slices of the one copy
    assert b"".join(chunks) == payload
    assert client.downloads == [E2E.Message.FromString(base64.b64decode(HANDLE["message"]))]
    assert backend._in_flight == 0
    client.download_result = b""
    chunks.clear()
    backend.fetch_media(HANDLE, chunks.append)
    assert chunks == []  # an empty file writes nothing


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        ("download failed with status code 404", "not_found",
         "the media is no longer on WhatsApp's servers (expired or deleted)"),
        ("download failed with status code 410", "not_found",
         "the media is no longer on WhatsApp's servers (expired or deleted)"),
        ("failed to refresh media connections: websocket not connected", "not_connected",
         "not connected to WhatsApp (media download: failed to refresh media connections: websocket not connected)"),
        ('failed to download media: Get "https://mmg.whatsapp.net/d/f/x.enc": context deadline exceeded', "timeout",
         "media download: no answer from WhatsApp (context deadline exceeded)"),
        ("invalid media hmac", "internal", "media download failed: invalid media hmac"),
        ("didn't find any attachments in message", "bad_request", "the message holds no media to download"),
        ('Get "https://mmg.whatsapp.net/d/f/x.enc": dial tcp: lookup mmg.whatsapp.net: no such host', "internal",
         "media download failed: cannot reach WhatsApp: DNS lookup of mmg.whatsapp.net failed (no such host)"),
    ],
)
def test_fetch_media_failures(make: Any, error: str, code: str, message: str) -> None:
    backend, _, client = connected(make)
    client.download_result = DownloadError(error)  # what neonize's download_any raises
    chunks: list[Any] = []
    with pytest.raises(BackendError) as err:
        backend.fetch_media(HANDLE, chunks.append)
    assert (err.value.code, err.value.message) == (code, message)
    assert chunks == [] and backend._in_flight == 0


def test_fetch_media_needs_a_connection_and_a_handle(make: Any) -> None:
    backend, _, client = make()
    with pytest.raises(BackendError) as err:
        backend.fetch_media(HANDLE, lambda _: None)
    assert err.value.code == "not_connected" and client.downloads == []
    backend, _, client = connected(make)
    not_a_message = base64.b64encode(b"\xff\xff").decode()
    for bad in (None, {"id": "3EB0MSG1"}, {"message": "%%% not base64"}, {"message": not_a_message}):
        with pytest.raises(BackendError) as err:
            backend.fetch_media(bad, lambda _: None)
        assert err.value.code == "bad_request" and "not a neonize media handle" in err.value.message
    assert client.downloads == [] and backend._in_flight == 0


def test_fetch_media_that_hangs_times_out(make: Any) -> None:
    backend, _, client = connected(make, media_timeout=0.2)
    client.hold.clear()
    client.download_result = b"late"
    chunks: list[Any] = []
    with pytest.raises(BackendError) as err:
        backend.fetch_media(HANDLE, chunks.append)
    assert (err.value.code, err.value.message) == ("timeout", "no media from WhatsApp within 0.2 s")
    assert backend._in_flight == 1  # Go is still downloading: stop() waits for it (bounded)
    client.hold.set()
    wait_for(lambda: backend._in_flight == 0, timeout=5, what="the late download to return")
    assert chunks == []  # its late bytes go nowhere


# ---------------------------------------------------------------------------------- store, options


def test_sqlite_store_is_private(make: Any, session_dir: str) -> None:
    path = os.path.join(session_dir, "whatsapp.db")
    with open(path, "w"):
        pass
    os.chmod(path, 0o644)
    backend, _, _ = make()
    assert backend.store == path
    backend._prepare_store()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_postgres_store_and_bad_options(session_dir: str) -> None:
    ctx = WorkerContext("acme", session_dir, {"store": "postgres://wa:secret@db/wa_acme"})
    backend = NeonizeBackend(ctx, Reports())
    backend._prepare_store()
    assert backend.store == "postgres://wa:secret@db/wa_acme" and os.listdir(session_dir) == []
    for bad in ({"store": "/tmp/other.db"}, {"store": 5}, {"connect_timeout": 0}, {"pairing_timeout": "soon"},
                {"proxy": 8080}):  # fmt: skip
        with pytest.raises(ValueError):
            NeonizeBackend(WorkerContext("acme", session_dir, bad), Reports())


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (DNS_ERROR, "cannot reach WhatsApp: DNS lookup of web.whatsapp.com failed (no such host)"),
        ('failed to dial whatsapp web websocket: Get "https://web.whatsapp.com/ws/chat": context deadline exceeded',
         "cannot reach WhatsApp: no answer (timed out)"),
        ("dial tcp: lookup web.whatsapp.com on 127.0.0.53:53: server misbehaving",
         "cannot reach WhatsApp: DNS lookup of web.whatsapp.com failed (no DNS server answered)"),
        ("dial tcp 157.240.1.1:443: connect: connection refused", "cannot reach WhatsApp: connection refused"),
        ("dial tcp 157.240.1.1:443: connect: network is unreachable", "cannot reach WhatsApp: network is unreachable"),
        ("failed to upgrade database: sql: database is locked", "session store failed: database is locked"),
        ("something: else entirely", "else entirely"),
    ],
)
def test_connect_errors_read_well(error: str, reason: str) -> None:
    assert describe_connect_error(error) == reason


# ---------------------------------------------------------------------------------- real worker processes


@pytest.fixture
def sup(short_tmp: str) -> Iterator[FakeSupervisor]:
    s = FakeSupervisor(short_tmp)
    yield s
    s.close()


def run_worker(base: str, sup: FakeSupervisor, **options: Any) -> tuple[int, list[dict[str, Any]], str, float]:
    """A neonize worker until it exits: (code, its events, its stderr, seconds)."""
    cmd = [sys.executable, "-m", "workers", "--company", "acme", "--generation", "1", "--endpoint", sup.endpoint,
           "--session-dir", os.path.join(base, "sess"), "--backend", "neonize", "--heartbeat-interval", "5",
           "--options", json.dumps({"pairing_timeout": 170, **options})]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    took = time.monotonic() - started
    sup.pump(100)
    events = [m.body for m in sup.got if m.type == protocol.EVENT]
    return proc.returncode, events, stderr, took


@pytest.mark.skipif(whatsapp_resolves(), reason="this machine can reach WhatsApp: the no-network case needs none")
def test_a_worker_without_network_exits_for_a_restart_with_backoff(short_tmp: str, sup: FakeSupervisor) -> None:
    code, events, stderr, took = run_worker(short_tmp, sup)
    assert code == exitcodes.TEMPFAIL, stderr
    assert [e["data"]["state"] for e in events if e["type"] == "state"] == ["connecting"]
    (exit_,) = [e["data"] for e in events if e["type"] == "exit"]
    assert exit_["reason"] == "connect_failed" and exit_["message"].startswith("cannot reach WhatsApp")
    assert "Traceback" not in stderr and len(stderr.splitlines()) <= 5, stderr
    assert took < 10
    assert stat.S_IMODE(os.stat(os.path.join(short_tmp, "sess", "whatsapp.db")).st_mode) == 0o600


def test_a_black_hole_is_cut_short_by_the_watchdog(short_tmp: str, sup: FakeSupervisor) -> None:
    hole = socket.socket()  # accepts connections (backlog) and never answers: a proxy into the void
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    try:
        code, events, stderr, took = run_worker(short_tmp, sup, connect_timeout=1.5,
                                                proxy=f"http://127.0.0.1:{hole.getsockname()[1]}")  # fmt: skip
    finally:
        hole.close()
    assert code == exitcodes.TEMPFAIL, stderr
    (exit_,) = [e["data"] for e in events if e["type"] == "exit"]
    assert exit_ == {"reason": "connect_failed", "message": "no answer from WhatsApp within 1.5 s",
                     "code": exitcodes.TEMPFAIL}  # fmt: skip
    # The dial into the hole cannot be interrupted; the process still ends at once (not after ~60 s).
    assert took < 1.5 + nb.STOP_WAIT + 5, took
    assert "Traceback" not in stderr, stderr


def test_whatsmeow_hears_a_message_arrived_only_once_it_is_journaled(make: Any) -> None:
    """whatsmeow sends the delivery receipt when the handler returns: the handler waits for the journal."""
    backend, reports, client = connected(make)
    reports.journal = False  # the worker has not journaled it yet
    handler = threading.Thread(target=backend.deliver, args=(client, message_event(
        E2E.Message(conversation="hi"), msg_id="WA-HOLD")))
    handler.start()
    wait_for(lambda: reports.of("message"), timeout=5, what="the message report")
    handler.join(0.3)
    assert handler.is_alive()  # still holding whatsmeow's receipt back
    backend.journaled(["WA-HOLD"])
    handler.join(5)
    assert not handler.is_alive() and backend._unjournaled == {}
