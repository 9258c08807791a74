"""The `sim` backend: a worker's session on the simulated WhatsApp network (workers/simnet.py).

It runs inside the worker's loop (`runs_inline`): the loop polls `loop_sockets()`, calls
`loop_step` every turn and sends with `send_async`, so a message costs no thread hand-off, and
the loop's thread is the one that owns the ZeroMQ DEALER socket (zmq sockets are not
thread-safe). Calls from other threads (the worker's request threads: pair_code, logout; and
the blocking send_text) are queued as closures that run on the loop's thread, woken through a
pipe; their results come back through `concurrent.futures.Future`.
Every connection attempt uses a fresh socket, so a stale reply can never be mistaken for a
new one and the network sees each attempt as a new peer.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import zmq

from ipc import jsonsafe, states
from ipc.errors import BAD_REQUEST, INTERNAL, NOT_CONNECTED, NOT_FOUND, TIMEOUT
from ipc.protocol import aligned_delay
from ipc.richmessage import INBOUND_FIELDS
from ipc.states import State
from ipc.zsocket import readable
from workers.backend import Backend, BackendError, Emit, Outcome, Phase, SendItem, WorkerContext
from workers.inbound import normalize_message
from workers.simcreds import Fenced, Unavailable, Unreadable, store_for
from workers.wakeup import Wakeup

log = logging.getLogger("waport.sim")

CREDS_FILE = "sim-creds.json"
HEARTBEAT_INTERVAL = 1.0
SILENCE_TIMEOUT = 3.0  # no reply at all for this long: the network is gone
REQUEST_TIMEOUT = 10.0
BYE_WAIT = 0.3
BACKOFF_MIN = 0.2
BACKOFF_MAX = 5.0
MEDIA_CHUNK = 1 << 20  # the most bytes of media one frame carries, either way
SAVE_RETRY = 2.0  # seconds between tries to store a fresh pairing's credentials while PostgreSQL is away
SEND_FIELDS = ("mimetype", "filename", "voice", "latitude", "longitude", "name", "emoji")

# The hello's answer `{"status": ...}` when the network knows our token (else "pairing"): the
# network's protocol (workers/simnet.py), not a session state.
HELLO_CONNECTED = "connected"
ON_NETWORK = (states.PAIRING, states.CONNECTED)  # the network answered: heartbeats run, a drop is a loss

Reply = dict[str, Any]
# What a waiting caller gets when the connection closes under its request: sent or not is unknown.
CLOSED_REPLY: Reply = {
    "ok": False,
    "error": {"code": TIMEOUT, "message": "connection lost before the answer"},
}
TIMEOUT_REPLY: Reply = {
    "ok": False,
    "error": {"code": TIMEOUT, "message": f"the network did not answer within {REQUEST_TIMEOUT:g} s"},
}


class SimBackend(Backend):
    """A session on the simulated network: pairing, reconnects with backoff, faults as exits."""

    send_window = 32  # requests are pipelined on the one connection, as whatsmeow's are
    runs_inline = True

    def __init__(self, ctx: WorkerContext, emit: Emit) -> None:
        super().__init__(ctx, emit)
        endpoint = ctx.options.get("sim_endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise ValueError("the sim backend needs the option sim_endpoint")
        self.endpoint = endpoint
        self.pairing_timeout = float(ctx.options.get("pairing_timeout") or 170)
        self.connect_timeout = float(ctx.options.get("connect_timeout") or 5)
        # The session file, or PostgreSQL in cluster mode (options cluster_dsn, a secret, and epoch).
        self.creds = store_for(ctx.company, ctx.session_dir, ctx.options, CREDS_FILE)
        self._unsaved: dict[str, Any] | None = None  # paired, but PostgreSQL was away: saved at _save_retry_at
        self._save_retry_at: float | None = None
        # The session state last reported (connecting: the first hello in flight), or exited.
        self.phase: State | Phase = states.CONNECTING
        self._stopping = threading.Event()
        self._calls: queue.SimpleQueue[tuple[Callable[[Future[Any]], None], Future[Any]]] = queue.SimpleQueue()
        self._calls_lock = threading.Lock()
        self._to_ack: queue.SimpleQueue[str] = queue.SimpleQueue()  # journaled inbound ids (`journaled`)
        self._accepting = False
        self._wakeup: Wakeup | None = None  # from start(): wakes the loop for calls from other threads
        self._growing = False  # the grow_bytes_per_s test knob has begun
        # Owned by the loop's thread from here on.
        self._zctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[float, Callable[[Reply], None], bool]] = {}
        self._answered = False  # the network answered a hello once: failures are now reconnects
        self._hello_deadline: float | None = None
        self._retry_at: float | None = None
        self._attempt = 0
        self._failures = 0
        self._next_heartbeat = 0.0
        self._last_heard = 0.0
        self._pairing_deadline: float | None = None
        self._loop_thread: int | None = None

    # ------------------------------------------------------------------ Backend interface

    def start(self) -> None:
        """On the loop's thread: the first hello goes out; the loop drives the rest (`loop_step`)."""
        if self._wakeup is not None or self._stopping.is_set():
            return
        self._wakeup = Wakeup()
        self._loop_thread = threading.get_ident()
        with self._calls_lock:
            self._accepting = True
        self._zctx = zmq.Context.instance()  # the worker's: one I/O thread for both sockets
        self._guarded(self._begin)

    def stop(self) -> None:
        """On the loop's thread, after its last turn: a bye to the network, then everything closes."""
        self._stopping.set()
        if self._unsaved is not None:  # the device exists on the network; its token is lost with us
            log.error("stopping with the credentials of a fresh pairing not stored: the next start pairs again")
        if self.phase != Phase.EXITED:
            self._guarded(self._say_bye)
        self._finish()
        if self._wakeup is not None:
            self._wakeup.close()

    # ------------------------------------------------------------------ the worker's loop drives

    def loop_sockets(self) -> list[Any]:
        """What the loop polls for us: the wake pipe (calls from other threads) and the connection."""
        if self._wakeup is None or self._wakeup.r < 0:
            return []
        return [self._wakeup.r] if self._sock is None else [self._wakeup.r, self._sock]

    def loop_step(self, ready: Any) -> float:
        """One turn of the connection after the loop's poll; the seconds until it needs another."""
        wakeup = self._wakeup
        if wakeup is not None and self.phase != Phase.EXITED and not self._stopping.is_set():
            self._guarded(lambda: self._step(wakeup.r in ready))
        return self._poll_timeout_ms() / 1000

    def send_async(self, items: list[SendItem], done: Callable[[list[Outcome]], None]) -> None:
        """On the loop's thread: the requests go out now; `done(outcomes)` once all are answered."""
        if self.phase != states.CONNECTED:
            done(self._not_connected(len(items)))
            return
        replies: dict[int, Reply] = {}  # every request is answered once: by the network, a close or its deadline

        def settle(i: int, reply: Reply) -> None:
            replies[i] = reply
            if len(replies) == len(items):
                done([_send_outcome(replies[k]) for k in range(len(items))])

        for i, item in enumerate(items):
            args: dict[str, Any] = {"to": item.to, "text": item.text}
            if item.message_id:
                args["id"] = item.message_id
            if item.type != "text":
                args["type"] = item.type
                args.update({k: item.fields[k] for k in SEND_FIELDS if k in item.fields})
            if item.quoted is not None:
                args["reply_to"] = item.quoted["id"]
            if item.target is not None:
                args["reaction_to"] = item.target["id"]
            try:
                attach = media_frames(item)
            except BackendError as exc:
                settle(i, {"ok": False, "error": {"code": exc.code, "message": exc.message}})
                continue
            self._request("send", args, functools.partial(settle, i), caller=True, attach=attach)

    def _not_connected(self, count: int) -> list[dict[str, Any] | Exception]:
        return [BackendError(NOT_CONNECTED, f"not connected (state {self.phase})")] * count

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # a bug: report it the way the worker expects, never hang
            log.exception("sim backend failed")
            self.emit("error", {"kind": "crash", "message": repr(exc)})
            self._exit("crash", message=repr(exc))

    def send(self, item: SendItem) -> dict[str, Any]:
        outcome = self.send_many([item])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def send_many(self, items: list[SendItem]) -> list[Outcome]:
        """From another thread: `send_async` on the loop's thread, waiting for all the answers."""
        if self.phase != states.CONNECTED:
            return self._not_connected(len(items))
        outcomes: list[Outcome] = []

        def run(fut: Future[Any]) -> None:
            def done(results: list[Outcome]) -> None:
                outcomes.extend(results)
                if not fut.done():
                    fut.set_result(None)

            self.send_async(items, done)

        try:
            self._submit(run).result(REQUEST_TIMEOUT + 1)  # every request is answered by its deadline
        except BackendError as exc:
            return [exc] * len(items)
        except FutureTimeout:
            return [BackendError(TIMEOUT, f"the network did not answer send within {REQUEST_TIMEOUT:g} s")] * len(items)
        return outcomes

    def logout(self) -> None:
        """Unlink on the network when connected; the credentials go in any case, then exit logged_out."""
        try:
            self._submit(self._logout_on_loop).result(5.0)
        except (BackendError, FutureTimeout):
            pass  # not running, or no answer: unlink locally anyway, pairing starts afresh
        self._delete_creds()

    def mark_read(self, chat: str, message_ids: list[str], senders: dict[str, str]) -> None:
        self._call("read", {"chat": chat, "ids": message_ids}, need=states.CONNECTED)

    def typing(self, chat: str, state: str) -> None:
        self._call("typing", {"chat": chat, "state": state}, need=states.CONNECTED)

    def journaled(self, ids: list[str]) -> None:
        """The network's `ack` goes out on the loop's next turn (now, when called from the loop)."""
        for msg_id in ids:
            self._to_ack.put(msg_id)
        if threading.get_ident() == self._loop_thread:
            self._guarded(self._send_acks)
        elif self._wakeup is not None:
            self._wakeup.poke()

    def _send_acks(self) -> None:
        ids: list[str] = []
        while not self._to_ack.empty():
            ids.append(self._to_ack.get_nowait())
        if ids and self._sock is not None:  # without a connection the network redelivers them: acked then
            self._request("ack", {"company": self.ctx.company, "ids": ids}, _ignore)

    def fetch_media(self, handle: Any, write: Callable[[bytes], None]) -> None:
        """Chunk after chunk from the network, each request bounded by REQUEST_TIMEOUT."""
        msg_id = handle.get("id") if isinstance(handle, dict) else None
        if not isinstance(msg_id, str):
            raise BackendError(BAD_REQUEST, "no message id to download the media of")
        offset = 0
        while True:
            result = self._call("download", {"id": msg_id, "offset": offset}, need=states.CONNECTED)
            for chunk in result.get("_data") or ():
                write(chunk)
                offset += len(chunk)
            if result.get("eof") or not result.get("_data") or not len(result["_data"][0]):
                return

    def pair_code(self, phone: str) -> str:
        if self.phase != states.PAIRING:
            raise BackendError(BAD_REQUEST, f"a pair code is only available while pairing (state {self.phase})")
        code = str(self._call("pair_code", {"phone": phone}, need=states.PAIRING)["code"])
        self.emit("pair_code", {"code": code})
        return code

    # ------------------------------------------------------------------ calls from other threads

    def _call(self, cmd: str, args: dict[str, Any], need: State, timeout: float = REQUEST_TIMEOUT) -> Reply:
        """Run a request on the loop's thread and wait for the network's answer."""

        def run(fut: Future[Any]) -> None:
            if self.phase != need:
                fut.set_exception(BackendError(NOT_CONNECTED, f"not {need} (state {self.phase})"))
                return
            self._request(cmd, args, lambda reply: _settle(fut, reply), caller=True)

        fut = self._submit(run)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            raise BackendError(TIMEOUT, f"the network did not answer {cmd} within {timeout:g} s") from None

    def _logout_on_loop(self, fut: Future[Any]) -> None:
        def done(_reply: Reply) -> None:
            self._delete_creds()
            self._exit("logged_out")
            if not fut.done():
                fut.set_result(None)

        if self.phase == states.CONNECTED:
            self._request("logout_device", {}, done, caller=True)
        else:
            done({})

    def _submit(self, fn: Callable[[Future[Any]], None]) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._calls_lock:
            if not self._accepting:
                raise BackendError(NOT_CONNECTED, "the sim backend is not running")
            self._calls.put((fn, fut))
            assert self._wakeup is not None  # accepting: started, not stopped
            self._wakeup.poke()
        return fut

    # ------------------------------------------------------------------ on the loop's thread

    def _begin(self) -> None:
        self.emit("state", {"state": states.CONNECTING, "reason": ""})
        self._open()

    def _finish(self) -> None:
        with self._calls_lock:
            self._accepting = False
        self._drain_calls(run=False)
        self._close_socket()
        self.phase = Phase.EXITED

    def _step(self, woken: bool) -> None:
        if woken and self._wakeup is not None:
            self._wakeup.drain()  # before the calls are drained: a call queued from now on pokes again
        self._drain_calls(run=True)
        self._send_acks()
        sock = self._sock
        while sock is not None and sock is self._sock and readable(sock):
            self._on_frame(sock.recv_multipart(copy=False))
        self._check_timers(time.monotonic())

    def _poll_timeout_ms(self) -> int:
        deadlines = [d for d in (self._hello_deadline, self._retry_at, self._pairing_deadline, self._save_retry_at)
                     if d is not None]
        if self.phase in ON_NETWORK:
            deadlines += [self._next_heartbeat, self._last_heard + SILENCE_TIMEOUT]
        if not deadlines:
            return 1000
        return max(0, min(1000, int((min(deadlines) - time.monotonic()) * 1000) + 1))

    def _drain_calls(self, run: bool) -> None:
        while not self._calls.empty():  # only the loop's thread takes calls out
            fn, fut = self._calls.get_nowait()
            if not run:
                fut.set_exception(BackendError(NOT_CONNECTED, "the sim backend stopped"))
                continue
            try:
                fn(fut)
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(BackendError(INTERNAL, repr(exc)))

    def _check_timers(self, now: float) -> None:
        if self._hello_deadline is not None and now >= self._hello_deadline:
            self._hello_deadline = None
            self._attempt_failed(f"no answer from {self.endpoint} within {self.connect_timeout:g} s")
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self._open()
        if self.phase in ON_NETWORK:
            if now - self._last_heard > SILENCE_TIMEOUT:
                self._lost("connection lost: no answer from the network")
            elif now >= self._next_heartbeat:
                self._next_heartbeat = now + aligned_delay(HEARTBEAT_INTERVAL)
                self._request("heartbeat", {}, self._on_heartbeat)
        if self._save_retry_at is not None and now >= self._save_retry_at and self._unsaved is not None:
            self._save_creds(self._unsaved)
        if self._pairing_deadline is not None and now >= self._pairing_deadline and self.phase != Phase.EXITED:
            self._exit("pairing_timeout", message=f"not paired within {self.pairing_timeout:g} s")
        for req_id, (deadline, on_reply, caller) in list(self._pending.items()):
            if now > deadline:
                del self._pending[req_id]
                if caller:  # a blocking caller gave up already; an asynchronous one hears it now
                    on_reply(TIMEOUT_REPLY)

    # ------------------------------------------------------------------ connection attempts

    def _open(self) -> None:
        """A fresh socket and a hello; the answer decides between connected, pairing and exit."""
        assert self._zctx is not None
        self._close_socket()
        try:
            token = self._load_creds().get("token")
        except Fenced as exc:
            self._exit("fenced", message=str(exc))
            return
        except Unavailable as exc:  # never "no credentials": pairing now would make a second device
            self._exit("database_unavailable", message=f"cannot read the credentials: {exc}")
            return
        sock = self._zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        self._sock = sock
        self._attempt += 1
        args: dict[str, Any] = {"company": self.ctx.company}
        if token:
            args["token"] = token
        self._hello_deadline = time.monotonic() + self.connect_timeout
        self._request("hello", args, self._on_hello)

    def _on_hello(self, reply: Reply) -> None:
        self._hello_deadline = None
        if not reply.get("ok"):
            error = reply.get("error") or {}
            reason = error.get("reason")
            if reason == "logged_out":
                self._delete_creds()
                self._exit("logged_out", message=error.get("message", ""))
            elif reason == "banned":
                self._exit("banned", until=error.get("until"), message=error.get("message", ""))
            else:
                self._attempt_failed(error.get("message") or "refused")
            return
        result = reply.get("result") or {}
        now = time.monotonic()
        self._answered = True
        self._failures = 0
        self._last_heard = now
        self._next_heartbeat = now + HEARTBEAT_INTERVAL
        if result.get("status") == HELLO_CONNECTED:
            self._connected(str(result.get("phone", "")))
        else:
            self.phase = states.PAIRING
            if self._pairing_deadline is None:
                self._pairing_deadline = now + self.pairing_timeout
            self.emit("qr", {"code": str(result.get("qr", ""))})
            self.emit("state", {"state": states.PAIRING, "reason": "waiting for QR scan"})

    def _connected(self, phone: str) -> None:
        log.info("connected as %s", phone)  # the log formatter masks the number
        grow = int(self.ctx.options.get("grow_bytes_per_s") or 0)
        if grow > 0 and not self._growing:  # a test knob: a session whose memory grows, for memory_limit
            self._growing = True  # (once connected: a slow connect is not cut short by the limit)
            threading.Thread(target=_grow, args=(grow, self._stopping), name="sim-grow", daemon=True).start()
        self.phase = states.CONNECTED
        self._pairing_deadline = None
        self.emit("state", {"state": states.CONNECTED, "reason": "", "phone": phone})

    def _attempt_failed(self, error: str) -> None:
        """The first attempt failing ends the worker; later ones retry with backoff, forever."""
        self._close_socket()
        if not self._answered:
            self._exit("connect_failed", message=error)
            return
        self.emit("reconnect_failed", {"attempt": self._attempt, "error": error})
        self._schedule_retry()

    def _lost(self, reason: str) -> None:
        log.warning("connection lost: %s; reconnecting", reason)
        self._close_socket()
        self.phase = states.DISCONNECTED
        self.emit("state", {"state": states.DISCONNECTED, "reason": reason})
        self._attempt = 0
        self._failures = 0
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        self._retry_at = time.monotonic() + min(BACKOFF_MAX, BACKOFF_MIN * 2**self._failures)
        self._failures += 1

    def _exit(self, reason: str, **extra: Any) -> None:
        if self.phase == Phase.EXITED:
            return
        self.phase = Phase.EXITED
        self._hello_deadline = self._retry_at = self._pairing_deadline = None
        self._close_socket()
        self.emit("exit", {"reason": reason, **{k: v for k, v in extra.items() if v is not None}})

    def _say_bye(self) -> None:
        """Tell the network we leave, so it frees the session at once; wait briefly for the answer."""
        if self._sock is None or self.phase not in ON_NETWORK:
            return
        answered: list[Reply] = []  # all on the loop's thread: a flag, no event
        self._request("bye", {}, answered.append)
        deadline = time.monotonic() + BYE_WAIT
        while not answered and self._sock is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                break
            self._on_frame(self._sock.recv_multipart(copy=False))

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        pending, self._pending = self._pending, {}
        for _, on_reply, caller in pending.values():
            if caller:  # a waiting caller learns the outcome is unknown; internal requests just end
                on_reply(CLOSED_REPLY)

    # ------------------------------------------------------------------ frames

    def _request(self, cmd: str, args: dict[str, Any], on_reply: Callable[[Reply], None], caller: bool = False,
                 attach: list[Any] | None = None) -> None:
        """One request; `attach`: buffers sent after it as frames of their own, not copied (a send's media)."""
        if self._sock is None:
            on_reply({"ok": False, "error": {"code": NOT_CONNECTED, "message": "no connection"}})
            return
        req_id = str(next(self._ids))
        self._pending[req_id] = (time.monotonic() + REQUEST_TIMEOUT, on_reply, caller)
        body = json.dumps({"id": req_id, "cmd": cmd, "args": args}).encode()
        if attach:
            self._sock.send_multipart([body, *attach], copy=False)
        else:
            self._sock.send(body)

    def _on_frame(self, frames: list[zmq.Frame]) -> None:
        self._last_heard = time.monotonic()
        try:
            msg = jsonsafe.loads(frames[0].bytes)
        except jsonsafe.InvalidJSON:
            self.emit("error", {"kind": "protocol", "message": "undecodable frame from the network"})
            return
        if not isinstance(msg, dict):
            return
        if "event" in msg:
            self._on_push(str(msg["event"]), msg.get("data") or {})
            return
        entry = self._pending.pop(str(msg.get("id")), None)
        if entry is not None:
            if len(frames) > 1 and isinstance(msg.get("result"), dict):
                msg["result"]["_data"] = [f.buffer for f in frames[1:]]  # a download's chunk, not copied
            entry[1](msg)

    def _on_heartbeat(self, reply: Reply) -> None:
        if not reply.get("ok") and (reply.get("error") or {}).get("code") == NOT_CONNECTED:
            self._lost("connection lost: the network forgot the connection")

    def _on_push(self, event: str, data: dict[str, Any]) -> None:
        if event == "message":
            sender = str(data.get("from", ""))
            msg = normalize_message(msg_id=data.get("id"), chat=sender, sender=sender,
                                    content=str(data.get("text", "")), push_name=str(data.get("push_name") or ""),
                                    ts=data.get("ts"), is_group=False)
            if msg is not None:
                self.emit("message", {**msg, **inbound_extras(data)})  # acknowledged once journaled
            else:
                self._to_ack.put(str(data.get("id")))  # nothing to journal: the network may forget it
        elif event == "receipt":
            self.emit("receipt", {"ids": data.get("ids", []), "type": data.get("type"), "chat": data.get("chat")})
        elif event == "paired":
            self._save_creds({"company": self.ctx.company, "token": data["token"], "phone": data["phone"]})
            if self.phase != Phase.EXITED:  # not fenced
                self._connected(str(data["phone"]))
        elif event == "dropped":
            if self.phase in ON_NETWORK:
                self._lost("connection lost")
        elif event == "logged_out":
            self._delete_creds()
            self._exit("logged_out")
        elif event == "replaced":
            self._exit("replaced")
        elif event == "banned":
            self._exit("banned", until=data.get("until"))

    # ------------------------------------------------------------------ credentials

    def _load_creds(self) -> dict[str, Any]:
        """The stored credentials, {} for none; raises `Unavailable` or `Fenced` (cluster mode)."""
        try:
            return self.creds.load()
        except Unreadable as exc:
            self.emit("error", {"kind": "credentials", "message": f"{exc}: pairing again"})
            return {}

    def _save_creds(self, creds: dict[str, Any]) -> None:
        """On the loop's thread. Refused for an older epoch: the session stops (`fenced`). PostgreSQL away:
        kept in memory and tried again every SAVE_RETRY seconds while the session runs."""
        self._unsaved, self._save_retry_at = None, None
        try:
            self.creds.save(creds)
        except Fenced as exc:
            self._exit("fenced", message=str(exc))
        except Unavailable as exc:
            log.warning("credentials not stored yet (%s); retrying in %g s", exc, SAVE_RETRY)
            self.emit("error", {"kind": "credentials", "message": f"not stored yet, retrying: {exc}"})
            self._unsaved, self._save_retry_at = creds, time.monotonic() + SAVE_RETRY

    def _delete_creds(self) -> None:
        """Logged out: the credentials go. If that fails now, the next start's hello is refused as logged
        out and deletes them then; a newer epoch's credentials are never touched."""
        self._unsaved, self._save_retry_at = None, None
        try:
            self.creds.delete()
        except (Fenced, Unavailable) as exc:
            log.warning("credentials not deleted: %s", exc)


