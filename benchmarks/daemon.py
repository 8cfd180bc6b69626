"""detector-sim -> serve -> listener on loopback: sustained frames/s, latency p50/p99, CPU/memory.

    python benchmarks/daemon.py [--bundle DIR] [--images 60] [--pixels 512] [--rate 0] [--workers 2]

`xtalsym serve` runs as a subprocess (its CPU time and peak RSS, workers included, are read
from /proc via psutil); the detector simulator sends from this process (frames are
rendered before the clock starts) and the listener runs in a thread here. Without
--bundle the shipped bundle is used if present, else a tiny untrained bundle is built
(the throughput of shaping/calibration is real; the model is then smaller than the
default one). Prints a table and names the stage that limits throughput, from the
daemon's own per-stage timings.
"""

from __future__ import annotations

import argparse
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


def tiny_bundle(tmp: Path) -> Path:
    from xtalsym.testing import tiny_bundle as make

    return make(tmp, index=True)


def stage_costs(pixels: int, n: int = 10) -> dict:
    """Per-frame seconds of decode, calibrate, shape on this machine (one core)."""
    from xtalsym import shaping
    from xtalsym.daemon import calibrate as cal
    from xtalsym.daemon.protocols import decode
    from xtalsym.daemon.sim import DetectorGeometry, DetectorSim

    sim = DetectorSim([ROOT / "xtalsym/data/structures/NaCl.cif"], geometry=DetectorGeometry(pixels, pixels))
    msgs = list(sim.messages())[1:-1]
    t = time.perf_counter()
    for _ in range(n):
        ev = decode("stream_v2", msgs[0])
    t_dec = (time.perf_counter() - t) / n
    frame = ev.data["threshold_1"]
    sampling = cal.build_map(cal.FrameGeometry(**sim.geometry.stream_geometry()), cal.TrainingGeometry(3.5e-12, 0.4, 75e-6, 256))
    t = time.perf_counter()
    for _ in range(n):
        raw = cal.calibrate(frame, sampling)
    t_cal = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        shaping.shape(raw, "x")
    t_shape = (time.perf_counter() - t) / n
    return {"decode": t_dec, "calibrate": t_cal, "shape": t_shape}


