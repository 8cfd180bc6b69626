"""Benchmark xtalsym.shaping: speed, fidelity to the authors' samples, fast vs reference.

    python benchmarks/shaping.py [--dataset DIR | --raw-npy STACK.npy] [--n N] [--seed S]

STACK.npy: (n, 256, 256) uint8 raw DPs. Without it, lattice-like patterns are
synthesised (2D reciprocal lattices of Gaussian spots, seeded). Timings are
single-threaded (OpenCV threads set to 1), i.e. frames/s per core.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from xtalsym import shaping as S
from xtalsym.testing import shared_path

SAMPLES = shared_path("reference", "tiong2020_samples")


def synth_frames(n: int, seed: int = 0) -> np.ndarray:
    """2D reciprocal lattices of Gaussian spots: random basis, spot size, intensity."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    frames = np.zeros((n, 256, 256), dtype=np.uint8)
    for k in range(n):
        length = rng.uniform(9, 40, size=2)
        angle0 = rng.uniform(0, np.pi)
        gamma = rng.uniform(np.pi / 3, 2 * np.pi / 3)
        a = length[0] * np.array([np.cos(angle0), np.sin(angle0)])
        b = length[1] * np.array([np.cos(angle0 + gamma), np.sin(angle0 + gamma)])
        sigma = rng.uniform(0.4, 2.0)
        decay = rng.uniform(20, 120)
        image = np.zeros((256, 256), dtype=np.float32)
        span = int(256 / min(length)) + 1
        for h in range(-span, span + 1):
            for m in range(-span, span + 1):
                cx, cy = 127 + h * a[0] + m * b[0], 127 + h * a[1] + m * b[1]
                radius = np.hypot(cx - 127, cy - 127)
                if not (-5 < cx < 261 and -5 < cy < 261) or radius > rng.uniform(60, 140):
                    continue
                amp = np.exp(-radius / decay) * rng.uniform(0.2, 1.0)
                x0, x1 = max(int(cx) - 8, 0), min(int(cx) + 9, 256)
                y0, y1 = max(int(cy) - 8, 0), min(int(cy) + 9, 256)
                if x0 >= x1 or y0 >= y1:
                    continue
                patch = np.exp(-((xx[y0:y1, x0:x1] - cx) ** 2 + (yy[y0:y1, x0:x1] - cy) ** 2) / (2 * sigma**2))
                image[y0:y1, x0:x1] += amp * patch
        image += rng.uniform(0, 0.01) * rng.random((256, 256), dtype=np.float32)
        frames[k] = np.clip(image / image.max() * 255, 0, 255).astype(np.uint8)
    return frames


