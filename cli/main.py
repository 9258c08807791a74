"""`waportctl`: the command line of waportd, one verb per control command (DESIGN.md §4).

Global options go before the verb (`waportctl --json list`) or after it (`waportctl list --json`).
Exit codes: 0 ok, 1 error reply, 2 usage, 3 daemon unreachable.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import click

import ipc
from cli import qr as qrcode
from cli import render
from cli.client import (
    DEFAULT_RUN_DIR,
    DEFAULT_TIMEOUT,
    EXIT_ERROR,
    WORKER_BOUND_TIMEOUT,
    Settings,
    answer,
    call,
    print_json,
    read_chunks,
    unreachable,
)
from cli.eventstream import EventStream
from ipc import events, webhooks
from ipc.control import DaemonUnreachable
from ipc.logfmt import log_to_stderr
from ipc.mediastore import WIRE_CHUNK, put_args
from ipc.validation import parse_duration

F = TypeVar("F", bound=Callable[..., Any])


def _set(field: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    """A callback storing a verb-level global option into the shared settings."""

    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is not None and value is not False:
            setattr(ctx.ensure_object(Settings), field, value)

    return callback


def global_options(func: F) -> F:
    """Accept --run-dir/--json/--timeout after the verb too, as users type them there."""
    func = click.option(
        "--run-dir",
        default=None,
        expose_value=False,
        callback=_set("run_dir"),
        hidden=True,
        type=click.Path(file_okay=False),
    )(func)
    func = click.option(
        "--json",
        "json_",
        is_flag=True,
        default=False,
        expose_value=False,
        callback=_set("json"),
        help="Print the reply's result as JSON.",
    )(func)
    func = click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        expose_value=False,
        callback=_set("timeout"),
        hidden=True,
    )(func)
    return func


pass_settings = click.make_pass_decorator(Settings, ensure=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--run-dir",
    envvar="WAPORT_RUN_DIR",
    default=DEFAULT_RUN_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory of waportd's sockets (env WAPORT_RUN_DIR).",
)
@click.option("--json", "json_", is_flag=True, help="Print the reply's result as JSON.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help=f"Seconds to wait for waportd's reply  [default: {DEFAULT_TIMEOUT:g}; "
    f"{WORKER_BOUND_TIMEOUT:g} for stop, restart, logout, delete, send, pair]",
)
@click.version_option(ipc.__version__, prog_name="waportctl")
@click.pass_context
def cli(ctx: click.Context, run_dir: str, json_: bool, timeout: float | None) -> None:
    """Control waportd, the WhatsApp session supervisor.

    \b
    Exit codes: 0 ok, 1 error reply, 2 usage, 3 waportd unreachable.
    """
    ctx.obj = Settings(run_dir=run_dir, json=json_, timeout=timeout)


def _print_record_state(settings: Settings, result: dict[str, Any]) -> None:
    if settings.json:
        print_json(result)
    else:
        click.echo(f"{result.get('company')}: {render.scalar(result.get('state'))}")


@cli.command()
@global_options
@pass_settings
def ping(settings: Settings) -> None:
    """Check that waportd answers."""
    result = call(settings, "ping")
    if settings.json:
        print_json(result)
    else:
        click.echo(f"pong from waportd {result.get('version', '?')} (pid {result.get('pid', '?')})")


@cli.command()
@global_options
@pass_settings
def version(settings: Settings) -> None:
    """Show the versions of waportd, its protocol and backend."""
    result = call(settings, "version")
    if settings.json:
        print_json(result)
    else:
        click.echo(
            f"waportd {result.get('version', '?')} (protocol {result.get('protocol', '?')}, "
            f"backend {result.get('backend', '?')})"
        )
        click.echo(f"waportctl {ipc.__version__}")


def _list(settings: Settings) -> None:
    result = call(settings, "list")
    if settings.json:
        print_json(result)
    else:
        click.echo(render.sessions_table(result.get("sessions") or []))
    if result.get("unanswered"):
        click.echo(f"hosts that did not answer (their sessions are missing): {', '.join(result['unanswered'])}",
                   err=True)


@cli.command("list")
@global_options
@pass_settings
def list_(settings: Settings) -> None:
    """List all sessions."""
    _list(settings)


@cli.command()
@click.argument("company", required=False)
@global_options
@pass_settings
def status(settings: Settings, company: str | None) -> None:
    """Show one session in detail (all sessions without COMPANY)."""
    if company is None:
        _list(settings)
        return
    result = call(settings, "status", company=company)
    if settings.json:
        print_json(result)
    else:
        click.echo(render.kv_block(result))


def _lifecycle(cmd: str, doc: str) -> None:
    """Register a verb whose reply is the session record (start/stop/restart/logout)."""

    @click.argument("company")
    @global_options
    @pass_settings
    def command(settings: Settings, company: str) -> None:
        _print_record_state(settings, call(settings, cmd, company=company))

    command.__doc__ = doc
    cli.command(cmd)(command)


@cli.command("start")
@click.argument("company")
@click.option("--proxy", metavar="URL", help="This company's own proxy to WhatsApp (http://, https:// or "
              "socks5://HOST:PORT), kept with it; `direct` for none whatever the config says; \"\" for the config's.")
@global_options
@pass_settings
def start(settings: Settings, company: str, proxy: str | None) -> None:
    """Start a company's worker (and start it at boot from now on); a changed --proxy restarts it."""
    args = {"company": company} if proxy is None else {"company": company, "proxy": proxy}
    _print_record_state(settings, call(settings, "start", **args))


