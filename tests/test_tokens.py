"""API tokens (ipc/tokens.py): only hashes at rest, 0600, verify, revoke, expiry, the reader's reloads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat

import pytest

from ipc.errors import BAD_REQUEST, INVALID_COMPANY_ID, WaportError
from ipc.tokens import (
    ACTIVE,
    EXPIRED,
    REVOKED,
    TOKENS_FILE,
    TokenFileError,
    TokenReader,
    TokenRecord,
    TokenStore,
    token_hash,
)

NOW = 1_700_000_000.0


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / TOKENS_FILE)


def test_a_token_is_wp_and_32_random_bytes_and_only_its_hash_is_kept(path):
    store = TokenStore()
    record, token = store.create("acme", None, NOW)
    assert re.fullmatch(r"wp_[A-Za-z0-9_-]{43}", token)  # 32 bytes of URL-safe base64
    assert re.fullmatch(r"tok_[0-9a-f]{12}", record.id)
    assert record.sha256 == hashlib.sha256(token.encode()).hexdigest() == token_hash(token)
    assert (record.company, record.created_at, record.expires_at, record.revoked_at) == ("acme", NOW, None, None)
    assert store.create("acme", None, NOW)[1] != token
    store.save(path)
    text = open(path).read()
    assert token not in text and token[3:] not in text
    assert record.sha256 in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_the_file_round_trips(path):
    store = TokenStore()
    admin, _ = store.create(None, None, NOW)
    company, _ = store.create("acme", 3600, NOW + 1)
    store.revoke(company.id, NOW + 2)
    store.save(path)
    loaded = TokenStore.load(path)
    assert loaded.records == store.records
    assert loaded.get(admin.id) == admin and loaded.get(company.id).revoked_at == NOW + 2
    data = json.loads(open(path).read())
    assert data["version"] == 1 and [t["id"] for t in data["tokens"]] == [admin.id, company.id]


def test_verify_an_active_token(path):
    store = TokenStore()
    record, token = store.create("acme", None, NOW)
    assert store.verify(token, NOW + 10**9) == record


@pytest.mark.parametrize("presented", ["wp_" + "A" * 43, "", "Bearer x", "wp_", None, 42, "wp_" + "x" * 300,
                                       "wp_\ud800"])
def test_verify_refuses_unknown_and_junk(presented):
    store = TokenStore()
    store.create(None, None, NOW)
    assert store.verify(presented, NOW) is None


def test_verify_refuses_a_revoked_token_and_revoking_twice_keeps_the_first_time():
    store = TokenStore()
    record, token = store.create(None, None, NOW)
    other, other_token = store.create(None, None, NOW)
    revoked = store.revoke(record.id, NOW + 5)
    assert revoked.revoked_at == NOW + 5 and revoked.state(NOW + 6) == REVOKED
    assert store.verify(token, NOW + 6) is None
    assert store.revoke(record.id, NOW + 9).revoked_at == NOW + 5
    assert store.verify(other_token, NOW + 6) == other


def test_verify_refuses_an_expired_token():
    store = TokenStore()
    record, token = store.create("acme", 60, NOW)
    assert record.expires_at == NOW + 60
    assert store.verify(token, NOW + 59.9) == record and record.state(NOW + 59.9) == ACTIVE
    assert store.verify(token, NOW + 60) is None and record.state(NOW + 60) == EXPIRED


def test_listing_shows_states_and_never_a_hash_or_token():
    store = TokenStore()
    a, token_a = store.create("acme", 60, NOW)
    b, token_b = store.create(None, None, NOW + 1)
    c, _ = store.create("bistro", None, NOW + 2)
    store.revoke(c.id, NOW + 3)
    listing = store.listing(NOW + 100)
    assert [(t["id"], t["company"], t["state"]) for t in listing] == [
        (a.id, "acme", EXPIRED), (b.id, None, ACTIVE), (c.id, "bistro", REVOKED)]
    assert set(listing[0]) == {"id", "company", "created_at", "expires_at", "revoked_at", "state"}
    text = json.dumps(listing)
    assert a.sha256 not in text and token_a not in text and token_b not in text


def test_create_and_revoke_refuse_bad_input():
    store = TokenStore()
    with pytest.raises(WaportError) as exc:
        store.create("no such/company", None, NOW)
    assert exc.value.code == INVALID_COMPANY_ID
    for seconds in (0, -5, True):
        with pytest.raises(WaportError) as exc:
            store.create(None, seconds, NOW)
        assert exc.value.code == BAD_REQUEST
    with pytest.raises(WaportError) as exc:
        store.revoke("tok_000000000000", NOW)
    assert exc.value.code == BAD_REQUEST and "tok_000000000000" in exc.value.message
    assert len(store) == 0


def test_a_missing_file_is_no_tokens(path):
    assert len(TokenStore.load(path)) == 0


def good_record(**changes) -> dict:
    record = {"id": "tok_0123456789ab", "sha256": "a" * 64, "company": None, "created_at": NOW,
              "expires_at": None, "revoked_at": None}
    return {**record, **changes}


@pytest.mark.parametrize("content,match", [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"[" * 100_000, "nested too deeply"),
    (b"[]", '"tokens" list'),
    (b'{"version": 1}', '"tokens" list'),
    (json.dumps({"version": 2, "tokens": []}).encode(), "unsupported version 2"),
    (json.dumps({"version": 1, "tokens": [1]}).encode(), "not an object"),
    (json.dumps({"version": 1, "tokens": [good_record(id="a b")]}).encode(), "token id"),
    (json.dumps({"version": 1, "tokens": [good_record(sha256="wp_secret")]}).encode(), "sha256"),
    (json.dumps({"version": 1, "tokens": [good_record(company="a/b")]}).encode(), "bad company"),
    (json.dumps({"version": 1, "tokens": [good_record(created_at="today")]}).encode(), "created_at"),
    (json.dumps({"version": 1, "tokens": [good_record(expires_at=True)]}).encode(), "expires_at"),
    (json.dumps({"version": 1, "tokens": [good_record(), good_record()]}).encode(), "appears twice"),
])
def test_a_damaged_file_is_refused_with_a_clear_error(path, content, match):
    with open(path, "wb") as fh:
        fh.write(content)
    with pytest.raises(TokenFileError, match=match) as exc:
        TokenStore.load(path)
    assert path in str(exc.value)


def test_a_record_from_the_file_is_checked():
    assert TokenRecord.from_json(good_record(company="acme", expires_at=NOW + 1)).company == "acme"


def test_the_reader_rereads_only_when_the_file_changed(path):
    reader = TokenReader(path)
    assert reader.verify("wp_anything", NOW) is None and reader.reads == 0  # no file: no tokens
    store = TokenStore()
    record, token = store.create("acme", None, NOW)
    store.save(path)
    assert reader.verify(token, NOW) == record
    for _ in range(5):
        assert reader.verify(token, NOW) == record
    assert reader.reads == 1
    store.revoke(record.id, NOW + 1)
    store.save(path)
    assert reader.verify(token, NOW + 2) is None and reader.reads == 2
    second, second_token = store.create(None, None, NOW + 3)
    store.save(path)
    assert reader.verify(second_token, NOW + 4) == second and reader.reads == 3
    os.unlink(path)
    assert reader.verify(second_token, NOW + 4) is None


def test_the_reader_fails_closed_on_a_damaged_file_until_it_is_fixed(path):
    store = TokenStore()
    _, token = store.create(None, None, NOW)
    store.save(path)
    reader = TokenReader(path)
    assert reader.verify(token, NOW) is not None
    with open(path, "w") as fh:
        fh.write('{"version": 1, "tokens": [')
    for _ in range(3):
        with pytest.raises(TokenFileError, match="not valid JSON"):
            reader.verify(token, NOW)
    assert reader.reads == 2  # the damaged version was read once
    store.save(path)
    assert reader.verify(token, NOW) is not None


# ---------------------------------------------------------------- another copy's records (cluster mode)


def test_merge_takes_new_and_changed_records_and_says_which():
    mine = TokenStore()
    kept, kept_token = mine.create(None, None, NOW)
    theirs = TokenStore([kept])
    new, new_token = theirs.create("acme", None, NOW + 1)
    assert mine.merge(theirs.records.values()) == [new.id]
    assert mine.verify(new_token, NOW + 2) == new and mine.verify(kept_token, NOW + 2) == kept
    assert mine.merge(theirs.records.values()) == []  # seen again: nothing changes, nothing to write
    theirs.revoke(new.id, NOW + 3)
    assert mine.merge([theirs.get(new.id)]) == [new.id]
    assert mine.verify(new_token, NOW + 4) is None


def test_merge_never_undoes_a_revocation_and_keeps_the_first_time():
    mine = TokenStore()
    record, token = mine.create(None, None, NOW)
    mine.revoke(record.id, NOW + 5)
    assert mine.merge([record]) == []  # an older copy, without the revocation
    assert mine.get(record.id).revoked_at == NOW + 5 and mine.verify(token, NOW + 6) is None
    later = dataclasses.replace(record, revoked_at=NOW + 9)
    assert mine.merge([later]) == [] and mine.get(record.id).revoked_at == NOW + 5
    earlier = dataclasses.replace(record, revoked_at=NOW + 1)
    assert mine.merge([earlier]) == [record.id] and mine.get(record.id).revoked_at == NOW + 1


def test_merge_of_every_record_drops_what_is_gone_and_another_hash_is_another_token():
    mine = TokenStore()
    gone, gone_token = mine.create(None, None, NOW)
    same_id, old_token = mine.create(None, None, NOW)
    unreadable, unreadable_token = mine.create(None, None, NOW)
    mine.revoke(same_id.id, NOW + 1)
    other = TokenStore()
    _, new_token = other.create(None, None, NOW + 2)
    replaced = dataclasses.replace(other.records.popitem()[1], id=same_id.id)  # the id, another token
    changed = mine.merge([replaced, unreadable], complete=True, gone=[unreadable.id])
    assert sorted(changed) == sorted([same_id.id, gone.id, unreadable.id])
    assert list(mine.records) == [same_id.id] and mine.get(same_id.id) == replaced  # not kept revoked: not it
    assert mine.verify(new_token, NOW + 3) == replaced
    for token in (gone_token, old_token, unreadable_token):
        assert mine.verify(token, NOW + 3) is None
