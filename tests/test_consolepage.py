"""The console's static files (api/consolepage.py, api/console/): what they may contain, how they are
served. Pure: the files are read, no server runs (tests/test_console.py drives them in a browser)."""

from __future__ import annotations

import os
import re
from html.parser import HTMLParser

import pytest

from api import consolepage


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.data: dict[int, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self.tags:
            self.data[len(self.tags) - 1] = self.data.get(len(self.tags) - 1, "") + data


def page() -> Page:
    p = Page()
    p.feed(consolepage.load()["/console"].body.decode())
    return p


def test_every_asset_is_there_with_its_type_and_a_validator() -> None:
    assets = consolepage.load()
    assert set(assets) == {"/console", "/console/console.js", "/console/console.css"}
    assert assets["/console"].media_type.startswith("text/html")
    assert assets["/console/console.js"].media_type.startswith("text/javascript")
    assert all(a.body and re.fullmatch(r'"[0-9a-f]{32}"', a.etag) for a in assets.values())


def test_the_page_loads_only_its_own_assets_and_has_no_inline_code() -> None:
    p = page()
    scripts = [attrs for tag, attrs in p.tags if tag == "script"]
    assert scripts == [{"src": "/console/console.js", "defer": None}]
    assert not [tag for tag, _ in p.tags if tag == "style"]
    assert not [attrs for _, attrs in p.tags if "style" in attrs or any(k.startswith("on") for k in attrs)]
    urls = [v for _, attrs in p.tags for k, v in attrs.items() if k in ("src", "href") and v]
    assert all(u.startswith("/console/") or u.startswith("data:") for u in urls), urls


def test_no_form_could_ever_put_the_token_in_a_url() -> None:
    """The script handles every form; were it missing, a form still sends nothing: no field has a name,
    and a form posts (never a GET with the fields in the query)."""
    p = page()
    assert not [attrs for tag, attrs in p.tags if tag == "input" and "name" in attrs]
    assert all(attrs.get("method") == "post" for tag, attrs in p.tags if tag == "form")


def test_every_control_has_an_accessible_name() -> None:
    p = page()
    labelled = {attrs.get("for") for tag, attrs in p.tags if tag == "label"}
    for i, (tag, attrs) in enumerate(p.tags):
        if tag == "button":
            # The action buttons get their aria-label ("Stop acme") from the script, by data-action.
            assert attrs.get("aria-label") or attrs.get("data-action") or p.data.get(i, "").strip(), attrs
        elif tag == "input":
            assert attrs.get("id") in labelled, attrs


def test_the_script_never_parses_text_as_markup() -> None:
    with open(os.path.join(consolepage.HERE, "console.js")) as fh:
        js = fh.read()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink
    assert "localStorage" not in js and "document.cookie" not in js  # the token stays in the tab


def test_a_missing_file_is_an_error_when_the_app_is_built(tmp_path: os.PathLike) -> None:
    with pytest.raises(FileNotFoundError):
        consolepage.load(str(tmp_path))