_lifecycle("stop", "Stop a company's worker (and no longer start it at boot).")
_lifecycle("restart", "Restart a company's worker; clears the `failed` state.")
_lifecycle("logout", "Unlink the device from WhatsApp; the session must pair again.")


def stdin_is_tty() -> bool:
    return sys.stdin.isatty()


@cli.command()
@click.argument("company")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@global_options
@pass_settings
def delete(settings: Settings, company: str, yes: bool) -> None:
    """Delete a company: its worker, session and credentials."""
    if not yes:
        if not stdin_is_tty():
            raise click.UsageError(
                f"refusing to delete {company!r} without confirmation: stdin is not a terminal; pass --yes"
            )
        if not click.confirm(
            f"Delete {company!r}, its session and credentials? It will need pairing again", err=True
        ):
            click.echo("not deleted", err=True)
            raise click.exceptions.Exit(EXIT_ERROR)
    result = call(settings, "delete", company=company)
    if settings.json:
        print_json(result)
    else:
        click.echo(f"{company}: deleted")


MEDIA_FLAGS = ("image", "video", "audio", "document")


@cli.command()
@click.argument("company")
@click.argument("to")
@click.argument("text", required=False)
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Send this picture (TEXT: caption).")
@click.option("--video", type=click.Path(exists=True, dir_okay=False), help="Send this video (TEXT: caption).")
@click.option("--audio", type=click.Path(exists=True, dir_okay=False), help="Send this audio file.")
@click.option("--voice", is_flag=True, help="With --audio: send it as a voice note.")
@click.option("--document", type=click.Path(exists=True, dir_okay=False),
              help="Send this file as a document (TEXT: caption).")
