"""API tokens in cluster mode (waportd/tokensync.py) against a real PostgreSQL, without daemons: each "host" is
a ClusterTokens with a state directory of its own, its cluster link's work run inline. The rules: PostgreSQL
first, the file a copy kept in step by one cheap look a round, a host's own tokens join the cluster, and no
older copy undoes a revocation."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import PgServer, free_port

from ipc.errors import BAD_REQUEST, TIMEOUT, WaportError
from ipc.tokens import TOKENS_FILE, TokenReader, TokenStore
from waportd.clusterstore import ClusterStore, StoreError
from waportd.tokensync import ClusterTokens

NOW = 1_700_000_000.0


class Host:
    """One host's ClusterTokens: its link's work runs at once (the order a link keeps), counted."""

    def __init__(self, base: str, store: ClusterStore) -> None:
        os.makedirs(base, exist_ok=True)
        self.path = os.path.join(base, TOKENS_FILE)
        self.store = store
        self.calls = 0
        self.clock = NOW
        self.tokens = ClusterTokens(self.path, self.submit, lambda: self.clock)

    def submit(self, work: Callable[[ClusterStore], Any], done: Callable[[Any], None]) -> None:
        self.calls += 1
        try:
            result = work(self.store)
        except StoreError as exc:
            result = exc
        done(result)

    def ctl(self, cmd: str, **args: Any) -> dict[str, Any]:
        """A command as the controller hands it over: its one answer, or the error it failed with."""
        answers: list[Any] = []
        getattr(self.tokens, f"cmd_{cmd}")(args, answers.append, answers.append)
        (answer,) = answers
        if isinstance(answer, WaportError):
            raise answer
        return answer

    def reader(self) -> TokenReader:
        return TokenReader(self.path)


@pytest.fixture
def hosts(pg: PgServer, tmp_path) -> Iterator[Callable[[str], Host]]:
    made: list[ClusterStore] = []

    def make(name: str, dsn: str | None = None) -> Host:
        store = ClusterStore(dsn or pg.dsn, name, 15.0, connect_timeout=2, call_timeout=4)
        if not made and dsn is None:
            store.migrate()
        made.append(store)
        return Host(str(tmp_path / name), store)

    yield make
    for store in made:
        store.close()


def test_a_token_made_on_one_host_works_on_another_and_a_revocation_reaches_back(hosts, pg):
    a, b = hosts("h1"), hosts("h2")
    a.tokens.start()
    b.tokens.start()
    made = a.ctl("token_create", company="acme", expires="30d")
    assert a.reader().verify(made["token"], NOW) is not None  # at once on the host that made it
    assert b.reader().verify(made["token"], NOW) is None  # b has not looked yet
    b.tokens.after_round()
    assert b.reader().verify(made["token"], NOW).company == "acme"
    stored = pg.sql("SELECT record FROM waport_tokens WHERE id = %s", made["id"])[0][0]
    assert stored == TokenStore.load(a.path).get(made["id"]).to_json() and made["token"] not in json.dumps(stored)

    b.clock = NOW + 5
    revoked = b.ctl("token_revoke", id=made["id"])
    assert revoked["state"] == "revoked" and revoked["revoked_at"] == NOW + 5
    assert b.reader().verify(made["token"], NOW + 6) is None
    a.tokens.after_round()
    assert a.reader().verify(made["token"], NOW + 6) is None
    b.clock = NOW + 9
    assert b.ctl("token_revoke", id=made["id"])["revoked_at"] == NOW + 5  # revoking twice keeps the first time
    assert [(t["id"], t["state"]) for t in a.ctl("token_list")["tokens"]] == [(made["id"], "revoked")]
    with pytest.raises(WaportError) as exc:
        a.ctl("token_revoke", id="tok_000000000000")
    assert exc.value.code == BAD_REQUEST


def test_an_idle_round_costs_one_query_and_rewrites_nothing(hosts):
    a, b = hosts("h1"), hosts("h2")
    a.tokens.start()
    b.tokens.start()
    a.ctl("token_create")
    b.tokens.after_round()
    inode = os.stat(b.path).st_ino
    before = b.calls
    for _ in range(3):  # the rows written in the last MARGIN come again: the same, so the file stays
        b.tokens.after_round()
    assert b.calls - before == 3 and os.stat(b.path).st_ino == inode


def test_a_hosts_own_tokens_join_the_cluster_and_no_old_copy_undoes_a_revocation(hosts, pg):
    a, b = hosts("h1"), hosts("h2")
    a.tokens.start()
    shared = a.ctl("token_create")
    # b ran alone before: a token of its own, and a copy of `shared` it revoked meanwhile
    copy = TokenStore.load(a.path).get(shared["id"])
    own = TokenStore([copy])
    kept, kept_token = own.create(None, None, NOW)
    own.revoke(copy.id, NOW + 1)
    own.save(b.path)
    b.tokens.start()
    a.tokens.after_round()
    assert a.reader().verify(kept_token, NOW + 2) == kept  # b's own token works on a
    assert a.reader().verify(shared["token"], NOW + 2) is None  # b's revocation reached the cluster
    assert b.reader().verify(kept_token, NOW + 2) == kept
    assert {t["id"] for t in a.ctl("token_list")["tokens"]} == {shared["id"], kept.id}

    # a host whose copy is from before the revocation (it was down meanwhile) joins: revoked there too
    c = hosts("h3")
    TokenStore([copy]).save(c.path)
    c.tokens.start()
    assert c.reader().verify(shared["token"], NOW + 3) is None
    assert c.reader().verify(kept_token, NOW + 3) == kept
    (record,) = pg.sql("SELECT record FROM waport_tokens WHERE id = %s", shared["id"])[0]
    assert record["revoked_at"] == NOW + 1


def test_a_write_that_commits_late_is_still_seen(hosts, pg):
    a, b = hosts("h1"), hosts("h2")
    a.tokens.start()
    b.tokens.start()
    made = a.ctl("token_create")
    b.tokens.after_round()
    # A revocation whose statement began before b's last look but committed after it (its updated_at is older)
    record = TokenStore.load(a.path).get(made["id"]).to_json()
    pg.sql("UPDATE waport_tokens SET record = jsonb_set(record, '{revoked_at}', %s::jsonb), "
           "updated_at = now() - interval '20 seconds' WHERE id = %s", json.dumps(NOW + 1), record["id"])
    b.tokens.after_round()
    assert b.reader().verify(made["token"], NOW + 2) is None


def test_postgresql_unreachable_is_a_clear_error_and_nothing_is_written(hosts, tmp_path):
    a = hosts("h1", dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    own = TokenStore()
    record, token = own.create(None, None, NOW)
    own.save(a.path)
    before = open(a.path, "rb").read()
    a.tokens.start()  # the join fails: the file stays as it is, and works
    for cmd, args, what in (("token_create", {}, "no token was created"),
                            ("token_revoke", {"id": record.id}, "nothing was revoked"),
                            ("token_list", {}, "no tokens")):
        with pytest.raises(WaportError) as exc:
            a.ctl(cmd, **args)
        assert exc.value.code == TIMEOUT and "unavailable" in exc.value.message and what in exc.value.message
    a.tokens.after_round()
    assert open(a.path, "rb").read() == before and a.reader().verify(token, NOW) == record
    assert not a.tokens.synced


def test_a_damaged_file_is_neither_uploaded_nor_overwritten(hosts, pg):
    a = hosts("h1")
    with open(a.path, "w") as fh:
        fh.write("{not json")
    a.tokens.start()
    made = a.ctl("token_create")  # PostgreSQL takes it; this host's file is left for its operator
    assert open(a.path).read() == "{not json" and not a.tokens.synced
    assert [row[0] for row in pg.sql("SELECT id FROM waport_tokens")] == [made["id"]]
    os.unlink(a.path)
    a.tokens.after_round()
    assert a.tokens.synced and a.reader().verify(made["token"], NOW) is not None
