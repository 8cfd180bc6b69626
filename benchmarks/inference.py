"""Inference throughput and latency per backend and batch size.

    python benchmarks/inference.py [--bundle PATH] [--backends torch,onnxruntime] \
        [--batch-sizes 1,8,32] [--seconds 5] [--device cpu|cuda|auto] [--threads N] \
        [--per-view] [--precisions fp32,int8]

Uses the shipped bundle (reference_index/) when present, else builds a freshly
initialised msdn at input 64 (224×224 shaped DPs in) in a temporary directory and says
so. Input: random sparse uint8 "shaped DPs" (about 3 % lit pixels), all three views
present. Prints samples/s and per-batch latency p50/p90/p99 (ms). Timings include the
host→device copy and the result copy back (what the daemon pays).

``--per-view`` adds, for backends with a per-view graph, rows of ``run_views`` on batches of
3 × batch single views (the same samples, each view once: what the daemon's per-view path
runs), counted in samples of 3 views. ``--precisions fp32,int8`` runs ONNX Runtime on the
CPU at each (int8 = the bundle's model_view_int8.onnx). ``cpu ms/sample`` is the process CPU
time per sample (all threads): on a shared machine it means more than the wall figures.

``--against OTHER_VIEW.onnx`` compares another per-view graph of the same model (e.g. the
previous export: ``git show <commit>:reference_index/model_view.onnx > old.onnx``) with the
bundle's on the same batches, ONNX Runtime CPU, one thread, the two runs interleaved: the
median CPU ms per view of each and the largest difference of their outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _fresh_bundle(tmp: Path, input_size: int) -> Path:
    import torch

    from xtalsym import model as models
    from xtalsym.bundle import build_bundle
    from xtalsym.offline import dataset as ds

    classes = list(range(1, 73))
    rel = tmp / "release"
    rel.mkdir()
    torch.manual_seed(0)
    model = models.build_model("msdn", len(classes), input_size=input_size)
    models.save_checkpoint(rel / "model.pt", model, extra={"classes": classes, "dataset_config": ds.BuildConfig().to_json()})
    (rel / "card.json").write_text(json.dumps({"name": "untrained-benchmark"}))
    (rel / "MODEL_CARD.md").write_text("# untrained msdn (benchmark only)\n")
    return build_bundle(rel, tmp / "bundle")


def _inputs(batch: int, size: int, rng) -> np.ndarray:
    x = np.zeros((batch, 3, 3, size, size), dtype=np.uint8)
    lit = rng.random(x.shape) < 0.03
    x[lit] = rng.integers(50, 256, size=int(lit.sum()), dtype=np.uint8)
    return x


def measure(backend, batch: int, size: int, seconds: float, rng, *, per_view: bool = False) -> dict:
    x = _inputs(batch, size, rng)
    present = np.ones((batch, 3), dtype=bool)
    if per_view:
        views, axes = x.reshape(batch * 3, 3, size, size), np.tile(np.arange(3), batch)
        run = lambda: backend.run_views(views, axes)  # noqa: E731
    else:
        run = lambda: backend.run(x, present)  # noqa: E731
    for _ in range(3):  # warm-up (engine autotuning, allocator, CUDA graphs)
        run()
    latencies = []
    started, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds or len(latencies) < 5:
        t0 = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    lat = np.array(latencies) * 1e3
    return {
        "batch": batch,
        "cpu_ms_per_sample": cpu * 1e3 / (batch * len(lat)),
        "samples_per_s": batch * len(lat) / (lat.sum() / 1e3),
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "runs": len(lat),
    }


def compare_view_graphs(bundle, other: Path, batches: list[int], rng, repeats: int = 7) -> None:
    """The bundle's per-view graph against ``other``, interleaved, one ORT thread, same inputs."""
    import onnxruntime as ort

    def session(path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    graphs = {"bundle": session(bundle.view_onnx_path), other.name: session(other)}
    print(f"| batch (views) | {' | '.join(f'{n} cpu ms/view' for n in graphs)} | max abs Δ logits / embeddings |")
    print("|---|---|---|---|")
    for batch in batches:
        x = _inputs(batch, bundle.image_size, rng)[:, 0]  # (batch, 3, S, S): one view per row
        feeds = {"view": x, "axis": (np.arange(batch) % 3).astype(np.int64)}
        outs = {n: s.run(None, feeds) for n, s in graphs.items()}  # also the warm-up
        cpu: dict = {n: [] for n in graphs}
        for _ in range(repeats):
            for n, s in graphs.items():
                c0 = time.thread_time()
                s.run(None, feeds)
                cpu[n].append((time.thread_time() - c0) * 1e3 / batch)
        a, b = outs.values()
        print(f"| {batch} | " + " | ".join(f"{np.median(v):.2f}" for v in cpu.values())
              + f" | {np.abs(a[0] - b[0]).max():.2g} / {np.abs(a[1] - b[1]).max():.2g} |", flush=True)
    print(f"# {os.popen('uptime').read().strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle directory (default: the shipped one, else a fresh model)")
    parser.add_argument("--backends", default="torch,onnxruntime,tensorrt")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per cell")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and onnxruntime (0: their default)")
    parser.add_argument("--input-size", type=int, default=64, help="model input size of the fresh model (no bundle)")
    parser.add_argument("--per-view", action="store_true", help="also run_views rows (each view once) where supported")
    parser.add_argument("--precisions", default="fp32",
                        help="onnxruntime on the CPU: fp32, int8 (the bundle's int8 graph) or both, comma-separated")
    parser.add_argument("--against", help="another per-view ONNX graph to compare with the bundle's (see above)")
    args = parser.parse_args(argv)

    import torch

    from xtalsym import bundle as bundles
    from xtalsym.inference import BackendUnavailable, make_backend, supports_views

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.bundle:
        bundle_path, origin = Path(args.bundle), f"bundle {args.bundle}"
    else:
        try:
            bundle_path, origin = bundles.default_bundle_path(), "shipped bundle"
        except bundles.BundleError:
            tmp = tempfile.TemporaryDirectory()
            bundle_path = _fresh_bundle(Path(tmp.name), args.input_size)
            origin = f"no shipped bundle: freshly initialised msdn, input {args.input_size}, 72 classes"
    bundle = bundles.load_bundle(bundle_path)
    size = bundle.image_size
    print(f"# {origin} ({bundle.model_spec['name']}, input {bundle.model_spec['input_size']}, "
          f"shaped DPs {size}×{size}, 3 views, model_id {bundle.model_id[:12]})")
    print(f"# host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads torch={torch.get_num_threads()}"
          + (f", GPU {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""))
    print(f"# {os.popen('uptime').read().strip()}")
    rng = np.random.default_rng(0)
    if args.against:
        compare_view_graphs(bundle, Path(args.against), [int(b) for b in args.batch_sizes.split(",")], rng)
        return 0
    print("| backend | device | precision | graph | batch (samples) | samples/s | cpu ms/sample | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        for precision in precisions if name == "onnxruntime" and device == "cpu" else ["auto"]:
            options = {}
            if args.threads and name == "onnxruntime":
                options["intra_op_threads"] = args.threads
            try:
                backend = make_backend(bundle, name, device=device, precision=precision, **options)
            except BackendUnavailable as exc:
                print(f"| {name} | {device} | {precision} | – | – | skipped: {exc} | | | | |")
                continue
            graphs = ["whole"]
            if backend.precision == "int8":
                graphs = ["per view"]  # the int8 graph is a per-view graph (run() sums its rows)
            elif args.per_view and supports_views(backend):
                graphs.append("per view")
            for graph in graphs:
                label = graph
                for batch in [int(b) for b in args.batch_sizes.split(",")]:
                    r = measure(backend, batch, size, args.seconds, rng, per_view=graph == "per view")
                    print(f"| {name} | {backend.device} | {backend.precision} | {label} | {batch} | "
                          f"{r['samples_per_s']:.1f} | {r['cpu_ms_per_sample']:.2f} | {r['p50_ms']:.1f} | "
                          f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} |", flush=True)
            backend.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