@click.option("--location", metavar="LAT,LON", help="Send a location (TEXT: its name).")
@click.option("--react", nargs=2, metavar="MSGID EMOJI", help="React to message MSGID (EMOJI \"\" removes it).")
@click.option("--reply-to", metavar="MSGID", help="Send as a reply to message MSGID.")
@click.option("--idempotency-key", help="Send at most once per key: a repeat returns the first result.")
@click.option("--wait", is_flag=True, help="Wait until the message is sent or has failed (exit 1 if it failed).")
@click.option("--wait-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds --wait waits before giving up (exit 1).")
@global_options
@pass_settings
def send(settings: Settings, company: str, to: str, text: str | None, image: str | None, video: str | None,
         audio: str | None, voice: bool, document: str | None, location: str | None,
         react: tuple[str, str] | None, reply_to: str | None, idempotency_key: str | None,
         wait: bool, wait_timeout: float) -> None:
    """Send TEXT from COMPANY to TO (a phone number or a JID), or a picture, video, audio, document,
    location or reaction (DESIGN.md §11); a file is read here and stored in waportd's media store first.

    The answer `queued` means the message is journaled and will be sent; --wait waits for the outcome.
    """
    files = {kind: path for kind, path in zip(MEDIA_FLAGS, (image, video, audio, document), strict=True) if path}
    kinds = [*files, *(["location"] if location else []), *(["reaction"] if react else [])]
    if len(kinds) > 1:
        raise click.UsageError(f"one kind of message at a time, not {' and '.join(kinds)}")
    if voice and "audio" not in files:
        raise click.UsageError("--voice goes with --audio")
    args: dict[str, Any] = {"company": company, "to": to, **({"type": kinds[0]} if kinds else {})}
    if text is not None:
        args["text"] = text
    elif not kinds:
        raise click.UsageError("nothing to send: give TEXT, or a file, --location or --react")
    for kind, path in files.items():
        args["media"] = store_file(settings, path, None, company)["media_id"]
        if kind == "document":
            args["filename"] = os.path.basename(path)
        if voice:
            args["voice"] = True
    if location:
        args.update(location_args(location))
        if text is not None:
            args["name"] = args.pop("text")
    if react:
        args.update(message_id=react[0], emoji=react[1])
    if reply_to:
        args["reply_to"] = reply_to
    if idempotency_key is not None:
        args["idempotency_key"] = idempotency_key
    result = call(settings, "send", **args)
    if wait and result.get("status") in ("queued", "sending"):
        result = wait_for_outcome(settings, company, result, wait_timeout)
    if settings.json:
        print_json(result)
    else:
        status_, message_id = render.scalar(result.get("status")), render.scalar(result.get("message_id"))
        click.echo(f"{company}: {status_} {message_id}")


FINAL = ("sent", "send_failed", "uncertain")


def _when(ts: Any) -> str:
    return render.iso_time(ts) if isinstance(ts, int | float) else "-"


def wait_for_outcome(settings: Settings, company: str, result: dict[str, Any], wait_s: float) -> dict[str, Any]:
    """Follow the journal until the message is final: the events socket wakes us, the journal decides."""
    message_id = result["message_id"]
    deadline = time.monotonic() + wait_s
    try:
        stream = EventStream(settings.run_dir, company).open()
    except DaemonUnreachable:
        stream = None
    try:
        while True:
            message = call(settings, "messages", company=company, message_id=message_id)["message"]
            if message["status"] in FINAL:
                out = {"message_id": message_id, "status": message["status"]}
                if message.get("error"):
                    out["error"] = message["error"]
                if message["status"] != "sent":
                    if settings.json:
                        print_json(out)
                    else:
                        click.echo(f"{company}: {message['status']} {message_id}: {message.get('error')}", err=True)
                    raise click.exceptions.Exit(EXIT_ERROR)
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                click.echo(f"{company}: still {message['status']} after {wait_s:g} s: {message_id}", err=True)
                raise click.exceptions.Exit(EXIT_ERROR)
            if stream is not None:
                stream.next_event(min(left, 1.0))
            else:
                time.sleep(min(left, 0.2))
    finally:
        if stream is not None:
            stream.close()


class ListByDefault(click.Group):
    """`waportctl messages COMPANY` lists, as it always did; `waportctl messages purge COMPANY` erases."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["list", *args]
        return super().parse_args(ctx, args)


class Moment(click.ParamType):
    """A point in time: an ISO date or date-time (local time unless it says), Unix seconds, or a
    duration ago (`30d`: older than thirty days)."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(text).astimezone().timestamp()
        except ValueError:
            pass
        try:
            return time.time() - parse_duration(text)
        except ValueError:
            self.fail(f"{value!r} is not a time: give 2026-01-31, 2026-01-31T18:00+01:00, Unix seconds or an "
                      "age such as 30d", param, ctx)


@cli.group(cls=ListByDefault)
def messages() -> None:
    """A company's messages: `messages COMPANY` lists them, `messages purge COMPANY` erases them."""


@messages.command("list")
@click.argument("company")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@global_options
@pass_settings
def messages_list(settings: Settings, company: str, limit: int) -> None:
    """Recent outbound and inbound messages of COMPANY from its journal, with their status."""
    result = call(settings, "messages", company=company, limit=limit)
    if settings.json:
        print_json(result)
        return
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.get("counts", {}).items())) or "none"
    click.echo(f"outbound ({counts}):")
    rows = [[_when(m.get("created")), m["message_id"], m["status"], m["to"], m.get("error") or "-",
             render.content(m)] for m in result.get("outbound", [])]
    click.echo(render.table(["CREATED", "MESSAGE-ID", "STATUS", "TO", "ERROR", "CONTENT"], rows) if rows else "  none")
    click.echo("inbound:")
    rows = [[_when(m.get("ts")), m["id"], m.get("from") or "-", m.get("push_name") or "-",
             "yes" if m.get("delivered") else "no", render.content(m)]
            for m in result.get("inbound", [])]
    click.echo(render.table(["TIME", "ID", "FROM", "NAME", "DELIVERED", "CONTENT"], rows) if rows else "  none")


