"""The offline half of the reference index's embeddings: what needs the simulator.

:mod:`xtalsym.index.embed` embeds stored shaped DPs through an inference backend; this
module adds the two things that need offline/: an :class:`~xtalsym.index.embed.Embedder`
from a training checkpoint, and structures simulated and shaped with the model's dataset
settings, then embedded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from xtalsym.checksums import sha256_file
from xtalsym.index.embed import Embedded, Embedder
from xtalsym.index.scoring import DIM, normalise_views, reference_entry
from xtalsym.offline import evaluate as ev
from xtalsym.offline import samples as sm
from xtalsym.offline import structures
from xtalsym.progress import progress as progress_bar


def embedder_from_checkpoint(path: str | os.PathLike, *, device: str = "cpu", batch_size: int = 32) -> Embedder:
    """The torch model of a training checkpoint, with the dataset settings it was trained on."""
    from xtalsym.bundle import verify_checkpoint

    verify_checkpoint(path)  # a model.pt inside a bundle only if the bundle verifies
    model, classes, extra = ev.load_model(path, device=device)
    return Embedder.from_model(
        model,
        classes,
        model_id=sha256_file(path),
        source=str(path),
        dataset_config=ev.build_config_from(extra).to_json(),
        device=device,
        batch_size=batch_size,
    )


def build_config(embedder: Embedder):
    """The BuildConfig the embedder's inputs are simulated and shaped with (defaults if unknown)."""
    return ev.build_config_from({"dataset_config": embedder.dataset_config})


def embed_structures(embedder: Embedder, sources: Sequence[str | os.PathLike], *, progress: bool = False) -> Embedded:
    """Read, label, simulate and shape structures with the model's settings, then embed them."""
    config = build_config(embedder)
    records = sm.read_records(sources)
    vecs, probs, entries, failed = [], [], [], []
    bar = progress_bar(total=len(records), unit="material", desc="simulate+embed", enabled=progress)
    for i in range(0, len(records), embedder.batch_size):
        chunk = records[i : i + embedder.batch_size]
        inputs, labelled, bad = sm.model_inputs(chunk, config, "shaped")
        failed += bad
        if inputs:
            e, p = embedder(np.stack(inputs))
            vecs.append(normalise_views(e))
            probs.append(np.asarray(p, dtype=np.float32))
            entries += [reference_entry(vars(item)) for item in labelled]
        bar.update(len(chunk))
    bar.close()
    return Embedded(
        np.concatenate(vecs) if vecs else np.zeros((0, DIM), np.float32),
        np.concatenate(probs) if probs else np.zeros((0, len(embedder.classes)), np.float32),
        entries,
        failed,
    )


def embed_structure(embedder: Embedder, structure) -> tuple[np.ndarray, np.ndarray, Any]:
    """One structure (path or LabelledStructure) -> ((1, 2880) vector, (1, C) probabilities, labelled)."""
    config = build_config(embedder)
    labelled = (
        structure
        if isinstance(structure, structures.LabelledStructure)
        else structures.load_structure(structure, symprec=config.symprec)
    )
    raws, shaped = sm.make_sample(labelled, config)
    e, p = embedder(sm.model_input(raws, shaped, "shaped")[None])
    return normalise_views(e), np.asarray(p, np.float32), labelled
