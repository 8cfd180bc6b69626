"""Prometheus metrics, /healthz and /readyz of a running daemon; the Grafana dashboard's
metric names against the live exposition; `promtool check metrics` on it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from xtalsym.daemon.config import ConfigError, defaults, load_config
from xtalsym.daemon.httpd import MonitorError, MonitorServer, health
from xtalsym.daemon.metrics import Metrics
from xtalsym.daemon.sim import DetectorSim
from xtalsym.testing import REPO_ROOT, InProcessDaemon, detector_socket, shipped_structures, small_detector

SHIPPED = shipped_structures()
GEOMETRY = small_detector()

ROOT = REPO_ROOT
DASHBOARD = ROOT / "systemd" / "grafana-dashboard.json"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict:
    """{(sample name, sorted labels): value} of an exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict, name: str, **labels) -> float:
    return parsed[(name, tuple(sorted((k, str(v)) for k, v in labels.items())))]


def total(parsed: dict, name: str) -> float:
    return sum(v for (n, _), v in parsed.items() if n == name)


# --------------------------------------------------------------------------- config and units


def test_metrics_config_defaults_and_errors():
    d = defaults()["metrics"]
    assert d == {"enabled": True, "address": "127.0.0.1", "port": 9855, "heartbeat_timeout_seconds": 10.0}
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"metrics": {"enabled": "yes", "address": "tcp://0.0.0.0", "port": 70000,
                                           "heartbeat_timeout_seconds": 0}})
    text = str(err.value)
    assert len(err.value.errors) == 4, text
    for fragment in ("metrics.enabled = 'yes'", "metrics.address = 'tcp://0.0.0.0'", "metrics.port = 70000",
                     "metrics.heartbeat_timeout_seconds = 0"):
        assert fragment in text
    with pytest.raises(ConfigError, match="metrics.address = 'localhost:9855'"):
        load_config(overrides={"metrics": {"address": "localhost:9855"}})
    assert load_config(overrides={"metrics": {"address": "::1", "port": 0}}).metrics.address == "::1"


def test_json_metrics_api_feeds_prometheus():
    m = Metrics()
    m.count("messages", 3)
    m.count("stale_end")
    m.bad_frame("bad_cbor", "test")
    m.bad_frame("bad_cbor", "test")
    m.batch(4)
    m.stage("decode", 0.002)
    snap = m.snapshot()
    assert snap["counts"] == {"messages": 3, "stale_end": 1} and snap["bad_frames"] == {"bad_cbor": 2}
    assert snap["mean_batch"] == 4.0 and list(m.batch_sizes) == [4]
    r = m.prom.registry
    assert r.get_sample_value("xtalsym_frames_received_total") == 3
    assert r.get_sample_value("xtalsym_events_total", {"event": "stale_end"}) == 1
    assert r.get_sample_value("xtalsym_frames_rejected_total", {"reason": "bad_cbor"}) == 2
    assert r.get_sample_value("xtalsym_batch_size_sum") == 4
    assert r.get_sample_value("xtalsym_stage_latency_seconds_bucket", {"stage": "decode", "le": "0.0025"}) == 1
    assert r.get_sample_value("xtalsym_stage_latency_seconds_bucket", {"stage": "decode", "le": "0.001"}) == 0
    with pytest.raises(ValueError, match="unknown stage 'shape'"):
        m.stage("shape", 0.1)
    # each Metrics has its own registry: two pipelines in one process do not share counters
    assert Metrics().prom.registry.get_sample_value("xtalsym_frames_received_total") == 0


def test_health_verdicts():
    assert health("starting", {"ingest": 99.0, "inference": 99.0}, 10)[0]  # loading is not a failure
    ok, body = health("running", {"ingest": 0.1, "inference": 0.05}, 10)
    assert ok and body["status"] == "ok"
    ok, body = health("running", {"ingest": 0.1, "inference": 12.5}, 10)
    assert not ok and body["stale"] == {"inference": 12.5}
    assert not health("stopped", {"ingest": 0.1, "inference": 0.1}, 10)[0]


def fake_pipeline(state: str, beats: dict) -> SimpleNamespace:
    return SimpleNamespace(state=state, ready=state == "running", heartbeat=lambda: beats,
                           model_info={"model_id": "m1"}, metrics=Metrics())


