"""`GET /console` and its assets (DESIGN.md §13): static files of `api/console/`, served from memory.

They hold no data, so they need no token; everything the page shows it asks the §9 routes for, with
the token the operator typed, so the console can do nothing the API does not let that token do.
Each file is read once, when the app is built; `ETag` + `no-cache` make a browser check it on every
load, so an upgraded waport is never shown with the old script.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "console")
ASSETS = {  # URL path -> (file in api/console/, media type)
    "/console": ("index.html", "text/html; charset=utf-8"),
    "/console/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console/console.css": ("console.css", "text/css; charset=utf-8"),
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str

    def answer(self, request: Request) -> Response:
        headers = {"ETag": self.etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def load(directory: str = HERE) -> dict[str, Asset]:
    """Every asset, read now: a missing file is an install error, said at start rather than on a click."""
    assets = {}
    for path, (name, media_type) in ASSETS.items():
        with open(os.path.join(directory, name), "rb") as fh:
            body = fh.read()
        assets[path] = Asset(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return assets


def add_routes(app: FastAPI, directory: str = HERE) -> None:
    for path, asset in load(directory).items():
        app.add_api_route(path, handler(asset), methods=["GET"], include_in_schema=False)


def handler(asset: Asset):  # noqa: ANN201 - a route endpoint
    async def serve(request: Request) -> Response:
        return asset.answer(request)

    return serve
