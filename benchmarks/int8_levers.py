"""int8 quantisation levers, each against fp32 on the same held-out samples (issue 12).

For every named variant (VARIANTS, or --variants a,b,c) the bundle's per-view graph is
quantised with :func:`xtalsym.inference.quantise.quantise_view_graph` and those options,
then measured: top-1 on the test samples against fp32's (paired, 95 % CI, McNemar as the
model card does) and CPU-ms per view at one batch size, one thread. fp32 runs once.

    python benchmarks/int8_levers.py --bundle reference_index --calibration runs/q/calib_ds \
        --test runs/q/test_ds --limit 512 --out runs/q/levers [--variants base,minmax]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "base": {},  # what bundle build does: percentile 99.999, per channel, U8S8, QDQ, heads fp32
    "minmax": {"method": "minmax"},
    "entropy": {"method": "entropy"},
    "p99.99": {"percentile": 99.99},
    "p99.9999": {"percentile": 99.9999},
    "per_tensor": {"per_channel": False},
    "s8s8": {"activations": "int8"},
    "reduce_range": {"reduce_range": True},
    "keep_stem": {"keep_fp32": ("heads", "stem")},
    "keep_concat": {"keep_fp32": ("heads", "concat")},
    "keep_pool": {"keep_fp32": ("heads", "pool")},
    "all_int8": {"keep_fp32": ()},
    "qoperator": {"quant_format": "QOperator"},
    "cal256": {"samples": 256},
}


def _cpu_ms_per_view(session, views: np.ndarray, batch: int, repeats: int) -> float:
    x = views[:batch]
    axes = np.arange(batch, dtype=np.int64) % 3
    session.run(None, {"view": x, "axis": axes})  # warm-up
    start = time.process_time()
    for _ in range(repeats):
        session.run(None, {"view": x, "axis": axes})
    return (time.process_time() - start) * 1e3 / (repeats * batch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="reference_index")
    parser.add_argument("--calibration", required=True, help="dataset whose train split calibrates")
    parser.add_argument("--test", required=True, help="dataset whose test split measures")
    parser.add_argument("--limit", type=int, default=None, help="first N test samples of the model's classes")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples unless a variant says")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--batch", type=int, default=8, help="batch (views) of the speed cell")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", required=True, help="folder for the graphs and results.jsonl")
    args = parser.parse_args(argv)

    from xtalsym.bundle import load_bundle
    from xtalsym.inference import quantise

    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variants: {', '.join(unknown)}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    bundle = load_bundle(args.bundle)
    fp32_path = bundle.view_onnx_path
    if fp32_path is None:
        print(f"bundle {args.bundle} has no per-view graph", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = quantise.dataset_samples(args.test, "test", limit=args.limit, classes=bundle.classes)
    index = {int(c): i for i, c in enumerate(bundle.classes)}
    targets = np.array([index[int(s["space_group"])] for s in samples])
    views = np.concatenate(list(quantise.shaped_views(args.test, samples[: args.batch])))
    fp32 = quantise._view_session(fp32_path, 1)
    p32 = quantise._sample_probabilities(fp32, args.test, samples, 8)
    fp32_ms = _cpu_ms_per_view(fp32, views, args.batch, args.repeats)
    print(f"fp32: top-1 {np.mean(p32.argmax(1) == targets) * 100:.2f} % on {len(samples)}, {fp32_ms:.2f} CPU-ms/view")
    with open(out / "results.jsonl", "a") as log:
        for name in names:
            options = {"samples": args.samples, **VARIANTS[name]}
            graph = out / f"{name}.onnx"
            cpu0 = time.process_time()
            info = quantise.quantise_view_graph(
                fp32_path, graph, calibration_dataset=args.calibration, classes=bundle.classes, **options
            )
            build_s = time.process_time() - cpu0
            session = quantise._view_session(graph, 1)
            p8 = quantise._sample_probabilities(session, args.test, samples, 8)
            stats = quantise.paired_difference(p32.argmax(1) == targets, p8.argmax(1) == targets)
            row = {
                "variant": name,
                "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
                "n": stats["n"],
                "top1_fp32": stats["top1_a"],
                "top1_int8": stats["top1_b"],
                "delta_points": stats["delta"] * 100,
                "ci95_points": [c * 100 for c in stats["ci95"]],
                "only_fp32_right": stats["only_a_right"],
                "only_int8_right": stats["only_b_right"],
                "mcnemar_p": stats["mcnemar_p"],
                "agreement": float((p32.argmax(1) == p8.argmax(1)).mean()),
                "cpu_ms_per_view_fp32": fp32_ms,
                "cpu_ms_per_view_int8": _cpu_ms_per_view(session, views, args.batch, args.repeats),
                "batch_views": args.batch,
                "build_cpu_s": build_s,
                "info": info,
            }
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(
                f"{name}: int8 − fp32 {row['delta_points']:+.2f} points (CI {row['ci95_points'][0]:+.2f} to "
                f"{row['ci95_points'][1]:+.2f}; {row['only_fp32_right']} only fp32, {row['only_int8_right']} only int8, "
                f"p = {row['mcnemar_p']:.2g}), agreement {row['agreement'] * 100:.1f} %, "
                f"{row['cpu_ms_per_view_int8']:.2f} vs {fp32_ms:.2f} CPU-ms/view",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