@messages.command("purge")
@click.argument("company")
@click.option("--before", type=Moment(), help="Only messages before this time (default: all until now).")
@click.option("--chat", metavar="PHONE|JID", help="Only this chat's messages (an erasure request).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@global_options
@pass_settings
def messages_purge(settings: Settings, company: str, before: float | None, chat: str | None, yes: bool) -> None:
    """Erase COMPANY's sent and received messages from its journal (texts, media, ids): for erasure
    requests. Sends not yet out are kept, and said so; nothing can bring the erased back."""
    if not yes:
        scope = (f" of chat {chat}" if chat else "") + (f" before {render.iso_seconds(before)}" if before else "")
        if not stdin_is_tty():
            raise click.UsageError(f"refusing to erase {company!r}'s messages without confirmation: stdin is not "
                                   "a terminal; pass --yes")
        if not click.confirm(f"Erase {company!r}'s messages{scope}? This cannot be undone", err=True):
            click.echo("nothing erased", err=True)
            raise click.exceptions.Exit(EXIT_ERROR)
    args: dict[str, Any] = {"company": company}
    if before is not None:
        args["before"] = before
    if chat is not None:
        args["chat"] = chat
    result = call(settings, "messages_purge", **args)
    if settings.json:
        print_json(result)
        return
    click.echo(f"{company}: erased {result['outbound']} sent and {result['inbound']} received messages"
               f" ({result['media']} media files)")
    if result.get("pending_kept"):
        click.echo(f"{result['pending_kept']} sends not yet out were kept: they go out as promised (erase them "
                   "after they are sent)")


def _no_code(what: str, result: dict[str, Any]) -> NoReturn:
    """A reply without a code is not an error reply, but the user got nothing: say why, exit 1."""
    why = result.get("message") or result.get("reason")
    state = result.get("state")
    text = f"no {what}: " + (f"session state is {state}" if state else "the daemon returned none")
    if why and why != state:
        text += f" ({why})"
    click.echo(text, err=True)
    raise click.exceptions.Exit(EXIT_ERROR)


@cli.command()
@click.argument("company")
@click.option("--png", type=click.Path(dir_okay=False, writable=True), help="Also write the code as a PNG.")
@global_options
@pass_settings
def qr(settings: Settings, company: str, png: str | None) -> None:
    """Show the QR code to scan with WhatsApp > Linked devices."""
    result = call(settings, "qr", company=company)
    code = result.get("code")
    if settings.json:
        print_json(result)
    if not code or not isinstance(code, str):
        _no_code("QR code", result)
    if png:
        try:
            qrcode.write_png(code, png)
        except OSError as exc:
            click.echo(f"error: cannot write {png}: {exc.strerror or exc}", err=True)
            raise click.exceptions.Exit(EXIT_ERROR) from None
    if not settings.json:
        click.echo(qrcode.terminal(code, getattr(sys.stdout, "encoding", None)), nl=False)
        click.echo(code)
        if png:
            click.echo(f"written to {png}", err=True)


@cli.command()
@click.argument("company")
@click.argument("phone")
@global_options
@pass_settings
def pair(settings: Settings, company: str, phone: str) -> None:
    """Get a pairing code to link PHONE without scanning a QR code."""
    result = call(settings, "pair_code", company=company, phone=phone)
    if settings.json:
        print_json(result)
    code = result.get("code")
    if not code:
        _no_code("pair code", result)
    if not settings.json:
        click.echo(code)
        click.echo("enter it on the phone: WhatsApp > Linked devices > Link with phone number", err=True)


@cli.command("cluster")
@global_options
@pass_settings
def cluster_(settings: Settings) -> None:
    """The hosts of the cluster (DESIGN.md §12): state, heartbeat age, companies, capacity."""
    result = call(settings, "cluster")
    if settings.json:
        print_json(result)
        return
    rows = [[h["host_id"] + (" (this host)" if h.get("me") else ""), h["state"], render.duration(h["heartbeat_age"]),
             str(h["companies"]), str(h["capacity"] or "unlimited")] for h in result.get("hosts", [])]
    click.echo(render.table(["HOST", "STATE", "HEARTBEAT", "COMPANIES", "CAPACITY"], rows) if rows else "no hosts")


@cli.command()
@click.argument("host")
@global_options
@pass_settings
def drain(settings: Settings, host: str) -> None:
    """Move every company away from HOST, gracefully (each stops there, then starts elsewhere)."""
    answer(settings, call(settings, "drain", host=host), lambda r: f"{r['host']}: draining")


@cli.command()
@click.argument("company")
@click.argument("host")
@global_options
@pass_settings
def move(settings: Settings, company: str, host: str) -> None:
    """Run COMPANY on HOST: it stops where it runs, then starts there (no pairing: its session moves)."""
    answer(settings, call(settings, "move", company=company, host=host),
           lambda r: f"{r['company']}: moving to {r['host']}")


@cli.command("events")
@click.option("-c", "--company", help="Only this company's events.")
@click.option("-t", "--type", "type_", type=click.Choice(sorted(events.TYPES)), help="Only this event type.")
@click.option("--count", type=click.IntRange(min=1), help="Exit after N events.")
@global_options
@pass_settings
def events_(settings: Settings, company: str | None, type_: str | None, count: int | None) -> None:
    """Print events as they happen, until Ctrl-C (or --count N)."""
    stream = EventStream(settings.run_dir, company, type_)
    try:
        stream.open()
    except DaemonUnreachable:
        unreachable(stream.path, what="waportd events")
    seen = 0
    try:
        for raw, event in stream:
            if settings.json:
                click.echo(raw if "\n" not in raw else render.compact(event))
            else:
                click.echo(render.event_line(event))
            seen += 1
            if count is not None and seen >= count:
                break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `waportctl events | head`: the reader is gone, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
    finally:
        stream.close()


@cli.command()
@global_options
@pass_settings
def metrics(settings: Settings) -> None:
    """Show the daemon's metrics."""
    result = call(settings, "metrics")
    if settings.json:
        print_json(result)
    else:
        click.echo(render.metrics_table(result.get("metrics") or []))


@cli.command()
@click.argument("company")
@global_options
@pass_settings
def diagnose(settings: Settings, company: str) -> None:
    """Check a session's health and suggest what to do."""
    result = call(settings, "diagnose", company=company)
    if settings.json:
        print_json(result)
    else:
        click.echo(render.diagnosis(result))


@cli.command()
@global_options
@pass_settings
def reload(settings: Settings) -> None:
    """Re-read the configuration: start and stop companies to match it."""
    result = call(settings, "reload")
    if settings.json:
        print_json(result)
    else:
        click.echo(render.reload_summary(result))


class Duration(click.ParamType):
    """A lifetime such as 30d, 12h, 90m, 3600s or plain seconds: ipc's parser, as for the config's durations."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if seconds <= 0:
            self.fail("must be more than 0 seconds", param, ctx)
        return seconds


@cli.group()
def token() -> None:
    """API tokens for the HTTP API: create, list, revoke.

    \b
    A token is shown once, when it is created; waportd keeps only its SHA-256.
    """


@token.command("create")
@click.option("--company", help="Act on this company only (default: an admin token, for every company).")
@click.option("--expires", type=Duration(), metavar="DURATION",
              help="Lifetime: 30d, 12h, 90m, 3600s or seconds (default: never expires).")
@global_options
@pass_settings
def token_create(settings: Settings, company: str | None, expires: float | None) -> None:
    """Create an API token and print it (once: it cannot be shown again)."""
    args: dict[str, Any] = {}
    if company is not None:
        args["company"] = company
    if expires is not None:
        args["expires"] = int(expires) if expires.is_integer() else expires
    result = call(settings, "token_create", **args)
    if settings.json:
        print_json(result)
        return
    click.echo(render.scalar(result.get("token")))
    scope = f"company {result['company']}" if result.get("company") else "all companies"
    expiry = render.iso_seconds(result.get("expires_at")) if result.get("expires_at") is not None else "never"
    click.echo(f"{render.scalar(result.get('id'))}: for {scope}, expires {expiry}. This is the only time the "
               "token is shown: store it now.", err=True)


@token.command("list")
@global_options
@pass_settings
def token_list(settings: Settings) -> None:
    """List the API tokens (their ids and states; never the tokens)."""
    result = call(settings, "token_list")
    if settings.json:
        print_json(result)
    else:
        click.echo(render.tokens_table(result.get("tokens") or []))


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@global_options
@pass_settings
def token_revoke(settings: Settings, token_id: str) -> None:
    """Revoke the API token ID: requests with it are refused from now on."""
    result = call(settings, "token_revoke", id=token_id)
    if settings.json:
        print_json(result)
    else:
        click.echo(f"{render.scalar(result.get('id'))}: {render.scalar(result.get('state'))}")


@cli.group()
def webhook() -> None:
    """Webhook endpoints (DESIGN.md §10): set, show, rotate, delete, replay; `secret` makes one for the config.

    \b
    A company's own endpoint replaces the config's webhook_url for that company.
    Its secret is printed once, when it is set or rotated.
    """


def _print_secret(result: dict[str, Any], what: str) -> None:
    click.echo(render.scalar(result.get("secret")))
    click.echo(f"{render.scalar(result.get('company'))}: {what} {render.scalar(result.get('url'))} (events "
               f"{','.join(result.get('events') or [])}). This is the only time the secret is shown: store it now.",
               err=True)


@webhook.command("set")
@click.argument("company")
@click.argument("url")
@click.option("--events", "events_", metavar="T,...",
              help="Event types to deliver (default: message,receipt,sent,send_failed,state).")
@global_options
@pass_settings
def webhook_set(settings: Settings, company: str, url: str, events_: str | None) -> None:
    """Deliver COMPANY's events to URL, signed with a new secret (printed once). Enables a disabled endpoint."""
    args: dict[str, Any] = {"company": company, "url": url}
    if events_ is not None:
        args["events"] = events_
    result = call(settings, "webhook_set", **args)
    answer(settings, result, lambda result: _print_secret(result, "webhook endpoint"))


@webhook.command("show")
@click.argument("company")
@global_options
@pass_settings
def webhook_show(settings: Settings, company: str) -> None:
    """The endpoint COMPANY's events go to (its own, or the config's webhook_url); never the secret."""
    result = call(settings, "webhook_show", company=company)
    answer(settings, result, lambda result: render.webhook_endpoint(result))


@webhook.command("rotate")
@click.argument("company")
@global_options
@pass_settings
def webhook_rotate(settings: Settings, company: str) -> None:
    """A new secret for COMPANY's endpoint (printed once); the previous one keeps signing for 24 h."""
    result = call(settings, "webhook_rotate", company=company)
    answer(settings, result, lambda result: _print_secret(result, "new secret for"))


@webhook.command("delete")
@click.argument("company")
@global_options
@pass_settings
def webhook_delete(settings: Settings, company: str) -> None:
    """Remove COMPANY's own endpoint (its events go to the config's webhook_url, if any)."""
    result = call(settings, "webhook_delete", company=company)
    answer(settings, result, lambda result: f"{render.scalar(result.get('company'))}: webhook endpoint deleted")


@webhook.command("replay")
@click.argument("company")
@click.option("--dead", is_flag=True, help="The dead events (not delivered within webhook_max_age, or disabled).")
@click.option("--since", metavar="TS", help="Every event since TS: a unix time or a duration back (1h, 30m).")
@global_options
@pass_settings
def webhook_replay(settings: Settings, company: str, dead: bool, since: str | None) -> None:
    """Deliver COMPANY's events again, with their own id and seq (receivers de-duplicate by webhook-id)."""
    if not dead and since is None:
        raise click.UsageError("say what to replay: --dead, --since TS, or both")
    args: dict[str, Any] = {"company": company, "dead": dead}
    if since is not None:
        try:
            args["since"] = float(since)
        except ValueError:
            args["since"] = since
    result = call(settings, "webhook_replay", **args)
    answer(settings, result,
           lambda r: f"{render.scalar(r.get('company'))}: {r.get('replayed', 0)} events to deliver again")


@webhook.command("secret")
def webhook_secret() -> None:
    """Print a new secret for the config's webhook_secret (nothing is sent to waportd)."""
    click.echo(webhooks.new_secret())


@cli.command("webhooks")
@click.argument("company")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@global_options
@pass_settings
def webhooks_(settings: Settings, company: str, limit: int) -> None:
    """COMPANY's webhook deliveries: pending, dead and recent events, each with its last attempt."""
    result = call(settings, "webhook_deliveries", company=company, limit=limit)
    answer(settings, result, lambda result: render.deliveries(result))


@cli.command("read")
@click.argument("company")
@click.argument("chat")
@click.argument("message_ids", nargs=-1, required=True, metavar="MSGID...")
@global_options
@pass_settings
def read_(settings: Settings, company: str, chat: str, message_ids: tuple[str, ...]) -> None:
    """Mark messages of CHAT (a phone number or a JID) read: the sender sees blue ticks."""
    result = call(settings, "read", company=company, chat=chat, message_ids=list(message_ids))
    answer(settings, result, lambda r: f"{render.scalar(r.get('company'))}: {r.get('read')} marked read")


@cli.command("typing")
@click.argument("company")
@click.argument("chat")
@click.option("--state", type=click.Choice(["composing", "recording", "paused"]), default="composing",
              show_default=True)
@global_options
@pass_settings
def typing_(settings: Settings, company: str, chat: str, state: str) -> None:
    """Show CHAT that the company is typing (or recording a voice note, or has paused)."""
    result = call(settings, "typing", company=company, chat=chat, state=state)
    answer(settings, result, lambda r: f"{render.scalar(r.get('company'))}: {r.get('state')}")


@cli.group()
def media() -> None:
    """The media store (DESIGN.md §11): put a file in, get one out. waportctl reads and writes the files;
    waportd never opens a path you name."""


@media.command("put")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, readable=True))
@click.option("--mimetype", help="The file's MIME type (default: guessed from its name).")
@click.option("--company", help="The company that will send it (a company token may then read it).")
@global_options
@pass_settings
def media_put(settings: Settings, path: str, mimetype: str | None, company: str | None) -> None:
    """Store the file PATH; prints its media id (for `send --image` and the like)."""
    result = store_file(settings, path, mimetype, company)
    answer(settings, result, lambda r: f"{r.get('media_id')} ({r.get('size')} bytes, {r.get('mimetype')})")


