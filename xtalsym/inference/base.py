"""The inference-backend contract: one Protocol, one result type, one 'not here' error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

EMBEDDING_DIM = 960  # per-view feature width of the exported graphs (xtalsym.model.EMBEDDING_DIM, without torch)


class BackendUnavailable(RuntimeError):
    """The backend cannot run on this host (package not installed, no GPU, no ONNX graph, ...)."""


@dataclass(frozen=True)
class InferenceResult:
    probabilities: np.ndarray  # float32 (B, C): softmax of the summed logits of the present views
    logits: np.ndarray  # float32 (B, C)
    embeddings: np.ndarray  # float32 (B, 3, 960): per-view features, zero for absent views


@dataclass(frozen=True)
class ViewResult:
    logits: np.ndarray  # float32 (N, C): each view's own head logits (its term of the sample's sum)
    embeddings: np.ndarray  # float32 (N, 960): each view's trunk features


@runtime_checkable
class InferenceBackend(Protocol):
    """Runs a bundle's model on batches of shaped DPs.

    ``run`` takes ``x`` uint8 (B, 3 axes, 3, H, W) with H = W = the bundle's image size,
    and ``present`` bool (B, 3) (None = every view present); an absent view's pixels are
    ignored. Outputs are float32 numpy arrays on the host whatever the backend's precision.
    """

    name: str  # "torch", "onnxruntime", "tensorrt"
    device: str  # "cpu", "cuda", "cuda:1", ...
    precision: str  # "fp32" or "fp16"
    classes: list[int]  # space group of each output column

    def run(self, x: np.ndarray, present: np.ndarray | None = None) -> InferenceResult: ...

    def close(self) -> None: ...


@runtime_checkable
class PerViewBackend(InferenceBackend, Protocol):
    """A backend that can also run single zone-axis views (MSDN: the prediction is the
    softmax of the sum of per-view logits). ``per_view`` is False when its model or graph
    cannot (then the caller uses :meth:`run`)."""

    per_view: bool

    def run_views(self, views: np.ndarray, axes: np.ndarray) -> ViewResult: ...


def supports_views(backend) -> bool:
    """Whether ``backend`` can classify single views (``run_views``)."""
    return bool(getattr(backend, "per_view", False)) and callable(getattr(backend, "run_views", None))


def check_views(views: np.ndarray, axes: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate one per-view batch: C-contiguous uint8 views (N, 3, S, S), int64 axes (N,) in 0..2."""
    views = np.asarray(views)
    if views.dtype != np.uint8:
        raise ValueError(f"views must be uint8, got {views.dtype}")
    if views.ndim != 4 or views.shape[1:] != (3, image_size, image_size) or views.shape[0] < 1:
        raise ValueError(f"views must have shape (N, 3, {image_size}, {image_size}), got {views.shape}")
    axes = np.asarray(axes)
    if axes.shape != (views.shape[0],) or not np.issubdtype(axes.dtype, np.integer):
        raise ValueError(f"axes must be {views.shape[0]} integers, got {axes.dtype} {axes.shape}")
    if axes.size and (axes.min() < 0 or axes.max() > 2):
        raise ValueError(f"axes must be 0 (x), 1 (y) or 2 (z), got values {sorted(set(axes.tolist()))}")
    return np.ascontiguousarray(views), np.ascontiguousarray(axes.astype(np.int64, copy=False))


def combine_views(view_logits: list[list[np.ndarray | None]], view_embeddings: list[list[np.ndarray | None]],
                  num_classes: int) -> InferenceResult:
    """Samples from per-view results: ``view_logits[i][v]`` is view v (x, y, z) of sample i,
    None when absent. Logits are summed in axis order x, y, z with the absent terms as
    zeros, as the whole graph sums its masked ``view_logits``; embeddings are zero for
    absent views. Same result as :meth:`InferenceBackend.run` within float rounding."""
    b = len(view_logits)
    logits = np.zeros((b, num_classes), np.float32)
    embeddings = np.zeros((b, 3, EMBEDDING_DIM), np.float32)
    for i, (terms, features) in enumerate(zip(view_logits, view_embeddings)):
        for v in range(3):
            if terms[v] is not None:
                logits[i] += terms[v]
                embeddings[i, v] = features[v]
    return InferenceResult(probabilities=softmax(logits), logits=logits, embeddings=embeddings)


def run_by_views(backend, x: np.ndarray, present: np.ndarray) -> InferenceResult:
    """:meth:`InferenceBackend.run` through ``backend.run_views``: only present views are computed."""
    rows = np.argwhere(present)  # (n, 2): sample, axis; row-major, so each sample's views in x, y, z order
    b = x.shape[0]
    terms: list[list] = [[None] * 3 for _ in range(b)]
    features: list[list] = [[None] * 3 for _ in range(b)]
    if rows.size:  # a sample without any view gets zero logits (uniform), as from the whole graph
        out = backend.run_views(x[rows[:, 0], rows[:, 1]], rows[:, 1])
        for k, (i, v) in enumerate(rows):
            terms[i][v], features[i][v] = out.logits[k], out.embeddings[k]
    return combine_views(terms, features, len(backend.classes))


def check_batch(x: np.ndarray, present: np.ndarray | None, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate and normalise one batch: C-contiguous uint8 x, bool present (all True if None)."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"x must be uint8, got {x.dtype}")
    if x.ndim != 5 or x.shape[1:] != (3, 3, image_size, image_size) or x.shape[0] < 1:
        raise ValueError(f"x must have shape (B, 3, 3, {image_size}, {image_size}), got {x.shape}")
    if present is None:
        present = np.ones((x.shape[0], 3), dtype=bool)
    present = np.asarray(present)
    if present.shape != (x.shape[0], 3):
        raise ValueError(f"present must have shape ({x.shape[0]}, 3), got {present.shape}")
    return np.ascontiguousarray(x), np.ascontiguousarray(present.astype(bool, copy=False))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)


__all__ = [
    "BackendUnavailable",
    "InferenceBackend",
    "InferenceResult",
    "PerViewBackend",
    "ViewResult",
    "check_batch",
    "check_views",
    "combine_views",
    "run_by_views",
    "softmax",
    "supports_views",
]
