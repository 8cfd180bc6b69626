"""What an absent node reads below the detection threshold: the fit behind
``xtalsym.evidence.sample.ABSENT_LEAK`` (issue 15, session 6, s6weak).

    python benchmarks/evidence_cache.py frames --features data/fusion
    python benchmarks/evidence_leak.py --features data/fusion --split val

Over the decided frames of the split's materials (the cached frame analyses), the measured nodes of
each frame's half-grid that are no nodes of its lattice (half-nodes: no reflection of the zone's own
lattice, so their reading is leak: side lobes, rods of other layers, nothing) and lie below the
detection threshold, as r = Î / Σ(|q|) (Σ: the frame's Wilson mean). Prints their quantiles, those of
the lattice's own sub-threshold nodes for comparison, and the shares of a mixture of exponentials with
fixed means (EM, r floored at 0), with the resulting empty-node score log p(r | Exp(1)) − log p(r | mixture).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtalsym.offline import fusion_data  # noqa: E402

MEANS = (1e-4, 1e-3, 1e-2, 1e-1)
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="data/fusion")
    ap.add_argument("--frames", default=None, help="default: <features>/frames")
    ap.add_argument("--split", default="val")
    ap.add_argument("--iterations", type=int, default=200)
    args = ap.parse_args(argv)
    feats = fusion_data.load_features(Path(args.features))
    wanted = set(np.asarray(feats.material_id)[np.asarray(feats.split) == args.split].tolist())
    half, own, frames = [], [], 0
    for path in sorted(Path(args.frames or Path(args.features) / "frames").glob("chunk-*.pkl")):
        with open(path, "rb") as handle:
            rows = pickle.load(handle)
        for material, views in rows:
            if material not in wanted:
                continue
            for ev in views.values():
                if not ev.decided or not len(ev.nodes_half):
                    continue
                frames += 1
                h = ev.nodes_half
                integer = ((h[:, 0] | h[:, 1]) & 1) == 0
                r = ev.nodes_intensity / ev.scale_at(ev.nodes_q)
                below = ev.nodes_intensity < ev.threshold
                half.append(r[~integer & below])
                own.append(r[integer & below])
    half_r, own_r = np.concatenate(half), np.concatenate(own)
    print(f"{args.split}: {len(wanted)} materials, {frames} decided frames")
    print(f"half-nodes below the threshold: {len(half_r)}, r quantiles {dict(zip(QUANTILES, np.quantile(half_r, QUANTILES).round(5).tolist()))}, "
          f"share r <= 0: {np.mean(half_r <= 0):.4f}")
    print(f"lattice nodes below the threshold: {len(own_r)}, r quantiles {dict(zip(QUANTILES, np.quantile(own_r, QUANTILES).round(5).tolist()))}, "
          f"share r <= 0: {np.mean(own_r <= 0):.4f}")
    k = np.array(MEANS)
    r = np.maximum(half_r, 0.0)
    w = np.full(len(k), 1.0 / len(k))
    for _ in range(args.iterations):
        d = w[None] / k[None] * np.exp(-r[:, None] / k[None])
        w = (d / d.sum(axis=1, keepdims=True)).mean(axis=0)
    print("ABSENT_LEAK = (" + ", ".join(f"({m:g}, {s:.4f})" for m, s in zip(MEANS, w)) + ")")
    for x in (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 2e-2, 5e-2, 1e-1):
        print(f"  r = {x:g}: log p(Exp(1)) - log p(mixture) = {-x - np.log((w / k * np.exp(-x / k)).sum()):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
