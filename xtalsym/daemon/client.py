"""A subscriber to the daemon's predictions (`xtalsym listen`) and its summary (docs/DAEMON.md)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from xtalsym.daemon.overload import SHED_REASON

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
    set_final: int = 0  # final predictions whose set (or undecided candidates) holds the truth
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
        verdict = truth_verdict(msg, truth) if truth is not None else None
        hit = verdict == "top-1"
        if msg["final"]:
            self.final += 1
            if truth is not None:
                self.judged_final += 1
                self.correct_final += bool(hit)
                self.set_final += verdict in ("top-1", "in set", "candidate")
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
            f"truth in set (final) {acc(self.set_final, self.judged_final)} (in the predicted set, or a candidate "
            "of an undecided one)",
            f"predictions/s        {self.predictions / span:.1f}" if span else "predictions/s        -",
            f"latency p50 / p99    {pct(self.latencies, 50)} / {pct(self.latencies, 99)} (frame received -> published)",
            f"client p50 / p99     {pct(self.client_latencies, 50)} / {pct(self.client_latencies, 99)} "
            "(frame received -> listener)",
        ]
        if self.metrics:
            lines.append(f"daemon bad frames    {self.metrics.get('bad_frames')}")
        return "\n".join(lines)


def truth_verdict(msg: dict, truth: int) -> str:
    """How the true group relates to a prediction message: 'top-1', 'in set' (the data cannot
    separate it from the top group), 'candidate' (listed by an undecided prediction), 'wrong'.
    Without a fusion object (a /1 message or a bundle without fusion): 'top-1' or 'wrong'."""
    fused = msg.get("fusion")
    if not fused:
        top = msg["top"][0] if msg.get("top") else {}
        return "top-1" if top.get("space_group") == truth else "wrong"
    groups = [g["space_group"] for g in fused["top_groups"]]
    if groups and groups[0] == truth:
        return "top-1"
    if truth in [g["space_group"] for g in fused["set"]["groups"]]:
        return "in set"
    undecided = fused.get("cannot_decide") or {}
    if any(truth in [g["space_group"] for g in c["groups"]] for c in undecided.get("candidates", [])):
        return "candidate"
    return "wrong"


_MARKS = {"top-1": "OK", "in set": "IN SET", "candidate": "CANDIDATE", "wrong": "WRONG"}


def format_prediction(msg: dict) -> str:
    top = msg["top"][0] if msg["top"] else {}
    fused = msg.get("fusion")
    if fused:  # the fused answer: the top group over 230, and the set it belongs to
        best = fused["top_groups"][0]
        top = {"space_group": best["space_group"], "symbol": best["symbol"], "probability": best["probability"]}
    truth = _truth(msg)
    mark = ""
    if truth is not None:
        verdict = truth_verdict(msg, truth)
        mark = f"  {_MARKS[verdict]}" + ("" if verdict == "top-1" else f" (truth {truth})")
    if fused:
        mark = (
            f"  set {fused['set']['label']} p={fused['set']['probability']:.2f}"
            + ("" if fused["decided"] else " (cannot decide)")
            + ("  no evidence (shed under load)" if SHED_REASON in fused.get("warnings", ()) else "")
            + mark
        )
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
