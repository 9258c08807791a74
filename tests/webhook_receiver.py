"""A webhook receiver for the tests and the benchmark: a real HTTP server process that checks every
request with the Standard Webhooks reference library (`standardwebhooks`) and records what it got.

`python tests/webhook_receiver.py --port P` (0: any; the port is printed on the first line).
- `POST /hook/<name>`: a delivery. Verified against the secrets set for that path; answered as the
  behaviour says (default 204).
- `POST /admin/secrets {"path", "secrets": [...]}`; `POST /admin/behave {"status", "retry_after",
  "delay", "path"?}` (for one path, or all); `GET /received` -> every request so far.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class Receiver:
    def __init__(self, verify: bool = True) -> None:
        self.verify = verify
        self.secrets: dict[str, list[str]] = {}
        self.behaviour: dict[str, dict[str, Any]] = {}
        self.received: list[dict[str, Any]] = []

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        path = request.path
        record: dict[str, Any] = {"path": path, "at": time.time(), "id": request.headers.get("webhook-id"),
                                  "timestamp": request.headers.get("webhook-timestamp"),
                                  "signatures": len(request.headers.get("webhook-signature", "").split())}
        try:
            payload = json.loads(body)
            record.update(seq=payload.get("seq"), type=payload.get("type"), company=payload.get("company"),
                          event_id=payload.get("id"), data=payload.get("data"), event_ts=payload.get("ts"))
        except ValueError:
            record["bad_json"] = True
        if not self.verify:
            record.pop("data", None)  # the benchmark's load: keep little
        else:
            record["valid"] = {}
            for secret in self.secrets.get(path, []):
                try:
                    Webhook(secret).verify(body, dict(request.headers))
                    record["valid"][secret] = True
                except WebhookVerificationError as exc:
                    record["valid"][secret] = str(exc)
        how = self.behaviour.get(path) or self.behaviour.get("*") or {}
        record["answered"] = how.get("status", 204)
        self.received.append(record)
        if how.get("delay"):
            await asyncio.sleep(how["delay"])
        headers = {"Retry-After": str(how["retry_after"])} if how.get("retry_after") is not None else {}
        return web.Response(status=record["answered"], headers=headers)

    async def set_secrets(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.secrets[data["path"]] = list(data["secrets"])
        return web.json_response({})

    async def behave(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.behaviour[data.pop("path", "*")] = data
        return web.json_response({})

    async def count(self, request: web.Request) -> web.Response:
        return web.json_response(len(self.received))

    async def listing(self, request: web.Request) -> web.Response:
        since = int(request.query.get("from", "0"))
        return web.json_response(self.received[since:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--no-verify", action="store_true", help="skip the signature check (the benchmark's load)")
    args = ap.parse_args()
    r = Receiver(verify=not args.no_verify)
    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/hook/{name}", r.hook)
    app.router.add_post("/admin/secrets", r.set_secrets)
    app.router.add_post("/admin/behave", r.behave)
    app.router.add_get("/received", r.listing)
    app.router.add_get("/count", r.count)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the port chosen for 0
        print(port, flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
