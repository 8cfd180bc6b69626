"""Overload and soak of a real `xtalsym serve` over loopback (issue 6, docs/RESULTS.md "Robustness").

    python benchmarks/soak.py [--bundle DIR] [--duration 600] [--fraction 0.8] [--overload-seconds 30]
                              [--pixels 512] [--workers 2] [--out runs/soak.json]

1. Overload: detector-sim sends as fast as this process can (several times the daemon's
   capacity) for --overload-seconds; the daemon runs the default ``overload = "drop_oldest"``.
   Measured: offered frames/s, sustained views/s (= capacity), drops by reason, peak RSS.
2. Recovery and soak: the offered rate falls to --fraction x the measured capacity for
   --duration seconds; every --sample-seconds the daemon's RSS (all processes), CPU (cores),
   latency p50/p99 of the predictions received in that window, and its counts are recorded.
3. Accounting at the end (after a drain): every message the daemon received is a start, an
   end, a stale end, a published view or a counted bad frame (drops included).

Writes a JSON (all samples) and prints a Markdown table. The daemon is a subprocess; the
sender and the listener run here (frames are rendered and encoded before the clock starts,
and re-sent in new series, so sending costs little CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Listener(threading.Thread):
    """Collects (arrival, latency) of every prediction and the latest metrics message."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 0)  # never drop here: the figures are the daemon's
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(address)
        self.lock = threading.Lock()
        self.latencies: list[tuple[float, float]] = []
        self.views_published = 0
        self.metrics: dict | None = None
        self.missed = 0
        self._last_seq: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(100):
                continue
            topic, body = self.sock.recv_multipart()
            msg = json.loads(body)
            now = time.time()
            with self.lock:
                if topic == b"xtalsym.metrics":
                    self.metrics = msg
                    continue
                seq = msg.get("seq")
                if self._last_seq is not None and seq > self._last_seq + 1:
                    self.missed += seq - self._last_seq - 1
                self._last_seq = seq
                self.latencies.append((now, msg["timestamps"]["published"] - msg["timestamps"]["received"]))
        self.sock.close(linger=0)

    def window(self, since: float) -> dict:
        with self.lock:
            lat = np.array([lat for t, lat in self.latencies if t >= since])
        if lat.size == 0:
            return {"predictions": 0, "p50_ms": None, "p99_ms": None}
        return {
            "predictions": int(lat.size),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 1),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1),
        }


