"""SIGHUP reload (verified bundle and config swapped between batches, bad ones refused) and
SIGTERM drain, in-process and with a real `xtalsym serve` over loopback sockets."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
zmq = pytest.importorskip("zmq")

from xtalsym import bundle as bundles
from xtalsym.daemon import reload
from xtalsym.daemon.client import listen
from xtalsym.daemon.config import ConfigError, load_config
from xtalsym.daemon.sim import DetectorSim, push_socket
from xtalsym.testing import (
    REPO_ROOT,
    InProcessDaemon,
    SystemdSide,
    daemon_overrides,
    shipped_structures,
    small_detector,
    tiny_bundle,
)

ROOT = REPO_ROOT
STRUCTURES = [shipped_structures() / name for name in ("NaCl.cif", "Si.cif")]
GEOMETRY = small_detector()


def other_bundle(tmp: Path, *, seed: int = 1, image_size: int = 64, model_name: str = "msdn") -> Path:
    """Like the tiny bundle, with other weights (another model_id), no index."""
    return tiny_bundle(tmp, index=False, seed=seed, image_size=image_size, model_name=model_name)


@pytest.fixture(scope="module")
def bundles_dir(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("reload")
    return {"a": tiny_bundle(tmp / "a"), "b": other_bundle(tmp / "b")}


def _config(bundle, endpoint, **sections):
    return load_config(overrides=daemon_overrides(endpoint, bundle=bundle, **sections))


def test_merge_keeps_restart_only_keys():
    old = load_config()
    new = load_config(overrides={"publish": {"address": "tcp://127.0.0.1:7777"}, "pipeline": {"max_batch": 4},
                                 "bundle": {"path": "/x"}})
    merged, kept = reload.merge(old, new)
    assert merged.publish.address == old.publish.address and merged.pipeline.max_batch == 4
    assert merged.bundle.path == "/x"
    assert kept == ["publish.address changed ('tcp://127.0.0.1:5556' -> 'tcp://127.0.0.1:7777') but needs a "
                    "restart; keeping 'tcp://127.0.0.1:5556' until then"]
    assert reload.merge(old, old) == (old, []) or reload.merge(old, old)[1] == []


def test_a_spot_dp_bundle_is_refused_when_loaded(tmp_path, capsys):
    """Start-up and SIGHUP reloads both load through load_components."""
    from xtalsym.bundle import BundleError
    from xtalsym.cli import main
    from xtalsym.daemon.service import load_components

    spot = other_bundle(tmp_path, model_name="ziletti-cnn")
    assert bundles.load_bundle(spot).representation == "spot"
    with pytest.raises(BundleError, match=r"ziletti-cnn\) classifies spot diffraction patterns.*shaped"):
        load_components(load_config(overrides={"bundle": {"path": str(spot), "backend": "torch", "device": "cpu"}}))
    # `xtalsym serve` says so in one line and exits 2
    assert main(["serve", "--bundle", str(spot), "--metrics-port", "0", "--ingest", "tcp://127.0.0.1:*"]) == 2
    assert "classifies spot diffraction patterns" in capsys.readouterr().err


def test_reload_swaps_the_bundle_without_losing_frames(bundles_dir, caplog):
    run = InProcessDaemon(bundle=bundles_dir["a"])
    old_id = run.service.pipeline.bundle.model_id
    try:
        run.send(STRUCTURES[:1])
        run.wait_predictions(3)
        run.next_config = _config(bundles_dir["b"], run.endpoint, pipeline={"max_batch": 4},
                                  publish={"topic": "elsewhere"})
        # frames stream while the new bundle is loaded and verified
        sender = threading.Thread(target=run.send, args=(STRUCTURES,), kwargs={"series_id": 2})
        sender.start()
        with caplog.at_level(logging.INFO, logger="xtalsym.daemon.service"):
            assert run.service.reload() is True
        sender.join(30)
        run.wait_predictions(3 + 6)
        run.send(STRUCTURES[1:], series_id=3)
        run.wait_predictions(3 + 6 + 3)
    finally:
        summary = run.close()
    new_id = bundles.load_bundle(bundles_dir["b"]).model_id
    assert run.service.pipeline.bundle.model_id == new_id != old_id
    assert run.service.config.pipeline.max_batch == 4
    assert run.service.config.publish.topic == "xtalsym.prediction"  # restart-only: kept
    assert any("publish.topic changed" in r.message for r in caplog.records)
    msgs = summary.messages
    assert len(msgs) == 12 and run.service.pipeline.metrics.snapshot()["bad_frames"] == {}
    assert {m["model"]["model_id"] for m in msgs[:3]} == {old_id}
    assert {m["model"]["model_id"] for m in msgs[-3:]} == {new_id}
    assert msgs[-1]["model"]["index"] is None and msgs[0]["model"]["index"] is not None
    assert run.service.reloads == {"done": 1, "refused": 0}


def test_bad_reloads_are_refused_and_the_old_bundle_keeps_serving(bundles_dir, tmp_path, caplog):
    corrupted = tmp_path / "corrupted"
    shutil.copytree(bundles_dir["b"], corrupted)
    onnx = corrupted / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the SHA-256 can tell
    onnx.write_bytes(bytes(data))
    other_size = other_bundle(tmp_path / "size", image_size=96)
    run = InProcessDaemon(bundle=bundles_dir["a"])
    old_id = run.service.pipeline.bundle.model_id
    try:
        with caplog.at_level(logging.ERROR, logger="xtalsym.daemon.service"):
            run.next_config = _config(corrupted, run.endpoint)
            assert run.service.reload() is False
            run.next_config = _config(other_size, run.endpoint)
            assert run.service.reload() is False

            def bad_file():
                raise ConfigError(["pipeline.workers = 0: must be an integer > 0"], "/etc/xtalsym/xtalsym.toml")

            run.service._reload_config = bad_file
            assert run.service.reload() is False
        run.send(STRUCTURES[:1])
        run.wait_predictions(3)
    finally:
        summary = run.close()
    lines = [r.message for r in caplog.records if r.message.startswith("reload refused")]
    assert len(lines) == 3
    assert "model.onnx is corrupted: SHA-256" in lines[0]
    assert "96 px" in lines[1] and "needs a restart" in lines[1]
    assert "pipeline.workers = 0" in lines[2]
    assert {m["model"]["model_id"] for m in summary.messages} == {old_id} and len(summary.messages) == 3
    assert run.service.reloads == {"done": 0, "refused": 3}


# --------------------------------------------------------------------------- a real `xtalsym serve`


def _write_config(path: Path, bundle: Path, ingest: str, publish: str) -> None:
    path.write_text(f"""
