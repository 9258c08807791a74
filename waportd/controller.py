"""Control commands (DESIGN.md §4): validate, act through the arbiter, answer exactly once."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil

from ipc import __version__, control, protocol
from ipc.errors import (
    BAD_REQUEST,
    INTERNAL,
    UNKNOWN_COMPANY,
    WaportError,
)
from ipc.states import ALIVE, CONNECTED, PAIRING
from ipc.validation import normalize_phone, validate_company

if TYPE_CHECKING:
    from waportd.arbiter import Arbiter

log = logging.getLogger("waport.control")

Respond = Callable[[bytes], None]
WORKER_TIMEOUT = 30.0


class Controller:
    def __init__(self, arbiter: Arbiter) -> None:
        self.arbiter = arbiter

    def handle(self, raw: bytes, respond: Respond) -> None:
        """Answer one frame; malformed or failing requests get an error reply, never a crash."""
        counters = self.arbiter.counters
        try:
            req = control.parse_request(raw)
        except WaportError as exc:
            counters[("control", "invalid", "bad_request")] += 1
            respond(control.error_reply(control.request_id_of(raw), exc))
            return

        def ok(result: dict[str, Any]) -> None:
            counters[("control", req.cmd, "ok")] += 1
            respond(control.ok_reply(req.id, result))

        def fail(exc: WaportError) -> None:
            counters[("control", req.cmd if req.cmd in control.COMMANDS else "unknown", exc.code)] += 1
            respond(control.error_reply(req.id, exc))

        handler = getattr(self, f"cmd_{req.cmd}", None) if req.cmd in control.COMMANDS else None
        if handler is None:
            known = ", ".join(control.COMMANDS)
            fail(WaportError(BAD_REQUEST, f"unknown command {req.cmd!r}; known: {known}"))
            return
        try:
            handler(req.args, ok, fail)
        except WaportError as exc:
            fail(exc)
        except Exception as exc:  # noqa: BLE001 - nothing crashes the daemon
            log.exception("control command %s failed", req.cmd)
            fail(WaportError(INTERNAL, f"{req.cmd} failed: {exc}"))

    # ------------------------------------------------------------ helpers

    def known(self, args: dict[str, Any]) -> str:
        company = validate_company(args.get("company"))
        if company not in self.arbiter.sessions:
            raise WaportError(UNKNOWN_COMPANY, f"no session for company {company!r}; start it first")
        return company

    def record(self, company: str, live: bool = True) -> dict[str, Any]:
        """`live` reads the worker's RSS now; `list` uses the last sample (psutil for 1,000 workers is slow)."""
        s = self.arbiter.sessions[company]
        if live and s.pid and s.state in ALIVE:
            try:
                s.rss_bytes = psutil.Process(s.pid).memory_info().rss
            except psutil.Error:
                s.rss_bytes = None
        return {**s.record(), **self.arbiter.ops.resource_fields(company)}

    def when_exited(self, company: str, then: Callable[[], None]) -> None:
        if company in self.arbiter.workers:
            self.arbiter.exit_waiters.setdefault(company, []).append(then)
        else:
            then()

    def worker_call(
        self, company: str, cmd: str, args: dict[str, Any], ok: Callable, fail: Callable,
        shape: Callable[[dict[str, Any]], dict[str, Any]] = lambda r: r,
    ) -> None:
        def on_reply(reply: dict[str, Any]) -> None:
            if reply.get("ok"):
                ok(shape(reply.get("result") or {}))
            else:
                fail(WaportError.from_dict(reply.get("error")))

        self.arbiter.request_worker(company, cmd, args, WORKER_TIMEOUT, on_reply)

    # ------------------------------------------------------------ commands

    def cmd_ping(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        ok({"pong": True, "pid": os.getpid(), "version": __version__})

    def cmd_version(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        ok({"version": __version__, "protocol": protocol.VERSION, "backend": self.arbiter.cfg.backend,
            "metrics": self.arbiter.ops.metrics_url})

    def cmd_list(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        ok({"sessions": [self.record(c, live=False) for c in sorted(self.arbiter.sessions)]})

    def cmd_status(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        if args.get("company") is None:
            self.cmd_list(args, ok, fail)
            return
        ok(self.record(self.known(args)))

    def cmd_start(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = validate_company(args.get("company"))
        a = self.arbiter
        if a.shutting_down:
            raise WaportError(BAD_REQUEST, "waportd is shutting down")
        a.desired.start(company)
        a.save_desired()
        a.start_session(company)
        ok(self.record(company))

    def cmd_stop(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)
        a = self.arbiter
        a.desired.stop(company)
        a.save_desired()
        a.stop_session(company)
        self.when_exited(company, lambda: ok(self.record(company)))

    def cmd_restart(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)
        a = self.arbiter
        if a.shutting_down:
            raise WaportError(BAD_REQUEST, "waportd is shutting down")
        a.desired.start(company)
        a.save_desired()
        s = a.sessions[company]

        def fresh_start() -> None:
            s.failures = 0
            a.spawn(s)
            ok(self.record(company))

        if company in a.workers:
            a.stop_worker(company, then=fresh_start, reason="restart requested")
        else:
            fresh_start()

    def cmd_logout(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)

        def logged_out(_result: dict[str, Any]) -> None:
            self.when_exited(company, lambda: ok(self.record(company)))

        self.worker_call(company, "logout", {}, logged_out, fail)

    def cmd_delete(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """Unlink the device when we can, stop the worker, remove the session's data."""
        company = self.known(args)
        a = self.arbiter

        def remove() -> None:
            a.delete_session(company)
            ok({"company": company, "deleted": True})

        def stop_then_remove(_reply: Any = None) -> None:
            if company in a.workers:
                a.stop_session(company)
                self.when_exited(company, remove)
            else:
                remove()

        if a.sessions[company].state == CONNECTED:
            a.request_worker(company, "logout", {}, WORKER_TIMEOUT, stop_then_remove)
        else:
            stop_then_remove()

    def cmd_send(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """Durable before it answers: `queued` means journaled; the outcome follows as an event."""
        self.arbiter.messages.accept(args.get("company"), args.get("to"), args.get("text"),
                                     args.get("idempotency_key"), ok)

    def cmd_messages(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)
        limit = args.get("limit", 20)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise WaportError(BAD_REQUEST, "limit must be a whole number from 1 to 1000")
        message_id = args.get("message_id")
        if message_id is not None:
            found = self.arbiter.messages.journal(company).by_id(str(message_id))
            if found is None:
                raise WaportError(BAD_REQUEST, f"no message {message_id!r} in {company}'s journal")
            ok({"company": company, "message": found.public()})
            return
        ok(self.arbiter.messages.listing(company, limit))

    def cmd_qr(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)
        s = self.arbiter.sessions[company]
        ok({"company": company, "state": s.state, "code": s.qr if s.state == PAIRING else None})

    def cmd_pair_code(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)
        phone = normalize_phone(args.get("phone"))
        self.worker_call(company, "pair_code", {"phone": phone}, ok, fail,
                         shape=lambda r: {"company": company, "code": r.get("code")})

    def cmd_metrics(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        ok({"metrics": self.metric_samples()})

    def cmd_diagnose(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)
        ok(self.arbiter.ops.diagnose(company, self.record(company)))

    def cmd_reload(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        ok(self.arbiter.reload())

    def metric_samples(self) -> list[dict[str, Any]]:
        """Every figure of /metrics (one registry), as {name, labels, value}."""
        return self.arbiter.ops.samples()
