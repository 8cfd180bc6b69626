"""Does counting noise look like a tilt? The evidence's off-axis score (xtalsym.evidence.axis) of
exact zone-axis samples, noise-free and at a realistic dose and background, against the shipped
fusion's ``off_axis_above`` (issue 15, the off-axis rule).

    python benchmarks/off_axis_noise.py --n 80 [--split val] [--dose 1e5] [--background 1e-3]

Each material is simulated as the training data were (fusion_data's options), once noise-free and
once with Poisson noise at ``--dose`` counts at the brightest pixel plus ``--background``; its three
zones are analysed (counts=True for the noisy ones) and combined.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtalsym import fusion  # noqa: E402
from xtalsym.bundle import load_bundle  # noqa: E402
from xtalsym.evidence import analyse_frame, combine  # noqa: E402
from xtalsym.offline import simulate, structures  # noqa: E402
from xtalsym.offline.evaluate import build_config_from  # noqa: E402
from xtalsym.offline.fusion_data import DEFAULT_SOURCE, select_records  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="reference_index")
    parser.add_argument("--n", type=int, default=80)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--dose", type=float, default=1e5)
    parser.add_argument("--background", type=float, default=1e-3)
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    engine = fusion.load_fusion(bundle)
    limit = engine.params.off_axis_above if engine is not None else None
    config = build_config_from({"dataset_config": bundle.settings["dataset_config"]})
    q = config.geometry.q_per_pixel
    scores: dict[str, list[float]] = {"noise-free": [], f"dose {args.dose:g}, background {args.background:g}": []}
    start = time.process_time()
    for i, record in enumerate(select_records(DEFAULT_SOURCE, split_counts={args.split: args.n})[args.split]):
        try:
            labelled = structures.label(record, symprec=config.symprec)
        except structures.StructureError:
            continue
        for name, realism in zip(scores, (None, simulate.Realism(dose=args.dose, background=args.background, seed=i))):
            patterns = simulate.simulate_axes(labelled.structure, geometry=config.geometry, scattering=config.scattering,
                                              realism=realism, **simulate.DATASET_OPTIONS)
            frames = {a: analyse_frame(patterns[a], axis=a, q_per_pixel=q, counts=realism is not None) for a in patterns}
            off_axis = combine(frames).off_axis
            scores[name].append(np.nan if off_axis is None else off_axis)
    print(f"\nMP {args.split} materials on their zone axes, first {args.n} in the fixed order; off_axis_above of "
          f"{args.bundle}: {limit}; {time.process_time() - start:.0f} CPU-s\n")
    print("| condition | n | not measured | median | 90th percentile | above off_axis_above |")
    print("|---|---|---|---|---|---|")
    for name, values in scores.items():
        v = np.array(values, dtype=np.float64)
        above = float(np.mean(np.nan_to_num(v, nan=-1.0) > limit)) if limit is not None else float("nan")
        print(f"| {name} | {len(v)} | {int(np.isnan(v).sum())} | {np.nanmedian(v):.3f} | {np.nanpercentile(v, 90):.3f} | "
              f"{above:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
