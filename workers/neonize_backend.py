"""The `neonize` backend: a real WhatsApp multi-device session (neonize 0.5.2: whatsmeow in Go).

What it is built around (DESIGN.md §1, §3):

- neonize is imported here only, lazily, on the connection thread: `import neonize` loads a Go
  runtime, which must never reach the supervisor (it does not survive fork) and allows one
  ``NewClient`` per process. Importing this module does not import neonize.
- ``connect()`` blocks, and runs our handlers serially on its own thread: a handler only reads
  the event, normalizes it and `emit`s (which enqueues); a slow handler would stall whatsmeow.
  Every handler is registered before ``connect()``; they never raise (one log line instead).
- whatsmeow reconnects by itself after a drop (``disconnected``, then ``connected`` again); it
  does not after logged out / stream replaced / client outdated / temporary ban, so those end
  the worker with the matching ``exit`` reason.
- There is no retry loop here: each failed ``connect()`` leaks a database connection, so a
  failed first connection is ``exit connect_failed`` (worker exit 75) and the supervisor starts a
  fresh process with backoff, forever at the cap. A watchdog covers the black-hole case (no
  answer at all: ``connect_timeout``, 60 s) and the pairing deadline (``pairing_timeout``).
- Go calls cannot be interrupted while whatsmeow dials (``Stop`` waits for the dial, ~60 s):
  ``stop()`` runs them on helper threads with a time bound, and the thread neonize starts for
  ``connect()`` is made a daemon, so a stuck dial never holds the worker process at exit.

Rich messages and media (DESIGN.md §11): a media send reads its file from the store once, uploads it
(``client.upload``) and sends the waE2E message built here from the upload's keys — not neonize's
``build_*_message`` helpers, which need ffmpeg (video, audio), replace the stored mimetype with
libmagic's guess and quote only a whole neonize event (we keep a journal row). An upload that fails
has sent nothing: ``send_failed`` with the reason (``not_connected``, which requeues, only when the
connection is down). Inbound media is announced with a handle (`workers.inbound.media_handle`) and
downloaded later by ``fetch_media`` (``client.download_any``), bounded in time.

Options (``ctx.options``): ``pairing_timeout`` (s, 170), ``connect_timeout`` (s, 60), ``store``
(a ``postgres://`` URL, one database per company — schemas do not work; default the SQLite file
``<session_dir>/whatsapp.db``, 0600), ``proxy`` (``http://``/``socks5://`` URL for whatsmeow),
``media_timeout`` (s, 300: the bound on one media upload or download).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from ipc import states
from ipc.errors import BAD_REQUEST, INTERNAL, INVALID_PHONE, NOT_CONNECTED, NOT_FOUND, NOT_IMPLEMENTED, TIMEOUT
from ipc.mediastore import CHUNK
from ipc.states import State
from ipc.validation import mask_phone
from workers import neonize_preload, neonizestore
from workers.backend import Backend, BackendError, Emit, Phase, SendItem, WorkerContext
from workers.inbound import PHONE_SERVERS, epoch_seconds, normalize_message, phone_from_jid
from workers.simcreds import Fenced, Unavailable, store_for

log = logging.getLogger("waport.neonize")

DB_FILE = "whatsapp.db"
PAIRING_TIMEOUT = 170.0
CONNECT_TIMEOUT = 60.0
STOP_WAIT = 2.0  # bound on neonize's Stop (it blocks for the length of a dial in progress)
LOGOUT_WAIT = 10.0  # bound on unlinking the device on WhatsApp's side
DRAIN_WAIT = 1.0  # Go calls in flight may finish before Stop rewrites neonize's client map
DEVICE_NAME = "waport"  # how the linked device is listed on the phone
JOURNAL_WAIT = 10.0  # how long a message handler holds whatsmeow's receipt back while the worker journals
MEDIA_TIMEOUT = 300.0  # bound on one media upload or download (64 MiB over a slow link)

# send type -> (waE2E.Message field, its protobuf class, neonize MediaType: the upload's encryption keys)
MEDIA_SENDS: dict[str, tuple[str, str, str]] = {
    "image": ("imageMessage", "ImageMessage", "MediaImage"),
    "video": ("videoMessage", "VideoMessage", "MediaVideo"),
    "audio": ("audioMessage", "AudioMessage", "MediaAudio"),
    "document": ("documentMessage", "DocumentMessage", "MediaDocument"),
}
CAPTIONED = frozenset({"image", "video", "document"})  # AudioMessage has no caption
# The quoted message a reply shows, rebuilt from what the journal keeps (type, text): field, text field.
QUOTED_AS: dict[str, tuple[str, str | None]] = {
    "image": ("imageMessage", "caption"),
    "video": ("videoMessage", "caption"),
    "audio": ("audioMessage", None),
    "document": ("documentMessage", "caption"),
    "sticker": ("stickerMessage", None),
    "location": ("locationMessage", "name"),
}
THUMB_EDGE = 72  # px: the JPEG preview an image message carries (neonize's helper uses 200; WhatsApp ~72)
THUMB_MAX_PIXELS = 40_000_000  # bigger images go without a preview rather than a long decode

# neonize event class (neonize.events) -> handler method, by the protobuf's class name.
EVENTS: dict[str, tuple[str, str]] = {
    "PairStatus": ("PairStatusEv", "on_pair_status"),
    "Connected": ("ConnectedEv", "on_connected"),
    "Disconnected": ("DisconnectedEv", "on_disconnected"),
    "KeepAliveTimeout": ("KeepAliveTimeoutEv", "on_keepalive_timeout"),
    "KeepAliveRestored": ("KeepAliveRestoredEv", "on_keepalive_restored"),
    "LoggedOut": ("LoggedOutEv", "on_logged_out"),
    "StreamReplaced": ("StreamReplacedEv", "on_stream_replaced"),
    "ClientOutdated": ("ClientOutdatedEv", "on_client_outdated"),
    "TemporaryBan": ("TemporaryBanEv", "on_temporary_ban"),
    "ConnectFailure": ("ConnectFailureEv", "on_connect_failure"),
    "StreamError": ("StreamErrorEv", "on_stream_error"),
    "Message": ("MessageEv", "on_message"),
    "Receipt": ("ReceiptEv", "on_receipt"),
}
# ConnectFailure reasons (neonize.proto ConnectFailureReason) that end the session for good.
FAILURE_EXITS = {
    "LOGGED_OUT": "logged_out",
    "MAIN_DEVICE_GONE": "logged_out",
    "UNKNOWN_LOGOUT": "logged_out",
    "TEMP_BANNED": "banned",
    "CLIENT_OUTDATED": "outdated",
}
# ... and those after which whatsmeow retries by itself.
FAILURE_RETRIED = frozenset({"SERVICE_UNAVAILABLE", "INTERNAL_SERVER_ERROR"})

_NZ: SimpleNamespace | None = None
_NZ_LOCK = threading.Lock()


class _DaemonThread(threading.Thread):
    """neonize's connect() runs the Go call on a non-daemon thread: at exit, Python would wait for
    a dial in progress (~60 s). Ours never outlives the worker's decision to end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["daemon"] = True
        super().__init__(*args, **kwargs)


