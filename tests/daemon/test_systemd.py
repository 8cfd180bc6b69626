"""systemd integration: the notify protocol against a real AF_UNIX datagram socket, the
watchdog against a stalled loop, journal logging, the unit (systemd-analyze) and install.sh."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from xtalsym import logsetup
from xtalsym.daemon.notify import Notifier, Watchdog
from xtalsym.testing import REPO_ROOT, SystemdSide

ROOT = REPO_ROOT
UNIT = ROOT / "systemd" / "xtalsym.service"
# the console script of the environment running the tests (a worktree has no .venv of its own)
XTALSYM = Path(sys.executable).parent / "xtalsym"


@pytest.fixture
def systemd_side(tmp_path):
    side = SystemdSide(str(tmp_path / "notify.sock"))
    side.path = str(tmp_path / "notify.sock")
    yield side
    side.close()


# --------------------------------------------------------------------------- notify protocol


def test_without_notify_socket_everything_is_a_no_op():
    n = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_interval is None
    assert n.ready("x") is False and n.watchdog() is False and n.stopping() is False


def test_messages_reach_a_path_socket(systemd_side):
    n = Notifier.from_env({"NOTIFY_SOCKET": systemd_side.path})
    assert n.ready("serving; model abc") and n.status("12 frames/s")
    before = time.monotonic_ns() // 1000
    assert n.reloading()
    assert n.stopping()
    assert systemd_side.wait_for("READY", "1")["STATUS"] == "serving; model abc"
    assert systemd_side.wait_for("STATUS", "12 frames/s")
    reloading = systemd_side.wait_for("RELOADING", "1")
    # CLOCK_MONOTONIC in microseconds, as systemd compares it
    assert before <= int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    systemd_side.wait_for("STOPPING", "1")
    n.close()


def test_messages_reach_an_abstract_socket():
    name = f"xtalsym-test-{os.getpid()}-{time.monotonic_ns()}"
    side = SystemdSide(b"\0" + name.encode())
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.watchdog()
        side.wait_for("WATCHDOG", "1", timeout=5)
    finally:
        side.close()


def test_watchdog_settings_from_the_environment(tmp_path):
    sock = str(tmp_path / "s")
    assert Notifier.from_env({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    mine = {"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(mine).watchdog_interval == 1.0
    other = {**mine, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(other).watchdog_interval is None  # meant for another process
    assert Notifier.from_env({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier.from_env({"NOTIFY_SOCKET": sock}).watchdog_interval is None


def test_send_failure_is_logged_not_raised(tmp_path, caplog):
    n = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING):
        assert n.ready() is False
        assert n.ready() is False
    assert sum("sd_notify" in r.message for r in caplog.records) == 1


def test_watchdog_pings_only_while_every_loop_beats(systemd_side):
    now = [100.0]
    beats = {"ingest": 100.0, "inference": 100.0}
    n = Notifier(systemd_side.path, watchdog_usec=2_000_000)
    dog = Watchdog(n, lambda: beats, interval=1.0, stale_after=1.0, clock=lambda: now[0])
    assert dog.tick()  # due at once
    assert not dog.tick()  # not due again before the interval
    now[0] = 101.0
    beats["ingest"] = 100.9
    beats["inference"] = 100.95
    assert dog.tick()
    now[0] = 102.5
    beats["ingest"] = 102.4  # inference silent for 1.55 s
    assert not dog.tick() and dog.stale() == {"inference": pytest.approx(1.55)}
    now[0] = 103.5
    beats["inference"] = 103.4
    beats["ingest"] = 103.45
    assert dog.tick()
    time.sleep(0.2)
    assert systemd_side.pings(0, float("inf")) == 3
    with pytest.raises(ValueError, match="interval"):
        Watchdog(n, lambda: beats, interval=0, stale_after=1)


# --------------------------------------------------------------------------- a stalled daemon


class StallingBackend:
    """Wraps a backend; once ``stall`` is set, run() blocks until ``release`` is set (a hung GPU call)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.stall = threading.Event()
        self.stalled = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _maybe_stall(self) -> None:
        if self.stall.is_set():
            self.stalled.set()
            self.release.wait(60)

    def run(self, x, present=None):
        self._maybe_stall()
        return self.inner.run(x, present)

    def run_views(self, views, axes):  # the daemon's default path: each view once through the per-view graph
        self._maybe_stall()
        return self.inner.run_views(views, axes)


