"""Prometheus metrics and /healthz: the collector on its own, then a live daemon scraped by
promtool and by a real Prometheus server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest
from conftest import ROOT, free_port, stop_process, wait_for
from prometheus_client.parser import text_string_to_metric_families

from waportd.metrics import Metrics, MetricsServer, SessionView, Snapshot, health, parse_listen
from waportd.resources import Sample

WAPORTCTL = os.path.join(os.path.dirname(sys.executable), "waportctl")

# DESIGN.md §5, sample names as exposed (counters with _total, the histogram's count).
DESIGN_METRICS = {
    "waport_sessions": {"state"},
    "waport_session_up": {"company"},
    "waport_worker_restarts_total": {"company", "reason"},
    "waport_messages_sent_total": {"company"},
    "waport_messages_received_total": {"company"},
    "waport_messages_failed_total": {"company", "reason"},
    "waport_rate_limited_total": {"company"},
    "waport_qr_codes_total": {"company"},
    "waport_errors_total": {"company", "kind"},
    "waport_worker_resident_memory_bytes": {"company"},
    "waport_worker_cpu_seconds_total": {"company"},
    "waport_heartbeat_age_seconds": {"company"},
    "waport_outbox_pending": {"company"},
    "waport_send_latency_seconds_count": set(),
    "waport_control_requests_total": {"cmd", "outcome"},
    "process_resident_memory_bytes": set(),
}


def parse(text: str) -> dict[str, dict[frozenset, float]]:
    """{sample name: {frozenset(labels.items()): value}}"""
    out: dict[str, dict[frozenset, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def value(samples: dict[str, dict[frozenset, float]], name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(frozenset(labels.items()))


def fake_snapshot(**changes: Any) -> Snapshot:
    snap = Snapshot(
        sessions=[SessionView("acme", "connected", "", True, 0.4, 2),
                  SessionView("bistro", "backoff", "crash", False, None, 0)],
        counters=[(("restarts", "bistro", "crash"), 3), (("sent", "acme"), 5), (("failed", "acme", "timeout"), 1),
                  (("control", "status", "ok"), 7), (("error", "acme", "stray"), 1), (("events_dropped",), 2),
                  (("transition", "connected"), 9), (("malformed", "worker"), 1), (("odd",), 1),
                  (("unknown_worker",), 4), (("refused_transition", "stopped", "connected"), 1)],
        samples={"acme": Sample(123, 1.0, 50_000_000, 1.5, 7, 30)},
        cpu_seconds={"acme": 1.5, "bistro": 4.0},
        version="9.9", backend="sim", pid=1, uptime=10,
    )
    for k, v in changes.items():
        setattr(snap, k, v)
    return snap


def test_collector_builds_every_family_from_the_snapshot():
    m = Metrics(lambda: fake_snapshot())
    m.observe_send_latency(0.3)
    body, ctype = m.exposition()
    assert ctype.startswith("text/plain")
    got = parse(body.decode())
    for name, labels in DESIGN_METRICS.items():
        if name in ("waport_messages_received_total", "waport_errors_total", "waport_worker_restarts_total"):
            assert name in got, name
        if name in got:
            for key in got[name]:
                assert {k for k, _ in key} == labels, (name, key)
    assert value(got, "waport_sessions", state="connected") == 1
    assert value(got, "waport_sessions", state="failed") == 0  # every state, so series do not vanish
    assert value(got, "waport_session_up", company="acme") == 1
    assert value(got, "waport_session_up", company="bistro") == 0
    assert value(got, "waport_heartbeat_age_seconds", company="acme") == 0.4
    assert value(got, "waport_heartbeat_age_seconds", company="bistro") is None  # no worker, no age
    assert value(got, "waport_outbox_pending", company="acme") == 2
    assert value(got, "waport_worker_restarts_total", company="bistro", reason="crash") == 3
    assert value(got, "waport_messages_sent_total", company="acme") == 5
    assert value(got, "waport_messages_sent_total", company="bistro") == 0  # zero-filled for known companies
    assert value(got, "waport_messages_failed_total", company="acme", reason="timeout") == 1
    assert value(got, "waport_control_requests_total", cmd="status", outcome="ok") == 7
    assert value(got, "waport_errors_total", company="acme", kind="stray") == 1
    assert value(got, "waport_events_dropped_total") == 2
    assert value(got, "waport_unknown_worker_frames_total") == 4
    assert value(got, "waport_refused_transitions_total", **{"from": "stopped", "to": "connected"}) == 1
    assert value(got, "waport_loop_errors_total") == 0  # plain counters exist from the start
    assert value(got, "waport_worker_resident_memory_bytes", company="acme") == 50_000_000
    assert value(got, "waport_worker_cpu_seconds_total", company="bistro") == 4.0
    assert value(got, "waport_send_latency_seconds_count") == 1
    assert value(got, "waport_send_latency_seconds_bucket", le="0.5") == 1
    assert "process_cpu_seconds_total" in got and "python_info" in got


def test_control_reply_has_the_same_figures_without_created_samples():
    m = Metrics(lambda: fake_snapshot())
    samples = m.samples()
    assert not [s for s in samples if s["name"].endswith("_created")]
    flat = {(s["name"], frozenset(s["labels"].items())): s["value"] for s in samples}
    assert flat[("waport_worker_restarts_total", frozenset({("company", "bistro"), ("reason", "crash")}))] == 3
    assert json.dumps(samples)  # JSON-ready for the control socket


def test_health_is_ok_only_when_nothing_needs_a_person():
    ok = fake_snapshot(sessions=[SessionView("acme", "connected", "", True, 0.2, 0),
                                 SessionView("b", "backoff", "crash", False, None, 0)])
    code, body = health(ok)
    assert code == 200 and body["status"] == "ok"
    assert body["counts"] == {"backoff": 1, "connected": 1} and body["services"]["control"] == "ok"
    code, body = health(fake_snapshot(sessions=[SessionView("acme", "failed", "crash loop", False, None, 0)]))
    assert code == 503 and body["status"] == "degraded" and body["attention"] == {"acme": "failed"}
    code, body = health(fake_snapshot(sessions=[SessionView("acme", "connected", "", True, 60.0, 0)]))
    assert code == 503 and body["attention"] == {"acme": "hung"}
    code, body = health(fake_snapshot(loop_age=30.0))
    assert code == 503 and body["services"]["main_loop"] == "stalled"
    code, body = health(fake_snapshot(sessions=[], redis="down"))
    assert code == 503 and body["services"]["redis"] == "down"
    code, body = health(fake_snapshot(sessions=[], shutting_down=True))
    assert code == 503 and body["services"]["control"] == "stopping"


@pytest.mark.parametrize("listen,expected", [
    ("127.0.0.1:9477", ("127.0.0.1", 9477)), (":9477", ("", 9477)), ("[::1]:0", ("::1", 0)),
    ("localhost:1", ("localhost", 1)),
])
def test_parse_listen(listen, expected):
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9477", "host:", "host:http", "h:70000"])
def test_parse_listen_refuses(listen):
    with pytest.raises(ValueError):
        parse_listen(listen)


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_server_answers_metrics_healthz_and_404():
    snap = fake_snapshot()
    server = MetricsServer("127.0.0.1:0", Metrics(lambda: snap), lambda: snap)
    host, port = server.start()
    try:
        assert host == "127.0.0.1" and port > 0 and server.url == f"http://127.0.0.1:{port}"
        code, ctype, text = get(f"{server.url}/metrics")
        assert code == 200 and ctype.startswith("text/plain") and "waport_session_up" in text
        code, ctype, text = get(f"{server.url}/healthz")
        assert code == 200 and ctype == "application/json" and json.loads(text)["status"] == "ok"
        snap.sessions = [SessionView("acme", "logged_out", "", False, None, 0)]
        code, _, text = get(f"{server.url}/healthz")
        assert code == 503 and json.loads(text)["attention"] == {"acme": "logged_out"}
        assert get(f"{server.url}/nope")[0] == 404
        req = urllib.request.Request(f"{server.url}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert r.read().decode().rstrip().endswith("# EOF")
    finally:
        server.close()


def test_scrapes_from_another_thread_never_trip_over_a_changing_arbiter(tmp_path):
    """The main loop adds and removes sessions and counters while the HTTP thread collects."""
    import threading

    from fakes import rig

    r = rig(tmp_path)
    ops, roster, counters = r.arbiter.ops, r.arbiter.roster, r.services.counters
    errors: list[BaseException] = []
    done = threading.Event()

    def scrape_forever() -> None:
        try:
            while not done.is_set():
                ops.metrics.exposition()
                health(ops.snapshot())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=scrape_forever)
    thread.start()
    try:
        for i in range(20_000):
            company = f"c{i % 300}"
            if i % 3:
                roster.add(company).start()
            else:
                c = roster.get(company)
                if c is not None and c.worker is not None:
                    c.exited(0)
                roster.companies.pop(company, None)
            counters[("sent", company)] += 1
            counters[("restarts", company, f"r{i % 7}")] += 1
            ops.resources.cpu_before[company] = float(i)
            if i % 500 == 0:
                ops.resources.cpu_before.clear()
    finally:
        done.set()
        thread.join(10)
    assert not errors, errors


# ---------------------------------------------------------------- a live daemon


def metrics_url(d) -> str:
    path = os.path.join(d.run_dir, "metrics.port")
    port = wait_for(lambda: os.path.exists(path) and open(path).read().strip(), what="metrics.port")
    return f"http://127.0.0.1:{port}"


def scrape(url: str) -> dict[str, dict[frozenset, float]]:
    code, _, text = get(f"{url}/metrics")
    assert code == 200
    return parse(text)


def test_scrape_follows_sessions_and_matches_waportctl(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme", "bistro"], metrics_listen="127.0.0.1:0",
                       health_check_interval=0.3).start()
    url = metrics_url(d)
    assert d.ctl("version")["metrics"] == url
    got = wait_for(lambda: (m := scrape(url)) and value(m, "waport_sessions", state="connected") == 2
                   and value(m, "waport_worker_resident_memory_bytes", company="bistro") and m,
                   what="two connected sessions with samples")
    for name, labels in DESIGN_METRICS.items():
        if name in ("waport_messages_failed_total", "waport_errors_total", "waport_worker_restarts_total"):
            continue  # no failure yet: no series
        assert name in got, name
        for key in got[name]:
            assert {k for k, _ in key} == labels, (name, key)
    assert value(got, "waport_session_up", company="acme") == 1
    assert value(got, "waport_qr_codes_total", company="acme") == 1  # auto-paired once
    assert value(got, "waport_worker_resident_memory_bytes", company="acme") > 5_000_000
    assert value(got, "waport_heartbeat_age_seconds", company="acme") < 3
    assert value(got, "waport_messages_sent_total", company="acme") == 0

    # A message: sent counter and the latency histogram move.
    d.ctl("send", company="acme", to="15550109999", text="hello")
    got = wait_for(lambda: (m := scrape(url)) and value(m, "waport_messages_sent_total", company="acme") == 1 and m,
                   what="sent counter")
    assert value(got, "waport_send_latency_seconds_count") == 1

    # A killed worker: a restart with its reason; a stopped session: up 0, one more stopped.
    pid = d.status("acme")["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (s := d.status("acme"))["state"] == "connected" and s["pid"] != pid, what="acme back")
    d.ctl("stop", company="bistro")
    got = wait_for(lambda: (m := scrape(url)) and value(m, "waport_session_up", company="bistro") == 0 and m,
                   what="bistro down")
    restarts = {dict(k)["reason"]: v for k, v in got["waport_worker_restarts_total"].items()
                if dict(k)["company"] == "acme"}
    assert sum(restarts.values()) == 1 and "SIGKILL" in " ".join(restarts), restarts
    assert value(got, "waport_sessions", state="stopped") == 1
    assert value(got, "waport_sessions", state="connected") == 1
    assert value(got, "waport_control_requests_total", cmd="stop", outcome="ok") == 1
    assert value(got, "waport_worker_resident_memory_bytes", company="bistro") is None  # no worker, no figure
    assert value(got, "waport_worker_cpu_seconds_total", company="bistro") >= 0  # the counter stays after exit

    # waportctl metrics shows the same figures, from the same registry.
    out = subprocess.run([WAPORTCTL, "--run-dir", d.run_dir, "--json", "metrics"], capture_output=True, text=True,
                         timeout=30, check=True)
    table = {(m["name"], frozenset(m["labels"].items())): m["value"] for m in json.loads(out.stdout)["metrics"]}
    for name in ("waport_sessions", "waport_session_up", "waport_worker_restarts_total", "waport_messages_sent_total",
                 "waport_qr_codes_total"):
        for labels, v in got[name].items():
            assert table[(name, labels)] == v, (name, labels)
    text = subprocess.run([WAPORTCTL, "--run-dir", d.run_dir, "metrics"], capture_output=True, text=True,
                          timeout=30, check=True).stdout
    assert "waport_session_up" in text and "company=bistro" in text

    code, _, body = get(f"{url}/healthz")
    health_body = json.loads(body)
    assert code == 200 and health_body["status"] == "ok"
    assert health_body["counts"] == {"connected": 1, "stopped": 1}


def test_promtool_accepts_a_live_scrape(daemon_factory, simnet):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/install-system-deps installs it)")
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], metrics_listen="127.0.0.1:0",
                       health_check_interval=0.3).start()
    url = metrics_url(d)
    d.wait_state("acme", "connected")
    os.kill(d.status("acme")["pid"], signal.SIGKILL)  # so restart and exit series exist too
    d.wait_state("acme", "connected")
    d.ctl("send", company="acme", to="15550109999", text="hello")
    text = wait_for(lambda: (t := get(f"{url}/metrics")[2]) and "waport_worker_restarts_total{" in t
                    and 'waport_messages_sent_total{company="acme"} 1.0' in t and t, what="a full scrape")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == ""


def prometheus_query(base: str, query: str) -> list[dict[str, Any]]:
    """The result vector; empty while the server is still starting."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            reply = json.loads(r.read())
    except (urllib.error.URLError, ConnectionError):
        return []
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def test_a_real_prometheus_scrapes_the_daemon(daemon_factory, simnet, tmp_path):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed (Debian package prometheus; .ci/install-system-deps installs it)")
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], metrics_listen="127.0.0.1:0",
                       health_check_interval=0.3).start()
    url = metrics_url(d)
    d.wait_state("acme", "connected")
    target = url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: waportd\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen(
        [exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    try:
        up = wait_for(lambda: prometheus_query(base, 'up{job="waportd"}'), timeout=30, interval=0.3,
                      what="prometheus to scrape waportd")
        assert up[0]["value"][1] == "1", up
        acme = wait_for(lambda: prometheus_query(base, 'waport_session_up{company="acme"}'), timeout=15,
                        interval=0.3, what="waport_session_up in prometheus")
        assert acme[0]["value"][1] == "1"
        rss = prometheus_query(base, 'waport_worker_resident_memory_bytes{company="acme"}')
        assert rss and float(rss[0]["value"][1]) > 0
        targets = json.loads(urllib.request.urlopen(f"{base}/api/v1/targets", timeout=5).read())
        health_ = [t["health"] for t in targets["data"]["activeTargets"]]
        assert health_ == ["up"], targets
    finally:
        stop_process(prom)
        log.close()