@pytest.mark.parametrize("state, beats, healthz, readyz", [
    ("starting", {"ingest": 0.0, "inference": 0.0}, 200, 503),
    ("running", {"ingest": 0.1, "inference": 0.1}, 200, 200),
    ("running", {"ingest": 30.0, "inference": 0.1}, 503, 200),
    ("stopping", {"ingest": 0.1, "inference": 0.1}, 200, 503),
    ("stopped", {"ingest": 0.1, "inference": 0.1}, 503, 503),
])
def test_health_endpoints_over_http(state, beats, healthz, readyz):
    server = MonitorServer(fake_pipeline(state, beats), port=0, heartbeat_timeout=10)
    try:
        code, body = get(server.url + "/healthz")
        assert code == healthz and json.loads(body)["state"] == state
        code, body = get(server.url + "/readyz")
        assert code == readyz and json.loads(body)["model_id"] == "m1"
        code, body = get(server.url + "/nope")
        assert code == 404 and "/metrics" in body
    finally:
        server.close()


def test_bind_failure_names_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MonitorError, match=f"127.0.0.1:{port}: cannot listen"):
            MonitorServer(fake_pipeline("running", {}), address="127.0.0.1", port=port)


# --------------------------------------------------------------------------- a running daemon


def _scrape_until(url: str, done, timeout: float = 30.0) -> tuple[str, dict]:
    t0 = time.monotonic()
    while True:
        code, text = get(url + "/metrics")
        assert code == 200
        parsed = samples(text)
        if done(parsed) or time.monotonic() - t0 > timeout:
            return text, parsed
        time.sleep(0.1)


@pytest.fixture(scope="module")
def live(components):
    """NaCl and Si (6 images) with an undecodable message after every second image, scraped
    once every prediction is out; then the daemon is stopped."""
    sim = DetectorSim([SHIPPED / "NaCl.cif", SHIPPED / "Si.cif"], geometry=GEOMETRY, bad_every=2)
    n_messages = len(list(sim.messages()))
    sock, endpoint = detector_socket()
    run = InProcessDaemon(components=components, frame_endpoint=endpoint)
    pipeline = run.service.pipeline
    out = {"n_messages": n_messages, "model_id": components[0].model_id}
    try:
        url = pipeline.monitor.url
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":9855")
        out["ready_before"] = get(url + "/readyz")
        sim.send(sock)
        run.wait_final(2)
        out["metrics"], out["parsed"] = _scrape_until(url, lambda p: (
            total(p, "xtalsym_samples_completed_total") >= 2
            and total(p, "xtalsym_frames_received_total") >= n_messages))
        out["healthz"] = get(url + "/healthz")
        out["readyz"] = get(url + "/readyz")
    finally:
        sock.close(linger=0)
        run.close()
    out["state_after"] = pipeline.state
    with pytest.raises(urllib.error.URLError):  # the HTTP server closes with the pipeline
        urllib.request.urlopen(url + "/healthz", timeout=5)
    return out


def test_live_counts_histograms_and_info(live):
    p, n = live["parsed"], live["n_messages"]
    assert value(p, "xtalsym_frames_received_total") == n
    assert value(p, "xtalsym_frames_decoded_total") == n - 3
    assert total(p, "xtalsym_frames_rejected_total") == 3  # one undecodable message after every second image
    assert value(p, "xtalsym_images_accepted_total") == 6 and value(p, "xtalsym_views_shaped_total") == 6
    assert value(p, "xtalsym_predictions_published_total", status="complete") == 2
    assert value(p, "xtalsym_predictions_published_total", status="partial") == 4
    assert value(p, "xtalsym_samples_completed_total") == 2
    assert total(p, "xtalsym_samples_partial_total") == 0
    assert value(p, "xtalsym_end_to_end_latency_seconds_count") == 6
    assert value(p, "xtalsym_stage_latency_seconds_count", stage="decode") == n
    assert value(p, "xtalsym_stage_latency_seconds_count", stage="calibrate_shape") == 6
    batches = value(p, "xtalsym_batch_size_count")
    assert value(p, "xtalsym_batch_size_sum") == 6 and 1 <= batches <= 6
    assert value(p, "xtalsym_stage_latency_seconds_count", stage="infer") == batches
    # index.query = "final": only a batch holding one of the 2 final predictions queries the index
    assert 1 <= value(p, "xtalsym_stage_latency_seconds_count", stage="match") <= min(batches, 2)
    # a bucket bound is cumulative: +Inf holds every observation
    assert value(p, "xtalsym_end_to_end_latency_seconds_bucket", le="+Inf") == 6
    assert total(p, "xtalsym_predicted_space_group_total") == 2
    assert total(p, "xtalsym_predicted_crystal_system_total") == 2
    assert value(p, "xtalsym_open_set_results_total") == 2
    assert value(p, "xtalsym_open_set_unknown_total") <= 2
    model = [labels for (name, labels), _ in p.items() if name == "xtalsym_model_info"]
    assert model == [(("backend", "onnxruntime"), ("device", "cpu"), ("model_id", live["model_id"]),
                      ("name", "tiny"), ("precision", "fp32"))]
    assert value(p, "xtalsym_reference_index_entries") == 4
    assert value(p, "xtalsym_queue_capacity", queue="workers") == 64
    assert {dict(labels)["queue"] for (name, labels) in p if name == "xtalsym_queue_depth"} == \
        {"workers", "results", "open_samples", "combine", "batch", "publish"}
    assert value(p, "process_resident_memory_bytes") > 10e6
    assert value(p, "xtalsym_uptime_seconds") > 0
    assert total(p, "xtalsym_build_info") == 1