def location_args(text: str) -> dict[str, float]:
    lat, _, lon = text.partition(",")
    try:
        return {"latitude": float(lat), "longitude": float(lon)}
    except ValueError:
        raise click.BadParameter(f"{text!r}: LAT,LON in degrees, e.g. 52.52,13.405",
                                 param_hint="--location") from None


def store_file(settings: Settings, path: str, mimetype: str | None, company: str | None) -> dict[str, Any]:
    """Read PATH here and put it in waportd's store in chunks: `{media_id, size, mimetype, sha256}`."""
    import mimetypes

    mimetype = mimetype or mimetypes.guess_type(path)[0] or "application/octet-stream"
    upload, result = None, {}
    with open(path, "rb") as fh:
        chunk = fh.read(WIRE_CHUNK)
        while True:
            following = fh.read(WIRE_CHUNK)
            args = put_args(chunk, upload)
            if not following:
                args.update(last=True, mimetype=mimetype, filename=os.path.basename(path))
                if company is not None:
                    args["company"] = company
            result = call(settings, "media_put", **args)
            if not following:
                break
            upload, chunk = result["upload"], following
    return result


@media.command("get")
@click.argument("media_id")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Where to write the file.")
@global_options
@pass_settings
def media_get(settings: Settings, media_id: str, output: str) -> None:
    """Write the stored file MEDIA_ID to OUTPUT (checked against its SHA-256)."""
    with open(output, "wb") as fh:
        digest, offset, result = read_chunks(settings, "media_get", fh.write, media_id=media_id)
    size = result.get("size", offset)
    if digest != result.get("sha256"):
        raise click.ClickException(f"{output}: the bytes do not match the stored SHA-256")
    click.echo(f"{output}: {size} bytes", err=True)


