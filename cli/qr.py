"""QR codes for pairing: drawn in the terminal or written as a PNG.

Always a full-size QR code (never a Micro QR, which phones do not scan), with the standard
quiet zone so the phone finds it on a dark or light terminal.
"""

from __future__ import annotations

import io

import segno

BLOCK = "\u2588"
PNG_SCALE = 8


def _code(text: str) -> segno.QRCode:
    return segno.make_qr(text, error="L")


def terminal(text: str, encoding: str | None = "utf-8") -> str:
    """The code drawn with half-block characters (two modules per line), or ANSI colours
    when the output cannot encode the block characters."""
    out = io.StringIO()
    try:
        BLOCK.encode(encoding or "utf-8")
        compact = True
    except (UnicodeEncodeError, LookupError):
        compact = False
    _code(text).terminal(out=out, compact=compact)
    return out.getvalue()


def write_png(text: str, path: str) -> None:
    _code(text).save(path, kind="png", scale=PNG_SCALE, border=4)
