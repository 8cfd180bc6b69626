"""Embeddings of materials for the reference index, through an inference backend.

:class:`Embedder` is ``embed(x uint8 (B,3,3,H,W), present bool (B,3)) -> (embeddings
(B,3,960) float32, probabilities (B,C))`` plus the identity of the model (``model_id`` =
sha256 of the weights file), its classes and dataset settings; built from a bundle (its
fastest :class:`~xtalsym.inference.InferenceBackend`) or a model in memory.
:func:`embed_dataset` turns stored dataset samples into normalised vectors. What needs the
simulator (structures -> vectors, an embedder from a training checkpoint) is offline/'s:
:mod:`xtalsym.offline.embed`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from xtalsym import dataset_format
from xtalsym.index.scoring import DIM, VIEWS, ReferenceIndexError, normalise_views, reference_entry

log = logging.getLogger(__name__)

EmbedFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Embedder:
    """``embed(x, present) -> (embeddings (B,3,960) float32, probabilities (B,C))`` and
    what identifies the model: ``model_id`` (sha256 of the weights file), its
    ``classes`` (space groups of the probability columns), ``dataset_config`` (the dataset
    settings its inputs must be simulated/shaped with, as dataset.json and a bundle's
    settings record them; None: the defaults) and ``source`` (a path, for messages)."""

    embed: EmbedFn
    classes: list[int]
    model_id: str | None
    source: str
    dataset_config: dict | None = None
    batch_size: int = 32

    def __call__(self, x: np.ndarray, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x)
        if present is None:
            present = np.ones((x.shape[0], VIEWS), dtype=bool)
        return self.embed(x, present)

    @classmethod
    def from_model(
        cls, model, classes, *, model_id, source, dataset_config=None, device="cpu", batch_size=32
    ) -> Embedder:
        """From a torch model in memory, run by the torch :class:`~xtalsym.inference.InferenceBackend`
        (the same forward pass and softmax the daemon's torch backend runs)."""
        from xtalsym import shaping
        from xtalsym.inference.torch_backend import TorchBackend

        if getattr(model, "views", 1) != VIEWS or getattr(model, "representation", "shaped") != "shaped":
            raise ReferenceIndexError(
                f"the reference index needs a three-stream shaped-DP model (msdn); {source} is {getattr(model, 'name', '?')}"
            )
        runner = TorchBackend(model, [int(c) for c in classes], image_size=shaping.MODEL_SIZE, device=device)
        return cls(_backend_embed(runner), [int(c) for c in classes], model_id, source, dataset_config, batch_size)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, backend: str = "auto", batch_size: int = 32) -> Embedder:
        """From a model bundle: embeds with the bundle's fastest backend (``auto``, see
        ``xtalsym.inference.select_backend``) and takes its classes, settings and model_id."""
        from xtalsym import bundle as bundle_module
        from xtalsym.inference import select_backend

        b = bundle_module.load_bundle(path)  # verifies the manifest (and the index against the model)
        runner = select_backend(b, backend)
        settings = getattr(b, "settings", None) or {}
        return cls(
            _backend_embed(runner),
            [int(c) for c in b.classes],
            b.model_id,
            str(path),
            settings.get("dataset_config"),
            batch_size,
        )


def _backend_embed(runner) -> EmbedFn:
    """The embed function of an inference backend: (per-view embeddings, probabilities)."""

    def embed(x: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = runner.run(np.ascontiguousarray(x, dtype=np.uint8), np.asarray(present, dtype=bool))
        return result.embeddings, result.probabilities

    return embed


# --------------------------------------------------------------------------- embedding data


@dataclass
class Embedded:
    vectors: np.ndarray  # (N, 2880) normalised
    probabilities: np.ndarray  # (N, C)
    entries: list[dict]
    failed: list[dict] = field(default_factory=list)


def _progress(total: int, desc: str, enabled: bool):
    from xtalsym.progress import progress

    return progress(total=total, unit="material", desc=desc, enabled=enabled)


def select_samples(
    root: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    space_groups: Iterable[int] | None = None,
    real_only: bool = False,
) -> list[dict]:
    """Sample metadata of a dataset, filtered by split(s), space groups and source."""
    samples = list(dataset_format.iter_sample_metadata(root))
    if splits:
        assigned = dataset_format.load_splits(root)
        samples = [s for s in samples if assigned.get(s["material_id"]) in set(splits)]
    if space_groups is not None:
        wanted = set(int(g) for g in space_groups)
        samples = [s for s in samples if int(s["space_group"]) in wanted]
    if real_only:
        samples = [s for s in samples if not str(s.get("source", "")).startswith("pyxtal")]
    return samples


def embed_dataset(
    embedder: Embedder, root: str | os.PathLike, samples: Sequence[dict], *, progress: bool = False
) -> Embedded:
    """Embed stored shaped DPs of ``samples`` (from :func:`select_samples`), in batches."""
    reader = dataset_format.ShardReader(root)
    vecs, probs = [], []
    bar = _progress(len(samples), "embed", progress)
    try:
        for i in range(0, len(samples), embedder.batch_size):
            chunk = samples[i : i + embedder.batch_size]
            x = np.stack([reader.read(s["shard"], s["position"], "shaped").transpose(0, 3, 1, 2) for s in chunk])
            e, p = embedder(np.ascontiguousarray(x))
            vecs.append(normalise_views(e))
            probs.append(np.asarray(p, dtype=np.float32))
            bar.update(len(chunk))
    finally:
        bar.close()
        reader.close()
    return Embedded(
        np.concatenate(vecs) if vecs else np.zeros((0, DIM), np.float32),
        np.concatenate(probs) if probs else np.zeros((0, len(embedder.classes)), np.float32),
        [reference_entry(s) for s in samples],
    )
