"""Thread-CPU per sample of ``xtalsym.evidence.combine`` on cached frame analyses, and whether two
code versions give the same outputs (issue 12: combine cheaper, outputs unchanged).

    python benchmarks/evidence_cache.py frames --features DIR          # DIR/frames/<chunk>.pkl
    PYTHONPATH=/work/main python benchmarks/combine_cpu.py --frames DIR/frames --dump main.pkl
    PYTHONPATH=$PWD python benchmarks/combine_cpu.py --frames DIR/frames --compare main.pkl

``--baseline /work/main/xtalsym/evidence/sample.py`` also loads that file as a second module (it
imports the rest of xtalsym from PYTHONPATH: valid while only sample.py differs) and times the two
alternately on each sample in this process, so that a shared machine's load falls on both alike;
its outputs are compared as --compare's are.

Subsets: the three views, and with ``--subsets`` the 2-view ones the daemon's partial predictions
combine (xy, xz, yz). Per subset, each sample is combined ``--passes`` times in a row and its least
disturbed (minimum) thread CPU kept; median / mean / p90 over samples. ``--dump`` writes every
output (group_loglik, class likelihoods, decision, cell); ``--compare`` reads such a file and
prints the largest differences (the timing is whichever code PYTHONPATH imports).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

SUBSETS = {"xyz": ("x", "y", "z"), "xy": ("x", "y"), "xz": ("x", "z"), "yz": ("y", "z")}


def load(folder: Path, limit: int) -> list[tuple[str, dict]]:
    rows: list = []
    for path in sorted(folder.glob("chunk-*.pkl")):
        with open(path, "rb") as handle:
            rows.extend(pickle.load(handle))
        if len(rows) >= limit:
            break
    return rows[:limit]


def summary(ev) -> dict:
    """The outputs that must not change."""
    return {"group_loglik": np.asarray(ev.group_loglik, float).copy(),
            "system": dict(ev.crystal_system_loglik), "bravais": dict(ev.bravais_loglik),
            "decided": ev.decided, "crystal_system": ev.crystal_system, "bravais_decided": ev.bravais,
            "cell": ev.cell, "cell_sigma": ev.cell_sigma, "metric_class": ev.metric_class,
            "cell_by_bravais": dict(ev.cell_by_bravais), "metric_loglik": dict(ev.metric_loglik),
            "warnings": list(ev.warnings), "reason": ev.reason,
            "off_axis": getattr(ev, "off_axis", None), "friedel_asymmetry": dict(getattr(ev, "friedel_asymmetry", {}))}


def _max_diff(a, b) -> float:
    """Largest absolute difference of two outputs' numbers; inf when their structure differs."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return float("inf")
        return max((_max_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (tuple, list, np.ndarray)) and not isinstance(a, str):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype.kind != b.dtype.kind:
            return float("inf")
        if a.dtype.kind in "fc":
            same = (a == b) | (np.isnan(a) & np.isnan(b))
            return float(np.max(np.abs(np.where(same, 0.0, a - b)), initial=0.0))
        return 0.0 if np.array_equal(a, b) else float("inf")
    if isinstance(a, float) and isinstance(b, float):
        return 0.0 if a == b or (a != a and b != b) else abs(a - b)
    return 0.0 if a == b else float("inf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", required=True, help="folder of evidence_cache.py frames chunks (chunk-*.pkl)")
    ap.add_argument("--limit", type=int, default=500, help="materials, in chunk order")
    ap.add_argument("--passes", type=int, default=2, help="combines per sample and subset (the minimum is kept)")
    ap.add_argument("--subsets", default="xyz", help="comma list of " + ", ".join(SUBSETS))
    ap.add_argument("--dump", default="", help="write every output to this pickle")
    ap.add_argument("--compare", default="", help="compare the outputs with this --dump file")
    ap.add_argument("--baseline", default="", help="another evidence/sample.py to time alongside (A/B in one process)")
    args = ap.parse_args(argv)
    folder = Path(args.frames)
    subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
    bad = [s for s in subsets if s not in SUBSETS]
    if bad or not subsets:
        raise SystemExit(f"combine_cpu.py: error: --subsets takes {', '.join(SUBSETS)}, got {args.subsets!r}")
    rows = load(folder, args.limit) if folder.is_dir() else []
    if not rows:
        raise SystemExit(f"combine_cpu.py: error: no chunk-*.pkl frames in {folder}")
    reference = None
    if args.compare:
        try:
            with open(args.compare, "rb") as handle:
                reference = pickle.load(handle)
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            raise SystemExit(f"combine_cpu.py: error: cannot read --compare {args.compare}: {exc}") from None
    from xtalsym.evidence import combine
    from xtalsym.evidence import sample as sample_mod

    sample_mod.group_table()  # one-time tables, not part of the per-sample time
    versions = {"this": combine}
    if args.baseline:
        import importlib.util

        spec = importlib.util.spec_from_file_location("baseline_sample", args.baseline)
        if spec is None or not Path(args.baseline).is_file():
            raise SystemExit(f"combine_cpu.py: error: --baseline {args.baseline} is no Python file")
        baseline = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = baseline  # dataclasses look their module up there
        spec.loader.exec_module(baseline)
        baseline.group_table()
        versions["baseline"] = baseline.combine
    print(f"code: {Path(sample_mod.__file__).resolve().parents[2]}; {len(rows)} materials from {folder}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    outputs: dict = {}
    base_outputs: dict = {}
    for name in subsets:
        cpu = {v: [] for v in versions}
        for material, frames in rows:
            frames = {a: frames[a] for a in SUBSETS[name]}
            best = dict.fromkeys(versions, float("inf"))
            for _ in range(args.passes):
                for version, fn in versions.items():  # alternately: the load falls on both alike
                    t0 = time.thread_time()
                    ev = fn(frames)
                    best[version] = min(best[version], time.thread_time() - t0)
                    (outputs if version == "this" else base_outputs)[name, material] = summary(ev)
            for version in versions:
                cpu[version].append(best[version])
        for version, values in cpu.items():
            v = 1e3 * np.array(values)
            print(f"{name:>4} {version:>8}: combine median {np.median(v):.2f} ms, mean {v.mean():.2f}, "
                  f"p90 {np.percentile(v, 90):.2f} thread CPU per sample ({len(v)} samples, min of {args.passes})",
                  flush=True)
        if "baseline" in cpu:
            ratio = np.array(cpu["this"]) / np.array(cpu["baseline"])
            print(f"{name:>4}: this / baseline per sample: median {np.median(ratio):.3f}, "
                  f"total {np.sum(cpu['this']) / np.sum(cpu['baseline']):.3f}", flush=True)
    if args.dump:
        with open(args.dump, "wb") as handle:
            pickle.dump(outputs, handle, protocol=pickle.HIGHEST_PROTOCOL)
    status = 0
    for label, other in ((args.compare, reference), ("baseline", base_outputs if args.baseline else None)):
        if other is not None:
            status |= _report(outputs, other, label)
    return status


def _report(outputs: dict, reference: dict, label: str) -> int:
    common = [k for k in outputs if k in reference]
    worst = {field: 0.0 for field in next(iter(outputs.values()))}
    for key in common:
        for field in worst:
            worst[field] = max(worst[field], _max_diff(outputs[key][field], reference[key][field]))
    print(f"compared with {label}: {len(common)} outputs in common, of {len(outputs)}")
    print("largest difference per output: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
    if any(v > 1e-12 for v in worst.values()):
        print("DIFFERENT")
        return 1
    print("same within 1e-12")
    return 0


if __name__ == "__main__":
    sys.exit(main())