def test_a_stalled_inference_loop_stops_the_watchdog_pings(systemd_side):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    zmq = pytest.importorskip("zmq")

    from xtalsym.daemon.config import load_config
    from xtalsym.daemon.service import Service, load_components
    from xtalsym.daemon.sim import DetectorSim, push_socket
    from xtalsym.testing import shipped_structures, small_detector, tiny_bundle

    tmp = Path(systemd_side.path).parent
    bundle_path = tiny_bundle(tmp / "b", index=False)
    push = push_socket(zmq.Context.instance(), "tcp://127.0.0.1:*")
    endpoint = push.getsockopt(zmq.LAST_ENDPOINT).decode()
    config = load_config(overrides={
        "bundle": {"path": str(bundle_path), "backend": "onnxruntime", "device": "cpu"},
        "ingest": {"address": endpoint}, "publish": {"address": "tcp://127.0.0.1:*"},
        "pipeline": {"workers": 1, "latency_budget_seconds": 0.01, "overload": "block"},
        "metrics": {"port": 0}})
    bundle, backend, index = load_components(config)
    stalling = StallingBackend(backend)
    notifier = Notifier(systemd_side.path, watchdog_usec=1_000_000)  # a ping every 0.5 s
    service = Service(config, components=(bundle, stalling, index), notifier=notifier)
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False}, daemon=True)
    runner.start()
    try:
        systemd_side.wait_for("READY", "1")
        t0 = time.monotonic()
        time.sleep(2.0)
        assert systemd_side.pings(t0, time.monotonic()) >= 2, systemd_side.messages
        stalling.stall.set()
        DetectorSim([shipped_structures() / "NaCl.cif"], geometry=small_detector()).send(push)
        assert stalling.stalled.wait(60), "the backend never ran"
        time.sleep(1.0)  # the last ping before the stall may still be due
        t1 = time.monotonic()
        time.sleep(2.5)
        assert systemd_side.pings(t1, time.monotonic()) == 0, "pinged while the inference loop was stuck"
        stalling.release.set()
        t2 = time.monotonic()
        time.sleep(2.0)
        assert systemd_side.pings(t2, time.monotonic()) >= 2, "pings did not resume"
    finally:
        stalling.release.set()
        push.close(linger=0)
        service.shutdown()
        runner.join(60)
    systemd_side.wait_for("STOPPING", "1", timeout=5)
    assert not runner.is_alive()


# --------------------------------------------------------------------------- journal logging


