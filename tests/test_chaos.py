"""Chaos soak: faults of every kind while traffic flows; then nothing lost, nothing twice.

Bounded: WAPORT_SOAK_SECONDS of chaos (45 by default, the CI size; the full soak is
`WAPORT_SOAK_SECONDS=480 pytest tests/test_chaos.py`). The fault sequence comes from a seed
that the test prints (WAPORT_SOAK_SEED repeats a run).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter

import psutil
from conftest import processes_using, wait_for

from ipc.control import ControlClient, DaemonUnreachable
from ipc.errors import WaportError
from ipc.journal import Journal
from ipc.webhooks import new_secret

COMPANIES = [f"co{i}" for i in range(6)]
SOAK_SECONDS = float(os.environ.get("WAPORT_SOAK_SECONDS", "45"))


class Traffic(threading.Thread):
    """Sends with unique idempotency keys; an unanswered send is retried with the same key until answered."""

    def __init__(self, run_dir: str, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.run_dir = run_dir
        self.rng = rng
        self.stop = threading.Event()
        self.accepted: dict[str, tuple[str, str]] = {}  # message_id -> (company, key)
        self.refused: Counter[str] = Counter()
        self.retries = 0

    def run(self) -> None:
        client = ControlClient(self.run_dir, timeout=3)
        n = 0
        while not self.stop.is_set():
            company = self.rng.choice(COMPANIES)
            key = f"soak-{n}"
            n += 1
            while not self.stop.is_set():
                try:
                    r = client.call("send", company=company, to=f"1555{self.rng.randrange(10**7):07d}",
                                    text=f"soak message {key}", idempotency_key=key)
                    self.accepted[r["message_id"]] = (company, key)
                    break
                except WaportError as exc:  # a clear refusal: not accepted, nothing to check
                    self.refused[exc.code] += 1
                    break
                except (DaemonUnreachable, OSError):
                    self.retries += 1  # the daemon is restarting: same key again
                    client.close()
                    self.stop.wait(0.2)
            self.stop.wait(0.01)
        client.close()


def pending(d) -> int:
    total = 0
    for company in COMPANIES:
        counts = d.ctl("messages", company=company, limit=1)["counts"]
        total += counts.get("queued", 0) + counts.get("sending", 0)
    return total


def test_chaos_soak(daemon_factory, simnet, redis_server, short_tmp, receiver):
    seed = int(os.environ.get("WAPORT_SOAK_SEED", random.randrange(10**6)))
    print(f"\nchaos soak: seed {seed}, {SOAK_SECONDS:g} s")
    rng = random.Random(seed)
    secret = new_secret()
    receiver.secrets("all", secret)
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=COMPANIES, redis_url=redis_server.url,
                       rate_limit_max=1_000_000, restart_base_delay=0.2, restart_max_delay=1.0,
                       max_restarts=1000, heartbeat_interval=0.5, stop_timeout=3, webhook_url=receiver.url("all"),
                       webhook_secret=secret, webhook_events="message", webhook_retry_scale=0.01).start()
    wait_for(lambda: all(d.status(c)["state"] == "connected" for c in COMPANIES), timeout=30, what="connected")
    traffic = Traffic(d.run_dir, random.Random(seed + 1))
    traffic.start()
    inbound: list[tuple[str, str]] = []
    faults: Counter[str] = Counter()
    deadline = time.monotonic() + SOAK_SECONDS
    daemon_kills = 0
    while time.monotonic() < deadline:
        company = rng.choice(COMPANIES)
        fault = rng.choice(["kill", "kill", "stop", "drop", "drop", "logout", "ban", "redis", "daemon", "inbound",
                            "inbound", "inbound", "webhooks"])
        try:
            if fault in ("kill", "stop"):
                pid = d.status(company)["pid"]
                if pid:
                    os.kill(pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            elif fault == "drop":
                simnet.call("drop", company=company)
            elif fault == "logout":
                simnet.call("logout", company=company)
            elif fault == "ban":
                simnet.call("ban", company=company, seconds=1.0)
            elif fault == "redis":
                redis_server.stop()
                time.sleep(rng.uniform(0.2, 1.5))  # the outage lasts a while
                redis_server.start()
            elif fault == "daemon":
                if daemon_kills >= max(1, int(SOAK_SECONDS // 40)):
                    continue  # a few daemon kills per soak: each costs every session a reconnect
                daemon_kills += 1
                d.kill()
                d.start()
            elif fault == "webhooks":  # the delivery process killed, or the receiver failing for a while
                delivery = next((c for c in psutil.Process(d.proc.pid).children()
                                 if "webhook_delivery" in " ".join(c.cmdline())), None)
                if rng.random() < 0.5 and delivery is not None:
                    delivery.kill()
                else:
                    receiver.behave(status=503)
                    time.sleep(rng.uniform(0.2, 1.0))
                    receiver.behave(status=204)
            elif fault == "inbound":
                msg_id = f"IN-{len(inbound)}"
                simnet.call("inbound", company=company, **{"from": "15550100001"}, text="hello", id=msg_id)
                inbound.append((company, msg_id))
            faults[fault] += 1
        except (WaportError, DaemonUnreachable):
            faults[f"{fault} (not now)"] += 1
        # sessions a person would re-pair: logged out or given up
        for company_ in COMPANIES:
            try:
                if d.status(company_)["state"] in ("logged_out", "failed", "replaced"):
                    d.ctl("restart", company=company_)
            except (WaportError, DaemonUnreachable):
                pass
        time.sleep(rng.uniform(0.1, 0.6))
    traffic.stop.set()
    traffic.join(30)

    # Calm: every session back (a person re-pairs what a late fault logged out: a logout injected
    # while a session was banned shows only when it comes back), every accepted message settled.
    def all_back() -> bool:
        states = {c: d.status(c)["state"] for c in COMPANIES}
        for company, state in states.items():
            if state in ("logged_out", "failed", "replaced", "stopped"):
                d.ctl("restart", company=company)
        return all(state == "connected" for state in states.values())

    try:
        wait_for(all_back, timeout=60, interval=0.2, what="reconnect")
    except AssertionError:
        stuck = {c: (r["state"], r["reason"]) for c in COMPANIES if (r := d.status(c))["state"] != "connected"}
        raise AssertionError(f"not reconnected (seed {seed}): {stuck}\n{d.logs()}") from None
    try:
        # (a person still re-pairs what a late logout takes down meanwhile, as above)
        wait_for(lambda: all_back() and pending(d) == 0, timeout=120, what="the outboxes to drain")
    except AssertionError:
        left = {c: (d.ctl("messages", company=c, limit=1)["counts"], d.status(c)["state"]) for c in COMPANIES}
        raise AssertionError(f"outboxes not drained (seed {seed}): {left}\n{d.logs()}") from None

    at_network = Counter(m["id"] for m in simnet.call("sent")["messages"])
    # Every message's outcome, straight from the journals (`messages` lists only the latest 1,000).
    status: dict[str, str] = {}
    for company in COMPANIES:
        journal = Journal.in_session(os.path.join(d.state_dir, "sessions", company))
        status.update(journal.db.execute("SELECT message_id, status FROM outbox").fetchall())
        journal.close()
    counts = Counter(status.get(mid, "missing") for mid in traffic.accepted)
    print(f"faults {dict(faults)}; accepted {len(traffic.accepted)}, refused {dict(traffic.refused)}, "
          f"retried {traffic.retries}; outcomes {dict(counts)}; replaced {simnet.stats()['replaced']}")
    assert len(traffic.accepted) > 50, "too little traffic to mean anything"
    assert counts["missing"] == 0, "an accepted message vanished from the journal"
    assert set(counts) <= {"sent", "uncertain"}
    duplicates = {mid: n for mid, n in at_network.items() if n > 1}
    assert not duplicates, f"sent twice: {duplicates}"
    for mid, (company, key) in traffic.accepted.items():
        if status[mid] == "sent":
            assert at_network[mid] == 1, (mid, company, key)
    assert simnet.stats()["replaced"] == 0, f"a double session happened (seed {seed})\n{d.logs()}"

    # inbound: each message journaled once, none lost (one the network kept for a session that just came
    # back may still be on its way to the journal: "connected" comes before the network delivers it)
    def journaled() -> Counter[tuple[str, str]]:
        seen: Counter[tuple[str, str]] = Counter()
        for company in COMPANIES:
            for m in d.ctl("messages", company=company, limit=1000)["inbound"]:
                seen[(company, m["id"])] += 1
        return seen

    try:
        wait_for(lambda: all(journaled()[item] == 1 for item in inbound), timeout=30,
                 what="every inbound message journaled once")
    except AssertionError:
        seen = journaled()
        raise AssertionError(f"not journaled once: {[(i, seen[i]) for i in inbound if seen[i] != 1]}") from None

    def missing_from_inbox() -> set[tuple[str, str]]:
        return set(inbound) - {(f["company"], f["id"]) for _, f in redis_server.client().xrange("waport:inbox")}

    try:
        wait_for(lambda: not missing_from_inbox(), timeout=30, what="every inbound message in waport:inbox")
    except AssertionError:
        raise AssertionError(f"not in waport:inbox: {sorted(missing_from_inbox())}") from None

    # webhooks: every inbound message delivered, signed, with one webhook-id per message
    def missing_webhooks() -> set[tuple[str, str]]:
        return set(inbound) - {(r["company"], r["data"]["id"]) for r in receiver.delivered("all")}

    try:
        wait_for(lambda: not missing_webhooks(), timeout=60, what="every inbound message at the webhook")
    except AssertionError:
        raise AssertionError(f"no webhook for: {sorted(missing_webhooks())}") from None
    hooks = receiver.delivered("all")
    assert receiver.all_valid(hooks)
    ids: dict[tuple[str, str], set[str]] = {}
    for r in hooks:
        ids.setdefault((r["company"], r["data"]["id"]), set()).add(r["id"])
    assert all(len(v) == 1 for v in ids.values()), "a redelivered message kept its webhook-id"

    # no orphans: after a clean stop nothing of ours is left
    assert d.terminate(timeout=60) == 0
    wait_for(lambda: not [p for p in processes_using(short_tmp) if "workers.simnet" not in " ".join(
        p.info["cmdline"])], timeout=15, what="no process left behind")
    assert not [p for p in psutil.process_iter(["cmdline"])
                if "--company" in (p.info["cmdline"] or []) and short_tmp in " ".join(p.info["cmdline"] or [])]
