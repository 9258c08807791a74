"""Control commands (DESIGN.md §4): validate, act through the owners, answer exactly once.

The controller holds the owners a command acts on (the roster and its companies, the message
desk, ops), never the arbiter: a command can do what those allow and nothing else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import psutil

from ipc import __version__, control, protocol
from ipc.errors import (
    BAD_REQUEST,
    CAPACITY,
    INTERNAL,
    NOT_FOUND,
    WaportError,
)
from ipc.states import ALIVE, CONNECTED, PAIRING
from ipc.tokens import TOKENS_FILE, TokenFileError, TokenRecord, TokenStore
from ipc.validation import (
    normalize_phone,
    parse_duration,
    validate_company,
    validate_message_ids,
    validate_presence,
    validate_proxy,
)
from waportd.company import Company
from waportd.media import MediaDesk
from waportd.messages import MessageDesk
from waportd.ops import Ops
from waportd.roster import Roster
from waportd.services import Services
from waportd.webhooks import Webhooks

log = logging.getLogger("waport.control")

Respond = Callable[[bytes], None]
WORKER_TIMEOUT = 30.0
MEDIA_FETCH_TIMEOUT = 120.0  # three attempts at a large download, each bounded by the backend


KEEP = object()  # `start` without `proxy`: the company keeps what it has
DIRECT = "direct"


def proxy_arg(value: Any) -> str | None | object:
    """`start`'s `proxy`: a URL (this company's own), "direct" (none, whatever the config says), or ""
    (back to the config's `proxy`)."""
    if value is None:
        return KEEP
    if value == "":
        return None
    if value == DIRECT:
        return ""
    return validate_proxy(value)


def token_create_args(args: dict[str, Any]) -> tuple[str | None, float | None]:
    """`token_create`'s (company, lifetime in seconds). A company token may name a company that does not exist
    yet: it is made before the session."""
    company = args.get("company")
    if company is not None:
        validate_company(company)
    if args.get("expires") is None:
        return company, None
    try:
        seconds = parse_duration(args["expires"])
    except ValueError as exc:
        raise WaportError(BAD_REQUEST, f"expires: {exc}") from None
    if seconds <= 0:
        raise WaportError(BAD_REQUEST, "expires: a token's lifetime must be more than 0 seconds")
    return company, seconds


def token_id_arg(args: dict[str, Any]) -> str:
    token_id = args.get("id")
    if not isinstance(token_id, str) or not token_id:
        raise WaportError(BAD_REQUEST, "id must be a token id (tok_...; `waportctl token list` shows them)")
    return token_id


def token_created(record: TokenRecord, token: str, seconds: float | None) -> dict[str, Any]:
    """`token_create`'s answer, the only one that holds the token; the log names its id only."""
    log.info("API token %s created for %s%s", record.id,
             f"company {record.company}" if record.company else "all companies",
             f", expires in {seconds:g} s" if seconds is not None else "")
    return {"id": record.id, "token": token, "company": record.company, "created_at": record.created_at,
            "expires_at": record.expires_at}


class Controller:
    def __init__(self, services: Services, roster: Roster, messages: MessageDesk, ops: Ops,
                 reload: Callable[[], dict[str, list[str]]], webhooks: Webhooks | None = None,
                 media: MediaDesk | None = None) -> None:
        self.services = services
        self.owners = {"webhook_": webhooks, "media_": media}  # commands answered by their owner, by prefix
        self.roster = roster
        self.messages = messages
        self.ops = ops
        self.reload = reload
        # Cluster mode (DESIGN.md §12): `route` sends a command to the host that answers it (False: answer it
        # here), `here` says which companies this host shows in its part of `list`, `host` is in each record.
        self.route: Callable[[control.Request, bytes, Respond], bool] | None = None
        self.here: Callable[[str], bool] = lambda _name: True
        self.host: str | None = None

    def handle(self, raw: bytes, respond: Respond, forwarded: bool = False) -> None:
        """Answer one frame; malformed or failing requests get an error reply, never a crash. `forwarded`:
        another host sent it here to be answered, so it is not routed again."""
        counters = self.services.counters
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

        if self.route is not None and not forwarded:
            try:
                if self.route(req, raw, respond):
                    counters[("control", req.cmd, "forwarded")] += 1
                    return
            except Exception as exc:  # noqa: BLE001 - nothing crashes the daemon
                log.exception("routing %s failed", req.cmd)
                fail(WaportError(INTERNAL, f"{req.cmd} failed: {exc}"))
                return
        handler = None
        if req.cmd in control.COMMANDS:
            owner = next((o for prefix, o in self.owners.items() if req.cmd.startswith(prefix)), self)
            # media_fetch is a worker's errand, which the controller runs, not the media desk
            handler = getattr(owner, f"cmd_{req.cmd}", None) or getattr(self, f"cmd_{req.cmd}", None)
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

    def known(self, args: dict[str, Any]) -> Company:
        return self.roster.known(args)

    def record(self, company: Company, live: bool = True) -> dict[str, Any]:
        """`live` reads the worker's RSS now; `list` uses the last sample (psutil for 1,000 workers is slow)."""
        s = company.session
        if live and s.pid and s.state in ALIVE:
            try:
                s.rss_bytes = psutil.Process(s.pid).memory_info().rss
            except psutil.Error:
                s.rss_bytes = None
        record = {**s.record(), **self.ops.resource_fields(company)}
        if self.host is not None:
            record["host"] = self.host
        return record

    def not_shutting_down(self) -> None:
        if self.services.shutting_down:
            raise WaportError(BAD_REQUEST, "waportd is shutting down")

    def not_exporting(self, name: str) -> None:
        """A company stopped for an export not yet confirmed stays stopped (waportd/transfer.py)."""
        transfers = self.owners.get("export")
        if transfers is not None:
            transfers.check_free(name)  # type: ignore[attr-defined]

    def worker_call(
        self, company: Company, cmd: str, args: dict[str, Any], ok: Callable, fail: Callable,
        shape: Callable[[dict[str, Any]], dict[str, Any]] = lambda r: r, timeout: float = WORKER_TIMEOUT,
    ) -> None:
        def on_reply(reply: dict[str, Any]) -> None:
            if reply.get("ok"):
                ok(shape(reply.get("result") or {}))
            else:
                fail(WaportError.from_dict(reply.get("error")))

        company.request(cmd, args, timeout, on_reply)

    # ------------------------------------------------------------ commands

    def cmd_ping(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        ok({"pong": True, "pid": os.getpid(), "version": __version__})

    def cmd_version(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        ok({"version": __version__, "protocol": protocol.VERSION, "backend": self.services.cfg.backend,
            "metrics": self.ops.metrics_url})

    def cmd_list(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        ok({"sessions": [self.record(c, live=False) for c in sorted(self.roster, key=lambda c: c.name)
                         if self.here(c.name)]})

    def cmd_status(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        if args.get("company") is None:
            self.cmd_list(args, ok, fail)
            return
        ok(self.record(self.known(args)))

    def cmd_start(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        name = validate_company(args.get("company"))
        self.not_shutting_down()
        self.not_exporting(name)
        limit = self.services.cfg.max_companies
        if self.roster.get(name) is None and len(self.roster) >= limit:
            raise WaportError(CAPACITY, f"this host already has {len(self.roster)} companies, its limit "
                                        f"(max_companies = {limit}): delete one or raise max_companies",
                              limit=limit)
        proxy = proxy_arg(args.get("proxy"))
        created = self.roster.get(name) is None
        company = self.roster.want(name)
        changed = proxy is not KEEP and self.roster.set_proxy(name, proxy)  # type: ignore[arg-type]
        if changed and company.worker is not None:  # a running worker dials with what it started with
            company.restart(lambda: ok({**self.record(company), "created": created}))
            return
        company.start()
        ok({**self.record(company), "created": created})

    def cmd_stop(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)
        self.roster.unwant(company.name)
        company.stop()
        company.when_exited(lambda: ok(self.record(company)))

    def cmd_restart(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)
        self.not_shutting_down()
        self.not_exporting(company.name)
        self.roster.want(company.name)
        company.restart(lambda: ok(self.record(company)))

    def cmd_logout(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)

        def logged_out(_result: dict[str, Any]) -> None:
            company.when_exited(lambda: ok(self.record(company)))

        self.worker_call(company, "logout", {}, logged_out, fail)

    def cmd_delete(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """Unlink the device when we can, stop the worker, remove the session's data."""
        company = self.known(args)

        def remove() -> None:
            self.messages.forget(company.name)  # its journal closed before its directory goes
            webhooks = self.owners["webhook_"]
            if webhooks is not None:
                webhooks.forget(company.name)
            company.delete_data()
            self.roster.forget(company.name)
            ok({"company": company.name, "deleted": True})

        def stop_then_remove(_reply: Any = None) -> None:
            if company.worker is not None:
                company.stop()
            company.when_exited(remove)

        if company.state == CONNECTED:
            company.request("logout", {}, WORKER_TIMEOUT, stop_then_remove)
        else:
            stop_then_remove()

    def cmd_send(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """Durable before it answers: `queued` means journaled; the outcome follows as an event."""
        self.messages.accept(args, ok, on_fail=fail)

    def cmd_messages(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        name = self.known(args).name
        limit = args.get("limit", 20)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise WaportError(BAD_REQUEST, "limit must be a whole number from 1 to 1000")
        message_id = args.get("message_id")
        if message_id is not None:
            found = self.messages.journal(name).by_id(str(message_id))
            if found is None:
                raise WaportError(NOT_FOUND, f"no message {message_id!r} in {name}'s journal")
            ok({"company": name, "message": found.public()})
            return
        ok(self.messages.listing(name, limit))

    def cmd_qr(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)
        s = company.session
        ok({"company": company.name, "state": s.state, "code": s.qr if s.state == PAIRING else None})

    def cmd_pair_code(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)
        phone = normalize_phone(args.get("phone"))
        self.worker_call(company, "pair_code", {"phone": phone}, ok, fail,
                         shape=lambda r: {"company": company.name, "code": r.get("code")})

    def cmd_read(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """Mark messages read (DESIGN.md §11): checked here, done by the worker's backend."""
        company = self.known(args)
        chat, ids = normalize_phone(args.get("chat")), validate_message_ids(args.get("message_ids"))
        self.worker_call(company, "read", {"chat": chat, "message_ids": ids}, ok, fail,
                         shape=lambda r: {"company": company.name, **r})

    def cmd_typing(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)
        chat, state = normalize_phone(args.get("chat")), validate_presence(args.get("state", "composing"))
        self.worker_call(company, "typing", {"chat": chat, "state": state}, ok, fail,
                         shape=lambda r: {"company": company.name, **r})

    def cmd_media_fetch(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """Download an inbound message's media again (DESIGN.md §11): the worker does it, with its retries."""
        company = self.known(args)
        msg_id = args.get("message_id")
        if not isinstance(msg_id, str) or not 0 < len(msg_id) <= 128:
            raise WaportError(BAD_REQUEST, "message_id: the id of an inbound message with media")
        self.worker_call(company, "media_fetch", {"message_id": msg_id}, ok, fail, timeout=MEDIA_FETCH_TIMEOUT)

    def cmd_metrics(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        ok({"metrics": self.metric_samples()})

    def cmd_diagnose(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = self.known(args)
        ok(self.ops.diagnose(company, self.record(company)))

    def cmd_reload(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        ok(self.reload())

    def cmd_health(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """The /healthz body, for the API's GET /v1/health (the API process has no snapshot of its own)."""
        ok(self.ops.health())

    # ------------------------------------------------------------ API tokens (DESIGN.md §9; a cluster's: tokensync)

    @property
    def tokens_path(self) -> str:
        return os.path.join(self.services.cfg.state_dir, TOKENS_FILE)

    def token_store(self) -> TokenStore:
        """Read fresh for each command (they are rare), so a hand-edited file is never overwritten unseen."""
        try:
            return TokenStore.load(self.tokens_path)
        except TokenFileError as exc:
            log.error("API tokens: %s", exc)
            raise WaportError(INTERNAL, f"{exc}: fix or remove the file (no token works meanwhile)") from None

    def save_tokens(self, store: TokenStore) -> None:
        try:
            store.save(self.tokens_path)
        except OSError as exc:
            raise WaportError(INTERNAL, f"cannot write {self.tokens_path}: {exc.strerror or exc}") from None

    def cmd_token_create(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company, seconds = token_create_args(args)
        store = self.token_store()
        record, token = store.create(company, seconds, self.services.clock.time())
        self.save_tokens(store)
        ok(token_created(record, token, seconds))

    def cmd_token_list(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        ok({"tokens": self.token_store().listing(self.services.clock.time())})

    def cmd_token_revoke(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        token_id = token_id_arg(args)
        now = self.services.clock.time()
        store = self.token_store()
        before = store.get(token_id)
        record = store.revoke(token_id, now)
        if record is not before:
            self.save_tokens(store)
            log.info("API token %s revoked", record.id)
        ok(record.public(now))

    def metric_samples(self) -> list[dict[str, Any]]:
        """Every figure of /metrics (one registry), as {name, labels, value}."""
        return self.ops.samples()
