"""The frame analyses of the fusion cache, kept so that ``combine`` can be re-run alone.

``fusion_data --evidence`` analyses every frame and combines the three views in one pass; when
only the combination changes (the absence likelihoods of :mod:`xtalsym.evidence.sample`) the
frame analyses (~2/3 of the cost) need not be redone. This keeps them per chunk and writes the
evidence files in ``fusion_data``'s format, so ``benchmarks/fusion.py --evidence DIR`` reads
them as it reads the official pass.

    python benchmarks/evidence_cache.py frames --features data/fusion       # frames/<chunk>.pkl
    python benchmarks/evidence_cache.py combine --features data/fusion --out data/fusion/evidence_soft
    python benchmarks/evidence_cache.py stats --features data/fusion --split val DIR [DIR ...]

``stats``: per evidence folder, the share of the split's materials whose true group the evidence
rules out (more than ``RULED_OUT_NATS`` below its best group) and the share with the truth among
the best groups (within 1e-6 nats).
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtalsym.offline import fusion_data, simulate  # noqa: E402

log = logging.getLogger("benchmarks.evidence_cache")
RULED_OUT_NATS = 20.0  # fusion_compare.HARD_MISS_NATS


def q_per_pixel(bundle: str) -> float:
    from xtalsym.bundle import load_bundle
    from xtalsym.offline.evaluate import build_config_from

    settings = load_bundle(bundle).settings
    return build_config_from({"dataset_config": settings["dataset_config"]}).geometry.q_per_pixel


def _atomic_write(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        write(handle)
    os.replace(tmp, target)


def frames_chunk(path: Path, out_dir: Path, qpp: float) -> int:
    """Analyse the three views of every material of one feature chunk; frames/<chunk>.pkl."""
    import json

    from threadpoolctl import threadpool_limits

    from xtalsym.evidence import analyse_frame

    target = out_dir / (path.stem + ".pkl")
    if target.is_file():
        return 0
    rows = []
    with threadpool_limits(1):
        meta = None
        for _, position, views in fusion_data.iter_patterns(path.parent, only=path):
            if meta is None:
                with np.load(path) as data:
                    meta = json.loads(bytes(data["meta"]).decode())
            frames = {a: analyse_frame(views[a], axis=a, q_per_pixel=qpp, counts=False) for a in simulate.AXES}
            rows.append((meta["rows"][position]["material_id"], frames))
    _atomic_write(target, lambda h: pickle.dump(rows, h, protocol=pickle.HIGHEST_PROTOCOL))
    return len(rows)


def load_frames(folder: Path) -> dict[str, dict]:
    """{material_id: {axis: FrameEvidence}} of every cached chunk."""
    out: dict[str, dict] = {}
    for path in sorted(folder.glob("chunk-*.pkl")):
        with open(path, "rb") as handle:
            out.update(dict(pickle.load(handle)))
    return out


def _rows(path: Path) -> list:
    with open(path, "rb") as handle:
        return pickle.load(handle)


def combine_chunk(path: Path, out_dir: Path) -> int:
    """Evidence of one chunk of cached frames, in fusion_data's evidence format (all three views)."""
    from xtalsym.evidence import combine

    target = out_dir / (path.stem + ".npz")
    if target.is_file():
        return 0
    with open(path, "rb") as handle:
        rows = pickle.load(handle)
    ll, decided = [], []
    for _, frames in rows:
        ev = combine(frames)
        ll.append(np.asarray(ev.group_loglik, dtype=np.float32))
        decided.append(bool(ev.decided))
    _atomic_write(target, lambda h: np.savez_compressed(
        h, material_id=np.array([m for m, _ in rows]), loglik_111=np.array(ll), decided_111=np.array(decided)))
    return len(rows)


def stats(features: Path, split: str, folders: list[str]) -> None:
    """Print, per evidence folder, the truth ruled out / at the top shares on ``split``."""
    feats = fusion_data.load_features(features)
    for folder in folders:
        rows, ev = fusion_data.load_evidence(Path(folder), feats.material_id)
        if not len(rows):
            print(f"{folder}: no evidence files")
            continue
        keep = np.array([k for k, r in enumerate(rows) if feats.split[r] == split], dtype=np.int64)
        ll = ev[(True, True, True)][keep]
        truth = feats.space_group[rows[keep]] - 1
        gap = ll.max(axis=1) - ll[np.arange(len(keep)), truth]
        print(f"{folder}: {split} n {len(keep)}, truth ruled out (> {RULED_OUT_NATS:g} nats) {np.mean(gap > RULED_OUT_NATS):.2%}, "
              f"truth at the top {np.mean(gap <= 1e-6):.2%}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("frames", "combine", "stats"))
    ap.add_argument("folders", nargs="*", help="stats: evidence folders")
    ap.add_argument("--split", default="val", help="stats: the split measured")
    ap.add_argument("--features", default="data/fusion")
    ap.add_argument("--frames", default=None, help="frames folder (default: <features>/frames)")
    ap.add_argument("--out", default=None, help="combine: evidence folder to write")
    ap.add_argument("--bundle", default="reference_index")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="combine: override a constant of xtalsym.evidence.sample (a variant, e.g. LEAK_SHARE=3e-3)")
    ap.add_argument("--only-split", default=None, help="combine: only the chunks holding this split's materials")
    ap.add_argument("--loop", action="store_true", help="frames: keep going while the feature job adds chunks")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    features = Path(args.features)
    frames_dir = Path(args.frames or features / "frames")
    if args.mode == "frames":
        qpp = q_per_pixel(args.bundle)
        idle = 0
        while True:
            todo = [p for p in sorted(features.glob("chunk-*.npz")) if not (frames_dir / (p.stem + ".pkl")).is_file()]
            for path in todo:
                start = time.process_time()
                n = frames_chunk(path, frames_dir, qpp)
                if n:
                    log.info("frames %s: %d materials, %.3f CPU-s each", path.name, n, (time.process_time() - start) / n)
            idle = 0 if todo else idle + 1
            if not args.loop or idle > 3:  # --loop: stop after 3 polls without a new chunk
                return 0
            if not todo:
                time.sleep(60)
    if args.mode == "stats":
        if not args.folders:
            ap.error("stats needs evidence folders")
        stats(features, args.split, args.folders)
        return 0
    if not args.out:
        ap.error("combine needs --out")
    from xtalsym.evidence import sample

    for item in args.set:
        name, _, value = item.partition("=")
        if not hasattr(sample, name):
            ap.error(f"--set: xtalsym.evidence.sample has no {name}")
        setattr(sample, name, type(getattr(sample, name))(float(value)))
        log.info("variant: sample.%s = %r", name, getattr(sample, name))
    paths = sorted(frames_dir.glob("chunk-*.pkl"))
    if args.only_split:
        feats = fusion_data.load_features(features)
        wanted = set(np.asarray(feats.material_id)[np.asarray(feats.split) == args.only_split].tolist())
        paths = [p for p in paths if any(m in wanted for m, _ in _rows(p))]
    start, total = time.process_time(), 0
    for path in paths:
        total += combine_chunk(path, Path(args.out))
    log.info("combined %d materials, %.3f CPU-s each", total, (time.process_time() - start) / max(total, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