def load_neonize() -> SimpleNamespace:
    """Import neonize on first use only, in the worker process (it starts a Go runtime)."""
    global _NZ
    with _NZ_LOCK:
        if _NZ is None:
            # neonize's media helpers (ffmpeg) are not used (see the module's docstring); their warning is noise.
            logging.getLogger("neonize.utils.ffmpeg").setLevel(logging.ERROR)
            neonize_preload.finish()  # forked from a fork server that preloaded neonize: its __init__ runs here
            import neonize.client as nz_client
            from neonize import events
            from neonize._binder import ProxySettings
            from neonize.exc import NeonizeError
            from neonize.proto.Neonize_pb2 import JID
            from neonize.proto.waCommon.WACommon_pb2 import MessageKey
            from neonize.proto.waCompanionReg.WAWebProtobufsCompanionReg_pb2 import DeviceProps
            from neonize.proto.waE2E import WAWebProtobufsE2E_pb2 as e2e
            from neonize.utils.enum import ChatPresence, ChatPresenceMedia, MediaType, ReceiptType

            nz_client.Thread = _DaemonThread
            # whatsmeow filters at this level in Go (from neonize's logger): no debug chatter
            # crosses into Python unless the worker runs at debug.
            logging.getLogger("neonize.utils.log").setLevel(max(logging.DEBUG, log.getEffectiveLevel()))
            _NZ = SimpleNamespace(
                NewClient=nz_client.NewClient, events=events, ProxySettings=ProxySettings,
                NeonizeError=NeonizeError, JID=JID, DeviceProps=DeviceProps, Message=e2e.Message, E2E=e2e,
                MessageKey=MessageKey, MediaType=MediaType,
                ChatPresence=ChatPresence, ChatPresenceMedia=ChatPresenceMedia, ReceiptType=ReceiptType,
            )  # fmt: skip
        return _NZ


def describe_connect_error(error: str) -> str:
    """A short reason a person understands, from whatsmeow's nested dial error."""
    text = " ".join(str(error).split())
    low = text.lower()
    host = m.group(1) if (m := re.search(r"lookup ([\w.-]+)", text)) else "web.whatsapp.com"
    if "no such host" in low:
        return f"cannot reach WhatsApp: DNS lookup of {host} failed (no such host)"
    if "server misbehaving" in low or "temporary failure in name resolution" in low:
        return f"cannot reach WhatsApp: DNS lookup of {host} failed (no DNS server answered)"
    if "connection refused" in low:
        return "cannot reach WhatsApp: connection refused"
    if "network is unreachable" in low or "no route to host" in low:
        return "cannot reach WhatsApp: network is unreachable"
    if "deadline exceeded" in low or "i/o timeout" in low or "timed out" in low:
        return "cannot reach WhatsApp: no answer (timed out)"
    if "x509" in low or "certificate" in low or "tls" in low:
        return f"cannot reach WhatsApp: TLS failed ({_tail(text)})"
    if "proxy" in low or "socks" in low:
        return f"cannot reach WhatsApp: proxy failed ({_tail(text)})"
    if "database" in low or "sql" in low or "postgres" in low:
        return f"session store failed: {_tail(text)}"
    return _tail(text) or "connect failed"


def _tail(text: str, limit: int = 200) -> str:
    """The innermost cause of a Go error chain ("a: b: c" -> "c"), bounded."""
    parts = [p.strip() for p in text.split(": ") if p.strip()]
    tail = parts[-1] if parts else ""
    return tail if len(tail) <= limit else tail[: limit - 1] + "…"


def _positive(options: dict[str, Any], key: str, default: float) -> float:
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"option {key} must be a positive number of seconds, not {value!r}")
    return float(value)