def test_live_health_and_readiness(live):
    assert live["ready_before"][0] == 200  # Service.start() returns once the pipeline is up
    code, body = live["healthz"]
    assert code == 200 and json.loads(body)["state"] == "running"
    code, body = live["readyz"]
    assert code == 200 and json.loads(body) == {"status": "ready", "state": "running", "model_id": live["model_id"]}
    assert live["state_after"] == "stopped"


# --------------------------------------------------------------------------- the dashboard's names

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (not functions, labels, keywords, ranges or strings)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors ([$__rate_interval])
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = re.findall(r"(?<![\w:$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", e)
    return {n for n in names if n.lower() not in PROMQL_WORDS}


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every panel target's expr (rows included) and every templating query's metric."""
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else ""
        exprs.extend(re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)", query))
    return exprs


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.99, sum by (le, stage) (rate(xtalsym_stage_latency_seconds_bucket'
                        '{instance=~"$instance", le="0.25"}[$__rate_interval])))') == \
        {"xtalsym_stage_latency_seconds_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / on (x) group_left sum(b_count) or vector(0)") == \
        {"a_total", "b_count"}
    assert metric_names('topk(10, increase(xtalsym_x_total{a="rate(y)"}[$__range]))') == {"xtalsym_x_total"}


def test_dashboard_uses_exactly_exported_names(live):
    dashboard = json.loads(DASHBOARD.read_text())
    exported = {name for name, _ in live["parsed"]}
    queries = dashboard_queries(dashboard)
    used = set().union(*(metric_names(q) for q in queries))
    assert len(queries) >= 20 and len(used) >= 20
    assert not used - exported, f"dashboard names the daemon does not export: {sorted(used - exported)}"
    assert "xtalsym_frames_recieved_total" not in exported  # a typo would be caught
    # every panel asks something, through the datasource variable
    for panel in dashboard["panels"]:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    for required in ("xtalsym_frames_received_total", "xtalsym_frames_rejected_total",
                     "xtalsym_predictions_published_total", "xtalsym_end_to_end_latency_seconds_bucket",
                     "xtalsym_stage_latency_seconds_bucket", "xtalsym_queue_depth", "xtalsym_batch_size_sum",
                     "xtalsym_open_set_unknown_total", "xtalsym_predicted_space_group_total",
                     "xtalsym_predicted_crystal_system_total", "xtalsym_model_info", "process_cpu_seconds_total",
                     "process_resident_memory_bytes", "xtalsym_series_total", "xtalsym_frames_missing_total",
                     "xtalsym_duplicate_axes_total", "xtalsym_stage_cpu_seconds_total"):
        assert required in used, required


# --------------------------------------------------------------------------- promtool


def promtool() -> str | None:
    """$XTALSYM_PROMTOOL (must exist when set), else promtool on PATH, else None."""
    path = os.environ.get("XTALSYM_PROMTOOL")
    if path:
        assert os.access(path, os.X_OK), f"XTALSYM_PROMTOOL={path!r} is not an executable file"
        return path
    return shutil.which("promtool")


def _check(tool: str, text: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


def test_promtool_check_metrics(live):
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not found: set XTALSYM_PROMTOOL or put promtool on PATH "
                    "(.ci/fetch-promtool unpacks it from Debian's prometheus package)")
    # promtool does lint: a counter without _total is reported
    bad = _check(tool, "# HELP foo a counter\n# TYPE foo counter\nfoo 1\n")
    assert bad.returncode != 0 and "_total" in bad.stdout + bad.stderr
    result = _check(tool, live["metrics"])
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
