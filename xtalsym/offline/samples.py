"""One structure record -> labelled structure -> raw and shaped DPs -> model input.

Dataset building, evaluation and the reference index all turn records into samples; they
do it here, with one error policy: a record that cannot be read, labelled, simulated or
shaped becomes a :class:`SampleFailure` naming its source and the reason, an unexpected
exception is logged with its traceback and becomes a failure too, and the caller goes on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xtalsym import shaping
from xtalsym.offline import simulate, structures

log = logging.getLogger(__name__)

REPRESENTATIONS = ("shaped", "spot", "raw")


class SampleError(ValueError):
    """A model representation that no input can be made for."""


@dataclass(frozen=True)
class SampleFailure:
    source: str
    material_id: str | None
    reason: str

    def to_json(self) -> dict:
        return {"source": self.source, "material_id": self.material_id, "reason": self.reason}


@dataclass
class Sample:
    labelled: structures.LabelledStructure
    raws: np.ndarray  # (3, 256, 256) uint8, axes x, y, z
    shaped: np.ndarray  # (3, 224, 224, 3) uint8

    def model_input(self, representation: str = "shaped") -> np.ndarray:
        return model_input(self.raws, self.shaped, representation)


def material_seed(material_id: str) -> int:
    """A material's seed for its realism draws: the same in every run, split and tool (the fusion
    caches of fusion_data --misorientation-deg and the datasets of --misorientation-deg)."""
    return int(hashlib.sha256(f"fusion-realism:{material_id}".encode()).hexdigest()[:8], 16)


def simulate_patterns(labelled: structures.LabelledStructure, config: Any) -> dict[str, np.ndarray]:
    """Float patterns {axis: (N, N)} of the x, y, z zone axes as datasets are made, with ``config``'s
    geometry and scattering (a dataset BuildConfig); with its ``misorientation_deg`` σ > 0 each zone is
    turned by N(0, σ)° about a random axis, seeded by the material (data off the zone axes)."""
    sigma = float(getattr(config, "misorientation_deg", 0.0) or 0.0)
    realism = simulate.Realism(misorientation_deg=sigma, seed=material_seed(labelled.material_id)) if sigma else None
    return simulate.simulate_axes(
        labelled.structure,
        geometry=config.geometry,
        scattering=config.scattering,
        realism=realism,
        **simulate.DATASET_OPTIONS,
    )


def make_sample(labelled: structures.LabelledStructure, config: Any) -> tuple[np.ndarray, np.ndarray]:
    """Raw DPs (3, 256, 256) and shaped DPs (3, 224, 224, 3) of :func:`simulate_patterns`, shaped
    with ``config``'s shaping method."""
    patterns = simulate_patterns(labelled, config)
    raws = np.stack([simulate.to_raw_uint8(patterns[axis]) for axis in simulate.AXES])
    shaped = np.stack(
        [shaping.shape(raw, axis, method=config.shaping_method) for raw, axis in zip(raws, simulate.AXES)]
    )
    return raws, shaped


def model_input(raws: np.ndarray, shaped: np.ndarray, representation: str) -> np.ndarray:
    """One sample's network input from make_sample's raw (3,256,256) and shaped
    (3,224,224,3) arrays, laid out as DiffractionDataset gives it."""
    if representation == "shaped":
        return np.ascontiguousarray(shaped.transpose(0, 3, 1, 2))
    if representation == "spot":
        return np.ascontiguousarray(shaping.spot_descriptor(dict(zip(shaping.AXES, raws))).transpose(2, 0, 1))
    if representation == "raw":
        return np.ascontiguousarray(raws)
    raise SampleError(f"unknown model representation {representation!r}; known: {', '.join(REPRESENTATIONS)}")


def sample_from_record(
    record: structures.StructureRecord | structures.StructureError, config: Any
) -> Sample | SampleFailure:
    """The sample of one record, or why there is none (never raises for a bad record)."""
    if isinstance(record, structures.StructureError):
        return SampleFailure(record.source, None, record.reason)
    try:
        labelled = structures.label(record, symprec=config.symprec)
        raws, shaped = make_sample(labelled, config)
    except (structures.StructureError, simulate.SimulationError, shaping.ShapingError) as exc:
        return SampleFailure(record.source, record.material_id, getattr(exc, "reason", str(exc)))
    except Exception as exc:  # one bad structure never stops a batch
        log.exception("unexpected failure on %s", record.source)
        return SampleFailure(record.source, record.material_id, f"unexpected {type(exc).__name__}: {exc}")
    return Sample(labelled, raws, shaped)


def model_inputs(
    records: Iterable, config: Any, representation: str, *, bar=None
) -> tuple[list[np.ndarray], list[structures.LabelledStructure], list[dict]]:
    """(inputs, labelled structures, failures as dicts) for ``records``; ``bar`` (a
    progress reporter) is advanced once per record."""
    if representation not in REPRESENTATIONS:
        raise SampleError(f"unknown model representation {representation!r}; known: {', '.join(REPRESENTATIONS)}")
    inputs, labelled, failed = [], [], []
    for record in records:
        sample = sample_from_record(record, config)
        if isinstance(sample, SampleFailure):
            failed.append(sample.to_json())
        else:
            inputs.append(sample.model_input(representation))
            labelled.append(sample.labelled)
        if bar is not None:
            bar.update(1)
    return inputs, labelled, failed


def read_records(sources: Sequence) -> list:
    """Every record of the given CIF/structure files, folders and JSON-lines files."""
    from pathlib import Path

    records: list = []
    for source in sources:
        if not Path(source).exists():
            raise FileNotFoundError(f"structure source not found: {source}")
        records.extend(structures.iter_records(source))
    return records
