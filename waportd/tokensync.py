"""API tokens in cluster mode (DESIGN.md §9, §12): PostgreSQL holds them, each host's token file is a copy.

The API process reads STATE_DIR/api-tokens.json on every host as it does on a single host (it imports ipc
only and knows nothing of PostgreSQL); in a cluster the supervisor keeps that file in step with
`waport_tokens`, whose `record` is exactly what the file keeps of a token (its SHA-256, never the token):

- `token_create` and `token_revoke` write PostgreSQL first, then this host's file: nothing is written here
  when PostgreSQL did not take it, and a token is in the cluster before its one answer shows it. They run
  on the cluster link's thread (`submit`), so the loop never waits for the database. `token_list` lists
  PostgreSQL's tokens.
- After each cluster round (every lease_renew_interval) one query asks for the rows written since the last
  look, and the file is rewritten, atomically, only when something changed: a revocation on any host stops
  the token on this one within about a round. An idle look returns one row of nulls.
- At start this host's own file joins the cluster first (a token PostgreSQL lacks is added, a revocation it
  lacks too), so a single host turned into a cluster keeps its tokens; then the file is PostgreSQL's copy.
  No older copy ever undoes a revocation (`ipc.tokens.merged`, and the upload's SQL).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from ipc.errors import INTERNAL, TIMEOUT, WaportError
from ipc.tokens import TokenFileError, TokenRecord, TokenStore, unknown_token
from waportd.clusterstore import ClusterStore, StoreUnavailable
from waportd.controller import token_create_args, token_created, token_id_arg

log = logging.getLogger("waport.cluster")

# A row's updated_at is when its statement began, and that statement may commit a little later (within its
# statement_timeout, 5 s) than another one that began after it: each look reaches back this far before the
# previous look's now(), so no write is ever missed (rows seen again change nothing).
MARGIN = timedelta(seconds=60)

Submit = Callable[[Callable[[ClusterStore], Any], Callable[[Any], None]], None]


class ClusterTokens:
    """The token commands of a host in a cluster, and its token file as PostgreSQL's copy."""

    def __init__(self, path: str, submit: Submit, now: Callable[[], float]) -> None:
        self.path = path
        self.submit = submit
        self.now = now  # wall clock, as created_at / revoked_at are
        self.store = TokenStore()  # the cluster's tokens as last seen: the file's content once `synced`
        self.synced = False  # this host's own file joined the cluster and the file became its copy
        self.looking = False  # a look at waport_tokens is under way: no second one
        self.since: datetime | None = None  # the next look asks for rows written after this (database clock)
        self.unsaved = False  # the file could not be written: again after the next round
        self.file_problem: str | None = None
        self.unreadable: set[str] = set()  # rows already logged as unreadable

    # ------------------------------------------------------------ keeping the file in step

    def start(self) -> None:
        """At start: the first work on the cluster link (commands queue behind it, so none sees the file half
        joined)."""
        self.join()

    def after_round(self) -> None:
        """After each cluster round, at most one query (none while the last one is under way)."""
        if self.unsaved:
            self.save()
        if self.looking:
            return
        if not self.synced:
            self.join()
            return
        since = self.since
        self.looking = True
        self.submit(lambda store: store.tokens(since), self.took_changes)

    def join(self) -> None:
        """This host's file joins the cluster's tokens, then becomes their copy. A damaged file is neither
        uploaded nor overwritten (its tokens would be lost): tried again each round until it is fixed."""
        try:
            local = TokenStore.load(self.path)
        except TokenFileError as exc:
            if str(exc) != self.file_problem:
                log.error("API tokens: %s: fix or remove the file; until then this host takes no token from the "
                          "cluster (and its API refuses every token)", exc)
            self.file_problem = str(exc)
            return
        self.file_problem = None
        mine = [r.to_json() for r in local.records.values()]
        self.looking = True

        def work(store: ClusterStore) -> Any:
            store.upload_tokens(mine)
            return store.tokens()

        self.submit(work, lambda result: self.joined(local, result))

    def joined(self, local: TokenStore, result: Any) -> None:
        self.looking = False
        if isinstance(result, BaseException):
            log.warning("API tokens: not joined with the cluster's yet (%s); again after the next round", result)
            return
        db_now, rows = result
        records, bad = self.parse(rows)
        own = len(local)
        self.store = local  # its revocations stay, whatever PostgreSQL says (merged)
        changed = self.store.merge(records, complete=True, gone=bad)
        self.synced, self.since = True, db_now - MARGIN
        log.info("API tokens: this host's %d joined the cluster's; %d in all", own, len(self.store))
        if changed:
            self.save()

    def took_changes(self, result: Any) -> None:
        self.looking = False
        if isinstance(result, BaseException):
            log.debug("API tokens: no look at the cluster's this round: %s", result)  # the round says it
            return
        db_now, rows = result
        self.since = db_now - MARGIN
        changed = self.take(*self.parse(rows))
        if changed:
            log.info("API tokens changed in the cluster: %s", ", ".join(changed[:20]))

    def take(self, records: Iterable[TokenRecord], bad: Iterable[str] = (), complete: bool = False) -> list[str]:
        """PostgreSQL's records into the copy, and the file rewritten if anything changed. Before this host's
        own file joined, nothing: the join brings everything (writing now would drop the file's own tokens)."""
        if not self.synced:
            return []
        changed = self.store.merge(records, complete, bad)
        if changed:
            self.save()
        return changed

    def save(self) -> None:
        try:
            self.store.save(self.path)
        except OSError as exc:
            if not self.unsaved:
                log.error("API tokens: cannot write %s (%s); this host's API keeps the previous copy until it can",
                          self.path, exc.strerror or exc)
            self.unsaved = True
        else:
            self.unsaved = False

    def parse(self, rows: Iterable[tuple[str, Any]]) -> tuple[list[TokenRecord], list[str]]:
        """The records of rows, and the ids of those that cannot be read: no token (fail closed), logged once."""
        records, bad = [], []
        for token_id, data in rows:
            try:
                record = TokenRecord.from_json(data)
                if record.id != token_id:
                    raise ValueError(f"its record says id {record.id}")
            except ValueError as exc:
                bad.append(token_id)
                if token_id not in self.unreadable:
                    self.unreadable.add(token_id)
                    log.error("API token %r in the cluster's database cannot be read (%s): it works nowhere",
                              str(token_id)[:64], exc)
                continue
            self.unreadable.discard(token_id)
            records.append(record)
        return records, bad

    # ------------------------------------------------------------ commands

    def cmd_token_create(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company, seconds = token_create_args(args)
        record, token = TokenStore(self.store.records.values()).create(company, seconds, self.now())
        data = record.to_json()

        def done(result: Any) -> None:
            if isinstance(result, BaseException):
                fail(refused(result, "no token was created"))
            elif not result:
                fail(WaportError(INTERNAL, f"token id {record.id} is taken in the cluster already; try again"))
            else:
                self.take([record])
                ok(token_created(record, token, seconds))

        self.submit(lambda store: store.add_token(data), done)

    def cmd_token_list(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        now = self.now()

        def done(result: Any) -> None:
            if isinstance(result, BaseException):
                fail(refused(result, "no tokens to show"))
                return
            records, bad = self.parse(result[1])
            if self.synced:  # every token there is: the copy follows, revocations it knows kept
                self.take(records, bad, complete=True)
                ok({"tokens": self.store.listing(now)})
            else:
                ok({"tokens": TokenStore(records).listing(now)})

        self.submit(lambda store: store.tokens(), done)

    def cmd_token_revoke(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        token_id = token_id_arg(args)
        now = self.now()

        def done(result: Any) -> None:
            if isinstance(result, BaseException):
                fail(refused(result, "nothing was revoked"))
                return
            if result is None:
                fail(unknown_token(token_id))
                return
            data, revoked = result
            records, bad = self.parse([(token_id, data)])
            if revoked:
                log.info("API token %s revoked", token_id)
            if bad:
                fail(WaportError(INTERNAL, f"API token {token_id}'s record in the cluster's database cannot be read"))
                return
            self.take(records)
            ok((self.store.get(token_id) or records[0]).public(now))

        self.submit(lambda store: store.revoke_token(token_id, round(now, 3)), done)


def refused(exc: BaseException, what: str) -> WaportError:
    """PostgreSQL did not take a token command (nothing was written anywhere): unreachable or too slow is
    `timeout` (try again); anything else `internal`. The message never holds the DSN's password."""
    if isinstance(exc, StoreUnavailable):
        return WaportError(TIMEOUT, f"the cluster's database is unavailable ({exc}): {what}; try again")
    return WaportError(INTERNAL, f"{exc}: {what}")