@media.command("fetch")
@click.argument("company")
@click.argument("message_id")
@global_options
@pass_settings
def media_fetch(settings: Settings, company: str, message_id: str) -> None:
    """Download the media of COMPANY's inbound message MESSAGE_ID again (after a failed download)."""
    result = call(settings, "media_fetch", company=company, message_id=message_id)
    media = result.get("media") or {}

    def line(_r: dict[str, Any]) -> str:
        if media.get("status") == "stored":
            return f"{message_id}: stored as {media.get('id')} ({media.get('size')} bytes, {media.get('mimetype')})"
        return f"{message_id}: failed: {render.scalar(media.get('error'))}"

    answer(settings, result, line)
    if media.get("status") != "stored":
        sys.exit(1)


def _bundle_options(func: F) -> F:
    func = click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False),
                        help="With --encrypt: read the passphrase from this file's first line (else a prompt).")(func)
    func = click.option("--encrypt", is_flag=True, help="Encrypt the file with a passphrase (asked twice).")(func)
    func = click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
                        help="The bundle file to write (a new file, mode 0600).")(func)
    return func


def _write_bundle(settings: Settings, cmd: str, company: str, output: str, encrypt: bool,
                  passphrase_file: str | None) -> dict[str, Any]:
    from cli import transfer

    passphrase = transfer.read_passphrase(passphrase_file, confirm=True) if encrypt or passphrase_file else None
    return transfer.fetch(settings, cmd, company, output, passphrase)