[bundle]
path = "{bundle}"
backend = "onnxruntime"
device = "cpu"
[ingest]
address = "{ingest}"
[pipeline]
workers = 1
overload = "block"
queue_size = 128
latency_budget_seconds = 0.01
[publish]
address = "{publish}"
metrics_interval_seconds = 0
[metrics]
port = 0
""")


def test_serve_process_notifies_reloads_on_sighup_and_drains_on_sigterm(bundles_dir, tmp_path):
    from xtalsym.daemon.demo import free_port

    side = SystemdSide(str(tmp_path / "notify.sock"))
    push = push_socket(zmq.Context.instance(), "tcp://127.0.0.1:*")
    ingest = push.getsockopt(zmq.LAST_ENDPOINT).decode()
    publish = f"tcp://127.0.0.1:{free_port()}"
    config = tmp_path / "xtalsym.toml"
    _write_config(config, bundles_dir["a"], ingest, publish)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "4000000",
           "OMP_NUM_THREADS": "1"}
    env.pop("WATCHDOG_PID", None)
    log_file = open(tmp_path / "serve.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "xtalsym", "serve", "--config", str(config)], env=env,
                              stdout=log_file, stderr=subprocess.STDOUT)
    stop = threading.Event()
    summary = {}
    listener = None
    try:
        ready = side.wait_for("READY", "1", timeout=120)
        assert "model" in ready["STATUS"] and "onnxruntime" in ready["STATUS"]
        side.wait_for("WATCHDOG", "1", timeout=10)
        listening = threading.Event()
        listener = threading.Thread(target=lambda: summary.update(s=listen(publish, stop=stop, ready=listening)),
                                    daemon=True)
        listener.start()
        listening.wait(5)
        time.sleep(0.5)

        # SIGHUP to another bundle: RELOADING=1, then READY=1 once it is verified and swapped in
        _write_config(config, bundles_dir["b"], ingest, publish)
        t_hup = time.monotonic()
        daemon.send_signal(signal.SIGHUP)
        side.wait_for("RELOADING", "1", after=t_hup, timeout=30)
        assert "reloaded" in side.wait_for("READY", "1", after=t_hup, timeout=60)["STATUS"]

        # frames piling up in the daemon (1 worker), then SIGTERM: every one is published
        sim = DetectorSim(STRUCTURES * 16, geometry=GEOMETRY)
        sent = sim.send(push)
        time.sleep(0.5)  # on the daemon's socket, not in this process's send queue
        t_term = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        side.wait_for("STOPPING", "1", after=t_term, timeout=30)
        assert daemon.wait(120) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log_file.close()
        time.sleep(0.5)
        stop.set()
        if listener is not None:
            listener.join(10)
        push.close(linger=0)
        side.close()
    log = (tmp_path / "serve.log").read_text()
    msgs = summary["s"].messages
    images = sent - 2  # start and end messages
    assert len(msgs) == images == 96, log[-3000:]
    new_id = bundles.load_bundle(bundles_dir["b"]).model_id
    assert {m["model"]["model_id"] for m in msgs} == {new_id}
    assert sum(m["final"] for m in msgs) == 32
    assert "reload: done" in log and "Traceback" not in log
    # stderr is not the journal here: lines carry our own timestamp
    assert any(line[:4].isdigit() for line in log.splitlines())
