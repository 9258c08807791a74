"""monitoring/: the Prometheus alerting rules (checked and unit-tested by promtool), the Grafana dashboard
(its structure checked here: Grafana is not in Debian and PyPI has no maintained dashboard JSON schema), and
both against a real Prometheus scraping a real waportd: the rules load and evaluate, every metric they
and the dashboard name is in the scrape, and every panel query runs."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from conftest import ROOT, free_port, stop_process, wait_for
from test_metrics import fake_snapshot, metrics_url, parse, prometheus_query, value

from ipc.webhooks import new_secret
from waportd.metrics import Metrics
from workers.sim_backend import CREDS_FILE

MONITORING = os.path.join(ROOT, "monitoring")
RULES = os.path.join(MONITORING, "waport-alerts.yml")
RULE_TESTS = os.path.join(MONITORING, "waport-alerts.test.yml")
DASHBOARD = os.path.join(MONITORING, "grafana-dashboard.json")

# Metric names in a PromQL expression: ours, and Prometheus' own `up` (`\b` keeps `waport_session_up` whole).
METRIC_NAME = re.compile(r"\b(waport_[a-z0-9_]+|up)\b(?!\s*\()")
# Series without a company label; every other waport_* series in a panel is filtered by $company.
HOST_WIDE = {"waport_sessions", "waport_info", "waport_send_latency_seconds_bucket",
             "waport_webhook_delivery_seconds_bucket", "waport_worker_memory_limit_bytes"}


def alerts() -> list[dict[str, Any]]:
    with open(RULES) as fh:
        groups = yaml.safe_load(fh)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def rule_tests() -> list[dict[str, Any]]:
    with open(RULE_TESTS) as fh:
        return yaml.safe_load(fh)["tests"]


def dashboard() -> dict[str, Any]:
    with open(DASHBOARD) as fh:
        return json.load(fh)


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for p in board["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def panel_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(board) if p["type"] != "row" for t in p["targets"]]


def grafana_to_promql(expr: str, company: str = "acme", interval: str = "1m") -> str:
    """What Grafana sends: variables replaced ($instance and $datasource have their `All` value)."""
    return expr.replace("$company", company).replace("$instance", ".*").replace("$__rate_interval", interval)


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/install-system-deps installs it)")
    return exe


# ---------------------------------------------------------------- the series the rules need


def test_state_per_company_and_memory_limit_are_exported():
    """The alerts on failed/logged_out/banned name the company, and memory near the limit compares with it."""
    got = parse(Metrics(lambda: fake_snapshot(memory_limit=512 << 20)).exposition()[0].decode())
    assert got["waport_session_state"] == {frozenset({("company", "acme"), ("state", "connected")}): 1,
                                           frozenset({("company", "bistro"), ("state", "backoff")}): 1}
    assert value(got, "waport_worker_memory_limit_bytes") == 512 << 20
    off = parse(Metrics(lambda: fake_snapshot()).exposition()[0].decode())
    assert value(off, "waport_worker_memory_limit_bytes") == 0  # off: the alert's `> 0` drops it


# ---------------------------------------------------------------- the rules


def test_promtool_checks_the_rules():
    out = subprocess.run([promtool(), "check", "rules", RULES], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


def test_promtool_unit_tests_of_the_rules_pass():
    out = subprocess.run([promtool(), "test", "rules", os.path.basename(RULE_TESTS)], capture_output=True,
                         text=True, timeout=120, cwd=MONITORING)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout and "FAILED" not in out.stdout


def test_every_alert_has_a_test_that_fires_it_and_series_that_must_not():
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"
    fired: dict[str, list[dict[str, Any]]] = {}
    quiet: set[str] = set()
    for group in rule_tests():
        series = [s["series"] for s in group["input_series"]]
        for case in group["alert_rule_test"]:
            if not case["exp_alerts"]:
                quiet.add(case["alertname"])
                continue
            fired.setdefault(case["alertname"], []).append(case)
            # Some input series of the group must not fire: one whose company (or host) is not expected.
            keys = {a["exp_labels"].get("company") or a["exp_labels"]["instance"] for a in case["exp_alerts"]}
            bystanders = [s for s in series if not any(f'"{k}"' in s for k in keys)]
            assert bystanders, f"{case['alertname']}: no series in its test that must not fire"
    assert set(fired) == set(names), f"alerts without a firing test: {set(names) - set(fired)}"
    assert quiet >= set(names), f"alerts without a test before they fire: {set(names) - quiet}"
    assert not set(fired) - set(names), "tests of alerts that do not exist"


def test_every_alert_has_a_duration_a_severity_and_annotations_naming_the_company():
    for a in alerts():
        assert re.fullmatch(r"\d+[smh]", a.get("for", "")), a["alert"]
        assert a["labels"]["severity"] in ("warning", "critical"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
        if a["alert"] != "WaportdDown":  # the only one about a host rather than a company
            for text in (a["annotations"]["summary"], a["annotations"]["description"]):
                assert "{{ $labels.company }}" in text, a["alert"]


# ---------------------------------------------------------------- the dashboard


def test_dashboard_structure():
    """What Grafana needs to import it, checked by hand (no maintained JSON schema on PyPI)."""
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["title"] and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", board["uid"])
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    company = variables["company"]
    assert company["type"] == "query" and company["includeAll"] and company["multi"]
    assert re.fullmatch(r"label_values\(waport_session_up(\{[^}]*\})?, company\)", company["query"]["query"])
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}", v["name"]

    everything = panels(board)
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in everything:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["h"] > 0 and 0 < g["w"] and g["x"] + g["w"] <= 24, p
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["title"] and p["targets"], p
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]

    for title, expr in panel_exprs(board):
        for name in METRIC_NAME.findall(expr):
            if name.removesuffix("_bucket") not in {n.removesuffix("_bucket") for n in HOST_WIDE}:
                assert 'company=~"$company"' in expr, f"{title}: {name} is not filtered by company"
    used = {n for _, expr in panel_exprs(board) for n in METRIC_NAME.findall(expr)}
    for name in ("waport_sessions", "waport_worker_restarts_total", "waport_messages_sent_total",
                 "waport_messages_received_total", "waport_messages_failed_total",
                 "waport_send_latency_seconds_bucket", "waport_outbox_pending", "waport_heartbeat_age_seconds",
                 "waport_worker_resident_memory_bytes", "waport_webhook_deliveries_total"):
        assert name in used, f"no panel shows {name}"
    assert any("histogram_quantile" in expr and "waport_send_latency_seconds_bucket" in expr
               for _, expr in panel_exprs(board))


# ---------------------------------------------------------------- against a real Prometheus and waportd


def api(base: str, path: str, **params: str) -> dict[str, Any]:
    url = f"{base}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:  # a bad query: Prometheus answers 400 with an error body
        return json.loads(exc.read())


@contextlib.contextmanager
def prometheus(target: str, rule_files: list[str], tmp_path: Any) -> Iterator[str]:
    """A real Prometheus scraping `target` every second, evaluating `rule_files` every second."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed (Debian package prometheus; .ci/install-system-deps installs it)")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": rule_files,
        "scrape_configs": [{"job_name": "waportd", "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_process(proc)


def counted(d: Any, name: str, **labels: str) -> float:
    return sum(s["value"] for s in d.ctl("metrics")["metrics"]
               if s["name"] == name and labels.items() <= s["labels"].items())


def make_a_failed_send_and_an_error(d: Any, net: Any) -> None:
    """waport_messages_failed_total and waport_errors_total exist only after something went wrong: an image
    queued during a network outage whose stored file is then removed by hand (README: it fails with
    not_found), and unreadable sim credentials (an `error` event, kind credentials; the worker pairs again)."""
    media = d.ctl("media_put", data=base64.b64encode(b"\xff\xd8 a photo").decode(), last=True,
                  mimetype="image/jpeg", company="acme")
    net.call("outage", seconds=60)  # until the file is gone
    d.wait_state("acme", "disconnected")
    queued = d.ctl("send", company="acme", to="15550109999", type="image", media=media["media_id"])
    assert queued["status"] == "queued", queued
    os.remove(os.path.join(d.state_dir, "media", media["media_id"][:2], media["media_id"]))
    net.call("outage", seconds=0)
    wait_for(lambda: counted(d, "waport_messages_failed_total", company="acme") >= 1, timeout=20,
             what="the failed send counted")
    d.ctl("stop", company="acme")
    d.wait_state("acme", "stopped")
    with open(os.path.join(d.state_dir, "sessions", "acme", CREDS_FILE), "w") as fh:
        fh.write("not json")
    d.ctl("start", company="acme")
    d.wait_state("acme", "connected")
    wait_for(lambda: counted(d, "waport_errors_total", company="acme") >= 1, what="the error counted")


def test_rules_and_dashboard_on_a_real_prometheus(daemon_factory, simnet, receiver, tmp_path):
    secret = new_secret()
    receiver.secrets("all", secret)
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme", "bistro"], metrics_listen="127.0.0.1:0",
                       health_check_interval=0.3, memory_limit=4 << 30, webhook_url=receiver.url("all"),
                       webhook_secret=secret, webhook_retry_scale=0.01).start()
    url = metrics_url(d)
    d.wait_state("acme", "connected")
    d.wait_state("bistro", "connected")
    pid = d.status("acme")["pid"]
    os.kill(pid, signal.SIGKILL)  # a restart, so waport_worker_restarts_total has a series
    wait_for(lambda: (s := d.status("acme"))["state"] == "connected" and s["pid"] != pid, what="acme back")
    d.ctl("send", company="acme", to="15550109999", text="hello")
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, text="hi", id="IN-1")
    make_a_failed_send_and_an_error(d, simnet)
    wait_for(lambda: counted(d, "waport_webhook_deliveries_total", company="acme", outcome="ok") >= 2,
             timeout=20, what="webhook deliveries counted")
    wait_for(lambda: counted(d, "waport_messages_sent_total", company="acme") >= 1, what="the sent message")

    board = dashboard()
    exprs = panel_exprs(board)
    rule_names = {a["alert"] for a in alerts()}
    with prometheus(url.removeprefix("http://"), [RULES], tmp_path) as base:
        up = wait_for(lambda: prometheus_query(base, 'up{job="waportd"}'), timeout=30, interval=0.3,
                      what="prometheus to scrape waportd")
        assert up[0]["value"][1] == "1", up

        # The rules loaded, and each has been evaluated without error.
        def evaluated() -> list[dict[str, Any]]:
            reply = api(base, "/api/v1/rules")
            rules = [r for g in reply.get("data", {}).get("groups", []) for r in g["rules"]]
            return rules if rules and all(r["health"] != "unknown" for r in rules) else []

        loaded = wait_for(evaluated, timeout=30, interval=0.3, what="the rules evaluated")
        assert {r["name"] for r in loaded} == rule_names
        assert all(r["type"] == "alerting" for r in loaded)
        assert [(r["name"], r["health"], r.get("lastError")) for r in loaded if r["health"] != "ok"] == []

        # Every metric the rules and the dashboard name is in the scrape.
        wanted = {n for a in alerts() for n in METRIC_NAME.findall(a["expr"])}
        wanted |= {n for _, expr in exprs for n in METRIC_NAME.findall(expr)}

        def missing() -> set[str]:
            return wanted - set(api(base, "/api/v1/label/__name__/values").get("data") or [])

        assert wait_for(lambda: not missing() or None, timeout=20, interval=0.5,
                        what=f"metrics in prometheus: missing {missing()}")

        # Every panel query (as Grafana sends it) runs without error and, failures made above, has data.

        def run_panels() -> dict[str, list[str]]:
            errors, empty = [], []
            for title, expr in exprs:
                reply = api(base, "/api/v1/query", query=grafana_to_promql(expr))
                if reply["status"] != "success":
                    errors.append(f"{title}: {expr}: {reply.get('error')}")
                elif not reply["data"]["result"]:
                    empty.append(f"{title}: {expr}")
            return {"errors": errors, "empty": empty}

        result = wait_for(lambda: (r := run_panels()) and not r["empty"] and r, timeout=30, interval=0.5,
                          what="every dashboard panel to have data")
        assert result["errors"] == []
        variable = api(base, "/api/v1/label/company/values", **{"match[]": 'waport_session_up{instance=~".*"}'})
        assert variable["status"] == "success" and set(variable["data"]) == {"acme", "bistro"}
        drill = api(base, "/api/v1/query", query=grafana_to_promql(
            'sum by (company) (waport_session_up{instance=~"$instance",company=~"$company"})', company="bistro"))
        assert [r["metric"]["company"] for r in drill["data"]["result"]] == ["bistro"]

        # And with every company selected (Grafana's `All` is the regex .*).
        for title, expr in exprs:
            reply = api(base, "/api/v1/query", query=grafana_to_promql(expr, company=".*"))
            assert reply["status"] == "success", (title, reply)