def usage(proc) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of the daemon and its worker processes."""
    import psutil

    rss, cpu = 0, 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss += p.memory_info().rss
            t = p.cpu_times()
            cpu += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return rss, cpu


class Sender:
    """Re-sends pre-encoded image messages in new series (a start, images, an end per cycle)."""

    def __init__(self, sim_factory, push) -> None:
        self.sims = [sim_factory(series_id) for series_id in (1, 2)]
        self.encoded = [list(s.messages()) for s in self.sims]  # [start, images..., end]
        self.push = push
        self.sent = 0
        self.cycle = 0
        self.pos = 0

    def send_one(self) -> None:
        messages = self.encoded[self.cycle % 2]
        self.push.send_multipart(messages[self.pos])
        self.sent += 1
        self.pos += 1
        if self.pos == len(messages):
            self.pos = 0
            self.cycle += 1

    def run(self, seconds: float, rate: float, on_tick=None, tick: float = 1.0) -> float:
        """Send for ``seconds`` at ``rate`` messages/s (0 = as fast as possible); returns messages/s."""
        t0 = time.perf_counter()
        n0, n = self.sent, 0
        next_tick = t0 + tick
        while True:
            now = time.perf_counter()
            if now - t0 >= seconds:
                break
            if rate:
                delay = t0 + n / rate - now
                if delay > 0:
                    time.sleep(min(delay, 0.05))
                    continue
            self.send_one()
            n += 1
            if on_tick and now >= next_tick:
                on_tick()
                next_tick += tick
        return (self.sent - n0) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle")
    ap.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    ap.add_argument("--fraction", type=float, default=0.8, help="soak rate as a fraction of the measured capacity")
    ap.add_argument("--overload-seconds", type=float, default=30.0, help="0: no overload phase (needs --rate)")
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="soak at this many messages/s instead of --fraction x the measured capacity",
    )
    ap.add_argument("--sample-seconds", type=float, default=60.0)
    ap.add_argument("--pixels", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/soak.json")
    args = ap.parse_args()
    if args.overload_seconds <= 0 and args.rate <= 0:
        ap.error("without an overload phase (--overload-seconds 0) the soak rate must be given: --rate")
    import psutil

    from xtalsym.daemon.sim import DetectorGeometry, DetectorSim, push_socket

    tmp = Path(tempfile.mkdtemp(prefix="xtalsym-soak-"))
    bundle = args.bundle
    if bundle is None:
        from xtalsym.testing import shipped_or_tiny_bundle

        bundle, tiny = shipped_or_tiny_bundle(tmp)
        if tiny:
            print("no shipped bundle: a tiny untrained one (the model costs less than the default one)")
    structures = sorted((ROOT / "xtalsym/data/structures").glob("*.cif"))
    geometry = DetectorGeometry(args.pixels, args.pixels)
    ctx = zmq.Context.instance()
    push = push_socket(ctx, "tcp://127.0.0.1:*", hwm=1000)
    frames_ep = push.getsockopt(zmq.LAST_ENDPOINT).decode()
    pub_port = 20000 + os.getpid() % 20000
    config = tmp / "soak.toml"
    config.write_text(
        f'[bundle]\npath = "{bundle}"\n[ingest]\naddress = "{frames_ep}"\n'
        f"[pipeline]\nworkers = {args.workers}\n[metrics]\nenabled = false\n"
        f'[publish]\naddress = "tcp://127.0.0.1:{pub_port}"\nmetrics_interval_seconds = 1.0\n'
    )
    serve = subprocess.Popen(
        [sys.executable, "-m", "xtalsym", "serve", "--config", str(config)],
        cwd=ROOT,
        stderr=open(tmp / "serve.log", "w"),
    )
    proc = psutil.Process(serve.pid)
    listener = Listener(ctx, f"tcp://127.0.0.1:{pub_port}")
    listener.start()
    sender = Sender(lambda sid: DetectorSim(structures, geometry=geometry, series_id=sid), push)
    time.sleep(10.0)  # serve: load the bundle, spawn the workers; PUB/SUB join
    report: dict = {
        "bundle": bundle,
        "pixels": args.pixels,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg()[0],
        "samples": [],
    }

    def counts() -> dict:
        with listener.lock:
            m = listener.metrics or {}
        return {
            "counts": m.get("counts", {}),
            "bad_frames": m.get("bad_frames", {}),
            "series": m.get("series", {}),
            "open_samples": m.get("open_samples"),
        }

    # ---- 1. overload
    peak = [0]

    def track_peak():
        peak[0] = max(peak[0], usage(proc)[0])

    rss0, cpu0 = usage(proc)
    t0 = time.time()
    capacity = None
    if args.overload_seconds > 0:
        offered = sender.run(args.overload_seconds, 0.0, on_tick=track_peak, tick=0.5)
        over_end = time.time()
        time.sleep(2.0)
        c = counts()
        views = c["counts"].get("views", 0)
        capacity = views / (over_end - t0)
        report["overload"] = {
            "seconds": args.overload_seconds,
            "offered_msgs_per_s": round(offered, 1),
            "sent": sender.sent,
            "sustained_views_per_s": round(capacity, 2),
            "peak_rss_mib": round(peak[0] / 2**20, 1),
            "rss_before_mib": round(rss0 / 2**20, 1),
            **c,
        }
        print(
            f"overload: offered {offered:.1f} msg/s, sustained {capacity:.2f} views/s, peak RSS "
            f"{peak[0] / 2**20:.0f} MiB, drops {c['bad_frames']}",
            flush=True,
        )

    # ---- 2. recovery and soak at a fraction of capacity (or the given rate)
    rate = args.rate if args.rate > 0 else max(0.5, args.fraction * capacity)
    report["soak"] = {"rate_msgs_per_s": round(rate, 2), "duration": args.duration}
    last = [t0, cpu0]  # the first sample covers the overload phase (if any)

    def sample():
        now = time.time()
        rss, cpu = usage(proc)
        entry = {
            "t": round(now - t0, 1),
            "rss_mib": round(rss / 2**20, 1),
            "cpu_cores": round((cpu - last[1]) / (now - last[0]), 2),
            **listener.window(last[0]),
            **counts(),
        }
        last[:] = [now, cpu]
        report["samples"].append(entry)
        print(
            f"t={entry['t']:.0f}s rss={entry['rss_mib']} MiB cpu={entry['cpu_cores']} "
            f"preds={entry['predictions']} p50={entry['p50_ms']} p99={entry['p99_ms']} ms "
            f"bad={entry['bad_frames']}",
            flush=True,
        )

    sample()  # the start of the soak (right after the overload)
    sender.run(args.duration, rate, on_tick=sample, tick=args.sample_seconds)
    sample()
    # ---- 3. drain and account
    time.sleep(8.0)  # > assembly timeout: open samples closed and published
    final = counts()
    cnt, bad, series = final["counts"], final["bad_frames"], final["series"]
    accounted = (
        series.get("start", 0)
        + series.get("end", 0)
        + cnt.get("stale_end", 0)
        + cnt.get("views", 0)
        + sum(bad.values())
    )
    report["end"] = {
        **final,
        "sent": sender.sent,
        "received": cnt.get("messages", 0),
        "accounted": accounted,
        "listener_missed": listener.missed,
        "cpu_s_total": round(usage(proc)[1] - cpu0, 1),
    }
    serve.terminate()
    serve.wait(60)
    listener.stop.set()
    listener.join(2)
    push.close(linger=0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    s = report["samples"]
    print(f"\nsoak: {args.pixels}x{args.pixels} stream V2 bslz4, {args.workers} workers, bundle {bundle}; JSON {out}")
    print("| t (s) | RSS MiB | CPU cores | predictions | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
    for e in s:
        print(
            f"| {e['t']:.0f} | {e['rss_mib']} | {e['cpu_cores']} | {e['predictions']} | {e['p50_ms']} | {e['p99_ms']} |"
        )
    e = report["end"]
    print(
        f"\nsent {e['sent']} messages, daemon received {e['received']}, accounted {e['accounted']} "
        f"(starts+ends+stale ends+views+bad); bad {e['bad_frames']}; listener missed {e['listener_missed']}"
    )
    return 0 if e["received"] == e["accounted"] == e["sent"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
