"""Sharded, compressed, resumable datasets of raw and shaped diffraction patterns.

Layout of a dataset directory::

    dataset.json            what was built and how (sources, geometry, shaping, versions)
    shards/shard-000042.npz one zip per chunk of structures; every sample's arrays are
                            separate deflated members (``raw-<i>``: 3x256x256 uint8, the
                            x/y/z raw DPs; ``shaped-<i>``: 3x224x224x3 uint8), so one
                            sample is read without inflating the whole shard
    shards/shard-000042.json the shard's samples (material_id, formula, space group, ...)
                            and the structures that failed, each with its reason
    splits.json             material_id -> train/val/test, by material

The work is cut into fixed chunks of the input records, so a rerun recomputes the same
chunks and skips every shard whose files are complete: that is the resume. A shard's
``.npz`` is written last and atomically, so it exists only when the shard is whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from xtalsym import __version__

# The layout and the reader live below offline/ (index/ and inference/ read datasets too);
# re-exported: ds.ShardReader, ds.DatasetError, ... are how the offline code and tests name them.
from xtalsym.dataset_format import (  # noqa: F401
    FORMAT_VERSION,
    METADATA_FILE,
    SHARD_DIR,
    SPLITS_FILE,
    DatasetError,
    ShardReader,
    iter_sample_metadata,
    load_metadata,
    load_splits,
    shard_paths,
)
from xtalsym.offline import simulate, structures
from xtalsym.offline.samples import SampleFailure, make_sample, sample_from_record  # noqa: F401 (make_sample: callers use ds.make_sample)

log = logging.getLogger(__name__)

DEFAULT_SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines a dataset's contents (written to dataset.json)."""

    geometry: simulate.Geometry = simulate.Geometry()
    shaping_method: str = "fast"
    symprec: float = 0.1
    scattering: str = "xray"
    shard_size: int = 64
    split_fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLIT_FRACTIONS))
    split_seed: int = 0
    # training data off the zone axes: each zone turned by N(0, σ)° about a random axis, seeded by
    # the material (samples.make_sample); inference configs (evaluate.build_config_from) keep 0
    misorientation_deg: float = 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data["geometry"] = asdict(self.geometry)
        if not data["misorientation_deg"]:  # datasets on the zone axes keep the dataset.json they always had
            del data["misorientation_deg"]
        return data


@dataclass
class ShardResult:
    index: int
    samples: int
    errors: list[dict]
    seconds: float
    skipped: bool = False
    attempts: int = 0  # pyxtal generation attempts (for the rejection rate)
    requested: int = 0  # pyxtal records in this shard