@cli.command("export")
@click.argument("company")
@_bundle_options
@global_options
@pass_settings
def export(settings: Settings, company: str, output: str, encrypt: bool, passphrase_file: str | None) -> None:
    """Move COMPANY to another host: stop it here, write its session, journal (queued sends), media and
    desired state to OUTPUT, then retire it here. On the other host: `waportctl import OUTPUT`."""
    result = _write_bundle(settings, "export", company, output, encrypt, passphrase_file)
    answer(settings, result, lambda r: (
        f"{company}: exported to {output} ({r.get('size')} bytes{', encrypted' if r.get('encrypted') else ''}, "
        f"{r.get('queued')} queued sends); it no longer runs on this host. Next: waportctl import {output} "
        "on the new host"))


@cli.command("backup")
@click.argument("company")
@_bundle_options
@global_options
@pass_settings
def backup(settings: Settings, company: str, output: str, encrypt: bool, passphrase_file: str | None) -> None:
    """Copy COMPANY's session while it runs, for disaster recovery (it keeps running here). Never import the
    copy while this original runs: two hosts on one session knock each other off WhatsApp."""
    result = _write_bundle(settings, "backup", company, output, encrypt, passphrase_file)
    click.echo(f"warning: {output} is a backup of {company}, which still runs on this host. Do not import it "
               "while this original runs; import it only once this host is gone for good "
               "(waportctl import --original-stopped).", err=True)
    answer(settings, result, lambda r: f"{company}: backup written to {output} ({r.get('size')} bytes"
                                       f"{', encrypted' if r.get('encrypted') else ''})")


