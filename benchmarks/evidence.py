"""Accuracy, abstention and speed of the symmetry evidence alone (issue 14), printed as tables.

    nice -n 10 python benchmarks/evidence.py --mp 280 --pyxtal 1          # noise-free tables
    nice -n 10 python benchmarks/evidence.py --mp 140 --pyxtal 0 --realism all
    nice -n 10 python benchmarks/evidence.py --mp 140 --pyxtal 0 --d-min 1.46,1.0,0.7

Materials: the Materials Project test split (xtalsym.offline.dataset.split_of, the rule every
dataset uses, so none of these materials is trained on), shuffled with --seed and sampled
class-balanced over the 7 crystal systems; pyxtal crystals: --pyxtal per space group for all
230 (labelled with spglib like the dataset builder, seed 1 = not the training seed 0).
Patterns: the project's simulator with the dataset options (noise-free float counts), or with
one realism option at a realistic and a harsh level (--realism).

Scores, per condition: the share where the evidence decides the crystal system / the Bravais
lattice, the accuracy of those decisions, the wrong decisions as a share of ALL samples
(target <= 1 %), the forced-choice (argmax) lattice-system and Bravais accuracy (the prototype's
85-88 % / 65-72 % figures are forced choices), and whether the true group is in the evidence's
top set (groups within DECIDE_LOG_ODDS of the best). Speed: CPU time per frame of
analyse_frame and per sample of combine (time.process_time, one thread), with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import Counter, defaultdict

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from xtalsym import spacegroups, symmetry  # noqa: E402
from xtalsym.evidence import analyse_frame, combine, decision  # noqa: E402
from xtalsym.evidence import sample as sample_mod
from xtalsym.offline import dataset, simulate, structures  # noqa: E402

MP_DEFAULT = "../shared/data/mp_structures/structures.jsonl.xz"
REALISM = {  # name -> (realistic, harsh)
    "dose": (dict(dose=1e5), dict(dose=3e3)),
    "background": (dict(background=1e-3), dict(background=1e-2)),
    "beam_stop": (dict(beam_stop_radius_px=5.0), dict(beam_stop_radius_px=12.0)),
    "misorientation": (dict(misorientation_deg=0.5), dict(misorientation_deg=2.0)),
    "pixel_scale": (dict(pixel_scale_error=0.005), dict(pixel_scale_error=0.02)),
}


def mp_test_sample(path: str, per_system: int, seed: int, split: str = "test",
                   exclude: frozenset[str] = frozenset()) -> list[structures.LabelledStructure]:
    """Class-balanced (crystal system) labelled materials of one split (test unless calibrating),
    none of those in ``exclude`` (material ids of samples already looked at)."""
    records = [r for r in structures.iter_records(path) if not isinstance(r, structures.StructureError)
               and dataset.split_of(r.material_id, dataset.DEFAULT_SPLIT_FRACTIONS) == split]
    random.Random(seed).shuffle(records)
    records = [r for r in records if r.material_id not in exclude]
    counts: Counter = Counter()
    chosen = []
    for rec in records:
        if all(counts[s] >= per_system for s in spacegroups.CRYSTAL_SYSTEMS):
            break
        try:
            lab = structures.label(rec)
        except structures.StructureError:
            continue
        if counts[lab.crystal_system] < per_system and len(lab.structure) <= 200:
            counts[lab.crystal_system] += 1
            chosen.append(lab)
    return chosen


def pyxtal_sample(per_group: int, seed: int) -> list[structures.LabelledStructure]:
    out = []
    for rec in structures.random_records(range(1, 231), per_group, seed=seed):
        try:
            out.append(structures.label(rec))
        except structures.StructureError:
            continue
    return out


def evaluate(materials, *, geometry, realism, d_min, timings) -> list[dict]:
    rows = []
    for i, lab in enumerate(materials):
        rz = realism
        if rz is not None and rz.pixel_scale_error:  # ± alternately
            rz = simulate.Realism(**{**rz.__dict__, "pixel_scale_error": rz.pixel_scale_error * (1 if i % 2 else -1)})
        if rz is not None:
            rz = simulate.Realism(**{**rz.__dict__, "seed": i})
        try:
            pats = simulate.simulate_axes(lab.structure, geometry=geometry, realism=rz, **simulate.DATASET_OPTIONS)
        except simulate.SimulationError:
            continue
        frames = {}
        for axis, p in pats.items():
            t0 = time.process_time()
            frames[axis] = analyse_frame(p, axis=axis, q_per_pixel=geometry.q_per_pixel, d_min_angstrom=d_min,
                                         beam_stop_radius_px=rz.beam_stop_radius_px if rz else 0.0)
            timings["frame"].append(time.process_time() - t0)
        t0 = time.process_time()
        ev = combine(frames)
        timings["combine"].append(time.process_time() - t0)
        sg = lab.space_group
        best = float(ev.group_loglik.max())
        top_set = np.flatnonzero(ev.group_loglik >= best - sample_mod.DECIDE_LOG_ODDS) + 1
        forced_b = max(ev.bravais_loglik, key=ev.bravais_loglik.get)
        feats = decision.features(system_ll=ev.crystal_system_loglik, bravais_ll=ev.bravais_loglik, frames=frames)
        rows.append({
            "id": lab.material_id, "sg": sg, "warnings": ev.warnings,
            "system": spacegroups.crystal_system(sg), "bravais": symmetry.bravais_lattice(sg),
            "lattice_system": symmetry.lattice_system(sg),
            "decided_system": ev.crystal_system, "decided_bravais": ev.bravais,
            "forced_bravais": forced_b,
            "forced_lattice_system": _lattice_system_of_bravais(forced_b),
            "in_top_set": sg in top_set, "top_set_size": len(top_set),
            "forced_system": max(ev.crystal_system_loglik, key=ev.crystal_system_loglik.get),
            "system_margin": feats.system_margin, "bravais_margin": feats.bravais_margin,
            "friedel_asymmetry": feats.friedel_asymmetry, "untested_zones": list(feats.untested_zones),
            # the class tables and per-zone summaries, so that a decision rule can be refitted on the dump
            "system_loglik": ev.crystal_system_loglik, "bravais_loglik": ev.bravais_loglik,
            "metric_loglik": ev.metric_loglik, "metric_class": ev.metric_class,
            "cell": None if ev.cell is None else [float(x) for x in ev.cell],
            "zones": {a: {"decided": f.decided, "spots": f.n_spots, "max_order": f.max_order,
                          "indexed": int(np.count_nonzero(f.spots_indexed)), "point_group_2d": f.point_group_2d,
                          "rms_px": f.rms_px} for a, f in frames.items()},
        })
    return rows


def _lattice_system_of_bravais(b: str) -> str:
    return {"a": "triclinic", "m": "monoclinic", "o": "orthorhombic", "t": "tetragonal", "c": "cubic"}.get(
        b[0], "rhombohedral" if b == "hR" else "hexagonal")


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    if not n:
        return {"n": 0}
    ds = [r for r in rows if r["decided_system"]]
    db = [r for r in rows if r["decided_bravais"]]
    return {
        "n": n,
        "system_decided": len(ds) / n,
        "system_acc": (sum(r["decided_system"] == r["system"] for r in ds) / len(ds)) if ds else float("nan"),
        "system_wrong": sum(r["decided_system"] != r["system"] for r in ds) / n,
        "bravais_decided": len(db) / n,
        "bravais_acc": (sum(r["decided_bravais"] == r["bravais"] for r in db) / len(db)) if db else float("nan"),
        "bravais_wrong": sum(r["decided_bravais"] != r["bravais"] for r in db) / n,
        "forced_lattice_system": sum(r["forced_lattice_system"] == r["lattice_system"] for r in rows) / n,
        "forced_bravais": sum(r["forced_bravais"] == r["bravais"] for r in rows) / n,
        "in_top_set": sum(r["in_top_set"] for r in rows) / n,
        "top_set_size": float(np.median([r["top_set_size"] for r in rows])),
    }


HEADER = (f"{'condition':<26} {'n':>4} {'sys dec':>7} {'sys acc':>7} {'sys wrong':>9} {'brv dec':>7} "
          f"{'brv acc':>7} {'brv wrong':>9} {'LS forced':>9} {'brv forced':>10} {'SG in set':>9} {'set':>4}")


def fmt(name: str, s: dict) -> str:
    if not s.get("n"):
        return f"{name:<26} {0:>4}"
    p = lambda v: "   -  " if v != v else f"{100 * v:5.1f}%"  # noqa: E731
    return (f"{name:<26} {s['n']:>4} {p(s['system_decided']):>7} {p(s['system_acc']):>7} {p(s['system_wrong']):>9} "
            f"{p(s['bravais_decided']):>7} {p(s['bravais_acc']):>7} {p(s['bravais_wrong']):>9} "
            f"{p(s['forced_lattice_system']):>9} {p(s['forced_bravais']):>10} {p(s['in_top_set']):>9} "
            f"{s['top_set_size']:>4.0f}")


def per_system_table(rows: list[dict]) -> list[str]:
    by = defaultdict(list)
    for r in rows:
        by[r["system"]].append(r)
    lines = [f"{'true crystal system':<20} {'n':>4} {'decided':>8} {'correct':>8} {'wrong':>6}  most common wrong"]
    for system in spacegroups.CRYSTAL_SYSTEMS:
        rs = by.get(system, [])
        if not rs:
            continue
        dec = [r for r in rs if r["decided_system"]]
        wrong = Counter(r["decided_system"] for r in dec if r["decided_system"] != system)
        lines.append(f"{system:<20} {len(rs):>4} {len(dec):>8} {sum(r['decided_system'] == system for r in dec):>8} "
                     f"{sum(wrong.values()):>6}  {', '.join(f'{k} x{v}' for k, v in wrong.most_common(3))}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mp", type=int, default=280, help="MP test materials (balanced over 7 systems)")
    ap.add_argument("--mp-path", default=MP_DEFAULT)
    ap.add_argument("--pyxtal", type=int, default=1, help="pyxtal crystals per space group (0: none)")
    ap.add_argument("--pyxtal-seed", type=int, default=1,
                    help="seed of the pyxtal crystals (1: the default sample; another seed: a different sample)")
    ap.add_argument("--exclude-seeds", default="",
                    help="leave out the MP materials of earlier samples of this split, e.g. 3:140,4:280 "
                         "(seed:--mp of each), so that this sample is fresh")
    ap.add_argument("--exclude-dumps", default="",
                    help="leave out the materials of these --dump files too (comma list), e.g. a sample that "
                         "was itself drawn with --exclude-seeds")
    ap.add_argument("--realism", default="", help="comma list of " + ", ".join(REALISM) + ", or 'all'")
    ap.add_argument("--d-min", default="", help="comma list of d_min in Å for the coverage table, e.g. 1.46,1.0,0.7")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test", choices=("test", "val"),
                    help="MP split (val: only to calibrate the decision rule, benchmarks/evidence_calibration.py)")
    ap.add_argument("--dump", default="", help="write every row (with the decision features) to this JSONL file")
    ap.add_argument("--show-wrong", action="store_true", help="list the wrong decisions")
    ap.add_argument("--speed", action="store_true",
                    help="only time analyse_frame (x, y, z) and combine on the shipped structures (min of 20); "
                         "with --realism, on patterns with those options at their realistic level together")
    args = ap.parse_args()
    if args.speed:
        names = list(REALISM) if args.realism == "all" else [r for r in args.realism.split(",") if r]
        options = {k: v for name in names for k, v in REALISM[name][0].items()}
        speed(realism=simulate.Realism(**options, seed=args.seed) if options else None)
        return

    sample_mod.group_table()  # one-time tables, not part of the per-sample time
    sets = {}
    if args.mp:
        exclude = frozenset(lab.material_id for seed, n in _seed_list(args.exclude_seeds)
                            for lab in mp_test_sample(args.mp_path, max(1, n // 7), seed, args.split))
        exclude |= _dumped_ids(args.exclude_dumps)
        sets[f"MP {args.split}"] = mp_test_sample(args.mp_path, max(1, args.mp // 7), args.seed, args.split, exclude)
        if exclude:
            print(f"left out {len(exclude)} materials of the samples {args.exclude_seeds} {args.exclude_dumps}")
    if args.pyxtal:
        sets["pyxtal 230"] = pyxtal_sample(args.pyxtal, seed=args.pyxtal_seed)
    geometry = simulate.Geometry()
    timings = defaultdict(list)
    print(HEADER)
    conditions = [("noise-free", None)]
    names = list(REALISM) if args.realism == "all" else [r for r in args.realism.split(",") if r]
    for name in names:
        realistic, harsh = REALISM[name]
        conditions += [(f"{name} {_level(realistic)}", simulate.Realism(**realistic)),
                       (f"{name} {_level(harsh)}", simulate.Realism(**harsh))]
    all_rows = {}
    for set_name, materials in sets.items():
        for cond, realism in conditions:
            rows = evaluate(materials, geometry=geometry, realism=realism, d_min=None, timings=timings)
            all_rows[(set_name, cond)] = rows
            if args.dump:
                with open(args.dump, "a") as fh:
                    for r in rows:
                        fh.write(json.dumps({"set": set_name, "condition": cond, **r}, default=_jsonable) + "\n")
            print(fmt(f"{set_name[:9]} {cond}", summarise(rows)), flush=True)
            if args.show_wrong:
                for r in rows:
                    if (r["decided_system"] and r["decided_system"] != r["system"]) or \
                            (r["decided_bravais"] and r["decided_bravais"] != r["bravais"]):
                        print(f"    wrong: {r['id']} SG {r['sg']} {r['system']}/{r['bravais']} -> "
                              f"{r['decided_system']}/{r['decided_bravais']}; {r['warnings']}")
    for d in [float(x) for x in args.d_min.split(",") if x]:
        pixels = int(2 * np.ceil(1.0 / (d * geometry.q_per_pixel) + 12)) if d < 1.4 else geometry.pixels
        g = simulate.Geometry(pixels=pixels)
        for set_name, materials in sets.items():
            rows = evaluate(materials, geometry=g, realism=None, d_min=d, timings=defaultdict(list))
            print(fmt(f"{set_name[:9]} d_min {d:g} A ({pixels}px)", summarise(rows)), flush=True)
    for (set_name, cond), rows in all_rows.items():
        if cond == "noise-free":
            print(f"\n{set_name}, noise-free, per true crystal system:")
            print("\n".join(per_system_table(rows)))
    load = os.getloadavg()
    for key, values in timings.items():
        if values:
            v = np.array(values) * 1e3
            print(f"\n{key}: median {np.median(v):.2f} ms CPU, p90 {np.percentile(v, 90):.2f} ms "
                  f"({len(v)} calls, one thread; load average {load[0]:.1f} on {os.cpu_count()} cores)")


def speed(repeats: int = 20, realism: simulate.Realism | None = None) -> None:
    """CPU ms per analyse_frame call (each zone) and per combine call (the three zones) on each
    shipped structure's patterns (noise-free, or with ``realism``), minimum over ``repeats`` (the
    least disturbed run), and the load."""
    import cv2

    cv2.setNumThreads(1)  # one core, as the daemon's workers run it (cv2's own pool would add its CPU time)
    geometry = simulate.Geometry()
    sample_mod.group_table()  # one-time tables, not part of the per-sample time
    ref = np.random.default_rng(0).random((256, 256))
    t0 = time.process_time()
    for _ in range(1000):
        ref.sum()
    print(f"reference: numpy sum over 256x256 float64 {1e3 * (time.process_time() - t0):.1f} us; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'structure':<10} {'ms/frame x':>11} {'y':>6} {'z':>6} {'ms/combine':>11} {'spots z':>8}")
    per_frame, per_combine = [], []
    for path in sorted(structures.shipped_structures_dir().glob("*.cif")):
        lab = structures.load_structure(path)
        patterns = simulate.simulate_axes(lab.structure, geometry=geometry, realism=realism, **simulate.DATASET_OPTIONS)
        frames, frame_ms = {}, {}
        for axis, p in patterns.items():
            times = []
            for _ in range(repeats):
                t0 = time.process_time()
                frames[axis] = analyse_frame(p, axis=axis, q_per_pixel=geometry.q_per_pixel,
                                             beam_stop_radius_px=realism.beam_stop_radius_px if realism else 0.0)
                times.append(time.process_time() - t0)
            frame_ms[axis] = 1e3 * min(times)
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            combine(frames)
            times.append(time.process_time() - t0)
        combine_ms = 1e3 * min(times)
        per_frame += list(frame_ms.values())
        per_combine.append(combine_ms)
        print(f"{path.stem:<10} {frame_ms['x']:>11.2f} {frame_ms['y']:>6.2f} {frame_ms['z']:>6.2f} "
              f"{combine_ms:>11.2f} {frames['z'].n_spots:>8}")
    print(f"median: analyse_frame {np.median(per_frame):.2f} ms per frame, combine {np.median(per_combine):.2f} ms "
          f"per sample; load average {os.getloadavg()[0]:.1f}")


def _seed_list(text: str) -> list[tuple[int, int]]:
    """'3:140,4:280' -> [(3, 140), (4, 280)]; exits with one line on a malformed item."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        seed, _, n = item.partition(":")
        if not (seed.isdigit() and n.isdigit()):
            raise SystemExit(f"evidence.py: error: --exclude-seeds items are SEED:N, got {item!r}")
        out.append((int(seed), int(n)))
    return out


def _dumped_ids(paths: str) -> frozenset[str]:
    ids = set()
    for path in (p.strip() for p in paths.split(",") if p.strip()):
        try:
            with open(path) as fh:
                ids |= {json.loads(line)["id"] for line in fh if line.strip()}
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"evidence.py: error: cannot read material ids from --exclude-dumps file {path!r}: {exc}") from None
    return frozenset(ids)


def _jsonable(value):
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"not JSON: {type(value)}")


def _level(options: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in options.items())


if __name__ == "__main__":
    main()
