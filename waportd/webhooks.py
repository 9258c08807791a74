"""Webhooks on the supervisor's side (DESIGN.md §10): record what an endpoint wants, before it is published.

Every event goes out through `publish`. One an endpoint wants gets an id and the company's next
`seq` and waits in the turn's batch; `flush` (once a turn) writes the batch to the store in one
transaction, then publishes the turn's events in order and nudges the delivery process. A
worker hears the ACK of an inbound message only after this (the arbiter flushes acks later),
so a message is never acknowledged before its webhook event is on disk.

Delivery itself runs in its own process (`waportd.webhook_delivery`): an endpoint that hangs
costs this loop nothing. It reports outcomes back with the `webhook_report` command.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

import zmq

from ipc import events
from ipc import journal as J
from ipc import webhooks as policy
from ipc.errors import BAD_REQUEST, INTERNAL, NOT_FOUND, WaportError
from ipc.journal import Outgoing
from ipc.validation import parse_duration, validate_company
from ipc.webhooks import GLOBAL
from ipc.webhookstore import Busy, Endpoint, WebhookStore, path_in
from waportd.services import Publish, Services

log = logging.getLogger("waport.webhooks")

LISTING = 50  # events `webhooks COMPANY` shows


class Webhooks:
    def __init__(self, services: Services, publish: Publish, start_delivery: Callable[[], None]) -> None:
        self.services = services
        self.publish_now = publish  # the events socket and streams
        self.start_delivery = start_delivery
        self.store: Any = None  # a WebhookStore, or in cluster mode a PgWebhookStore; opened by `open`
        self.endpoints: dict[str, Endpoint] = {}
        self.disabled: dict[tuple[str, str], dict[str, Any]] = {}
        self.seqs: dict[str, int] = {}
        self.batch: list[tuple[str, str, dict[str, Any], float | None, tuple | None]] = []
        self.recorded = 0  # events in the batch that go to the store
        self.pending: dict[str, int] = {}  # per company, as the delivery process last reported
        self.latency_counts = [0] * (len(policy.LATENCY_BUCKETS) + 1)  # event -> 2xx, all reports added up
        self.latency_sum = 0.0
        self.nudge_sock: zmq.Socket | None = None

    # ------------------------------------------------------------ set-up

    def open(self) -> None:
        cfg = self.services.cfg
        if cfg.cluster_dsn:  # the companies' endpoints, seqs and events move with them (DESIGN.md §12)
            from ipc.clusterschema import supervisor_name
            from ipc.pgdb import PgDb  # psycopg: only in cluster mode
            from ipc.pgwebhookstore import PgWebhookStore

            store: Any = PgWebhookStore(PgDb(cfg.cluster_dsn, supervisor_name(cfg.host_id, "webhooks")), cfg.host_id)
        else:
            store = WebhookStore(path_in(cfg.state_dir), busy_ms=0, checkpoints=False)
        try:
            self.seqs = store.seqs()
        except sqlite3.Error:
            store.close()
            raise
        self.store = store
        self.configure(cfg)
        self.reload()

    def configure(self, cfg: Any) -> None:
        """`webhook_url` of the config is the '*' endpoint of the store (set at boot and at every reload)."""
        if self.store is None:
            return
        now = self.services.clock.time()
        current = self.store.endpoints().get(GLOBAL)
        try:
            if cfg.webhook_url:
                events_ = cfg.webhook_events or policy.DEFAULT_EVENTS
                if current is None or (current.url, current.secret, current.events) != (
                        cfg.webhook_url, cfg.webhook_secret, tuple(events_)):
                    self.store.put_endpoint(Endpoint(GLOBAL, cfg.webhook_url, cfg.webhook_secret, tuple(events_),
                                                     created=current.created if current else now, updated=now))
            elif current is not None:
                self.store.delete_endpoint(GLOBAL)
        except Busy:
            log.warning("webhook store busy: the config's webhook_url is applied at the next reload")
        self.reload()

    def reload(self) -> None:
        """Endpoints and disabled ones from the store: after a change of ours or one the delivery process made."""
        if self.store is None:
            return
        self.endpoints = self.store.endpoints()
        self.disabled = self.store.disabled()
        if self.endpoints:
            self.start_delivery()
        self.nudge(b"endpoints")

    def close(self) -> None:
        if self.store is not None:
            self.flush()
            self.store.close()
            self.store = None

    # ------------------------------------------------------------ the events

    def endpoint_of(self, company: str) -> Endpoint | None:
        ep = self.endpoints.get(company) or self.endpoints.get(GLOBAL)
        if ep is None or (company, ep.url) in self.disabled:
            return None
        return ep

    def publish(self, company: str, type_: str, data: dict[str, Any], ts: float | None = None) -> None:
        """Every event the supervisor publishes: straight out, or after its record is committed this turn."""
        ep = self.endpoint_of(company) if self.endpoints else None
        if ep is None or type_ not in ep.events:
            if self.batch:  # keep the order of the turn's events
                self.batch.append((company, type_, data, ts, None))
            else:
                self.publish_now(company, type_, data, ts)
            return
        ts = self.services.clock.time() if ts is None else ts
        seq = self.seqs[company] = self.seqs.get(company, 0) + 1
        eid = policy.event_id(company, type_, data)
        body = json.dumps({**events.make(company, type_, data, ts), "id": eid, "seq": seq},
                          separators=(",", ":"), ensure_ascii=False)
        self.batch.append((company, type_, data, ts, (eid, company, seq, type_, body, self.services.clock.time())))
        self.recorded += 1

    def flush(self) -> bool:
        """Commit the turn's records, then publish the turn's events. False: the store was busy (next turn)."""
        if not self.batch:
            return True
        if self.recorded and self.store is not None:
            rows = [item[4] for item in self.batch if item[4] is not None]
            try:
                self.seqs.update(self.store.add_events(rows, {r[1]: self.seqs[r[1]] for r in rows}))
            except Busy:
                return False
        batch, recorded, self.batch, self.recorded = self.batch, self.recorded, [], 0
        for company, type_, data, ts, _ in batch:
            self.publish_now(company, type_, data, ts)
        if recorded:
            self.nudge(b"new")
        return True

    def nudge(self, what: bytes) -> None:
        """Tell the delivery process to look; dropped if it is not there (it reads everything when it starts)."""
        if self.nudge_sock is not None:
            try:
                self.nudge_sock.send(what, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def recover_outcomes(self, company: str, recent: list[Outgoing]) -> None:
        """A worker is ready: outcomes its predecessor journaled but never reported (killed between the two)
        are published now. Their ids are derived from the message id, so one already recorded is not again."""
        ep = self.endpoint_of(company) if self.store is not None else None
        if ep is None or not {events.SENT, events.SEND_FAILED} & set(ep.events):
            return
        since = max(ep.created, self.services.clock.time() - self.services.cfg.webhook_max_age)
        found: dict[str, tuple[str, Outgoing]] = {}
        for m in recent:
            type_ = events.SENT if m.status == J.SENT else events.SEND_FAILED if m.status in J.ENDED else None
            if type_ in ep.events and m.updated >= since:
                found[policy.event_id(company, type_, {"message_id": m.message_id})] = (type_, m)
        if not found:
            return
        batched = {item[4][0] for item in self.batch if item[4] is not None}
        assert self.store is not None
        for eid in set(found) - self.store.known(list(found)) - batched:
            type_, m = found[eid]
            data: dict[str, Any] = {"message_id": m.message_id, "idempotency_key": m.idempotency_key,
                                    "to": m.recipient, "recovered": True}
            if type_ == events.SENT:
                data["ts"] = m.sent_ts
            else:
                data.update(reason=m.status if m.status == J.UNCERTAIN else "error", message=m.error)
            log.info("%s: a %s outcome not heard before the worker ended, published now", company, type_)
            self.publish(company, type_, data, m.updated)

    def forget(self, company: str) -> None:
        """A deleted company's endpoint and events go with it."""
        self.seqs.pop(company, None)
        self.pending.pop(company, None)
        if self.store is not None:
            self.flush()
            try:
                self.store.forget(company)
            except Busy:
                log.warning("%s: webhook store busy; its webhook events stay until the next delete", company)
            self.reload()
            self.nudge(b"reload " + company.encode())

    # ------------------------------------------------------------ commands (the controller dispatches here)

    def the_store(self) -> Any:
        if self.store is None:
            raise WaportError(INTERNAL, "the webhook store is not open")
        return self.store

    def write(self, action: Callable[[Any], Any]) -> Any:
        """Commands wait a little for the store (the loop's own writes never do)."""
        store = self.the_store()
        with store.patient():
            try:
                return action(store)
            except Busy as exc:
                why = f" ({exc})" if str(exc) else ""
                raise WaportError(INTERNAL, f"the webhook store is busy{why}; try again") from None

    # ------------------------------------------------------------ cluster mode: companies come and go

    def claimed(self, companies: list[str]) -> None:
        """Companies this host now runs: their endpoints as the last owner left them, and their undelivered
        events to the delivery process (read whole: they may be older than anything it has seen)."""
        if self.store is None or not companies:
            return
        try:
            self.reload()
        except sqlite3.Error as exc:
            log.warning("webhook endpoints not reloaded after a claim: %s", exc)
        for company in companies:
            self.nudge(b"reload " + company.encode())

    def lost(self, company: str) -> None:
        """Another host runs it now: this host's delivery process stops delivering its events."""
        self.nudge(b"drop " + company.encode())

    def cmd_webhook_set(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """A company's own endpoint; the secret is generated and shown once (setting again re-enables it)."""
        company = validate_company(args.get("company"))
        url = policy.validate_url(args.get("url"), "url")
        wanted = policy.validate_events(args.get("events"))
        now = self.services.clock.time()
        old = self.the_store().endpoints().get(company)
        secret = policy.new_secret()
        if args.get("secret") is not None:
            policy.secret_key(args["secret"], "secret")
            secret = args["secret"]
        ep = Endpoint(company, url, secret, wanted, created=old.created if old else now, updated=now)
        self.write(lambda s: s.put_endpoint(ep))
        log.info("%s: webhook endpoint %s (events %s)", company, "replaced" if old else "set", ",".join(wanted))
        self.reload()
        ok({**ep.public(), "secret": secret, "created": old is None})

    def cmd_webhook_show(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = validate_company(args.get("company"))
        ep = self.endpoints.get(company) or self.endpoints.get(GLOBAL)
        if ep is None:
            raise WaportError(NOT_FOUND, f"{company} has no webhook endpoint (waportctl webhook set {company} URL)")
        ok(ep.public(self.disabled.get((company, ep.url))))

    def cmd_webhook_rotate(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """A new secret; the previous one still signs for a day (two `v1,` signatures)."""
        company = validate_company(args.get("company"))
        ep = self.the_store().endpoints().get(company)
        if ep is None:
            raise WaportError(NOT_FOUND, f"{company} has no webhook endpoint of its own to rotate"
                                         + (" (the global one is the config's webhook_secret)"
                                            if GLOBAL in self.endpoints else ""))
        now = self.services.clock.time()
        secret = policy.new_secret()
        rotated = Endpoint(company, ep.url, secret, ep.events, old_secret=ep.secret,
                           old_until=now + policy.OLD_SECRET_VALID, created=ep.created, updated=now)
        self.write(lambda s: s.put_endpoint(rotated))
        log.info("%s: webhook secret rotated; the previous one stays valid 24 h", company)
        self.reload()
        ok({**rotated.public(), "secret": secret})

    def cmd_webhook_delete(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = validate_company(args.get("company"))
        existed = self.write(lambda s: s.delete_endpoint(company))
        if not existed:
            raise WaportError(NOT_FOUND, f"{company} has no webhook endpoint of its own")
        log.info("%s: webhook endpoint deleted", company)
        self.reload()
        self.nudge(b"reload " + company.encode())
        ok({"company": company, "deleted": True})

    def cmd_webhook_deliveries(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = validate_company(args.get("company"))
        limit = args.get("limit", LISTING)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise WaportError(BAD_REQUEST, "limit must be a whole number from 1 to 1000")
        ep = self.endpoints.get(company) or self.endpoints.get(GLOBAL)
        listing = self.the_store().deliveries(company, limit)
        ok({"company": company, "endpoint": ep.public(self.disabled.get((company, ep.url))) if ep else None,
            **listing})

    def cmd_webhook_replay(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """Dead events (`dead`), or every event since a time, are delivered again with their own id and seq."""
        company = validate_company(args.get("company"))
        dead = bool(args.get("dead", False))
        since = args.get("since")
        if since is not None:
            since = parse_since(since, self.services.clock.time())
        if not dead and since is None:
            raise WaportError(BAD_REQUEST, "say what to replay: dead (the dead events) and/or since (a time)")
        now = self.services.clock.time()
        count = self.write(lambda s: s.replay(company, dead, since, now))
        log.info("%s: %d webhook events to deliver again", company, count)
        self.nudge(b"reload " + company.encode())
        ok({"company": company, "replayed": count})

    def cmd_webhook_report(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """From the delivery process: outcomes, latencies, pending counts, endpoints it disabled (410)."""
        counters = self.services.counters
        for company, outcome, n in args.get("outcomes", []):
            counters[("webhook", str(company), str(outcome))] += int(n)
        latency = args.get("latency")
        if isinstance(latency, dict) and len(latency.get("counts", ())) == len(self.latency_counts):
            self.latency_counts = [a + int(b) for a, b in zip(self.latency_counts, latency["counts"], strict=True)]
            self.latency_sum += float(latency.get("sum", 0.0))
        pending = args.get("pending")
        if isinstance(pending, dict):
            self.pending = {str(c): int(n) for c, n in pending.items()}
        disabled = args.get("disabled", [])
        if disabled:
            self.reload()
            for company, url, status in disabled:
                log.warning("%s: webhook endpoint answered %s: disabled (`waportctl webhook set` enables it)",
                            company, status)
                self.publish(str(company), events.WEBHOOK_DISABLED, {"url": url, "status": status})
        ok({})


def parse_since(value: Any, now: float) -> float:
    """A unix time, or a duration back from now ("1h")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return now - parse_duration(value)
    except ValueError:
        raise WaportError(BAD_REQUEST, f"since: {value!r} is neither a unix time nor a duration such as 1h") from None