@cli.command("import")
@click.argument("path", metavar="FILE", type=click.Path(exists=True, dir_okay=False, readable=True))
@click.option("--replace", is_flag=True, help="The company is known here and stopped: set its session here "
                                              "aside and install the bundle's.")
@click.option("--original-stopped", is_flag=True, help="Import a backup: its original is stopped for good.")
@click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False),
              help="An encrypted bundle's passphrase, from this file's first line (else a prompt).")
@global_options
@pass_settings
def import_(settings: Settings, path: str, replace: bool, original_stopped: bool, passphrase_file: str | None) -> None:
    """Install the company in FILE (from `export` or `backup`) on this host and start it: it connects with its
    session (no pairing) and sends what was queued. Everything is verified before anything changes."""
    from cli import transfer

    result = transfer.send(settings, path, passphrase_file, replace, original_stopped)
    answer(settings, result, lambda r: (
        f"{r.get('company')}: imported ({r.get('kind')} from {r.get('source_host')}, {r.get('queued')} queued "
        f"sends){', started' if r.get('started') else ', left stopped as it was'}"))


def main() -> None:
    """Console-script entry point."""
    # Its own warnings (a library's, a Python warning) in the one log format; answers stay plain text.
    log_to_stderr("warning", "waportctl")
    cli.main(prog_name="waportctl")
