"""Summaries and example grids of a dataset (`xtalsym dataset show`)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np

from xtalsym import spacegroups
from xtalsym.offline import dataset as ds
from xtalsym.offline import simulate
from xtalsym.offline.images import add_scale_bar


def summarise(root: str | Path) -> dict:
    """Counts per space group, crystal system and split."""
    meta = ds.load_metadata(root)
    samples = list(ds.iter_sample_metadata(root))
    try:
        splits = ds.load_splits(root)
    except ds.DatasetError:
        splits = {}
    by_group = Counter(s["space_group"] for s in samples)
    by_system = Counter(s["crystal_system"] for s in samples)
    by_split = Counter(splits.get(s["material_id"], "unassigned") for s in samples)
    errors_path = Path(root) / "build_errors.json"
    return {
        "dataset": str(root),
        "generator": meta.get("generator"),
        "geometry": meta["config"]["geometry"],
        "shaping": meta["config"]["shaping_method"],
        "samples": len(samples),
        "materials": len({s["material_id"] for s in samples}),
        "failed_structures": len(json.loads(errors_path.read_text())) if errors_path.exists() else None,
        "space_groups": {str(k): by_group[k] for k in sorted(by_group)},
        "crystal_systems": {k: by_system[k] for k in spacegroups.CRYSTAL_SYSTEMS if by_system[k]},
        "splits": dict(sorted(by_split.items())),
    }


def format_summary(summary: dict) -> str:
    g = summary["geometry"]
    lines = [
        f"dataset {summary['dataset']} ({summary['generator']}, shaping {summary['shaping']})",
        f"geometry: wavelength {g['wavelength_m']:g} m, distance {g['distance_m']:g} m, "
        f"pixel {g['pixel_size_m']:g} m, {g['pixels']}x{g['pixels']}",
        f"samples: {summary['samples']} ({summary['materials']} materials); "
        f"failed structures: {summary['failed_structures']}",
        "splits: " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()),
        "",
        "crystal system      samples",
    ]
    lines += [f"  {name:<16} {count:7d}" for name, count in summary["crystal_systems"].items()]
    lines += ["", f"space groups: {len(summary['space_groups'])}", "   #  symbol        samples"]
    for number, count in summary["space_groups"].items():
        lines.append(f"  {int(number):3d}  {spacegroups.symbol(int(number)):<12} {count:7d}")
    return "\n".join(lines)


def _pick_examples(samples: list[dict], rows: int, seed: int) -> list[dict]:
    """Spread the examples over space groups, so the grid shows variety."""
    rng = random.Random(seed)
    by_group: dict[int, list[dict]] = {}
    for s in samples:
        by_group.setdefault(s["space_group"], []).append(s)
    groups = sorted(by_group)
    rng.shuffle(groups)
    picked = [rng.choice(by_group[g]) for g in groups[:rows]]
    rest = [s for s in samples if s not in picked]
    rng.shuffle(rest)
    return picked + rest[: max(0, rows - len(picked))]


def _raw_q_per_pixel(root: str | Path) -> float | None:
    """Å⁻¹ per raw-DP pixel from the dataset's geometry (None if it does not say)."""
    from xtalsym.offline.simulate import Geometry

    geometry = (ds.load_metadata(root).get("config") or {}).get("geometry") or {}
    try:
        return Geometry(**{k: geometry[k] for k in ("wavelength_m", "distance_m", "pixel_size_m", "pixels")
                           if k in geometry}).q_per_pixel
    except (TypeError, ValueError):
        return None


def save_example_grid(root: str | Path, out: str | Path, *, rows: int = 8, seed: int = 0) -> Path:
    """PNG grid: per example the raw DPs (x, y, z; shown with a square-root stretch so weak
    spots are visible) and the shaped DPs (x, y, z) as the model sees them, each with a
    scale bar in Å⁻¹ (from the dataset's geometry)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = list(ds.iter_sample_metadata(root))
    if not samples:
        raise ds.DatasetError(f"dataset has no samples to show: {root}")
    examples = _pick_examples(samples, rows, seed)
    q_raw = _raw_q_per_pixel(root)
    reader = ds.ShardReader(root)
    fig, axes = plt.subplots(len(examples), 6, figsize=(12, 2.1 * len(examples)), squeeze=False)
    for row, sample in zip(axes, examples):
        raws = reader.read(sample["shard"], sample["position"], "raw")
        shaped = reader.read(sample["shard"], sample["position"], "shaped")
        for k, axis in enumerate("xyz"):
            row[k].imshow(np.sqrt(raws[k] / 255.0), cmap="gray", vmin=0, vmax=1)
            row[k].set_title(f"raw {axis}", fontsize=7)
            row[3 + k].imshow(shaped[k])
            row[3 + k].set_title(f"shaped {axis}", fontsize=7)
            if q_raw is not None:
                add_scale_bar(row[k], q_raw, raws[k].shape[1])
                add_scale_bar(row[3 + k], q_raw * raws[k].shape[1] / shaped[k].shape[1], shaped[k].shape[1])
        row[0].set_ylabel(
            f"{sample['material_id']}\n{sample['formula']}\nSG {sample['space_group']} {sample['symbol']}", fontsize=7
        )
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    reader.close()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def save_evidence_overlays(root: str | Path, out_dir: str | Path, *, rows: int = 8, seed: int = 0) -> list[Path]:
    """Per example (the grid's) and axis: the raw DP with its indexed lattice and indices.

    Datasets keep the 8-bit raw DPs only, so the analysis here sees 8-bit values (weak
    reflections below half a grey level are gone); the daemon and `predict` analyse float counts."""
    from xtalsym.evidence import analyse_frame, report

    meta = ds.load_metadata(root)
    geometry = meta.get("config", {}).get("geometry") or {}
    g = simulate.Geometry(**geometry) if geometry else simulate.Geometry()
    samples = list(ds.iter_sample_metadata(root))
    if not samples:
        raise ds.DatasetError(f"dataset has no samples to show: {root}")
    reader = ds.ShardReader(root)
    out_dir = Path(out_dir)
    paths = []
    try:
        for sample in _pick_examples(samples, rows, seed):
            raws = reader.read(sample["shard"], sample["position"], "raw")
            for k, axis in enumerate("xyz"):
                frame = analyse_frame(raws[k].astype(np.float64), axis=axis, q_per_pixel=g.q_per_pixel, counts=False)
                name = f"{sample['material_id']}_{axis}.png".replace("/", "_")
                title = f"{sample['material_id']} SG {sample['space_group']} {sample['symbol']}, zone {axis}"
                paths.append(report.draw_overlay(raws[k], frame, out_dir / name, title=title))
    finally:
        reader.close()
    return paths
