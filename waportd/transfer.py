"""Moving a company's session between hosts: `export` (a move), `backup` (a copy of a running one),
and `import`. The bundle format is `ipc/bundle.py`; this module builds bundles, streams them out in
chunks, takes one in, verifies all of it and only then installs it.

The passphrase never reaches the daemon: waportctl encrypts what it reads here and decrypts what it
streams in. Temporary files live in STATE_DIR/transfers/ (0700, files 0600) and go when a transfer
ends, fails or sits idle for `TRANSFER_IDLE`, and at every start of waportd.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipc import __version__, bundle
from ipc.errors import BAD_REQUEST, CAPACITY, INTERNAL, WaportError, disk_full, is_disk_full
from ipc.files import create_private, make_dir, write_atomic
from ipc.mediastore import WIRE_CHUNK, MediaStore, validate_mimetype
from ipc.states import ALIVE
from ipc.webhookstore import Endpoint
from waportd.company import Company
from waportd.media import MediaDesk, decode
from waportd.messages import MessageDesk
from waportd.roster import Roster
from waportd.services import Services
from waportd.webhooks import Webhooks

log = logging.getLogger("waport.transfer")

TRANSFERS_DIR = "transfers"
RETIRED_DIR = "retired"  # session directories set aside by an export or an import --replace
TRANSFER_IDLE = 600.0  # seconds a transfer may wait for its next chunk
MAX_TRANSFERS = 8
MAX_IMPORT_BYTES = 16 << 30


@dataclass
class Outgoing:
    id: str
    company: str
    kind: str
    path: str
    size: int
    sha256: str
    last: float


@dataclass
class Incoming:
    id: str
    path: str
    fd: int
    size: int
    last: float


class Transfers:
    def __init__(self, services: Services, roster: Roster, messages: MessageDesk, webhooks: Webhooks | None,
                 media: MediaDesk, wake: Callable[[], None] = lambda: None) -> None:
        self.services = services
        self.roster = roster
        self.messages = messages
        self.webhooks = webhooks
        self.media = media
        self.outgoing: dict[str, Outgoing] = {}
        self.incoming: dict[str, Incoming] = {}
        self.exporting: set[str] = set()  # companies stopped for an export that is not confirmed yet
        self.wake = wake  # pokes the loop when a thread's work is done
        self.done: deque[tuple[Callable[[Any, BaseException | None], None], Any, BaseException | None]] = deque()
        self.building = 0  # bundles being built or verified on threads

    @property
    def root(self) -> str:
        return os.path.join(self.services.cfg.state_dir, TRANSFERS_DIR)

    def open(self) -> None:
        """At start-up (the state directory's lock held): what an earlier daemon left behind goes."""
        shutil.rmtree(self.root, ignore_errors=True)
        make_dir(self.root, 0o700)

    def close(self) -> None:
        for inc in self.incoming.values():
            with contextlib.suppress(OSError):
                os.close(inc.fd)
        shutil.rmtree(self.root, ignore_errors=True)

    def check_free(self, name: str) -> None:
        """A company stopped for an export that is not confirmed yet may not start here meanwhile."""
        if name in self.exporting:
            raise WaportError(BAD_REQUEST, f"{name} is being exported: it stays stopped until the export ends "
                                           "(waportctl export finishes or is interrupted)")

    def forget_idle(self, now: float) -> None:
        """Transfers nobody asked about for TRANSFER_IDLE: their files go (an export's company stays stopped)."""
        for tid, out in list(self.outgoing.items()):
            if now - out.last > TRANSFER_IDLE:
                log.warning("%s: %s %s abandoned after %g s idle; its file removed", out.company, out.kind, tid,
                            TRANSFER_IDLE)
                self.end_outgoing(tid)
        for tid, inc in list(self.incoming.items()):
            if now - inc.last > TRANSFER_IDLE:
                log.warning("import %s abandoned after %g s idle; its file removed", tid, TRANSFER_IDLE)
                self.end_incoming(tid)

    def room(self) -> None:
        self.forget_idle(self.services.clock.monotonic())
        if len(self.outgoing) + len(self.incoming) + self.building >= MAX_TRANSFERS:
            raise WaportError(BAD_REQUEST, f"{MAX_TRANSFERS} transfers are unfinished; finish them or wait "
                                           f"{TRANSFER_IDLE:g} s")

    def known(self, args: dict[str, Any]) -> Company:
        return self.roster.known(args)

    # ------------------------------------------------------------ out: export and backup

    def cmd_export(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """A move: the company stops here (and is no longer wanted) before its bundle is built, so the
        bundle is the only live copy; `transfer_done` then retires it here for good."""
        company = self.known(args)
        name = company.name
        if name in self.exporting:
            raise WaportError(BAD_REQUEST, f"an export of {name} is already under way")
        if self.services.shutting_down:
            raise WaportError(BAD_REQUEST, "waportd is shutting down")
        self.room()
        wanted = self.roster.is_wanted(name)
        self.exporting.add(name)
        self.roster.unwant(name)
        company.stop()
        log.info("%s: export: stopping it here first", name)

        def failed(exc: WaportError) -> None:
            self.exporting.discard(name)
            fail(WaportError(exc.code, f"{exc.message}; {name} stays stopped here: `waportctl start {name}` "
                                       "brings it back"))

        company.when_exited(lambda: self.start_build(company, bundle.EXPORT, wanted, ok, failed))

    def cmd_backup(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """A copy of a company as it runs (disaster recovery): it keeps running; the bundle says `backup`."""
        company = self.known(args)
        self.room()
        self.start_build(company, bundle.BACKUP, self.roster.is_wanted(company.name), ok, fail)

    def start_build(self, company: Company, kind: str, wanted: bool, ok: Callable, fail: Callable) -> None:
        """What only the loop may read (the webhook store, the journal's queued media) is read here; the
        copies and the bundle are made on a thread, so a large bundle never stalls the loop; the answer
        comes back on the loop (`take_done`)."""
        name = company.name
        journal = os.path.join(company.session_dir, bundle.JOURNAL_MEMBER)
        needed = self.messages.journal(name).queued_media() if os.path.exists(journal) else set()
        state = {"wanted": wanted, "proxy": company.proxy, "webhook": self.endpoint_of(name)}
        store = self.media.store if self.has_media() else None
        tid = "tr_" + secrets.token_hex(8)
        self.building += 1

        def built(result: tuple[str, int, str, int] | None, error: BaseException | None) -> None:
            self.building -= 1
            if result is None:
                why = bundle.fail_message(error) if error is not None else "no result"
                log.error("%s: %s failed: %s", name, kind, why)
                fail(disk_full(f"no {kind} bundle was built") if isinstance(error, OSError) and is_disk_full(error)
                     else WaportError(INTERNAL, f"{kind} of {name} failed: {why}"))
                return
            path, size, digest, members = result
            self.outgoing[tid] = Outgoing(tid, name, kind, path, size, digest, self.services.clock.monotonic())
            try:
                queued = self.messages.journal(name).pending()
            except Exception:  # noqa: BLE001 - a figure for the operator, not worth failing the transfer
                queued = None
            log.info("%s: %s bundle %s built (%d bytes, %d members, %s sends queued)", name, kind, tid, size,
                     members, queued)
            ok({"transfer": tid, "company": name, "kind": kind, "size": size, "sha256": digest,
                "members": members, "queued": queued})

        self.off_loop(lambda: self.build(tid, name, company.session_dir, kind, state, needed, store), built)

    def off_loop(self, work: Callable[[], Any], then: Callable[[Any, BaseException | None], None]) -> None:
        """Run `work` on a thread of its own; `then(result, error)` runs on the loop once it is done."""
        def job() -> None:
            try:
                result, error = work(), None
            except BaseException as exc:  # noqa: BLE001 - reported to `then`, on the loop
                result, error = None, exc
            self.done.append((then, result, error))
            self.wake()

        threading.Thread(target=job, name="transfer", daemon=True).start()

    def take_done(self) -> None:
        """On the loop, every turn: answer the transfers whose thread has finished."""
        while self.done:
            then, result, error = self.done.popleft()
            try:
                then(result, error)
            except Exception:  # noqa: BLE001 - one transfer's bug must not cost the loop
                self.services.counters[("loop_errors",)] += 1
                log.exception("transfer: error while finishing; carrying on")

    def build(self, tid: str, name: str, session_dir: str, kind: str, state: dict[str, Any], needed: set[str],
              store: MediaStore | None) -> tuple[str, int, str, int]:
        """(On a thread.) The bundle in a file of its own under transfers/: session files and journal copied
        consistently (SQLite through its backup API), its media, its desired state and webhook endpoint."""
        stage = os.path.join(self.root, tid + ".d")
        make_dir(self.root, 0o700)
        make_dir(stage, 0o700)
        path = os.path.join(self.root, tid + ".wapb")
        try:
            sources = gather(name, session_dir, stage, state, needed, store)
            manifest = bundle.manifest_for(name, kind, sources, self.services.clock.time(), socket.gethostname(),
                                           __version__)
            with os.fdopen(create_private(path), "wb") as fh:
                digest = bundle.write(fh, manifest, sources)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return path, os.path.getsize(path), digest, len(manifest.members)

    def has_media(self) -> bool:
        return os.path.isdir(os.path.join(self.services.cfg.state_dir, "media"))

    def endpoint_of(self, name: str) -> dict[str, Any] | None:
        """The company's own webhook endpoint (not the config's global one), secrets included."""
        if self.webhooks is None or self.webhooks.store is None:
            return None
        ep = self.webhooks.the_store().endpoints().get(name)
        if ep is None:
            return None
        return {"url": ep.url, "secret": ep.secret, "events": list(ep.events), "old_secret": ep.old_secret,
                "old_until": ep.old_until, "created": ep.created}

    def outgoing_of(self, args: dict[str, Any]) -> Outgoing:
        return self.live(self.outgoing, args, "transfer")

    def live(self, table: dict[str, Any], args: dict[str, Any], what: str) -> Any:
        """The transfer a command names, kept alive by the use; else a clear `bad_request`."""
        tid = args.get("transfer")
        found = table.get(tid) if isinstance(tid, str) else None
        if found is None:
            raise WaportError(BAD_REQUEST, f"no {what} {str(tid)[:40]!r} (unknown, finished, or idle more "
                                           f"than {TRANSFER_IDLE:g} s)")
        found.last = self.services.clock.monotonic()
        return found

    def cmd_transfer_read(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """`{transfer, offset}` -> `{data, offset, size, eof}`: the bundle's bytes, base64, at most WIRE_CHUNK."""
        out = self.outgoing_of(args)
        offset = args.get("offset", 0)
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= out.size:
            raise WaportError(BAD_REQUEST, f"offset must be a whole number from 0 to {out.size}")
        with open(out.path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(WIRE_CHUNK)
        ok({"data": base64.b64encode(data).decode(), "offset": offset, "size": out.size,
            "eof": offset + len(data) >= out.size})

    def cmd_transfer_done(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """The CLI wrote the file and checked its SHA-256: an export's company is retired here."""
        out = self.outgoing_of(args)
        if args.get("sha256") != out.sha256:
            raise WaportError(BAD_REQUEST, "sha256 does not match the bundle's: the file written is not this "
                                           "bundle; nothing changed")
        self.end_outgoing(out.id)
        result: dict[str, Any] = {"transfer": out.id, "company": out.company, "kind": out.kind}
        if out.kind == bundle.EXPORT:
            result["retired_to"] = self.retire(out.company, "exported")
            self.exporting.discard(out.company)
            log.info("%s: exported; it is no longer served by this host", out.company)
        ok(result)

    def cmd_transfer_abort(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        out = self.outgoing_of(args)
        self.end_outgoing(out.id)
        ok({"transfer": out.id, "company": out.company, "kind": out.kind, "aborted": True})

    def end_outgoing(self, tid: str) -> None:
        out = self.outgoing.pop(tid, None)
        if out is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out.path)
        if out.kind == bundle.EXPORT and out.company in self.exporting:
            self.exporting.discard(out.company)
            log.info("%s: export not confirmed; it stays stopped here (waportctl start brings it back)",
                     out.company)

    def retire(self, name: str, why: str) -> str | None:
        """Forget the company here; its session directory (credentials, journal) is set aside under
        STATE_DIR/retired/, never used again by waportd: a later `start` pairs as a new device."""
        company = self.roster.get(name)
        self.messages.forget(name)  # its journal closed before its directory moves
        if self.webhooks is not None and self.webhooks.store is not None:
            self.webhooks.forget(name)
        session_dir = os.path.join(self.services.cfg.state_dir, "sessions", name)
        target = None
        if company is not None:
            company.release_lock()
        if os.path.isdir(session_dir):
            retired = os.path.join(self.services.cfg.state_dir, RETIRED_DIR)
            make_dir(retired, 0o700)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.services.clock.time()))
            target = os.path.join(retired, f"{name}.{why}.{stamp}.{secrets.token_hex(2)}")
            os.rename(session_dir, target)
        if company is not None:
            self.roster.forget(name)
        return target

    # ------------------------------------------------------------ in: import

    def cmd_import_begin(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        self.room()
        make_dir(self.root, 0o700)
        tid = "im_" + secrets.token_hex(8)
        path = os.path.join(self.root, tid + ".in")
        self.incoming[tid] = Incoming(tid, path, create_private(path), 0, self.services.clock.monotonic())
        ok({"transfer": tid})

    def incoming_of(self, args: dict[str, Any]) -> Incoming:
        return self.live(self.incoming, args, "import")

    def cmd_import_write(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """`{transfer, offset, data}`: the bundle's bytes in order (`offset` is where this chunk goes)."""
        inc = self.incoming_of(args)
        chunk = decode(args.get("data"))
        if args.get("offset") != inc.size:
            raise WaportError(BAD_REQUEST, f"offset must be {inc.size} (the bytes so far)")
        if inc.size + len(chunk) > MAX_IMPORT_BYTES:
            self.end_incoming(inc.id)
            raise WaportError(BAD_REQUEST, f"a bundle is at most {MAX_IMPORT_BYTES} bytes; import abandoned")
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(inc.fd, view):]
        except OSError as exc:
            self.end_incoming(inc.id)
            if is_disk_full(exc):
                raise disk_full("import abandoned, nothing changed") from None
            raise
        inc.size += len(chunk)
        ok({"transfer": inc.id, "size": inc.size})

    def cmd_import_abort(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        inc = self.incoming_of(args)
        self.end_incoming(inc.id)
        ok({"transfer": inc.id, "aborted": True})

    def end_incoming(self, tid: str) -> None:
        inc = self.incoming.pop(tid, None)
        if inc is None:
            return
        with contextlib.suppress(OSError):
            os.close(inc.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(inc.path)

    def cmd_import_commit(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """Verify the whole bundle (on a thread), then, on the loop, check it may be installed here, install it
        and start the company. Any refusal leaves this host as it was."""
        inc = self.incoming_of(args)
        replace, from_backup = bool(args.get("replace")), bool(args.get("from_backup"))
        del self.incoming[inc.id]  # no longer idle-collected: the thread reads it
        os.close(inc.fd)
        stage = os.path.join(self.root, inc.id + ".d")
        self.building += 1

        def verify() -> tuple[bundle.Manifest, dict[str, Any]]:
            with open(inc.path, "rb") as fh:
                manifest = bundle.read(fh, stage)
            return manifest, parse_state(os.path.join(stage, bundle.STATE_MEMBER), manifest)

        def verified(result: tuple[bundle.Manifest, dict[str, Any]] | None, error: BaseException | None) -> None:
            self.building -= 1
            answer: dict[str, Any] | WaportError
            try:
                if isinstance(error, bundle.BundleError):
                    raise WaportError(BAD_REQUEST, f"bundle refused, nothing changed: {error}")
                if isinstance(error, OSError) and is_disk_full(error):
                    raise disk_full("nothing changed")
                if result is None:
                    why = bundle.fail_message(error) if error is not None else "no result"
                    raise WaportError(INTERNAL, f"the bundle could not be read ({why}); nothing changed")
                manifest, state = result
                self.may_install(manifest, replace, from_backup)
                answer = self.install(manifest, state, stage)
            except WaportError as exc:
                answer = exc
            except Exception as exc:  # noqa: BLE001 - an answer, whatever happened
                log.exception("import failed")
                answer = WaportError(INTERNAL, f"import failed: {bundle.fail_message(exc)}")
            finally:  # before the answer: when the client hears "nothing changed", nothing is left behind
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(inc.path)
                shutil.rmtree(stage, ignore_errors=True)
            if isinstance(answer, WaportError):
                fail(answer)
            else:
                ok(answer)

        self.off_loop(verify, verified)

    def may_install(self, manifest: bundle.Manifest, replace: bool, from_backup: bool) -> None:
        name = manifest.company
        if manifest.kind == bundle.BACKUP and not from_backup:
            made = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(manifest.created))
            raise WaportError(BAD_REQUEST, f"this is a backup of {name} taken on {manifest.source_host} at {made} "
                                           "while it ran: import it only once that original is stopped for good "
                                           "(--original-stopped), else two hosts use one session; nothing changed")
        if self.services.shutting_down:
            raise WaportError(BAD_REQUEST, "waportd is shutting down; nothing changed")
        self.check_free(name)
        company = self.roster.get(name)
        if company is not None and (company.worker is not None or company.state in ALIVE
                                    or self.roster.is_wanted(name)):
            raise WaportError(BAD_REQUEST, f"{name} runs on this host (state {company.state}); nothing changed. "
                                           f"Stop it first (waportctl stop {name}), then import with --replace")
        session_dir = os.path.join(self.services.cfg.state_dir, "sessions", name)
        here = company is not None or (os.path.isdir(session_dir) and bool(os.listdir(session_dir)))
        if here and not replace:
            raise WaportError(BAD_REQUEST, f"{name} is known on this host (stopped); nothing changed. --replace "
                                           "sets its session here aside (in STATE_DIR/retired/) and installs the "
                                           "bundle's")
        limit = self.services.cfg.max_companies
        if company is None and len(self.roster) >= limit:
            raise WaportError(CAPACITY, f"this host already has {len(self.roster)} companies, its limit "
                                        f"(max_companies = {limit}); nothing changed", limit=limit)

    def install(self, manifest: bundle.Manifest, state: dict[str, Any], stage: str) -> dict[str, Any]:
        name = manifest.company
        replaced = self.retire(name, "replaced") if (self.roster.get(name) is not None or os.path.isdir(
            os.path.join(self.services.cfg.state_dir, "sessions", name))) else None
        session_dir = os.path.join(self.services.cfg.state_dir, "sessions", name)
        try:
            make_dir(session_dir, 0o700)
            for member in manifest.members:
                src = os.path.join(stage, member.name)
                if member.name.startswith("session/"):
                    os.replace(src, os.path.join(session_dir, member.name[len("session/"):]))
                elif member.name == bundle.JOURNAL_MEMBER:
                    os.replace(src, os.path.join(session_dir, bundle.JOURNAL_MEMBER))
                elif member.name.startswith("media/"):
                    self.install_media(name, member, src, state["media"].get(member.sha256) or {})
            if state["webhook"] is not None and self.webhooks is not None and self.webhooks.store is not None:
                hook = state["webhook"]
                now = self.services.clock.time()
                ep = Endpoint(name, hook["url"], hook["secret"], tuple(hook["events"]), hook.get("old_secret"),
                              hook.get("old_until"), created=hook.get("created") or now, updated=now)
                self.webhooks.write(lambda s: s.put_endpoint(ep))
                self.webhooks.reload()
        except OSError as exc:
            log.error("%s: import failed while installing: %s", name, exc)
            raise WaportError(INTERNAL, f"import of {name} failed while installing: {exc.strerror or exc}") from None
        company = self.roster.add(name)
        self.roster.set_proxy(name, state["proxy"])
        if state["wanted"]:
            self.roster.want(name)
            company.start()
        try:
            queued: int | None = self.messages.journal(name).pending()
        except Exception:  # noqa: BLE001 - a figure for the operator: the import is done
            queued = None
        log.info("%s: imported (%s from %s, %s sends queued)%s", name, manifest.kind, manifest.source_host, queued,
                 "; started" if state["wanted"] else "")
        return {"company": name, "kind": manifest.kind, "source_host": manifest.source_host,
                "created": manifest.created, "started": bool(state["wanted"]), "queued": queued,
                "replaced": replaced, "record": company.record()}

    def install_media(self, company: str, member: bundle.Member, src: str, meta: dict[str, Any]) -> None:
        store = self.media.store
        path = store.path(member.sha256)
        if not os.path.exists(path):
            make_dir(os.path.dirname(path), 0o700)
            os.replace(src, path)
        try:
            mimetype = validate_mimetype(meta.get("mimetype") or "application/octet-stream")
        except WaportError:
            mimetype = "application/octet-stream"
        filename = meta.get("filename")
        store.record(member.sha256, member.size, mimetype, company, filename if isinstance(filename, str) else None)


def gather(name: str, session_dir: str, stage: str, state: dict[str, Any], needed: set[str],
           store: MediaStore | None) -> dict[str, str]:
    """Private copies of what the bundle carries, as member name -> path (media: the store's own files,
    content-addressed and never written in place)."""
    sources: dict[str, str] = {}
    names = sorted(os.listdir(session_dir)) if os.path.isdir(session_dir) else []
    for fname in names:
        src = os.path.join(session_dir, fname)
        if not bundle.carried(fname) or not stat.S_ISREG(os.lstat(src).st_mode):
            continue
        dst = os.path.join(stage, "session-" + fname)
        (bundle.copy_sqlite if bundle.is_sqlite(src) else bundle.copy_file)(src, dst)
        sources["session/" + fname] = dst
    journal = os.path.join(session_dir, bundle.JOURNAL_MEMBER)
    if os.path.exists(journal):
        dst = os.path.join(stage, bundle.JOURNAL_MEMBER)
        bundle.copy_sqlite(journal, dst)
        sources[bundle.JOURNAL_MEMBER] = dst
    media: dict[str, dict[str, Any]] = {}
    if store is not None:
        for media_id in sorted(owned_media(store, name) | needed):
            info = store.info(media_id)
            if info is None:
                log.warning("%s: media %s… a queued send needs is not in the store", name, media_id[:12])
                continue
            sources["media/" + media_id] = store.path(media_id)
            media[media_id] = {"mimetype": info.mimetype, "filename": info.filename}
    state_path = os.path.join(stage, bundle.STATE_MEMBER)
    write_atomic(state_path, json.dumps({**state, "media": media}, sort_keys=True), durable=False)
    sources[bundle.STATE_MEMBER] = state_path
    return sources


def owned_media(store: MediaStore, company: str) -> set[str]:
    """The media a company sent or received (their records name it an owner)."""
    found: set[str] = set()
    for sub in os.listdir(store.root):
        folder = os.path.join(store.root, sub)
        if sub == "tmp" or not os.path.isdir(folder):
            continue
        for fname in os.listdir(folder):
            if fname.endswith(".json"):
                media_id = fname[: -len(".json")]
                with contextlib.suppress(WaportError):
                    info = store.info(media_id)
                    if info is not None and company in info.owners:
                        found.add(media_id)
    return found


def parse_state(path: str, manifest: bundle.Manifest) -> dict[str, Any]:
    """The bundle's `state.json`, checked: desired state, proxy, webhook endpoint, media records."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read())
    except FileNotFoundError:
        raise bundle.BundleError("the bundle carries no state.json") from None
    except (ValueError, RecursionError):
        raise bundle.BundleError("state.json is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("wanted"), bool):
        raise bundle.BundleError("state.json: wanted must be true or false")
    proxy = data.get("proxy")
    if proxy is not None and not isinstance(proxy, str):
        raise bundle.BundleError("state.json: proxy must be a string or null")
    media = data.get("media", {})
    if not isinstance(media, dict) or not all(isinstance(v, dict) for v in media.values()):
        raise bundle.BundleError("state.json: media must be an object of records")
    hook = data.get("webhook")
    if hook is not None:
        if not isinstance(hook, dict) or not isinstance(hook.get("url"), str) or not isinstance(
                hook.get("secret"), str) or not isinstance(hook.get("events"), list):
            raise bundle.BundleError("state.json: webhook must carry url, secret and events")
    return {"wanted": data["wanted"], "proxy": proxy, "media": media, "webhook": hook}