def test_journal_stream_logs_priority_without_timestamp(tmp_path):
    path = tmp_path / "stream"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logsetup.journal_stream(stream, env)
        assert not logsetup.journal_stream(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logsetup.journal_stream(stream, {})
        record = logging.LogRecord("xtalsym.x", logging.WARNING, __file__, 1, "two\nlines", None, None)
        assert logsetup.JournalFormatter().format(record) == "<4>WARNING xtalsym.x: two\n<4>lines"
    plain = logging.Formatter(logsetup.TERMINAL_FORMAT).format(record)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING", plain)
    assert not logsetup.journal_stream(io.StringIO(), env)  # no file descriptor: a terminal format


# --------------------------------------------------------------------------- the unit


def _analyze():
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return exe


def test_unit_passes_systemd_analyze_verify(tmp_path):
    exe = _analyze()
    assert XTALSYM.is_file(), f"{XTALSYM} missing: the unit's ExecStart needs a real xtalsym"
    text = UNIT.read_text()
    assert "ExecStart=/opt/xtalsym/venv/bin/xtalsym serve --config /etc/xtalsym/xtalsym.toml" in text
    unit = tmp_path / "xtalsym.service"
    unit.write_text(text.replace("/opt/xtalsym/venv/bin/xtalsym", str(XTALSYM)))
    result = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    gpu = tmp_path / "xtalsym.service.d"
    gpu.mkdir()
    shutil.copy(ROOT / "systemd" / "xtalsym-gpu.conf", gpu / "gpu.conf")
    result = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_unit_security_rating_is_ok_or_better():
    exe = _analyze()
    result = subprocess.run([exe, "security", "--offline=true", str(UNIT)], capture_output=True, text=True,
                            timeout=120)
    m = re.search(r"Overall exposure level for xtalsym\.service: ([\d.]+) (\w+)", result.stdout)
    assert m, result.stdout[-2000:] + result.stderr
    score, rating = float(m.group(1)), m.group(2)
    assert rating in ("SAFE", "OK"), (score, rating)
    assert score <= 2.0, f"exposure {score} rose above the 1.4 documented in docs/DAEMON.md"


def test_unit_settings_the_daemon_relies_on():
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert settings["KillMode"] == ["mixed"]  # workers must not get SIGTERM: the main process drains them
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "AF_NETLINK" in settings["RestrictAddressFamilies"][0]  # libzmq aborts on bind without it
    assert int(settings["WatchdogSec"][0]) >= 10


# --------------------------------------------------------------------------- install.sh


def _install(*args, env=None):
    return subprocess.run(["sh", str(ROOT / "systemd" / "install.sh"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_install_into_a_staging_root(tmp_path):
    dest = tmp_path / "root"
    result = _install("--skip-venv", "--prefix", "/srv/xs", env={"DESTDIR": str(dest)})
    assert result.returncode == 0, result.stderr
    bundle = dest / "srv/xs/share/bundle"
    from xtalsym.bundle import verify_bundle

    assert verify_bundle(bundle)["model_id"]  # copied complete, checksums intact
    assert all(os.stat(p).st_mode & 0o004 for p in bundle.rglob("*"))  # readable by the DynamicUser
    config = dest / "etc/xtalsym/xtalsym.toml"
    from xtalsym.daemon.config import load_config

    assert load_config(config).bundle.path == "/srv/xs/share/bundle"
    unit = (dest / "etc/systemd/system/xtalsym.service").read_text()
    assert "ExecStart=/srv/xs/venv/bin/xtalsym serve --config /etc/xtalsym/xtalsym.toml" in unit
    assert (dest / "etc/systemd/system/xtalsym.service.d/gpu.conf.example").is_file()
    assert "systemd not reloaded" in result.stdout

    # a second run keeps the operator's configuration and enables the GPU drop-in
    config.write_text(config.read_text().replace("workers = 2", "workers = 3"))
    result = _install("--skip-venv", "--prefix", "/srv/xs", "--gpu", "--destdir", str(dest))
    assert result.returncode == 0, result.stderr
    assert load_config(config).pipeline.workers == 3 and "keeping the existing" in result.stdout
    assert (dest / "etc/systemd/system/xtalsym.service.d/gpu.conf").is_file()
    assert not (dest / "etc/systemd/system/xtalsym.service.d/gpu.conf.example").exists()


def test_install_refuses_bad_arguments(tmp_path):
    result = _install("--skip-venv", "--bundle", str(tmp_path), "--destdir", str(tmp_path / "r"))
    assert result.returncode == 2 and "has no manifest.json" in result.stderr
    result = _install("--prefix", "relative/path", "--destdir", str(tmp_path / "r"))
    assert result.returncode == 2 and "must be an absolute path" in result.stderr
    result = _install("--skip-venv", "--destdir", str(tmp_path / "r"), env={"TORCH_SPEC": "torch"})
    assert result.returncode == 2 and "must pin a version" in result.stderr
    assert not (tmp_path / "r").exists()
