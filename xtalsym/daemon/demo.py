"""`xtalsym demo`: the whole live path on loopback, as a user would run it.

The daemon runs as its own process (`xtalsym serve`), exactly as under systemd; the
detector simulator and the listener run here. Free loopback ports are picked so the demo
never collides with a daemon already running on the documented defaults.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(structures: list[str] | None = None, *, bundle: str | None = None, rate_hz: float = 20.0,
             repeat: int = 1, protocol: str = "stream_v2", timeout_s: float = 120.0, echo=print):
    """Stream the structures through a real `xtalsym serve`; returns the listener's summary."""
    import zmq

    from xtalsym.daemon.client import listen
    from xtalsym.daemon.sim import DetectorSim, push_socket
    from xtalsym.offline import structures as structure_sources

    sources = structures or [str(structure_sources.shipped_structures_dir())]
    sim = DetectorSim(sources, protocol=protocol, repeat=repeat)
    ingest = f"tcp://127.0.0.1:{free_port()}"
    publish = f"tcp://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "xtalsym", "serve", "--ingest", ingest, "--publish", publish,
               "--metrics-port", "0"]
    if bundle:
        command += ["--bundle", str(Path(bundle))]
    echo(f"demo: {len(sim.samples)} structures x {repeat}, {protocol} frames at {rate_hz:g}/s -> {ingest}; "
         f"predictions on {publish}")
    daemon = subprocess.Popen(command)
    ctx = zmq.Context.instance()
    stop = threading.Event()
    ready = threading.Event()
    result: dict = {}

    def listener() -> None:
        result["summary"] = listen(publish, final_count=len(sim.samples) * repeat, echo=echo, stop=stop,
                                   context=ctx, ready=ready)

    thread = threading.Thread(target=listener, daemon=True)
    thread.start()
    ready.wait(10)
    push = push_socket(ctx, ingest, bind=True)
    try:
        # PUSH blocks until the daemon's PULL connects, i.e. until its bundle is loaded.
        sim.send(push, rate_hz=rate_hz)
        thread.join(timeout_s)
    finally:
        stop.set()
        thread.join(5)
        push.close(linger=0)
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)  # the daemon finishes what is in flight, then exits
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    echo(f"demo: daemon exited with status {daemon.returncode}")
    return result["summary"]