def frames_per_second(fn, frames: np.ndarray, axis: str = "z") -> tuple[float, int]:
    """Frames/s over the frames fn accepts; also how many raised ShapingError."""
    done, failed, start = 0, 0, time.perf_counter()
    for frame in frames:
        try:
            fn(frame, axis)
            done += 1
        except S.ShapingError:
            failed += 1
    elapsed = time.perf_counter() - start
    return (done + failed) / elapsed if elapsed > 0 else float("inf"), failed


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def jpeg_like_authors(shaped: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Our 256 output with their uint8 wrap (256 -> 0) and PIL JPEG save."""
    wrapped = shaped.copy()
    im = S._normalised_float(raw)
    if im is not None:
        wrapped[im >= 256] = 0
    buf = io.BytesIO()
    Image.fromarray(wrapped).save(buf, "JPEG")
    return np.asarray(Image.open(buf))


def sample_table() -> list[np.ndarray]:
    print("\nReference vs the authors' samples (size 256)")
    print(f"{'sample':8} {'MAD':>6} {'MAD jpeg':>9} {'line IoU':>9} {'fast IoU':>9}")
    raws = []
    for n in (1, 2, 3):
        for axis in S.AXES:
            raw = np.asarray(Image.open(SAMPLES / f"raw_{n}_{axis}.png"))
            theirs = np.asarray(Image.open(SAMPLES / f"shaped_{n}_{axis}.jpg"))
            ref = S.shape_reference(raw, axis, size=S.RAW_SIZE)
            fast = S.shape_fast(raw, axis, size=S.RAW_SIZE)
            mad = np.abs(ref.astype(int) - theirs).mean()
            mad_jpeg = np.abs(jpeg_like_authors(ref, raw).astype(int) - theirs).mean()
            line_iou = iou(S.line_mask(ref, axis), S.line_mask(theirs, axis, tolerance=100))
            fast_iou = iou(S.line_mask(ref, axis), S.line_mask(fast, axis))
            print(f"{n}_{axis:6} {mad:6.2f} {mad_jpeg:9.3f} {line_iou:9.3f} {fast_iou:9.3f}")
            raws.append(raw)
    print("MAD: full RGB vs their JPEG; MAD jpeg: ours with their 256->0 wrap, JPEG-saved.")
    return raws


def speed_table(name: str, frames: np.ndarray) -> None:
    fast_fps, _ = frames_per_second(S.shape_fast, frames)
    ref_fps, ref_failed = frames_per_second(S.shape_reference, frames)
    print(f"{name:22} {len(frames):6d} {fast_fps:10.0f} {ref_fps:10.0f} {fast_fps / ref_fps:7.1f}x"
          f"  (reference refused {ref_failed})")


def stack_iou(frames: np.ndarray) -> None:
    scores = []
    for frame in frames:
        try:
            ref = S.shape_reference(frame, "z", size=S.RAW_SIZE)
        except S.ShapingError:
            continue
        fast = S.shape_fast(frame, "z", size=S.RAW_SIZE)
        scores.append(iou(S.line_mask(ref, "z"), S.line_mask(fast, "z")))
    s = np.asarray(scores)
    print(f"\nline-pixel IoU fast vs reference over {s.size} frames: mean {s.mean():.3f}"
          f"  median {np.median(s):.3f}  p5 {np.percentile(s, 5):.3f}")


def dataset_frames(root: Path, n: int) -> np.ndarray:
    """n raw DPs (all three axes of n/3 materials spread evenly over the dataset)."""
    from xtalsym.offline import dataset as ds

    samples = list(ds.iter_sample_metadata(root))
    picked = samples[:: max(1, len(samples) // max(1, n // 3))][: max(1, n // 3)]
    reader = ds.ShardReader(root)
    return np.concatenate([reader.read(s["shard"], s["position"], "raw") for s in picked])[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-npy", type=Path, help="(n, 256, 256) uint8 raw DPs")
    parser.add_argument("--dataset", type=Path, help="an xtalsym dataset: its raw DPs of n/3 materials spread evenly")
    parser.add_argument("--n", type=int, default=300, help="frames: synthetic, or read from --dataset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cv2.setNumThreads(1)

    raws = np.stack(sample_table())
    if args.dataset:
        stack, name = dataset_frames(args.dataset, args.n), f"{args.dataset} ({args.n} raw DPs)"
    elif args.raw_npy:
        stack = np.load(args.raw_npy)
        if stack.ndim != 3 or stack.shape[1:] != (256, 256) or stack.dtype != np.uint8:
            raise SystemExit(f"--raw-npy must be (n, 256, 256) uint8, got {stack.shape} {stack.dtype}")
        name = args.raw_npy.name
    else:
        stack, name = synth_frames(args.n, args.seed), f"synthetic (seed {args.seed})"
    nodes = (np.stack([S.normalise(f) for f in stack[:200]]) >= 50).sum(axis=(1, 2))
    print(f"\nstack: {name}, node pixels per frame median {np.median(nodes):.0f}, max {nodes.max()}")
    print(f"\n{'frames/s per core':22} {'n':>6} {'fast':>10} {'reference':>10} {'ratio':>8}")
    speed_table("samples (x10)", np.tile(raws, (10, 1, 1)))
    speed_table(name, stack)
    stack_iou(stack)


if __name__ == "__main__":
    main()