def _settle(fut: Future[Any], reply: Reply) -> None:
    if fut.done():
        return
    if reply.get("ok"):
        fut.set_result(reply.get("result") or {})
    else:
        fut.set_exception(_reply_error(reply))


def _send_outcome(reply: Reply) -> dict[str, Any] | Exception:
    if reply.get("ok"):
        result = reply.get("result") or {}
        return {"message_id": result.get("id"), "ts": result.get("ts")}
    return _reply_error(reply)


def _reply_error(reply: Reply) -> BackendError:
    error = reply.get("error") or {}
    return BackendError(str(error.get("code", INTERNAL)), str(error.get("message", "")))


def _ignore(_reply: Reply) -> None:
    pass


def _grow(bytes_per_s: int, stop: threading.Event) -> None:
    """Hold on to `bytes_per_s` more (resident) memory every second until the backend stops."""
    held: list[bytes] = []
    while not stop.wait(0.1):
        held.append(b"\x01" * (bytes_per_s // 10))


def media_frames(item: SendItem) -> list[memoryview]:
    """A media send's file as frames of at most 1 MiB: read once, sliced without copying."""
    if item.type not in ("image", "video", "audio", "document"):
        return []
    try:
        with open(item.media_path or "", "rb") as fh:
            data = fh.read()
    except OSError:
        raise BackendError(NOT_FOUND, f"media {str(item.fields.get('media'))[:12]}… is no longer in the store") \
            from None
    view = memoryview(data)
    return [view[i:i + MEDIA_CHUNK] for i in range(0, len(data), MEDIA_CHUNK)]


def inbound_extras(data: dict[str, Any]) -> dict[str, Any]:
    """The §11 fields of a pushed message: its type, location, reaction, reply, and media to download."""
    out: dict[str, Any] = {k: data[k] for k in INBOUND_FIELDS if k in data}
    if data.get("type"):
        out["type"] = str(data["type"])
    media = data.get("media")
    if isinstance(media, dict):
        out["media"] = {k: media[k] for k in ("mimetype", "size", "sha256", "filename") if k in media}
        out["_fetch"] = {"id": data.get("id")}
    return out
