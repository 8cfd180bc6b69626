"""A subscriber to the daemon's predictions (`xtalsym listen`) and its summary (docs/DAEMON.md)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


def _truth(msg: dict):
    """The true space group detector-sim puts in user_data; None for any other user_data
    (real detectors send whatever the user set: lists, strings, numbers)."""
    user_data = msg.get("user_data")
    return user_data.get("space_group") if isinstance(user_data, dict) else None


@dataclass
class ListenSummary:
    """What a listener saw: predictions, final ones with a known truth, latencies."""

    predictions: int = 0
    final: int = 0
    complete: int = 0
    correct_final: int = 0
    judged_final: int = 0
    correct_complete: int = 0
    judged_complete: int = 0
    latencies: list = field(default_factory=list)  # published - received (daemon clock), s
    client_latencies: list = field(default_factory=list)  # arrival at the listener - received, s
    first: float | None = None
    last: float | None = None
    metrics: dict | None = None
    messages: list = field(default_factory=list)
    missed: int = 0  # predictions lost on the way (gaps in the daemon's "seq")
    last_seq: int | None = None

    def add(self, msg: dict, arrived: float) -> None:
        self.predictions += 1
        seq = msg.get("seq")
        if isinstance(seq, int):
            if self.last_seq is not None and seq > self.last_seq + 1:
                self.missed += seq - self.last_seq - 1
            self.last_seq = seq
        self.first = arrived if self.first is None else self.first
        self.last = arrived
        ts = msg["timestamps"]
        self.latencies.append(ts["published"] - ts["received"])
        self.client_latencies.append(arrived - ts["received"])
        truth = _truth(msg)
        hit = truth is not None and msg["top"] and msg["top"][0]["space_group"] == truth
        if msg["final"]:
            self.final += 1
            if truth is not None:
                self.judged_final += 1
                self.correct_final += bool(hit)
        if msg["status"] == "complete":
            self.complete += 1
            if truth is not None:
                self.judged_complete += 1
                self.correct_complete += bool(hit)

    def table(self) -> str:
        def pct(values, q):
            return f"{np.percentile(values, q) * 1000:.1f} ms" if values else "-"

        def acc(c, n):
            return f"{c}/{n} = {c / n:.1%}" if n else "-"

        span = (self.last - self.first) if self.first is not None and self.last != self.first else 0.0
        lines = [
            f"predictions          {self.predictions} ({self.complete} complete, {self.final} final)",
            f"accuracy (complete)  {acc(self.correct_complete, self.judged_complete)}",
            f"accuracy (final)     {acc(self.correct_final, self.judged_final)}",
            f"predictions/s        {self.predictions / span:.1f}" if span else "predictions/s        -",
            f"latency p50 / p99    {pct(self.latencies, 50)} / {pct(self.latencies, 99)} (frame received -> published)",
            f"client p50 / p99     {pct(self.client_latencies, 50)} / {pct(self.client_latencies, 99)} "
            "(frame received -> listener)",
        ]
        if self.metrics:
            lines.append(f"daemon bad frames    {self.metrics.get('bad_frames')}")
        return "\n".join(lines)


def format_prediction(msg: dict) -> str:
    top = msg["top"][0] if msg["top"] else {}
    truth = _truth(msg)
    mark = "" if truth is None else ("  OK" if top.get("space_group") == truth else f"  WRONG (truth {truth})")
    open_set = msg.get("open_set")
    extra = ""
    if open_set:
        nn = open_set["neighbours"][0] if open_set["neighbours"] else {}
        extra = f"  nearest {nn.get('formula') or nn.get('material_id')} ({nn.get('similarity')})" + (
            "  UNKNOWN" if open_set["unknown"] else ""
        )
    latency = (msg["timestamps"]["published"] - msg["timestamps"]["received"]) * 1000
    return (
        f"{msg['sample_id']:<16} {''.join(msg['axes']):<3} {msg['status']:<8}"
        f"{'(' + msg['closed_by'] + ')' if msg['closed_by'] and msg['closed_by'] != 'complete' else '':<11}"
        f" {top.get('space_group', '?'):>3} {top.get('symbol', ''):<10} p={top.get('probability', 0):.3f}"
        f"{mark}{extra}  {latency:.0f} ms"
    )


def listen(
    address: str,
    *,
    topic: str = "xtalsym.prediction",
    count: int | None = None,
    final_count: int | None = None,
    duration: float | None = None,
    idle: float | None = None,
    echo=None,
    stop=None,
    context=None,
    ready=None,
    curve_server_key: str | None = None,
    curve_key: str | None = None,
    summary: ListenSummary | None = None,
    receive_hwm: int | None = None,
) -> ListenSummary:
    """Subscribe to predictions (and metrics) until a limit, an idle gap or ``stop`` is set.

    ``curve_server_key``: the daemon's public certificate (CURVE); ``curve_key``: this
    subscriber's secret certificate, whose public half the daemon must allow.
    ``summary``: fill this one (readable from another thread while listening);
    ``receive_hwm``: ZeroMQ receive high-water mark (0 = unlimited: never drop here).
    """
    import zmq

    from xtalsym.daemon.config import METRICS_TOPIC

    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if receive_hwm is not None:
        sock.setsockopt(zmq.RCVHWM, receive_hwm)
    sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sock.setsockopt(zmq.SUBSCRIBE, METRICS_TOPIC.encode())
    if curve_server_key:
        from xtalsym.daemon.publish import curve_client

        try:
            curve_client(sock, curve_server_key, curve_key)
        except Exception:
            sock.close()
            raise
    try:
        sock.connect(address)
    except zmq.ZMQError as exc:
        sock.close()
        raise ValueError(
            f"listen address {address!r}: not a ZeroMQ endpoint it can connect to ({exc.strerror}); "
            f"give tcp://HOST:PORT, e.g. tcp://127.0.0.1:5556"
        ) from None
    if ready is not None:
        ready.set()
    summary = ListenSummary() if summary is None else summary
    start = last = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if stop is not None and stop.is_set():
                break
            if duration is not None and now - start >= duration:
                break
            if idle is not None and summary.predictions and now - last >= idle:
                break
            if not sock.poll(100):
                continue
            t, body = sock.recv_multipart()
            arrived = time.time()
            last = time.monotonic()
            msg = json.loads(body)
            if t.decode() == METRICS_TOPIC:
                summary.metrics = msg
                continue
            summary.add(msg, arrived)
            summary.messages.append(msg)
            if echo:
                echo(format_prediction(msg))
            if count is not None and summary.predictions >= count:
                break
            if final_count is not None and summary.final >= final_count:
                break
    finally:
        sock.close()
    return summary