def _bounded(fn: Callable[[], Any], timeout: float, name: str) -> tuple[bool, Any]:
    """Run a Go call on a daemon thread and wait at most `timeout`: (finished, result or exception)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None
    return True, box.get("error", box.get("result"))


class NeonizeBackend(Backend):
    """One WhatsApp session through neonize; reports states, messages, receipts and exits."""

    # neonize's download_any holds three Python copies of a file at once (BENCHMARKS.md neonize_download):
    # one download at a time keeps a 64 MiB file from costing a worker twice that against memory_limit.
    download_concurrency = 1

    def __init__(self, ctx: WorkerContext, emit: Emit) -> None:
        super().__init__(ctx, emit)
        options = ctx.options
        self.pairing_timeout = _positive(options, "pairing_timeout", PAIRING_TIMEOUT)
        self.connect_timeout = _positive(options, "connect_timeout", CONNECT_TIMEOUT)
        self.media_timeout = _positive(options, "media_timeout", MEDIA_TIMEOUT)
        store = options.get("store") or ""
        if not isinstance(store, str) or (store and not store.startswith(("postgres://", "postgresql://"))):
            raise ValueError("option store must be a postgres:// URL (one database per company) or empty for SQLite")
        # Cluster mode: every company's device in the cluster's database, found by the JID kept in its
        # credentials row (workers/neonizestore.py); the DSN came with the secrets, never in argv.
        self.cluster: tuple[str, int] | None = None
        self.device_record: Any = None
        if options.get("cluster_dsn"):
            self.device_record = store_for(ctx.company, ctx.session_dir, options, DB_FILE)
            self.cluster = (options["cluster_dsn"], options["epoch"])
            store = options["cluster_dsn"]
        self.store = store or os.path.join(ctx.session_dir, DB_FILE)
        self.device_jid: str | None = None  # cluster mode: the JID this company's device has in the store
        proxy = options.get("proxy") or None
        if proxy is not None and not isinstance(proxy, str):
            raise ValueError("option proxy must be a URL string")
        self.proxy: str | None = proxy
        self.phase: State | Phase = states.STARTING  # until start(); then the state last reported, or exited
        self.phone = ""
        self._unjournaled: dict[str, threading.Event] = {}  # inbound ids whose receipt waits for the journal
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0  # Go calls from request threads (send, pair code, logout)
        self._stopping = threading.Event()
        self._stopped = False
        self.handlers: dict[str, Callable[[Any, Any], None]] = {
            name: self._guarded(getattr(self, method)) for name, (_, method) in EVENTS.items()
        }
        self._client: Any = None
        self._nz: SimpleNamespace | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._connect_deadline: float | None = None
        self._pairing_deadline: float | None = None

    @property
    def is_postgres(self) -> bool:
        return self.store.startswith("postgres")

    # ------------------------------------------------------------------ Backend interface

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stopping.is_set():
                return
            self.phase = states.CONNECTING
            self._connect_deadline = time.monotonic() + self.connect_timeout
            self._thread = threading.Thread(target=self._run, name="neonize-connect", daemon=True)
            self._watchdog = threading.Thread(target=self._watch, name="neonize-watchdog", daemon=True)
        self.emit("state", {"state": states.CONNECTING, "reason": "connecting to WhatsApp"})
        self._thread.start()
        self._watchdog.start()

    def stop(self) -> None:
        """End the session: bounded in time (a dial in progress cannot be interrupted), idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            client = self._client
            deadline = time.monotonic() + DRAIN_WAIT
            while self._in_flight and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
        if client is not None:
            finished, _ = _bounded(client.stop, STOP_WAIT, "neonize-stop")
            if not finished:  # the connect thread is stuck in the same dial: do not wait for it either
                log.info("neonize did not stop within %g s (a dial in progress); leaving it behind", STOP_WAIT)
                return
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)

    def send(self, item: SendItem) -> dict[str, Any]:
        """Send a message of any §11 type; `message_id` cannot be honoured (whatsmeow makes its own: the
        one returned). Building it (reading and uploading media) fails before anything can go out."""
        if item.type not in ("text", "location", "reaction", *MEDIA_SENDS):
            raise BackendError(NOT_IMPLEMENTED, f"the neonize backend cannot send a {item.type}")
        client, nz = self._enter(need=states.CONNECTED)
        try:
            try:
                message = self._build(client, nz, item)
            except BackendError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug or bad fields: nothing went out, so not uncertain
                log.error("cannot build a %s message: %r", item.type, exc)
                raise BackendError(INTERNAL, f"cannot build the {item.type} message: {exc!r}") from None
            try:
                response = client.send_message(self._jid(nz, item.to), message)
            except Exception as exc:  # noqa: BLE001 - NeonizeError and friends become protocol errors
                raise _send_error(exc) from None
        finally:
            self._leave()
        return {"message_id": str(response.ID), "ts": epoch_seconds(response.Timestamp)}

    def fetch_media(self, handle: Any, write: Callable[[bytes], None]) -> None:
        """Download an inbound message's media (`handle`: its `_fetch`) with neonize's ``download_any``,
        bounded by `media_timeout`; the bytes go to `write` as slices of at most 1 MiB, not copied."""
        raw = _handle_bytes(handle)
        client, nz = self._enter(need=states.CONNECTED)
        try:
            try:
                message = nz.Message.FromString(raw)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
                raise BackendError(BAD_REQUEST, "not a neonize media handle (the message does not parse)") from None
            finished, result = self._go_bounded(lambda: client.download_any(message), "neonize-download")
        finally:
            self._leave()
        if not finished:
            raise BackendError(TIMEOUT, f"no media from WhatsApp within {self.media_timeout:g} s")
        if isinstance(result, Exception):
            raise self._media_error(result, "download") from None
        if not isinstance(result, (bytes, bytearray)):
            raise BackendError(INTERNAL, f"neonize returned {type(result).__name__}, not the media's bytes")
        view = memoryview(result)
        for start in range(0, len(view), CHUNK):
            write(view[start:start + CHUNK])  # type: ignore[arg-type] - a slice of the one copy, as bytes-like

    def mark_read(self, chat: str, message_ids: list[str], senders: dict[str, str]) -> None:
        """Read receipts, one call per sender (whatsmeow needs the sender of a group's messages; in a
        one-to-one chat, and for ids the journal does not know, it is the chat)."""
        by_sender: dict[str, list[str]] = {}
        for msg_id in message_ids:
            by_sender.setdefault(senders.get(msg_id) or chat, []).append(msg_id)
        client, nz = self._enter(need=states.CONNECTED)
        try:
            for sender, ids in by_sender.items():
                client.mark_read(*ids, chat=self._jid(nz, chat), sender=self._jid(nz, sender),
                                 receipt=nz.ReceiptType.READ)
        except Exception as exc:  # noqa: BLE001 - NeonizeError and friends become protocol errors
            raise _send_error(exc) from None
        finally:
            self._leave()

    def typing(self, chat: str, state: str) -> None:
        """composing and paused as they are; recording is composing with audio media (a voice note)."""
        client, nz = self._enter(need=states.CONNECTED)
        presence = nz.ChatPresence.CHAT_PRESENCE_PAUSED if state == "paused" else \
            nz.ChatPresence.CHAT_PRESENCE_COMPOSING
        media = nz.ChatPresenceMedia.CHAT_PRESENCE_MEDIA_AUDIO if state == "recording" else \
            nz.ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT
        try:
            client.send_chat_presence(self._jid(nz, chat), presence, media)
        except Exception as exc:  # noqa: BLE001
            raise _send_error(exc) from None
        finally:
            self._leave()

    def pair_code(self, phone: str) -> str:
        """A phone-number pair code; only while pairing, after the first QR (whatsmeow needs the socket)."""
        digits = phone_from_jid(phone)
        if not digits.isdigit():
            raise BackendError(INVALID_PHONE, "a pair code needs a phone number, not a JID")
        client, _ = self._enter(need=states.PAIRING)
        try:
            code = str(client.PairPhone(digits, True))
        except Exception as exc:  # noqa: BLE001
            message = str(exc) or type(exc).__name__
            code_ = NOT_CONNECTED if "not connected" in message.lower() else BAD_REQUEST
            raise BackendError(code_, f"WhatsApp refused the pair code: {message}") from None
        finally:
            self._leave()
        self.emit("pair_code", {"code": code})
        return code

    def logout(self) -> None:
        """Unlink on WhatsApp when connected, then stop and delete the store in any case."""
        with self._lock:
            client = self._client if self.phase == states.CONNECTED and not self._stopping.is_set() else None
            if client is not None:
                self._in_flight += 1
        unlinked = False
        if client is not None:
            try:
                finished, result = _bounded(client.logout, LOGOUT_WAIT, "neonize-logout")
            finally:
                self._leave()
            unlinked = finished and not isinstance(result, Exception)
            if not unlinked:
                why = result if finished else f"no answer within {LOGOUT_WAIT:g} s"
                log.warning("could not unlink the device on WhatsApp (%s); deleting the local session", why)
                self.emit("error", {"kind": "logout", "message": f"device not unlinked on WhatsApp: {why}"})
        self.stop()
        self._delete_store()
        self._exit("logged_out", message="logged out on request" if unlinked else
                   "local session deleted; remove the linked device on the phone")  # fmt: skip

    # ------------------------------------------------------------------ the connection thread

    def _run(self) -> None:
        try:
            self._prepare_store()
            if self.cluster is not None and not self._find_device():
                return
            client = self._new_client()
        except Fenced as exc:  # the lease moved on before this worker even started
            self._exit("fenced", message=str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - cannot even start: a crash, counted by the supervisor
            log.error("cannot start neonize: %s", exc)
            self._exit("crash", message=f"cannot start neonize: {exc}")
            return
        with self._lock:
            if self._stopping.is_set():
                return
            self._client = client
        assert self._nz is not None
        proxy = self._nz.ProxySettings(proxy_address=self.proxy) if self.proxy else None
        try:
            client.connect(proxy)  # blocks until stop() or a failure
        except self._nz.NeonizeError as exc:
            if not self._stopping.is_set():
                reason = describe_connect_error(str(exc))
                log.warning("connect failed: %s", reason)
                log.debug("connect error: %s", exc)
                self._exit("connect_failed", message=reason)
        except Exception as exc:  # noqa: BLE001 - a bug, not the network
            if not self._stopping.is_set():
                log.error("connect crashed: %r", exc)
                self._exit("crash", message=f"connect crashed: {exc!r}")
        else:
            if not self._stopping.is_set():
                self._exit("connect_failed", message="the connection ended unexpectedly")

    def _prepare_store(self) -> None:
        """The SQLite store is created 0600 before Go opens it (SQLite's journals copy its mode)."""
        if self.is_postgres:
            return
        fd = os.open(self.store, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)

    def _find_device(self) -> bool:
        """Cluster mode: whatsmeow's schema current (upgraded once), and this company's device known — or
        none yet (pair a new one). False when its device is gone from the store: reported as logged out."""
        dsn, epoch = self.cluster  # type: ignore[misc]
        neonizestore.ensure_schema(dsn, self.ctx.company, epoch)
        jid = self.device_record.load().get("jid")
        if not isinstance(jid, str) or not jid:
            return True
        if not neonizestore.device_exists(dsn, self.ctx.company, epoch, jid):
            log.warning("the WhatsApp device of this company is no longer in the store; it must pair again")
            self.device_record.delete()
            self._exit("logged_out", message="the device was unlinked (it is gone from the store): pair again")
            return False
        self.device_jid = jid
        with self._lock:
            self.phone = jid.split("@", 1)[0].split(":", 1)[0].split(".", 1)[0]
        return True

    def _remember_device(self, client: Any) -> None:
        """Cluster mode: the JID of the device just paired (or resumed), kept under the lease's epoch."""
        if self.cluster is None:
            return
        try:
            me = client.get_me()
            jid = neonizestore.jid_text(me.JID) if me is not None and me.HasField("JID") else ""
        except Exception as exc:  # noqa: BLE001 - asked again at the next connection
            log.warning("could not read this device's JID: %s", exc)
            return
        if not jid or jid == self.device_jid:
            return
        try:
            self.device_record.save({"jid": jid})
        except Fenced as exc:
            self._exit("fenced", message=str(exc))
            return
        except Unavailable as exc:  # kept for the next connection: a restart now would pair a second device
            log.error("could not record this device's JID (%s); trying again at the next connection", exc)
            self.emit("error", {"kind": "store", "message": f"device JID not recorded: {exc}"})
            return
        self.device_jid = jid

    def _new_client(self) -> Any:
        nz = self._nz = load_neonize()
        props = nz.DeviceProps(os=DEVICE_NAME, platformType=nz.DeviceProps.CHROME)
        if self.device_jid is not None:  # always this company's own device, never the store's first
            client = nz.NewClient(self.store, jid=neonizestore.parse_jid(self.device_jid, nz.JID), props=props,
                                  uuid=self.ctx.company)
        elif self.cluster is not None:  # no device yet: a new one, whatever others the store holds
            client = nz.NewClient(self.store, props=props, uuid=self.ctx.company, new_device=True)
        else:
            client = nz.NewClient(self.store, props=props, uuid=self.ctx.company)
        # neonize stops the client again at interpreter exit; during a dial that blocks ~60 s, and
        # stop() has done it (bounded) already.
        finalizer = getattr(client, "_stop_finalizer", None)
        if finalizer is not None:
            finalizer.atexit = False
        # The QR channel's end ("timeout", "success", "err-…") only reaches neonize's login-status
        # callback, which prints it; connect() looks it up on the instance, so ours replaces it.
        if hasattr(client, "_NewClient__onLoginStatus"):
            client._NewClient__onLoginStatus = self._login_status_callback
        client.event.qr(self._guarded(self.on_qr))
        for name, (event_class, _) in EVENTS.items():
            client.event(getattr(nz.events, event_class))(self.handlers[name])
        return client

    def _watch(self) -> None:
        while not self._stopping.is_set():
            if self._check_deadlines(time.monotonic()):
                return
            self._stopping.wait(self._next_wait(time.monotonic()))

    def _next_wait(self, now: float) -> float:
        deadlines = [d for d in (self._connect_deadline, self._pairing_deadline) if d is not None]
        return 1.0 if not deadlines else max(0.05, min(1.0, min(deadlines) - now))

    def _check_deadlines(self, now: float) -> bool:
        """The watchdog's check: True once the session has ended (an exit was reported)."""
        with self._lock:
            phase = self.phase
            connect_due = self._connect_deadline is not None and now >= self._connect_deadline
            pairing_due = self._pairing_deadline is not None and now >= self._pairing_deadline
        if phase == Phase.EXITED:
            return True
        if pairing_due:
            self._exit("pairing_timeout", message=f"not paired within {self.pairing_timeout:g} s")
            return True
        if connect_due:
            paired = phase == states.CONNECTING and self.phone
            why = "paired, but not connected" if paired else "no answer from WhatsApp"
            log.warning("connect failed: %s within %g s", why, self.connect_timeout)
            self._exit("connect_failed", message=f"{why} within {self.connect_timeout:g} s")
            return True
        return False

    # ------------------------------------------------------------------ calls from request threads

    def _enter(self, need: State) -> tuple[Any, SimpleNamespace]:
        """Admit a Go call from a request thread, or refuse it with a clear reason."""
        with self._lock:
            phase, client, nz = self.phase, self._client, self._nz
            if client is None or nz is None or self._stopping.is_set() or phase != need:
                if need == states.PAIRING:
                    if phase == states.CONNECTED:
                        raise BackendError(BAD_REQUEST, "already paired and connected: no pair code needed")
                    raise BackendError(
                        BAD_REQUEST, f"a pair code is available only while pairing, after the first QR code "
                                     f"(now {phase})")  # fmt: skip
                raise BackendError(NOT_CONNECTED, f"not connected to WhatsApp (now {phase})")
            if need == states.PAIRING and self.qr is None:
                raise BackendError(BAD_REQUEST, "a pair code is available only after the first QR code")
            self._in_flight += 1
        return client, nz

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._idle.notify_all()

    def _go_bounded(self, fn: Callable[[], Any], name: str) -> tuple[bool, Any]:
        """A Go call bounded by `media_timeout` that stays counted in flight until Go returns, also when
        we stop waiting for it (stop() lets calls in flight finish before neonize's Stop)."""
        with self._lock:
            self._in_flight += 1

        def run() -> Any:
            try:
                return fn()
            finally:
                self._leave()

        return _bounded(run, self.media_timeout, name)

    # ------------------------------------------------------------------ building messages to send

    def _build(self, client: Any, nz: SimpleNamespace, item: SendItem) -> Any:
        """The waE2E.Message of one send, with the quote of `reply_to` (media: read and uploaded here)."""
        e2e = nz.E2E
        context = self._quote(nz, item.quoted) if item.quoted is not None else None
        if item.type == "text":
            if context is None:
                return nz.Message(conversation=item.text)
            return nz.Message(extendedTextMessage=e2e.ExtendedTextMessage(text=item.text, contextInfo=context))
        if item.type == "location":
            location = e2e.LocationMessage(degreesLatitude=float(item.fields["latitude"]),
                                           degreesLongitude=float(item.fields["longitude"]))  # fmt: skip
            name = item.fields.get("name") or item.text
            if name:
                location.name = name
            if context is not None:
                location.contextInfo.CopyFrom(context)
            return nz.Message(locationMessage=location)
        if item.type == "reaction":
            return nz.Message(reactionMessage=self._reaction(nz, item))  # a reaction quotes nothing
        field, proto, media_type = MEDIA_SENDS[item.type]
        data = _read_media(item)
        upload = self._upload(client, data, getattr(nz.MediaType, media_type))
        media = getattr(e2e, proto)(
            URL=upload.url, directPath=upload.DirectPath, mediaKey=upload.MediaKey,
            fileEncSHA256=upload.FileEncSHA256, fileSHA256=upload.FileSHA256, fileLength=upload.FileLength,
            mimetype=_send_mimetype(item),
        )  # fmt: skip
        if item.text and item.type in CAPTIONED:
            media.caption = item.text
        if item.type == "document" and item.fields.get("filename"):
            media.fileName = item.fields["filename"]
        if item.type == "audio" and item.fields.get("voice"):
            media.PTT = True
        if item.type == "image" and (preview := image_preview(data)) is not None:
            media.JPEGThumbnail, media.width, media.height = preview
        if context is not None:
            media.contextInfo.CopyFrom(context)
        message = nz.Message()
        getattr(message, field).CopyFrom(media)
        return message

    def _upload(self, client: Any, data: bytes, media_type: Any) -> Any:
        """Encrypt and upload to WhatsApp's media servers; nothing has gone to the recipient yet."""
        finished, result = self._go_bounded(lambda: client.upload(data, media_type), "neonize-upload")
        if not finished:
            raise BackendError(INTERNAL, f"media upload: no answer from WhatsApp's media servers within "
                                         f"{self.media_timeout:g} s; nothing was sent")  # fmt: skip
        if isinstance(result, Exception):
            raise self._media_error(result, "upload") from None
        return result

    def _media_error(self, exc: Exception, what: str) -> BackendError:
        """An upload or download failure: not_connected only when the connection is down (an upload that
        fails sent nothing, so it is never `timeout`, which would make the send uncertain)."""
        message = " ".join((str(exc) or type(exc).__name__).split())
        low = message.lower()
        with self._lock:
            down = self.phase != states.CONNECTED or self._stopping.is_set()
        if down or "not connected" in low or "not logged in" in low:
            return BackendError(NOT_CONNECTED, f"not connected to WhatsApp (media {what}: {message})")
        if what == "upload":
            return BackendError(INTERNAL, f"media upload failed, nothing was sent: {describe_connect_error(message)}")
        if re.search(r"status code (404|410)\b", low):
            return BackendError(NOT_FOUND, "the media is no longer on WhatsApp's servers (expired or deleted)")
        if "didn't find any attachments" in low:
            return BackendError(BAD_REQUEST, "the message holds no media to download")
        if "timed out" in low or "deadline exceeded" in low or "timeout" in low:
            return BackendError(TIMEOUT, f"media download: no answer from WhatsApp ({_tail(message)})")
        return BackendError(INTERNAL, f"media download failed: {describe_connect_error(message)}")

    def _quote(self, nz: SimpleNamespace, quoted: dict[str, Any]) -> Any:
        """The ContextInfo of a reply: WhatsApp's id of the quoted message, its author, and a copy of it
        rebuilt from the journal (its type and text) for the preview the recipient sees."""
        e2e = nz.E2E
        author = self._author(quoted)
        kind, text = str(quoted.get("type") or "text"), str(quoted.get("text") or "")
        field, text_field = QUOTED_AS.get(kind, ("conversation", None))
        if field == "conversation":
            shown = e2e.Message(conversation=text)
        else:
            shown = e2e.Message()
            part = getattr(shown, field)
            part.SetInParent()
            if text_field and text:
                setattr(part, text_field, text)
        context = e2e.ContextInfo(stanzaID=str(quoted["id"]), quotedMessage=shown)
        if author:
            context.participant = author
        return context

    def _author(self, ref: dict[str, Any]) -> str:
        """The JID of who wrote a journaled message: us (own number), else its sender, else its chat."""
        if ref.get("from_me"):
            return _jid_string(self.phone) if self.phone else ""
        return _jid_string(str(ref.get("from") or ref.get("chat") or ""))

    def _reaction(self, nz: SimpleNamespace, item: SendItem) -> Any:
        """A reactionMessage keyed as whatsmeow's BuildMessageKey does: the chat, fromMe, WhatsApp's id,
        and in a group the author of a message that is not ours."""
        target = item.target
        if target is None:
            raise BackendError(NOT_FOUND, "the message to react to is no longer in the journal")
        chat = _jid_string(str(target.get("chat") or item.to))
        from_me = bool(target.get("from_me"))
        key = nz.MessageKey(remoteJID=chat, fromMe=from_me, ID=str(target["id"]))
        if not from_me and chat.partition("@")[2] not in PERSONAL_SERVERS and target.get("from"):
            key.participant = _jid_string(str(target["from"]))
        return nz.E2E.ReactionMessage(key=key, text=str(item.fields.get("emoji") or ""),
                                      senderTimestampMS=int(time.time() * 1000))  # fmt: skip

    @staticmethod
    def _jid(nz: SimpleNamespace, to: str) -> Any:
        user, at, server = to.partition("@")
        return nz.JID(User=user.split(":", 1)[0], Server=server if at else "s.whatsapp.net",
                      RawAgent=0, Device=0, Integrator=0, IsEmpty=False)  # fmt: skip

    def _delete_store(self) -> None:
        if self.device_record is not None:
            try:
                self.device_record.delete()  # the next start pairs a new device
            except (Fenced, Unavailable) as exc:
                log.warning("could not forget this device's JID: %s", exc)
        if self.is_postgres:
            return  # whatsmeow deleted the device rows when the unlink succeeded
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(self.store + suffix)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ reports

    def _exit(self, reason: str, **extra: Any) -> None:
        """Report the end of the session once; the first exit wins."""
        with self._lock:
            if self.phase == Phase.EXITED:
                return
            self.phase = Phase.EXITED
            self._connect_deadline = self._pairing_deadline = None
        self.emit("exit", {"reason": reason, **{k: v for k, v in extra.items() if v is not None}})

    def _set_phase(self, phase: State, reason: str, *, only_from: tuple[State, ...] = ()) -> bool:
        with self._lock:
            if self.phase == Phase.EXITED or (only_from and self.phase not in only_from):
                return False
            self.phase = phase
            if phase == states.CONNECTED:
                self._connect_deadline = self._pairing_deadline = None
                self.qr = None
            phone = self.phone
        data: dict[str, Any] = {"state": phase, "reason": reason}
        if phone:
            data["phone"] = phone
        self.emit("state", data)
        return True

    def _guarded(self, handler: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        """A handler as neonize calls it: never after stop(), never raising into Go's callback."""

        def run(client: Any, event: Any) -> None:
            if self._stopping.is_set():
                return
            try:
                handler(client, event)
            except Exception as exc:  # noqa: BLE001 - one line, not a traceback per event
                log.error("%s failed on %s: %r", handler.__name__, type(event).__name__, exc)
                log.debug("handler failure", exc_info=True)
                self.emit("error", {"kind": "handler", "message": f"{handler.__name__}: {exc!r}"[:500]})

        run.__name__ = handler.__name__
        return run

    def deliver(self, client: Any, event: Any) -> None:
        """Hand one neonize event to its registered handler (how neonize calls us; tests too)."""
        handler = self.handlers.get(type(event).__name__)
        if handler is not None:
            handler(client, event)

    # ------------------------------------------------------------------ handlers (neonize's thread)

    def on_qr(self, _client: Any, data: bytes | str) -> None:
        """Each QR code (6, ~160 s): state pairing; the pairing deadline starts with the first."""
        code = data.decode() if isinstance(data, bytes) else str(data)
        with self._lock:
            if self.phase == Phase.EXITED:
                return
            self.qr = code
            self.phase = states.PAIRING
            self._connect_deadline = None
            if self._pairing_deadline is None:
                self._pairing_deadline = time.monotonic() + self.pairing_timeout
        self.emit("qr", {"code": code})
        self.emit("state", {"state": states.PAIRING,
                            "reason": "waiting for the QR code to be scanned (or a pair code)"})

    def on_login_event(self, event: str) -> None:
        """The end of the QR channel: "success", "timeout" (codes exhausted) or "err-…"."""
        if event == "success":
            log.info("pairing succeeded")
        elif event == "timeout":
            self._exit("pairing_timeout", message="the QR codes expired without a scan")
        elif event == "err-client-outdated":
            self._exit("outdated", message="WhatsApp refused pairing: client outdated")
        else:
            self.emit("error", {"kind": "pairing", "message": f"pairing: {event}"})

    def _login_status_callback(self, _uuid: Any, status: Any) -> None:
        if self._stopping.is_set():
            return
        try:
            text = ctypes.string_at(status).decode(errors="replace") if isinstance(status, int) else str(status)
            self.on_login_event(text)
        except Exception as exc:  # noqa: BLE001 - never raise into Go
            log.error("login status callback failed: %r", exc)

    def on_pair_status(self, _client: Any, ev: Any) -> None:
        if ev.HasField("Status") and ev.Status == ev.SUCCESS:
            phone = ev.ID.User if ev.HasField("ID") else ""
            with self._lock:
                if self.phase == Phase.EXITED:
                    return
                self.phone = phone or self.phone
                self._pairing_deadline = None
                self.qr = None
                # WhatsApp restarts the stream after pairing: Connected follows, within the bound.
                self._connect_deadline = time.monotonic() + self.connect_timeout
            log.info("paired as %s", mask_phone(phone) if phone else "?")
            self._set_phase(states.CONNECTING, "paired; connecting")
        else:
            error = ev.Error if ev.HasField("Error") and ev.Error else "pairing failed"
            log.warning("pairing failed: %s", error)
            self.emit("error", {"kind": "pairing", "message": error})

    def on_connected(self, client: Any, _ev: Any) -> None:
        phone = _own_phone(client)
        with self._lock:
            self.phone = phone or self.phone
        self._remember_device(client)
        self._set_phase(states.CONNECTED, "")

    def on_disconnected(self, _client: Any, _ev: Any) -> None:
        self._set_phase(states.DISCONNECTED, "connection lost; reconnecting", only_from=(states.CONNECTED,))

    def on_keepalive_timeout(self, _client: Any, ev: Any) -> None:
        count = ev.ErrorCount if ev.HasField("ErrorCount") else 1
        self._set_phase(states.DISCONNECTED, f"keepalive timeout ({count} missed); waiting for WhatsApp",
                        only_from=(states.CONNECTED, states.DISCONNECTED))  # fmt: skip

    def on_keepalive_restored(self, _client: Any, _ev: Any) -> None:
        self._set_phase(states.CONNECTED, "", only_from=(states.DISCONNECTED,))

    def on_logged_out(self, _client: Any, ev: Any) -> None:
        why = _enum_name(ev, "Reason").lower()
        when = "at connect" if ev.HasField("OnConnect") and ev.OnConnect else "while connected"
        self._exit("logged_out", message=f"device unlinked {when}" + (f" ({why})" if why else ""))

    def on_stream_replaced(self, _client: Any, _ev: Any) -> None:
        self._exit("replaced", message="another client connected with this session")

    def on_client_outdated(self, _client: Any, _ev: Any) -> None:
        self._exit("outdated", message="WhatsApp refused this client version: update neonize")

    def on_temporary_ban(self, _client: Any, ev: Any) -> None:
        expire = ev.Expire if ev.HasField("Expire") else 0  # seconds from now
        why = _enum_name(ev, "Code").lower()
        until = time.time() + expire if expire > 0 else None
        self._exit("banned", until=until, message="temporarily banned" + (f" ({why})" if why else ""))

    def on_connect_failure(self, _client: Any, ev: Any) -> None:
        reason = _enum_name(ev, "Reason")
        detail = ev.Message if ev.HasField("Message") and ev.Message else reason.lower() or "unknown reason"
        if reason in FAILURE_EXITS:
            self._exit(FAILURE_EXITS[reason], message=f"WhatsApp refused the connection ({detail})")
        elif reason in FAILURE_RETRIED:
            self._set_phase(states.DISCONNECTED, f"WhatsApp unavailable ({detail}); reconnecting")
        else:
            self._exit("connect_failed", message=f"WhatsApp refused the connection ({detail})")

    def on_stream_error(self, _client: Any, ev: Any) -> None:
        code = ev.Code if ev.HasField("Code") else "?"
        self.emit("error", {"kind": "stream_error", "message": f"WhatsApp stream error {code}"})

    def on_message(self, _client: Any, ev: Any) -> None:
        info = ev.Info
        source = info.MessageSource
        chat, sender = source.Chat, source.Sender
        # Hidden-number (LID) addressing: the phone number, when WhatsApp gives it, is the alt JID.
        if sender.Server == "lid" and source.HasField("SenderAlt") and source.SenderAlt.Server in PHONE_SERVERS:
            sender = source.SenderAlt
        if not source.IsGroup and chat.Server == "lid" and sender.Server in PHONE_SERVERS and not source.IsFromMe:
            chat = sender
        msg = normalize_message(
            msg_id=info.ID,
            chat=chat,
            sender=sender,
            content=ev.Message if ev.HasField("Message") else None,
            push_name=info.Pushname,
            ts=info.Timestamp if info.HasField("Timestamp") else None,
            is_group=source.IsGroup,
            from_me=source.IsFromMe,
        )
        if msg is None:
            return
        # whatsmeow sends the delivery receipt when this handler returns (message.go: handleDecryptedMessage,
        # then sendMessageReceipt): hold it back until the worker has journaled the message, so a crash in
        # between leaves WhatsApp redelivering it rather than believing it delivered.
        done = threading.Event()
        with self._lock:
            self._unjournaled[msg["id"]] = done
        try:
            self.emit("message", msg)
            if not done.wait(JOURNAL_WAIT):
                log.warning("message %s not journaled within %g s; WhatsApp hears it arrived anyway",
                            msg["id"], JOURNAL_WAIT)
        finally:
            with self._lock:
                self._unjournaled.pop(msg["id"], None)

    def journaled(self, ids: list[str]) -> None:
        with self._lock:
            waiting = [self._unjournaled.get(i) for i in ids]
        for done in waiting:
            if done is not None:
                done.set()

    def on_receipt(self, _client: Any, ev: Any) -> None:
        ids = [str(i) for i in ev.MessageIDs]
        if not ids:
            return
        kind = _enum_name(ev, "Type").lower() or "unknown"  # unset enums read as DELIVERED: not trusted
        self.emit("receipt", {"ids": ids, "type": kind, "chat": phone_from_jid(ev.MessageSource.Chat)})


def _enum_name(ev: Any, field: str) -> str:
    """An enum field's name, or "" when unset (proto2 reads an unset enum as its first value)."""
    if not ev.HasField(field):
        return ""
    value = getattr(ev, field)
    try:
        return str(ev.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[value].name)
    except (KeyError, AttributeError):
        return str(value)


def _own_phone(client: Any) -> str:
    """Our own number: neonize's cached device (sent before any event), else ask Go."""
    me = getattr(client, "me", None)
    if me is None or not me.HasField("JID"):
        try:
            me = client.get_me()
        except Exception:  # noqa: BLE001 - the phone is a nicety in the state report
            return ""
    return str(me.JID.User) if me is not None and me.HasField("JID") else ""


PERSONAL_SERVERS = PHONE_SERVERS | {"lid"}  # one-to-one chats: a reaction's key names no participant


def _jid_string(who: str) -> str:
    """A JID as WhatsApp writes it in keys and quotes: phone digits on s.whatsapp.net, others whole."""
    user, at, server = who.partition("@")
    return f"{user.split(':', 1)[0]}@{server}" if at else f"{who}@s.whatsapp.net" if who else ""


def _read_media(item: SendItem) -> bytes:
    """The stored file of a media send, read once."""
    media = str(item.fields.get("media") or "")[:12]
    if not item.media_path:
        raise BackendError(NOT_FOUND, f"media {media}… cannot be read: this worker has no media store")
    try:
        with open(item.media_path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise BackendError(NOT_FOUND, f"media {media}… is no longer in the store") from None
    except OSError as exc:
        raise BackendError(INTERNAL, f"media {media}… cannot be read: {exc.strerror or exc}") from None


def _send_mimetype(item: SendItem) -> str:
    """The stored type; a voice note is Opus in Ogg, which WhatsApp's apps want named with its codec."""
    mimetype = str(item.fields.get("mimetype") or "application/octet-stream")
    if item.type == "audio" and item.fields.get("voice") and mimetype == "audio/ogg":
        return "audio/ogg; codecs=opus"
    return mimetype


def image_preview(data: bytes) -> tuple[bytes, int, int] | None:
    """(JPEG thumbnail, width, height) of an image, shown before it is downloaded; None when Pillow (a
    neonize dependency) cannot read it or it is too large to decode quickly: the image goes without."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > THUMB_MAX_PIXELS:
                return None
            img.draft("RGB", (THUMB_EDGE, THUMB_EDGE))  # JPEG: decode at a reduced scale
            img.thumbnail((THUMB_EDGE, THUMB_EDGE))
            out = io.BytesIO()
            img.convert("RGB").save(out, format="JPEG", quality=60)
        return out.getvalue(), width, height
    except Exception:  # noqa: BLE001 - a preview is a nicety; the image is sent without one
        return None


def _handle_bytes(handle: Any) -> bytes:
    """The serialized message a `_fetch` handle (`workers.inbound.media_handle`) carries."""
    encoded = handle.get("message") if isinstance(handle, dict) else None
    if not isinstance(encoded, str) or not encoded:
        raise BackendError(BAD_REQUEST, "not a neonize media handle (no message to download the media of)")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BackendError(BAD_REQUEST, "not a neonize media handle (bad base64)") from None


def _send_error(exc: Exception) -> BackendError:
    """Map whatsmeow's send errors: not_connected only when nothing can have gone out."""
    message = str(exc) or type(exc).__name__
    low = message.lower()
    if "not connected" in low or "not logged in" in low or "doesn't contain a device jid" in low:
        return BackendError(NOT_CONNECTED, f"not connected to WhatsApp: {message}")
    if "timed out" in low or "deadline" in low or "timeout" in low:
        return BackendError(TIMEOUT, f"no answer from WhatsApp: {message}")
    return BackendError(INTERNAL, f"WhatsApp refused the message: {message}")
