"""`python -m api`: the HTTP API server, run by waportd when `http_listen` is set.

uvicorn serves the app; the links to waportd (control and events sockets) live as long as the
server. It dies with waportd (waportd starts it tied: PR_SET_PDEATHSIG) and keeps nothing that a
restart would lose beyond the 10 minutes of events kept for SSE reconnects.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import AsyncIterator

import uvicorn
import zmq

from api.app import Api, build
from api.auth import Auth
from api.daemon import ControlLink, EventHub
from api.fastpath import FastSend
from api.httpbounds import BoundedHttpTools
from api.securityheaders import SecurityHeaders
from ipc.logfmt import log_to_stderr
from ipc.validation import parse_listen

log = logging.getLogger("waport.api")
TOKENS_FILE = "api-tokens.json"


def make_app(run_dir: str, state_dir: str):  # noqa: ANN201 - a FastAPI app
    """The app with its links to waportd, opened when the server starts and closed when it stops."""
    ctx = zmq.Context()
    control = ControlLink(run_dir, ctx)
    hub = EventHub(run_dir, ctx)
    api = Api(control, hub, Auth(os.path.join(state_dir, TOKENS_FILE)))
    app = build(api)

    @contextlib.asynccontextmanager
    async def lifespan(_app: object) -> AsyncIterator[None]:
        control.start()
        hub.start()
        try:
            yield
        finally:
            hub.close()
            control.close()
            ctx.term()

    app.router.lifespan_context = lifespan
    return SecurityHeaders(FastSend(app, api))  # §13: on every answer, the fast path's included


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m api", description="waport's HTTP API (DESIGN.md §9)")
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    log_to_stderr(args.log_level, "api")
    try:
        host, port = parse_listen(args.listen, "http_listen")  # ":8480": every interface, as metrics_listen
    except ValueError as exc:
        log.error("%s", exc)  # in the one log format, like every line of ours
        raise SystemExit(2) from None
    app = make_app(args.run_dir, args.state_dir)
    # No access log: request lines would carry company ids at INFO for every send; errors are logged.
    # uvicorn says where it listens once it does (and why not, when the port is taken).
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
                            server_header=False, date_header=False, timeout_graceful_shutdown=3,
                            http=BoundedHttpTools)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
