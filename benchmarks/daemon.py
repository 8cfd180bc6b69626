"""detector-sim -> serve -> listener on loopback: sustained frames/s, latency p50/p99, CPU/memory.

    python benchmarks/daemon.py [--bundle DIR] [--images 300] [--pixels 512] [--rates 0,150]
                                [--paths whole,view] [--precision fp32[,int8]] [--workers 2]
                                [--variants "default;pipeline.evidence=false"]
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

Side by side in one run: ``--paths whole,view`` runs the previous path (``pipeline.view_inference
= "off"``: the whole graph over all present views of every request) and the new one (each view
through the per-view graph once) on the same frames, at every ``--rates`` value (0 = as fast as
accepted: capacity; e.g. 150: latency at that offered rate). Per stage it reports the CPU seconds
per frame the daemon's threads and workers spent (its ``xtalsym_stage_cpu_seconds_total``), which
stay meaningful on a shared machine where wall-clock figures do not; ``uptime`` is printed with
each run, and a load above the core count flags the wall figures and prints the rerun command.

``--variants "default;pipeline.evidence=false;index.query=every"`` runs each path and rate once
per variant (daemon settings added to the run's config), e.g. the symmetry evidence on and off
or the open-set match for every request against the final ones only, side by side.
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


def stage_costs(sim, n: int = 5) -> dict:
    """Per-frame CPU seconds of decode, calibrate, shape on this machine (one core), as the daemon
    runs them: the ingest thread's decode (payload left compressed), the worker's decompression
    (straight to the non-zero pixels where it applies), calibration (the series' prepared map) and shaping."""
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
    lazy = ev.data["threshold_1"]
    pixels = lazy.nonzero(prepared.usable) if prepared.takes_nonzero else None
    if pixels is not None:  # as the worker does: a bslz4 frame under an area map, straight to its non-zero pixels
        t_unz, pixels = per(lambda: lazy.nonzero(prepared.usable))
        t_cal, raw = per(lambda: cal.to_uint8(prepared.apply_nonzero(*pixels)))
    else:
        t_unz, frame = per(lambda: materialise(lazy))
        t_cal, raw = per(lambda: cal.to_uint8(prepared.apply(frame)))
    t_shape, _ = per(lambda: shaping.shape(raw, "x"))
    return {
        "decode (ingest thread)": t_dec,
        "decompress (worker)": t_unz,
        "calibrate (worker)": t_cal,
        "shape (worker)": t_shape,
    }


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


def daemon_accounting(port: int) -> dict:
    """What the daemon has done with the messages so far, from its /metrics: messages received,
    frames rejected by reason, and what is still inside it (frames in the workers, results not
    assembled, open samples, requests waiting for a batch). Empty when /metrics does not answer."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out: dict = {"received": 0.0, "rejected": {}, "inside": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "xtalsym_frames_received" and sample.name.endswith("_total"):
                out["received"] += sample.value
            elif family.name == "xtalsym_frames_rejected" and sample.name.endswith("_total"):
                out["rejected"][sample.labels.get("reason", "?")] = sample.value
            elif family.name == "xtalsym_queue_depth":
                out["inside"][sample.labels.get("queue", "?")] = sample.value
    return out


def all_accounted(acc: dict, messages_sent: int) -> bool:
    """Every message sent has been received and nothing is left inside the daemon: each frame
    was either published (in a sample) or rejected (counted by reason)."""
    return bool(acc) and acc["received"] >= messages_sent and not any(acc["inside"].values())


def daemon_stage_means(port: int) -> dict:
    """Mean seconds per stage and end to end, from the running daemon's own /metrics histograms."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    sums: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (
            "xtalsym_stage_latency_seconds",
            "xtalsym_end_to_end_latency_seconds",
            "xtalsym_batch_size",
        ):
            continue
        for sample in family.samples:
            key = sample.labels.get("stage", family.name.removeprefix("xtalsym_"))
            if sample.name.endswith("_sum") or sample.name.endswith("_count"):
                sums.setdefault(key, {})[sample.name.rsplit("_", 1)[1]] = sample.value
    return {k: v["sum"] / v["count"] for k, v in sums.items() if v.get("count")}


