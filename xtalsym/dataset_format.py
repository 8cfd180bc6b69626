"""The on-disk layout of an xtalsym dataset and its reading side (no simulation needed).

Written by :mod:`xtalsym.offline.dataset` (which documents the layout); read here, below
offline/, so that int8 calibration (inference/quantise.py) and the reference index
(index/) can read stored shaped DPs without importing the offline toolchain.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
METADATA_FILE = "dataset.json"
SPLITS_FILE = "splits.json"
SHARD_DIR = "shards"


class DatasetError(ValueError):
    """A dataset directory that is missing, incomplete or built with other settings."""


def shard_paths(shard_dir: Path, index: int) -> tuple[Path, Path]:
    stem = shard_dir / f"shard-{index:06d}"
    return stem.with_suffix(".npz"), stem.with_suffix(".json")


def load_metadata(out: str | Path) -> dict:
    path = Path(out) / METADATA_FILE
    if not path.is_file():
        raise DatasetError(f"not an xtalsym dataset (no {METADATA_FILE}): {out}")
    return json.loads(path.read_text())


def iter_sample_metadata(out: str | Path) -> Iterable[dict]:
    """Metadata of every sample of every complete shard, with its shard and position."""
    shard_dir = Path(out) / SHARD_DIR
    for npz in sorted(shard_dir.glob("shard-*.npz")):
        index = int(npz.stem.split("-")[1])
        meta = json.loads(shard_paths(shard_dir, index)[1].read_text())
        for position, sample in enumerate(meta["samples"]):
            yield {**sample, "shard": index, "position": position}


def _default_max_open() -> int:
    """Archives kept open: reopening one re-parses its zip directory (~1.7 ms, more than
    inflating a sample), so keep as many as a quarter of the file-descriptor limit allows."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        soft = 1024
    return max(8, min(4096, soft // 4))


class ShardReader:
    """Reads single samples from shards, keeping up to ``max_open`` zip archives open."""

    def __init__(self, out: str | Path, max_open: int | None = None):
        self.shard_dir = Path(out) / SHARD_DIR
        self.max_open = max_open or _default_max_open()
        self._open: dict[int, zipfile.ZipFile] = {}

    def _archive(self, shard: int) -> zipfile.ZipFile:
        archive = self._open.get(shard)
        if archive is None:
            if len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open))).close()
            archive = zipfile.ZipFile(shard_paths(self.shard_dir, shard)[0])
            self._open[shard] = archive
        return archive

    def read(self, shard: int, position: int, kind: str) -> np.ndarray:
        """kind: 'raw' (3, 256, 256) or 'shaped' (3, 224, 224, 3), uint8."""
        with self._archive(shard).open(f"{kind}-{position}.npy") as member:
            return np.lib.format.read_array(io.BytesIO(member.read()), allow_pickle=False)

    def close(self) -> None:
        for archive in self._open.values():
            archive.close()
        self._open.clear()

    def __getstate__(self):  # DataLoader workers each open their own handles
        return {"shard_dir": self.shard_dir, "max_open": self.max_open, "_open": {}}


def load_splits(out: str | Path) -> dict[str, str]:
    path = Path(out) / SPLITS_FILE
    if not path.is_file():
        raise DatasetError(f"dataset has no {SPLITS_FILE} (build it with `xtalsym simulate dataset`): {out}")
    return json.loads(path.read_text())["materials"]
