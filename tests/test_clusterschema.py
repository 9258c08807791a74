"""Cluster mode's application_name (fencing by company and epoch) and the DSN shown without its password."""

from __future__ import annotations

from ipc.clusterschema import (
    MIGRATIONS,
    NAME_MAX_BYTES,
    SCHEMA_VERSION,
    application_name,
    company_token,
    like_prefix,
    parse_application_name,
)
from waportd.clusterstore import redact_dsn


def test_application_name_round_trips_company_and_epoch() -> None:
    assert application_name("acme", 7) == "waport/acme/7"
    assert parse_application_name("waport/acme/7") == ("acme", 7)
    assert parse_application_name(application_name("a_b-C9", 2**63 - 1)) == ("a_b-C9", 2**63 - 1)


def test_a_long_company_fits_postgresql_63_bytes_and_stays_distinct() -> None:
    long_a, long_b = "a" * 50, "a" * 49 + "b"
    for company in (long_a, long_b, "x" * 31):
        name = application_name(company, 2**63 - 1)
        assert len(name.encode()) <= NAME_MAX_BYTES
        assert parse_application_name(name) == (company_token(company), 2**63 - 1)
    assert company_token(long_a) != company_token(long_b)
    assert company_token("x" * 30) == "x" * 30  # short enough: the company itself


def test_other_names_are_not_ours() -> None:
    for name in ("", "waportd/host1", "waport/acme", "waport/acme/x", "waport/acme/1/2", "psql", "waport//3"):
        assert parse_application_name(name) is None


def test_like_prefix_escapes_wildcards() -> None:
    assert like_prefix("a_b") == "waport/a\\_b/%"  # `_` would match any character in LIKE


def test_schema_versions_are_contiguous() -> None:
    assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))


def test_redact_dsn_hides_the_password_in_every_form() -> None:
    assert redact_dsn("postgresql://waport:s3cr%40t@db:5432/waport") == "postgresql://waport:***@db:5432/waport"
    assert "s3cret" not in redact_dsn("postgresql://db/waport?password=s3cret&sslmode=require")
    assert "sslmode=require" in redact_dsn("postgresql://db/waport?password=s3cret&sslmode=require")
    assert "s3cret" not in redact_dsn("host=db user=waport password=s3cret dbname=waport")
    assert redact_dsn("postgresql://db/waport") == "postgresql://db/waport"