def inference_cost(
    bundle_path: str, *, per_view: bool, precision: str = "fp32", batch: int = 16, seconds: float = 2.0
) -> dict:
    """CPU seconds (one thread) the backend spends per frame, on one core: the previous path
    classifies every frame's request with the whole graph over its present views (1 + 2 + 3
    views per sample: 2 views per frame on average), the new path runs each view once."""
    from xtalsym.bundle import load_bundle
    from xtalsym.inference import select_backend

    b = load_bundle(bundle_path)
    backend = select_backend(b, "onnxruntime", device="cpu", cpu_threads=1, precision=precision)
    rng = np.random.default_rng(0)
    size = b.image_size
    if per_view:
        x = rng.integers(0, 255, (batch, 3, size, size), dtype=np.uint8)
        axes = np.arange(batch) % 3
        run = lambda: backend.run_views(x, axes)  # noqa: E731
        frames = batch  # one new view per frame
    else:
        x = rng.integers(0, 255, (batch, 3, 3, size, size), dtype=np.uint8)
        present = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]] * (batch // 3 + 1), bool)[:batch]
        run = lambda: backend.run(x, present)  # noqa: E731
        frames = batch  # one request per frame
    run()
    c0, n = time.process_time(), 0
    while time.process_time() - c0 < seconds or n < 3:
        run()
        n += 1
    return {"cpu_per_frame": (time.process_time() - c0) / n / frames, "precision": backend.precision}


SERVE_STAGES = (
    "decode",
    "combine",
    "infer",
    "match",
    "fuse",
    "publish",
)  # timed in the serve process (the rest in workers)


def untimed_serve(run: dict) -> float:
    """CPU seconds per frame the serve process spent outside its timed stages (each stage times
    only its own thread: a second ONNX Runtime thread counts here, under thread role native)."""
    st = run["stage_cpu_per_frame"]
    return run["main_cpu_s"] / run["frames"] - sum(st.get(k, 0.0) for k in SERVE_STAGES)


def budget_rows(run: dict) -> list[tuple[str, float]]:
    """The run's CPU seconds per frame by stage, every process and thread counted once: the
    floor (decode + calibrate + shape) first, then what comes on top of it; they add up to the
    run's total (the workers' and the serve process's CPU outside their timed stages included)."""
    st, th, n = run["stage_cpu_per_frame"], run.get("thread_cpu_per_frame") or {}, run["frames"]
    workers = (run["cpu_s"] - run["main_cpu_s"]) / n
    untimed = untimed_serve(run)
    native, pool = th.get("native", 0.0), th.get("worker_pool", 0.0)
    return [
        (
            "floor: decode (ingest thread) + calibrate + shape (workers)",
            st.get("decode", 0) + st.get("calibrate_shape", 0),
        ),
        ("evidence (workers)", st.get("evidence", 0)),
        (
            "workers outside their stages (job and result transfer)",
            workers - st.get("calibrate_shape", 0) - st.get("evidence", 0),
        ),
        ("infer: calling thread + ONNX Runtime's other threads (native)", st.get("infer", 0) + native),
        ("match (index query)", st.get("match", 0)),
        ("fuse", st.get("fuse", 0)),
        ("combine (combine thread)", st.get("combine", 0)),
        ("publish (messages: build, encode, send)", st.get("publish", 0)),
        ("serve: process-pool threads (job and result transfer)", pool),
        ("serve: the rest (loops, assembly, metrics, HTTP scrapes, ZeroMQ I/O)", untimed - native - pool),
    ]


def print_budget(runs: list[dict], cores: int) -> None:
    """Issue 12's per-frame CPU budget by stage against the floor, one column per run."""
    rows = [budget_rows(r) for r in runs]
    print(
        f"\n| per-frame CPU budget (ms; {cores} cores) | "
        + " | ".join(f"{r['variant']} @ {'max' if not r['rate'] else int(r['rate'])}" for r in runs)
        + " |"
    )
    print("|---|" + "---|" * len(runs))
    for i, (label, _) in enumerate(rows[0]):
        print(f"| {label} | " + " | ".join(f"{rr[i][1] * 1000:.2f}" for rr in rows) + " |")
    print(
        "| **total, all processes** | " + " | ".join(f"**{r['cpu_s'] / r['frames'] * 1000:.2f}**" for r in runs) + " |"
    )
    print(
        "| → frames/s the CPU allows (cores / total) | "
        + " | ".join(f"{cores / (r['cpu_s'] / r['frames']):.0f}" for r in runs)
        + " |"
    )
    print(
        "| → frames/s the CPU allows with this benchmark's own CPU on the same cores | "
        + " | ".join(f"{cores / ((r['cpu_s'] + r['bench_cpu_s']) / r['frames']):.0f}" for r in runs)
        + " |"
    )
    print(
        "| → frames/s at the floor alone | "
        + " | ".join(f"{cores / rr[0][1]:.0f}" if rr[0][1] else "–" for rr in rows)
        + " |"
    )


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def daemon_event(port: int, event: str) -> float:
    """A counter of the daemon's xtalsym_events_total (e.g. views_inferred), read at the end of a run
    (the last metrics message a listener saw can be a second old)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "xtalsym_events":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("event") == event:
                    return sample.value
    return 0.0


def daemon_stage_cpu(port: int) -> dict:
    """CPU seconds per stage so far, from the daemon's xtalsym_stage_cpu_seconds_total."""
    return _labelled(port, "xtalsym_stage_cpu_seconds", "stage", suffix="_total")


def daemon_thread_cpu(port: int) -> dict:
    """CPU seconds of the serve process so far by thread role, from its xtalsym_thread_cpu_seconds
    (the stages time their own thread; this also shows the process pool's threads, the HTTP
    scrapes, ONNX Runtime's other intra-op threads)."""
    return _labelled(port, "xtalsym_thread_cpu_seconds", "thread")


def _labelled(port: int, name: str, label: str, suffix: str = "") -> dict:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                if sample.name.endswith(suffix):
                    out[sample.labels[label]] = sample.value
    return out


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """``--variants``: ';'-separated variants, each ','-separated ``section.key=value`` settings
    (TOML values) or ``default``; returns (label, {section: {key: value}})."""
    import tomllib

    out = []
    for label in [v.strip() for v in text.split(";") if v.strip()]:
        settings: dict = {}
        for item in [i.strip() for i in label.split(",") if i.strip() and i.strip() != "default"]:
            key, sep, value = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot:
                raise SystemExit(f"--variants: {item!r} is not section.key=value")
            try:
                parsed = tomllib.loads(f"v = {value.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                parsed = value.strip()  # a bare word: a string
            settings.setdefault(section, {})[name] = parsed
        out.append((label, settings))
    return out


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_daemon(
    *,
    bundle: str,
    messages: list,
    n_images: int,
    rate: float,
    workers: int,
    view_inference: str,
    precision: str,
    tmp: Path,
    backend: str = "onnxruntime",
    device: str = "cpu",
    overload: str = "block",
    warm_messages: list = (),
    n_warm_finals: int = 0,
    max_wait_s: float = 900.0,
    evidence: bool = True,
    variant: tuple[str, dict] = ("default", {}),
) -> dict:
    """One `xtalsym serve` subprocess fed ``messages`` at ``rate`` (0 = as fast as accepted);
    ``variant``: (label, extra config settings by section, applied over ``evidence``)."""
    import psutil

    from xtalsym.daemon.client import listen
    from xtalsym.daemon.demo import free_port
    from xtalsym.daemon.sim import push_socket

    ctx = zmq.Context.instance()
    push = push_socket(ctx, "tcp://127.0.0.1:*", hwm=100000)
    frames_ep = push.getsockopt(zmq.LAST_ENDPOINT).decode()
    pub_port, metrics_port = free_port(), free_port()
    config = tmp / f"bench-{view_inference}-{precision}-{rate:g}-{abs(hash(variant[0])):x}.toml"
    sections = {
        "bundle": {"path": bundle, "backend": backend, "device": device, "precision": precision},
        "ingest": {"address": frames_ep},
        "pipeline": {
            "workers": workers,
            "overload": overload,  # block: lossless
            "view_inference": view_inference,
            "evidence": evidence,
        },
        "publish": {"address": f"tcp://127.0.0.1:{pub_port}", "metrics_interval_seconds": 1.0},
        "metrics": {"port": metrics_port},
    }  # a free port, never the default 9855
    for section, settings in variant[1].items():
        sections.setdefault(section, {}).update(settings)
    config.write_text(
        "".join(
            f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
            for name, table in sections.items()
        )
    )
    load_before = uptime()
    serve = subprocess.Popen(
        [sys.executable, "-m", "xtalsym", "serve", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc = psutil.Process(serve.pid)
    stop, ready = threading.Event(), threading.Event()
    result: dict = {}
    # the listener runs until stopped: with a dropping overload policy some samples never get a
    # final prediction, so the run ends when the daemon has accounted for every message (below)
    t_listen = threading.Thread(
        target=lambda: result.update(
            s=listen(f"tcp://127.0.0.1:{pub_port}", stop=stop, ready=ready, duration=max_wait_s + 600)
        )
    )
    t_listen.start()
    ready.wait()
    _wait_ready(metrics_port, serve)
    for m in warm_messages:  # every worker builds the series' sampling map before the clock starts
        push.send_multipart(m)
    while warm_messages and t_listen.is_alive() and _finals_seen(metrics_port) < n_warm_finals:
        time.sleep(0.2)
    while warm_messages and not all_accounted(daemon_accounting(metrics_port), len(warm_messages)):
        time.sleep(0.5)  # the warm-up series' last partial samples too
    time.sleep(0.5)
    rejected0 = daemon_accounting(metrics_port).get("rejected", {})
    t0_wall = time.time()
    procs = [proc] + proc.children(recursive=True)
    cpu_of = lambda ps=procs: sum(p.cpu_times().user + p.cpu_times().system for p in ps)  # noqa: E731
    cpu0, stage0, thread0 = cpu_of(), daemon_stage_cpu(metrics_port), daemon_thread_cpu(metrics_port)
    main_cpu0 = cpu_of([proc])  # the serve process (ingest, inference, publish); the rest are the workers
    views0 = daemon_event(metrics_port, "views_inferred")  # the warm-up series' views before the clock
    peak_rss = 0
    own0 = time.process_time()  # this process: sender, listener thread, polling (on the same cores)
    t0 = time.perf_counter()
    period = 1.0 / rate if rate else 0.0
    for i, m in enumerate(messages):
        if period:
            delay = t0 + i * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        push.send_multipart(m)
        if i % 20 == 0:
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in procs))
    t_sent = time.perf_counter() - t0
    expected = len(warm_messages) + len(messages)
    deadline = time.perf_counter() + max_wait_s
    acc = daemon_accounting(metrics_port)
    while not all_accounted(acc, expected) and time.perf_counter() < deadline and serve.poll() is None:
        time.sleep(0.5)  # a scrape costs the daemon CPU: not too often
        peak_rss = max(peak_rss, sum(p.memory_info().rss for p in procs))
        acc = daemon_accounting(metrics_port)
    wall = time.perf_counter() - t0
    own_cpu = time.process_time() - own0
    accounted = all_accounted(acc, expected)
    if not accounted:
        print(
            f"WARNING: after {max_wait_s:.0f} s the daemon had received {acc.get('received', 0):.0f} of "
            f"{expected} messages and still held {acc.get('inside')}",
            flush=True,
        )
    time.sleep(1.5)  # the last predictions and a metrics message reach the listener
    stop.set()
    t_listen.join(30)
    cpu1, stage1, thread1 = cpu_of(), daemon_stage_cpu(metrics_port), daemon_thread_cpu(metrics_port)
    main_cpu = cpu_of([proc]) - main_cpu0
    views1 = daemon_event(metrics_port, "views_inferred")
    stage_means = daemon_stage_means(metrics_port)
    serve.terminate()
    serve.wait(60)
    push.close(linger=0)
    s = result["s"]
    measured = [m for m in s.messages if m["timestamps"]["received"] >= t0_wall]
    lat = np.array([m["timestamps"]["published"] - m["timestamps"]["received"] for m in measured] or [np.nan])
    return {
        "variant": variant[0],
        "view_inference": view_inference,
        "precision": precision,
        "rate": rate,
        "frames": n_images,
        "final": sum(1 for m in measured if m["final"]),
        "send_s": t_sent,
        "wall_s": wall,
        "rejected": {
            k: v - rejected0.get(k, 0.0) for k, v in acc.get("rejected", {}).items() if v - rejected0.get(k, 0.0) > 0
        },
        "accounted": accounted,
        "complete": sum(1 for m in measured if m["final"] and m.get("status") == "complete"),
        "fps": n_images / wall,
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "cpu_s": cpu1 - cpu0,
        "main_cpu_s": main_cpu,
        "bench_cpu_s": own_cpu,
        "peak_rss_mib": peak_rss / 2**20,
        "stage_means": stage_means,
        "stage_cpu_per_frame": {k: (stage1.get(k, 0.0) - stage0.get(k, 0.0)) / n_images for k in stage1},
        "thread_cpu_per_frame": {k: (thread1.get(k, 0.0) - thread0.get(k, 0.0)) / n_images for k in thread1},
        "views_inferred": views1 - views0,
        # issue 15: partial predictions fused with their zones' combined evidence (the rest were
        # superseded on the combine thread, or the fusion weighs none at their number of views)
        "partial": sum(1 for m in measured if not m["final"]),
        "partial_with_evidence": sum(
            1 for m in measured if not m["final"] and (m.get("fusion") or {}).get("evidence_used")
        ),
        # pipeline.evidence_under_load = "shed": final predictions whose sample got evidence
        "final_with_evidence": sum(1 for m in measured if m["final"] and (m.get("fusion") or {}).get("evidence_used")),
        "load_before": load_before,
        "load_after": uptime(),
        "backend": (s.messages[-1]["model"] if s.messages else {}).get("backend", "?"),
        "device": (s.messages[-1]["model"] if s.messages else {}).get("device", "?"),
    }


def _wait_ready(port: int, serve: subprocess.Popen, timeout: float = 300.0) -> None:
    """Until the daemon's /readyz says 200 (bundle loaded, workers up, backend warmed)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise SystemExit(f"serve exited with {serve.returncode}: {serve.stderr.read()[-2000:]}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"serve not ready after {timeout:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle")
    ap.add_argument("--images", type=int, default=300, help="frames to send per run (multiple of 3)")
    ap.add_argument("--pixels", type=int, default=512)
    ap.add_argument(
        "--rates", default="0,150", help="frames/s offered, one run per rate and path (0 = as fast as accepted)"
    )
    ap.add_argument("--rate", type=float, default=None, help="a single rate (overrides --rates)")
    ap.add_argument(
        "--paths",
        default="whole,view",
        help="whole = the previous path (whole graph over each request's views), view = each view once",
    )
    ap.add_argument(
        "--precision",
        default="fp32",
        help="bundle.precision of the runs: fp32, int8, auto; "
        "comma-separated for several (each with every path that can run it)",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", default="onnxruntime", help="bundle.backend of the runs (default %(default)s)")
    ap.add_argument("--device", default="cpu", help="bundle.device of the runs: cpu, cuda, auto (default %(default)s)")
    ap.add_argument("--layout", choices=("eiger2-4m", "eiger2-16m"), help="EIGER2 frames (overrides --pixels)")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache/xtalsym/detector-sim"))
    ap.add_argument("--warmup", type=int, default=6, help="frames of a warm-up series sent first (0 = none)")
    ap.add_argument("--overload", default="block", choices=("block", "drop_oldest", "drop_new"))
    ap.add_argument(
        "--variants",
        default="default",
        help="';'-separated daemon settings to run side by side, each ','-separated section.key=value "
        "or 'default', e.g. \"default;pipeline.evidence=false;index.query=every\"",
    )
    ap.add_argument(
        "--evidence",
        default="on",
        choices=("on", "off"),
        help="pipeline.evidence: the symmetry evidence per frame (workers) and per sample (the combine "
        "thread combines it); off shows what it costs",
    )
    ap.add_argument(
        "--max-wait",
        type=float,
        default=900.0,
        help="seconds after the last message to wait for the daemon to account for every message",
    )
    ap.add_argument(
        "--load-limit",
        type=float,
        default=None,
        help="1-minute load average above which the wall figures are flagged (default: the core count)",
    )
    args = ap.parse_args()

    from xtalsym.daemon.sim import DetectorGeometry, DetectorSim, eiger2_geometry, eiger2_layout

    tmp = Path(tempfile.mkdtemp(prefix="xtalsym-bench-"))
    bundle = args.bundle
    if bundle is None:
        from xtalsym.testing import shipped_or_tiny_bundle

        bundle, tiny = shipped_or_tiny_bundle(tmp)
        if tiny:
            print("no shipped bundle: built a tiny untrained one (model cost is NOT the default model's)")
    rates = [args.rate] if args.rate is not None else [float(r) for r in args.rates.split(",")]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    variants = parse_variants(args.variants)
    cached_encoder()
    structures = sorted((ROOT / "xtalsym/data/structures").glob("*.cif"))
    if args.layout:  # rendering is ~N^2: two structures, cached
        structures = [ROOT / "xtalsym/data/structures/NaCl.cif", ROOT / "xtalsym/data/structures/Si.cif"]
        geometry, layout = eiger2_geometry(args.layout), eiger2_layout(args.layout)
    else:
        geometry, layout = DetectorGeometry(args.pixels, args.pixels), None
    repeat = max(1, args.images // (3 * len(structures)))
    sim = DetectorSim(
        structures, geometry=geometry, layout=layout, repeat=repeat, cache_dir=args.cache_dir, series_id=2
    )
    warm = (
        DetectorSim(
            structures,
            geometry=geometry,
            layout=layout,
            repeat=max(1, round(args.warmup / (3 * len(structures)))),
            cache_dir=args.cache_dir,
            series_id=1,
        )
        if args.warmup
        else None
    )
    warm_messages = list(warm.messages()) if warm is not None else []
    n_warm_finals = warm.number_of_images() // 3 if warm is not None else 0
    n_images = sim.number_of_images()
    messages = list(sim.messages())  # rendered and encoded before any clock starts
    runs = []
    for rate in rates:
        for precision in precisions:
            for path in paths:
                if path == "whole" and precision == "int8":
                    continue  # the int8 graph is a per-view graph
                mode = {"whole": "off", "view": "auto"}[path]
                for variant in variants:
                    print(
                        f"run: {path} path, {precision}, {variant[0]}, {'max' if not rate else rate} frames/s ... "
                        f"{uptime()}",
                        flush=True,
                    )
                    runs.append(
                        run_daemon(
                            bundle=bundle,
                            messages=messages,
                            n_images=n_images,
                            rate=rate,
                            workers=args.workers,
                            view_inference=mode,
                            precision=precision,
                            tmp=tmp,
                            backend=args.backend,
                            device=args.device,
                            overload=args.overload,
                            warm_messages=warm_messages,
                            n_warm_finals=n_warm_finals,
                            max_wait_s=args.max_wait,
                            evidence=args.evidence == "on",
                            variant=variant,
                        )
                    )
    cores = os.cpu_count() or 1
    print(
        f"\ndaemon benchmark: {n_images} frames {geometry.pixels_x}x{geometry.pixels_y} uint16 stream V2 bslz4"
        f"{' (' + args.layout + ' layout)' if args.layout else ''} per run, {args.workers} workers, backend "
        f"{args.backend} on {args.device}, overload = {args.overload}, evidence {args.evidence}, bundle {bundle}; "
        "warm-up series of "
        f"{n_warm_finals * 3} frames first"
    )
    head = [
        f"{r['view_inference'] == 'auto' and 'each view once' or 'whole graph per request'} {r['precision']}"
        + ("" if r["variant"] == "default" else f" {r['variant']}")
        + f" @ {'max' if not r['rate'] else int(r['rate'])}"
        for r in runs
    ]
    print("| metric | " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(runs))

    def row(name, fmt):
        print(f"| {name} | " + " | ".join(fmt(r) for r in runs) + " |")

    row("backend served", lambda r: f"{r['backend']} {r['device']}")
    row(
        "load before → after (uptime)",
        lambda r: (
            r["load_before"].split("load average:")[-1].strip()
            + " → "
            + r["load_after"].split("load average:")[-1].strip()
        ),
    )
    row(
        "frames sent / final predictions (complete) / rejected",
        lambda r: f"{r['frames']} / {r['final']} ({r['complete']}) / {sum(r['rejected'].values()):.0f}",
    )
    row(
        "rejected by reason (overload = lost to load)",
        lambda r: ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["rejected"].items())) or "none",
    )
    row("every message accounted for", lambda r: "yes" if r["accounted"] else "NO (timed out)")
    row("frames/s (all accounted for)", lambda r: f"{r['fps']:.1f}")
    row("latency p50 / p99 ms", lambda r: f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}")
    row("views through the network per frame", lambda r: f"{(r['views_inferred'] or 0) / r['frames']:.2f}")
    row("partial predictions fused with evidence", lambda r: f"{r['partial_with_evidence']} of {r['partial']}")
    row(
        "final predictions fused with evidence (the rest shed under load)",
        lambda r: f"{r['final_with_evidence']} of {r['final']}",
    )
    row("daemon CPU-s per frame (all processes)", lambda r: f"{r['cpu_s'] / r['frames'] * 1000:.1f} ms")
    row(
        "this benchmark's own CPU per frame (sender, listener, polling: the same cores)",
        lambda r: f"{r['bench_cpu_s'] / r['frames'] * 1000:.2f} ms",
    )
    row(
        "... of which the serve process / the workers",
        lambda r: (
            f"{r['main_cpu_s'] / r['frames'] * 1000:.1f} / {(r['cpu_s'] - r['main_cpu_s']) / r['frames'] * 1000:.1f} ms"
        ),
    )
    for stage in ("decode", "calibrate_shape", "evidence", "combine", "infer", "match", "fuse", "publish"):
        row(f"CPU per frame: {stage}", lambda r, st=stage: f"{r['stage_cpu_per_frame'].get(st, 0) * 1000:.2f} ms")
    # the serve process by thread role: what its stages time (their own thread) and what they do not
    roles = [
        k
        for k in (runs[0].get("thread_cpu_per_frame") or {})
        if any(r["thread_cpu_per_frame"].get(k, 0) > 0 for r in runs)
    ]
    for role in roles:
        row(
            f"serve CPU per frame, thread {role}",
            lambda r, ro=role: f"{r['thread_cpu_per_frame'].get(ro, 0) * 1000:.2f} ms",
        )
    row("serve CPU per frame outside the timed stages", lambda r: f"{untimed_serve(r) * 1000:.2f} ms")
    row(
        "wall ms per call: stage means",
        lambda r: str({k: round(v * 1000, 2) if k != "batch_size" else v for k, v in r["stage_means"].items()}),
    )
    row("mean batch (requests)", lambda r: f"{r['stage_means'].get('batch_size', 0):.1f}")
    row("peak RSS (all processes)", lambda r: f"{r['peak_rss_mib']:.0f} MiB")

    if args.device != "cpu":
        print("\n(per-frame CPU inference costs below are ONNX Runtime on one CPU core, for the CPU budget)")
    costs = stage_costs(sim)
    print("\n| stage (one core, this process, CPU ms per frame) | ms |\n|---|---|")
    for k, v in costs.items():
        print(f"| {k} | {v * 1000:.2f} |")
    floor = sum(costs.values())
    infer = {}
    for precision in precisions:
        for path in paths:
            if path == "whole" and precision == "int8":
                continue
            try:
                c = inference_cost(bundle, per_view=path == "view", precision=precision)
            except Exception as exc:  # noqa: BLE001 - e.g. a bundle without the int8 graph
                print(f"| inference {path} {precision} | unavailable: {exc} |")
                continue
            infer[(path, c["precision"])] = c["cpu_per_frame"]
            label = "each view once" if path == "view" else "whole graph per request (2 views/frame avg)"
            print(f"| inference, {label}, {c['precision']}, batch 16 | {c['cpu_per_frame'] * 1000:.2f} |")
    print(
        f"\nfloor (decode + calibrate + shape, inference free): {floor * 1000:.2f} CPU-ms per frame "
        f"-> at most {cores / floor:.0f} frames/s on {cores} cores"
    )
    for r in runs:  # the same from the daemon's own stage CPU, per run
        st = r["stage_cpu_per_frame"]
        own = st.get("decode", 0) + st.get("calibrate_shape", 0)
        total = r["cpu_s"] / r["frames"]
        if own:
            print(
                f"daemon {r['view_inference'] == 'auto' and 'view' or 'whole'} {r['precision']} {r['variant']} @ "
                f"{'max' if not r['rate'] else int(r['rate'])}: floor {own * 1000:.2f} CPU-ms/frame "
                f"(-> {cores / own:.0f} frames/s), all processes {total * 1000:.2f} CPU-ms/frame "
                f"(-> {cores / total:.0f} frames/s on {cores} cores)"
            )
    print_budget(runs, cores)
    for (path, precision), c in infer.items():
        total = floor + c
        print(
            f"budget {path} {precision}: {total * 1000:.2f} CPU-ms per frame "
            f"(inference {c / total:.0%}) -> at most {cores / total:.0f} frames/s on {cores} cores"
        )
    load = max(
        os.getloadavg()[0],
        *(
            float(r["load_before"].split("load average:")[-1].split(",")[0])
            for r in runs
            if "load average:" in r["load_before"]
        ),
    )
    limit = args.load_limit if args.load_limit is not None else float(cores)
    if load > limit:
        print(
            f"\nWARNING: load average reached {load:.1f} on {cores} cores (other jobs): the wall-clock figures "
            "(frames/s, latency) are not this daemon's; compare the CPU-seconds per frame, and rerun on a quiet "
            "machine:\n  python benchmarks/daemon.py " + " ".join(sys.argv[1:])
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