@dataclass
class BuildSummary:
    out: Path
    shards: int
    shards_built: int
    shards_skipped: int
    samples: int
    errors: list[dict]
    seconds: float
    pyxtal_attempts: int = 0
    pyxtal_requested: int = 0

    def describe(self) -> str:
        lines = [
            f"dataset: {self.out}",
            f"shards: {self.shards} ({self.shards_built} built, {self.shards_skipped} already complete)",
            f"samples: {self.samples}  failed structures: {len(self.errors)}",
            f"time: {self.seconds:.1f} s"
            + (f" ({self.samples / self.seconds:.1f} structures/s)" if self.seconds > 0 and self.samples else ""),
        ]
        if self.pyxtal_requested:
            rejected = self.pyxtal_attempts - self.pyxtal_requested
            lines.append(
                f"random crystals: {self.pyxtal_attempts} pyxtal attempts for {self.pyxtal_requested} crystals "
                f"({rejected / max(self.pyxtal_attempts, 1):.0%} rejected for the wrong space group)"
            )
        reasons = Counter(e["reason"].split(":")[0] for e in self.errors)
        for reason, count in reasons.most_common(8):
            lines.append(f"  {count:6d} x {reason}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- records


def collect_records(
    sources: Sequence[str | Path] = (),
    *,
    random_space_groups: Sequence[int] = (),
    random_per_group: int = 0,
    random_seed: int = 0,
    limit: int | None = None,
) -> tuple[list[structures.StructureRecord], list[dict]]:
    """All input records in a fixed order, plus the inputs that could not even be read."""
    records: list[structures.StructureRecord] = []
    errors: list[dict] = []
    for source in sources:
        if not Path(source).exists():
            raise FileNotFoundError(f"structure source not found: {source}")
        for item in structures.iter_records(source):
            if isinstance(item, structures.StructureError):
                errors.append(_error_entry(item.source, None, item.reason))
            else:
                records.append(item)
    if random_space_groups and random_per_group > 0:
        records.extend(structures.random_records(random_space_groups, random_per_group, seed=random_seed))
    if limit is not None:
        records = records[:limit]
    return records, errors


def _error_entry(source: str, material_id: str | None, reason: str) -> dict:
    return {"source": source, "material_id": material_id, "reason": reason}


# --------------------------------------------------------------------------- samples


def _sample_metadata(labelled: structures.LabelledStructure) -> dict:
    lattice = labelled.structure.lattice
    return {
        "material_id": labelled.material_id,
        "formula": labelled.formula,
        "source": labelled.source,
        "space_group": labelled.space_group,
        "symbol": labelled.symbol,
        "crystal_system": labelled.crystal_system,
        "symprec": labelled.symprec,
        "atoms": len(labelled.structure),
        "abc_angstrom": [round(x, 4) for x in lattice.abc],
        "angles_deg": [round(x, 3) for x in lattice.angles],
    }


def build_shard(
    index: int, records: Sequence[structures.StructureRecord], out: str, config: BuildConfig
) -> ShardResult:
    """Simulate and shape one chunk of records and write its shard (runs in a worker)."""
    # One BLAS/OpenCV thread per worker process: the parallelism is the processes, and
    # nested thread pools on the same cores slow the small matrix products ~20x.
    with threadpool_limits(1):
        cv2.setNumThreads(1)
        return _build_shard(index, records, out, config)


def _build_shard(
    index: int, records: Sequence[structures.StructureRecord], out: str, config: BuildConfig
) -> ShardResult:
    start = time.perf_counter()
    shard_dir = Path(out) / SHARD_DIR
    if shard_complete(shard_dir, index):
        return ShardResult(index, _shard_sample_count(shard_dir, index), [], 0.0, skipped=True)
    arrays: dict[str, np.ndarray] = {}
    samples: list[dict] = []
    errors: list[dict] = []
    attempts = requested = 0
    for record in records:
        sample = sample_from_record(record, config)
        if isinstance(sample, SampleFailure):
            errors.append(_error_entry(sample.source, sample.material_id, sample.reason))
            continue
        if record.space_group_request is not None:
            requested += 1
            attempts += getattr(sample.labelled, "attempts", 1)
        i = len(samples)
        arrays[f"raw-{i}"] = sample.raws
        arrays[f"shaped-{i}"] = sample.shaped
        samples.append(_sample_metadata(sample.labelled))
    _write_shard(shard_dir, index, arrays, {"samples": samples, "errors": errors})
    return ShardResult(index, len(samples), errors, time.perf_counter() - start, attempts=attempts, requested=requested)


def shard_complete(shard_dir: Path, index: int) -> bool:
    npz, meta = shard_paths(shard_dir, index)
    return npz.is_file() and meta.is_file()


def _shard_sample_count(shard_dir: Path, index: int) -> int:
    return len(json.loads(shard_paths(shard_dir, index)[1].read_text())["samples"])


def _write_shard(shard_dir: Path, index: int, arrays: dict[str, np.ndarray], meta: dict) -> None:
    shard_dir.mkdir(parents=True, exist_ok=True)
    npz, meta_path = shard_paths(shard_dir, index)
    # Sidecar first, archive last: the .npz appearing (atomic rename) marks the shard done.
    _atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
    tmp = npz.with_name(npz.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(tmp, npz)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- build


def _chunks(records: Sequence, size: int) -> list[list]:
    return [list(records[i : i + size]) for i in range(0, len(records), size)]


def _first_difference(old, new, name: str) -> str:
    """'config.geometry.pixels is 256 there, 128 now' for the first key where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{name}.{key}")
    return f"{name} is {old!r} there, {new!r} now"


def _check_or_write_metadata(out: Path, config: BuildConfig, inputs: dict, overwrite: bool) -> None:
    meta_path = out / METADATA_FILE
    wanted = {
        "format_version": FORMAT_VERSION,
        "generator": f"xtalsym {__version__}",
        "config": config.to_json(),
        "inputs": inputs,
    }
    if meta_path.exists() and not overwrite:
        existing = json.loads(meta_path.read_text())
        for key in ("format_version", "config", "inputs"):
            if existing.get(key) != wanted[key]:
                raise DatasetError(
                    f"{out} holds a dataset built with other {key}: "
                    f"{_first_difference(existing.get(key), wanted[key], key)}; choose another --out, rerun "
                    f"with the same settings to resume, or pass --overwrite"
                )
        return
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in (out / SHARD_DIR).glob("shard-*"):
            path.unlink()
    _atomic_write_bytes(meta_path, json.dumps(wanted, indent=1).encode())


def build_dataset(
    records: Sequence[structures.StructureRecord],
    out: str | Path,
    *,
    config: BuildConfig = BuildConfig(),
    inputs: dict | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    read_errors: Sequence[dict] = (),
) -> BuildSummary:
    """Build (or resume) a dataset from ``records`` into ``out``.

    ``workers`` local processes (default: all cores) or, with ``scheduler``, the workers
    of a Dask distributed cluster (they must see ``out`` on a shared filesystem).
    """
    from xtalsym.progress import progress as progress_bar

    out = Path(out)
    if config.shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {config.shard_size}")
    _check_split_fractions(config.split_fractions)
    inputs = inputs or {"records": len(records)}
    _check_or_write_metadata(out, config, inputs, overwrite)
    chunks = _chunks(records, config.shard_size)
    start = time.perf_counter()
    results: list[ShardResult] = []
    bar = progress_bar(total=len(records), unit="structure", enabled=progress, desc="simulate+shape")
    for result in _run_shards(chunks, str(out), config, workers=workers, scheduler=scheduler):
        results.append(result)
        bar.update(len(chunks[result.index]))
        bar.set_postfix(shards=len(results), failed=sum(len(r.errors) for r in results))
    bar.close()
    # Read every shard's failures back, so a resumed run reports the whole dataset.
    errors = list(read_errors) + [e for r in results for e in _shard_errors(out, r)]
    write_splits(out, config)
    summary = BuildSummary(
        out=out,
        shards=len(chunks),
        shards_built=sum(not r.skipped for r in results),
        shards_skipped=sum(r.skipped for r in results),
        samples=sum(r.samples for r in results),
        errors=errors,
        seconds=time.perf_counter() - start,
        pyxtal_attempts=sum(r.attempts for r in results),
        pyxtal_requested=sum(r.requested for r in results),
    )
    _atomic_write_bytes(out / "build_errors.json", json.dumps(errors, indent=1).encode())
    log.debug("%s", summary.describe())
    return summary


def _shard_errors(out: Path, result: ShardResult) -> list[dict]:
    if not result.skipped:
        return result.errors
    return json.loads(shard_paths(out / SHARD_DIR, result.index)[1].read_text())["errors"]


def _run_shards(chunks: list[list], out: str, config: BuildConfig, *, workers: int | None, scheduler: str | None):
    if scheduler:
        yield from _run_shards_dask(chunks, out, config, scheduler)
        return
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        for i, chunk in enumerate(chunks):
            yield build_shard(i, chunk, out, config)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(build_shard, i, chunk, out, config) for i, chunk in enumerate(chunks)]
        for future in as_completed(futures):
            yield future.result()


def _run_shards_dask(chunks: list[list], out: str, config: BuildConfig, scheduler: str):
    try:
        from dask.distributed import Client
        from dask.distributed import as_completed as dask_completed
    except ImportError:
        raise DatasetError(
            "a Dask scheduler was given but dask.distributed is not installed: pip install 'xtalsym[distributed]'"
        ) from None
    with Client(scheduler) as client:
        futures = [
            client.submit(build_shard, i, chunk, out, config, key=f"xtalsym-shard-{i}-{_token(out)}", pure=False)
            for i, chunk in enumerate(chunks)
        ]
        for future in dask_completed(futures):
            yield future.result()


def _token(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


# --------------------------------------------------------------------------- splits


def _check_split_fractions(fractions: dict[str, float]) -> None:
    if not fractions or any(not (0 <= f <= 1) for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"split fractions must be in [0, 1] and sum to 1, got {fractions}")


def split_of(material_id: str, fractions: dict[str, float], seed: int = 0) -> str:
    """Deterministic split of a material: a hash, so a material lands in one split only
    and every rebuild or resume puts it in the same one."""
    digest = hashlib.sha256(f"{seed}:{material_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in fractions.items():
        edge += fraction
        if u < edge:
            return name
    return list(fractions)[-1]


def write_splits(out: Path, config: BuildConfig) -> dict[str, str]:
    """Assign every material to a split and write splits.json. Random (pyxtal) crystals
    go to the training split only: they are not real materials to be tested on."""
    splits: dict[str, str] = {}
    for sample in iter_sample_metadata(out):
        mid = sample["material_id"]
        if sample["source"].startswith("pyxtal"):
            splits[mid] = "train"
        else:
            splits[mid] = split_of(mid, config.split_fractions, config.split_seed)
    payload = {
        "fractions": config.split_fractions,
        "seed": config.split_seed,
        "rule": "sha256(seed:material_id) -> split; pyxtal crystals -> train",
        "materials": splits,
    }
    _atomic_write_bytes(out / SPLITS_FILE, json.dumps(payload, indent=0).encode())
    return splits
