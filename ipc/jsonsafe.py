"""One JSON parser for every frame, body and file we did not write ourselves (DESIGN.md §9).

`json.loads` raises `RecursionError` on input nested deeper than the interpreter's recursion
limit (`[` repeated 200,000 times fits in a 1 MiB frame): that is no `ValueError`, so a caller
catching malformed JSON the usual way lets it escape into its loop. `loads` turns it, and every
other way raw input can fail to parse, into one exception, `InvalidJSON`.
"""

from __future__ import annotations

import json
from typing import Any


class InvalidJSON(ValueError):
    """Raw input that is not JSON we accept: undecodable, malformed, or nested too deeply.

    A `ValueError`, so handlers written for `json.loads` keep catching it.
    """


def loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """`json.loads`, raising only `InvalidJSON` (a `ValueError`) for bad input of any kind."""
    if isinstance(raw, memoryview):
        raw = raw.tobytes()
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidJSON("JSON nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:
        raise InvalidJSON(f"not valid JSON: {exc}") from None
