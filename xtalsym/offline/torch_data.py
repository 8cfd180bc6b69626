"""PyTorch view of an xtalsym dataset: one item per material, split by material."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xtalsym import shaping
from xtalsym.offline import dataset as ds

try:
    import torch
    from torch.utils.data import Dataset
except ImportError as exc:  # torch is the `ml` extra
    raise ImportError(
        "xtalsym's PyTorch dataset needs torch: pip install torch==2.13.0 (CPU) or a CUDA build, "
        "then pip install 'xtalsym[ml]'"
    ) from exc

REPRESENTATIONS = ("shaped", "raw", "spot")


class DiffractionDataset(Dataset):
    """Samples of one split of a dataset directory.

    Each item is ``(x, label)``: ``x`` a uint8 tensor — ``shaped``: (3 axes, 3, 224, 224)
    channels-first; ``raw``: (3 axes, 256, 256); ``spot``: (3, 224, 224), the Ziletti
    et al. spot DP of the three axes — and ``label`` the index of the material's space
    group in ``classes``. Samples whose space group is not in ``classes`` are left out
    (and counted in ``excluded``), so a model is trained on a fixed label set.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train",
        *,
        representation: str = "shaped",
        classes: Sequence[int] | None = None,
    ):
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
        self.root = Path(root)
        self.metadata = ds.load_metadata(self.root)
        self.representation = representation
        samples = list(ds.iter_sample_metadata(self.root))
        if split is not None:
            splits = ds.load_splits(self.root)
            known = set(splits.values())
            if split not in known:
                raise ValueError(f"split {split!r} not in this dataset (it has {sorted(known)})")
            samples = [s for s in samples if splits.get(s["material_id"]) == split]
        self.classes = sorted({s["space_group"] for s in samples}) if classes is None else list(classes)
        index = {sg: i for i, sg in enumerate(self.classes)}
        self.samples = [s for s in samples if s["space_group"] in index]
        self.excluded = len(samples) - len(self.samples)
        self.labels = np.array([index[s["space_group"]] for s in self.samples], dtype=np.int64)
        self._reader = ds.ShardReader(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        sample = self.samples[i]
        if self.representation == "shaped":
            array = self._reader.read(sample["shard"], sample["position"], "shaped").transpose(0, 3, 1, 2)
        else:
            raws = self._reader.read(sample["shard"], sample["position"], "raw")
            if self.representation == "raw":
                array = raws
            else:
                spot = shaping.spot_descriptor(dict(zip(shaping.AXES, raws)))
                array = spot.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(array)), int(self.labels[i])

    def class_counts(self) -> np.ndarray:
        """Samples per class, e.g. for inverse-frequency weights against class imbalance."""
        return np.bincount(self.labels, minlength=len(self.classes))


class JoinedDataset(Dataset):
    """Several :class:`DiffractionDataset` s of one label set as one, in order: e.g. the same
    materials simulated on the zone axes and off them (``simulate dataset --misorientation-deg``),
    so a model trains on both. ``labels``, ``class_counts`` and ``excluded`` are those of the
    union; every part must have the same ``classes`` and representation."""

    def __init__(self, parts: Sequence[DiffractionDataset]):
        if not parts:
            raise ValueError("JoinedDataset needs at least one dataset")
        first = parts[0]
        for part in parts[1:]:
            if list(part.classes) != list(first.classes):
                raise ValueError(f"{part.root} has other classes than {first.root}")
            if part.representation != first.representation:
                raise ValueError(f"{part.root} gives {part.representation!r}, {first.root} {first.representation!r}")
        self.parts = list(parts)
        self.classes = list(first.classes)
        self.representation = first.representation
        self.labels = np.concatenate([part.labels for part in self.parts])
        self.excluded = sum(part.excluded for part in self.parts)
        self._starts = np.cumsum([0] + [len(part) for part in self.parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k][i - int(self._starts[k])]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))


def open_datasets(roots: Sequence[str | Path], split: str, *, representation: str = "shaped",
                  classes: Sequence[int] | None = None) -> DiffractionDataset | JoinedDataset:
    """``split`` of the first dataset directory, joined with that split of every further one
    (which then take the first's classes)."""
    first = DiffractionDataset(roots[0], split, representation=representation, classes=classes)
    if len(roots) == 1:
        return first
    rest = [DiffractionDataset(root, split, representation=representation, classes=first.classes) for root in roots[1:]]
    return JoinedDataset([first, *rest])
