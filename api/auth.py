"""Bearer tokens (DESIGN.md §9): checked against STATE_DIR/api-tokens.json, which waportd writes
(`waportctl token create|list|revoke`) and this process only reads, again whenever it changes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ipc.errors import FORBIDDEN, INTERNAL, UNAUTHORIZED, WaportError
from ipc.tokens import TokenFileError, TokenReader

log = logging.getLogger("waport.api")


@dataclass(frozen=True)
class Caller:
    token_id: str
    company: str | None  # None: an admin token, acts on every company

    def may_act_on(self, company: str) -> None:
        if self.company is not None and self.company != company:
            raise WaportError(FORBIDDEN, f"this token acts on company {self.company!r} only")


class Auth:
    def __init__(self, path: str) -> None:
        self.tokens = TokenReader(path)
        self.reported = ""

    def check(self, header: str | None) -> Caller:
        """The caller of `Authorization: Bearer <token>`, or `unauthorized` (never saying which part failed
        beyond what the caller sent: a missing header, or a token that is not valid now)."""
        if not header:
            raise WaportError(UNAUTHORIZED, "missing Authorization: Bearer <token> (waportctl token create)")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise WaportError(UNAUTHORIZED, "Authorization must be: Bearer <token>")
        try:
            record = self.tokens.verify(token.strip(), time.time())
        except TokenFileError as exc:  # fail closed: the file that revokes a token may be the damaged one
            if str(exc) != self.reported:  # once per damage, for the operator; the caller learns no path
                self.reported = str(exc)
                log.error("every request is refused until the token file is repaired: %s", exc)
            raise WaportError(INTERNAL, "the token store cannot be read; see the waport API log") from None
        if record is None:
            raise WaportError(UNAUTHORIZED, "unknown, revoked or expired token")
        return Caller(record.id, record.company)