def daemon_stage_means(port: int) -> dict:
    """Mean seconds per stage and end to end, from the running daemon's own /metrics histograms."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    sums: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("xtalsym_stage_latency_seconds", "xtalsym_end_to_end_latency_seconds",
                               "xtalsym_batch_size"):
            continue
        for sample in family.samples:
            key = sample.labels.get("stage", family.name.removeprefix("xtalsym_"))
            if sample.name.endswith("_sum") or sample.name.endswith("_count"):
                sums.setdefault(key, {})[sample.name.rsplit("_", 1)[1]] = sample.value
    return {k: v["sum"] / v["count"] for k, v in sums.items() if v.get("count")}


def inference_cost(bundle_path: str, batch: int = 16, n: int = 3) -> float:
    from xtalsym.bundle import load_bundle
    from xtalsym.inference import select_backend

    b = load_bundle(bundle_path)
    backend = select_backend(b, "auto")
    x = np.random.default_rng(0).integers(0, 255, (batch, 3, 3, b.image_size, b.image_size), dtype=np.uint8)
    backend.run(x)
    t = time.perf_counter()
    for _ in range(n):
        backend.run(x)
    return (time.perf_counter() - t) / n / batch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle")
    ap.add_argument("--images", type=int, default=60, help="frames to send (multiple of 3)")
    ap.add_argument("--pixels", type=int, default=512)
    ap.add_argument("--rate", type=float, default=0.0, help="frames/s offered (0 = as fast as accepted)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    import psutil

    from xtalsym.daemon.client import listen
    from xtalsym.daemon.sim import DetectorGeometry, DetectorSim, push_socket

    tmp = Path(tempfile.mkdtemp(prefix="xtalsym-bench-"))
    bundle = args.bundle
    if bundle is None:
        from xtalsym.bundle import BundleError, default_bundle_path, load_bundle

        try:
            bundle = str(default_bundle_path())
            load_bundle(bundle)
        except (BundleError, FileNotFoundError):
            print("no shipped bundle: building a tiny untrained one (model cost is NOT the default model's)")
            bundle = str(tiny_bundle(tmp))
    structures = sorted((ROOT / "xtalsym/data/structures").glob("*.cif"))
    repeat = max(1, args.images // (3 * len(structures)))
    sim = DetectorSim(structures, geometry=DetectorGeometry(args.pixels, args.pixels), repeat=repeat)
    ctx = zmq.Context.instance()
    push = push_socket(ctx, "tcp://127.0.0.1:*", hwm=100000)
    frames_ep = push.getsockopt(zmq.LAST_ENDPOINT).decode()
    pub_port = 20000 + os.getpid() % 20000
    from xtalsym.daemon.demo import free_port

    metrics_port = free_port()
    config = tmp / "bench.toml"
    config.write_text(f'[bundle]\npath = "{bundle}"\n[ingest]\naddress = "{frames_ep}"\n'
                      f'[pipeline]\nworkers = {args.workers}\noverload = "block"\n'  # lossless: measures throughput
                      f'[publish]\naddress = "tcp://127.0.0.1:{pub_port}"\nmetrics_interval_seconds = 1.0\n'
                      f'[metrics]\nport = {metrics_port}\n')  # a free port, never the default 9855
    serve = subprocess.Popen([sys.executable, "-m", "xtalsym", "serve", "--config", str(config)],
                             cwd=ROOT)
    proc = psutil.Process(serve.pid)
    stop, ready = threading.Event(), threading.Event()
    result: dict = {}
    n_images = sim.number_of_images()
    t_listen = threading.Thread(target=lambda: result.update(s=listen(
        f"tcp://127.0.0.1:{pub_port}", final_count=n_images // 3, stop=stop, ready=ready, duration=600)))
    t_listen.start()
    ready.wait()
    messages = list(sim.messages())  # rendered and encoded before the clock starts
    time.sleep(8.0)  # serve: load bundle and spawn workers
    peak_rss = 0
    cpu0 = sum(p.cpu_times().user + p.cpu_times().system for p in [proc] + proc.children(recursive=True))
    t0 = time.perf_counter()
    period = 1.0 / args.rate if args.rate else 0.0
    for i, m in enumerate(messages):
        if period:
            delay = t0 + i * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        push.send_multipart(m)
        if i % 20 == 0:
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in [proc] + proc.children(recursive=True)))
    t_sent = time.perf_counter() - t0
    while t_listen.is_alive():
        t_listen.join(0.5)
        try:
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in [proc] + proc.children(recursive=True)))
        except psutil.NoSuchProcess:
            break
    wall = time.perf_counter() - t0
    cpu1 = sum(p.cpu_times().user + p.cpu_times().system for p in [proc] + proc.children(recursive=True))
    stage_means = daemon_stage_means(metrics_port)
    serve.terminate()
    serve.wait(60)
    push.close(linger=0)
    s = result["s"]
    lat = np.array(s.latencies)
    print(f"\ndaemon benchmark: {n_images} frames {args.pixels}x{args.pixels} uint16 stream V2 bslz4, "
          f"{args.workers} workers, bundle {bundle}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (shared machine)")
    print("| metric | value |\n|---|---|")
    print(f"| frames sent / final predictions received | {n_images} / {s.final} (samples of 3) |")
    print(f"| bad frames | {s.metrics.get('bad_frames') if s.metrics else '?'} |")
    print(f"| send time (offered {'max' if not args.rate else args.rate} fps) | {t_sent:.2f} s |")
    print(f"| sustained frames/s (all final predictions out) | {n_images / wall:.1f} |")
    print(f"| predictions | {s.predictions} ({s.complete} complete) |")
    print(f"| latency p50 / p99 (received -> published) | {np.percentile(lat, 50) * 1000:.0f} / "
          f"{np.percentile(lat, 99) * 1000:.0f} ms |")
    print(f"| daemon CPU (all processes) | {cpu1 - cpu0:.1f} s = {(cpu1 - cpu0) / wall:.2f} cores |")
    print(f"| daemon peak RSS (all processes) | {peak_rss / 2**20:.0f} MiB |")
    if stage_means:
        print("\n| in the daemon during the run (its /metrics histograms) | mean |\n|---|---|")
        for k, v in stage_means.items():
            unit = "" if k == "batch_size" else " ms"
            print(f"| {k} | {v if k == 'batch_size' else v * 1000:.1f}{unit} |")
    costs = stage_costs(args.pixels)
    costs["inference (per sample-request, batch 16)"] = inference_cost(bundle)
    print("\n| stage (one core, this machine) | ms per frame |\n|---|---|")
    for k, v in costs.items():
        print(f"| {k} | {v * 1000:.1f} |")
    worker_stage = costs["calibrate"] + costs["shape"]
    # every frame is inferred once as a partial (2 of 3) or complete (1 of 3) request
    infer = costs["inference (per sample-request, batch 16)"]
    bottleneck = max([("calibrate+shape (workers)", worker_stage / args.workers),
                      ("decode (ingest thread)", costs["decode"]), ("inference", infer)], key=lambda kv: kv[1])
    print(f"\nbottleneck: {bottleneck[0]} ({bottleneck[1] * 1000:.1f} ms per frame of wall time "
          f"-> at most {1 / bottleneck[1]:.0f} frames/s if it had the cores to itself)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
