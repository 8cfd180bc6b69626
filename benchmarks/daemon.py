"""detector-sim -> serve -> listener on loopback: sustained frames/s, latency p50/p99, CPU/memory.

    python benchmarks/daemon.py [--bundle DIR] [--images 60] [--pixels 512] [--rate 0] [--workers 2]
    python benchmarks/daemon.py --layout eiger2-16m --images 150 --rate 25 --overload drop_oldest

``--layout eiger2-4m`` / ``eiger2-16m``: EIGER2 frames (2068 × 2162 / 4148 × 4362, module gaps and
bad pixels in the frames and the pixel mask; NaCl and Si, cached in ``--cache-dir`` since a 16M
render takes minutes). A warm-up series (``--warmup`` frames) goes first so that every worker
has built the series' sampling map (~1–2 s for a 16M area map, once per geometry) before the
clock starts; only the measured series' predictions count. ``--overload block`` (default)
measures the lossless throughput; ``--rate 25 --overload drop_oldest`` (the daemon's default
policy) whether 25 frames/s are sustained without loss (the ``overload`` bad-frame count).

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


def stage_costs(sim, n: int = 5) -> dict:
    """Per-frame CPU seconds of decode, calibrate, shape on this machine (one core), as the daemon
    runs them: the ingest thread's decode (payload left compressed), the worker's decompression,
    calibration (the series' prepared map) and shaping."""
    from xtalsym import shaping
    from xtalsym.daemon import calibrate as cal
    from xtalsym.daemon.protocols import decode, materialise

    image_id, array, ud = next(sim.images())
    msg = sim.image_message(image_id, array, ud)
    geometry = cal.FrameGeometry(**sim.geometry.stream_geometry())
    training = cal.TrainingGeometry(3.5e-12, 0.4, 75e-6, 256)
    sampling = cal.build_map(geometry, training, cal.auto_method(geometry, training))
    prepared = cal.prepare(sampling, pixel_mask=sim.pixel_mask())

    def per(fn):
        t = time.process_time()
        for _ in range(n):
            out = fn()
        return (time.process_time() - t) / n, out

    t_dec, ev = per(lambda: decode("stream_v2", msg, defer_decompression=True))
    t_unz, frame = per(lambda: materialise(ev.data["threshold_1"]))
    t_cal, raw = per(lambda: cal.to_uint8(prepared.apply(frame)))
    t_shape, _ = per(lambda: shaping.shape(raw, "x"))
    return {"decode (ingest thread)": t_dec, "decompress (worker)": t_unz, "calibrate (worker)": t_cal,
            "shape (worker)": t_shape}


def cached_encoder() -> None:
    """Encode each distinct frame once: the numpy bslz4 encoder takes ~1.5 s per 16M frame, and the
    benchmark sends the same few frames many times (only user_data and image_id differ)."""
    from xtalsym.daemon.protocols import stream_v2

    encode = stream_v2.bslz4_compress
    done: dict = {}

    def cached(data: bytes, elem_size: int, *args):
        key = (hash(data), len(data), elem_size, args)
        if key not in done:
            done[key] = encode(data, elem_size, *args)
        return done[key]

    stream_v2.bslz4_compress = cached


def _finals_seen(port: int) -> float:
    """Final predictions the daemon has published so far (its /metrics)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name in ("xtalsym_samples_completed", "xtalsym_samples_partial"):
            total += sum(x.value for x in family.samples if x.name.endswith("_total"))
    return total


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
    ap.add_argument("--layout", choices=("eiger2-4m", "eiger2-16m"), help="EIGER2 frames (overrides --pixels)")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache/xtalsym/detector-sim"))
    ap.add_argument("--warmup", type=int, default=6, help="frames of a warm-up series sent first (0 = none)")
    ap.add_argument("--overload", default="block", choices=("block", "drop_oldest", "drop_new"))
    args = ap.parse_args()
    import psutil

    from xtalsym.daemon.client import listen
    from xtalsym.daemon.sim import DetectorGeometry, DetectorSim, eiger2_geometry, eiger2_layout, push_socket

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
    cached_encoder()
    structures = sorted((ROOT / "xtalsym/data/structures").glob("*.cif"))
    if args.layout:  # rendering is ~N^2: two structures, cached
        structures = [ROOT / "xtalsym/data/structures/NaCl.cif", ROOT / "xtalsym/data/structures/Si.cif"]
        geometry, layout = eiger2_geometry(args.layout), eiger2_layout(args.layout)
    else:
        geometry, layout = DetectorGeometry(args.pixels, args.pixels), None
    repeat = max(1, args.images // (3 * len(structures)))
    sim = DetectorSim(structures, geometry=geometry, layout=layout, repeat=repeat, cache_dir=args.cache_dir,
                      series_id=2)
    warm = DetectorSim(structures, geometry=geometry, layout=layout,
                       repeat=max(1, round(args.warmup / (3 * len(structures)))), cache_dir=args.cache_dir,
                       series_id=1) if args.warmup else None
    ctx = zmq.Context.instance()
    push = push_socket(ctx, "tcp://127.0.0.1:*", hwm=100000)
    frames_ep = push.getsockopt(zmq.LAST_ENDPOINT).decode()
    pub_port = 20000 + os.getpid() % 20000
    from xtalsym.daemon.demo import free_port

    metrics_port = free_port()
    config = tmp / "bench.toml"
    config.write_text(f'[bundle]\npath = "{bundle}"\n[ingest]\naddress = "{frames_ep}"\n'
                      f'[pipeline]\nworkers = {args.workers}\noverload = "{args.overload}"\n'  # block: lossless
                      f'[publish]\naddress = "tcp://127.0.0.1:{pub_port}"\nmetrics_interval_seconds = 1.0\n'
                      f'[metrics]\nport = {metrics_port}\n')  # a free port, never the default 9855
    serve = subprocess.Popen([sys.executable, "-m", "xtalsym", "serve", "--config", str(config)],
                             cwd=ROOT)
    proc = psutil.Process(serve.pid)
    stop, ready = threading.Event(), threading.Event()
    result: dict = {}
    n_images = sim.number_of_images()
    warm_messages = []
    if warm is not None:  # a whole series of about args.warmup images
        warm_messages = list(warm.messages())
    n_warm_finals = warm.number_of_images() // 3 if warm is not None else 0
    t_listen = threading.Thread(target=lambda: result.update(s=listen(
        f"tcp://127.0.0.1:{pub_port}", final_count=n_images // 3 + n_warm_finals, stop=stop, ready=ready,
        duration=900)))
    t_listen.start()
    ready.wait()
    messages = list(sim.messages())  # rendered and encoded before the clock starts
    time.sleep(8.0)  # serve: load bundle and spawn workers
    for m in warm_messages:  # every worker builds the series' sampling map
        push.send_multipart(m)
    while warm_messages and t_listen.is_alive():
        time.sleep(0.2)
        snap = result.get("s")
        if snap is None and _finals_seen(metrics_port) >= n_warm_finals:
            break
    time.sleep(0.5)
    t0_wall = time.time()
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
    measured = [m for m in s.messages if m["timestamps"]["received"] >= t0_wall]
    lat = np.array([m["timestamps"]["published"] - m["timestamps"]["received"] for m in measured])
    finals = sum(1 for m in measured if m["final"])
    print(f"\ndaemon benchmark: {n_images} frames {geometry.pixels_x}x{geometry.pixels_y} uint16 stream V2 bslz4"
          f"{' (' + args.layout + ' layout)' if args.layout else ''}, {args.workers} workers, overload "
          f"{args.overload}, bundle {bundle}; warm-up series of {n_warm_finals * 3} frames first")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (shared machine)")
    print("| metric | value |\n|---|---|")
    print(f"| frames sent / final predictions received | {n_images} / {finals} (samples of 3) |")
    print(f"| bad frames | {s.metrics.get('bad_frames') if s.metrics else '?'} |")
    print(f"| send time (offered {'max' if not args.rate else args.rate} fps) | {t_sent:.2f} s |")
    print(f"| sustained frames/s (all final predictions out) | {n_images / wall:.1f} |")
    print(f"| daemon CPU per frame (all processes) | {(cpu1 - cpu0) / n_images * 1000:.0f} ms |")
    print(f"| predictions (measured series) | {len(measured)} ({sum(m['status'] == 'complete' for m in measured)} "
          "complete) |")
    print(f"| latency p50 / p99 (received -> published) | {np.percentile(lat, 50) * 1000:.0f} / "
          f"{np.percentile(lat, 99) * 1000:.0f} ms |")
    print(f"| daemon CPU (all processes) | {cpu1 - cpu0:.1f} s = {(cpu1 - cpu0) / wall:.2f} cores |")
    print(f"| daemon peak RSS (all processes) | {peak_rss / 2**20:.0f} MiB |")
    if stage_means:
        print("\n| in the daemon during the run (its /metrics histograms) | mean |\n|---|---|")
        for k, v in stage_means.items():
            unit = "" if k == "batch_size" else " ms"
            print(f"| {k} | {v if k == 'batch_size' else v * 1000:.1f}{unit} |")
    costs = stage_costs(sim)
    costs["inference (per sample-request, batch 16)"] = inference_cost(bundle)
    print("\n| stage (one core, this machine, CPU time) | ms per frame |\n|---|---|")
    for k, v in costs.items():
        print(f"| {k} | {v * 1000:.1f} |")
    worker_stage = costs["decompress (worker)"] + costs["calibrate (worker)"] + costs["shape (worker)"]
    # every frame is inferred once as a partial (2 of 3) or complete (1 of 3) request
    infer = costs["inference (per sample-request, batch 16)"]
    bottleneck = max([("calibrate+shape (workers)", worker_stage / args.workers),
                      ("decode (ingest thread)", costs["decode (ingest thread)"]), ("inference", infer)],
                     key=lambda kv: kv[1])
    print(f"\nbottleneck: {bottleneck[0]} ({bottleneck[1] * 1000:.1f} ms per frame of wall time "
          f"-> at most {1 / bottleneck[1]:.0f} frames/s if it had the cores to itself)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
