"""The inference-backend contract: one Protocol, one result type, one 'not here' error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


class BackendUnavailable(RuntimeError):
    """The backend cannot run on this host (package not installed, no GPU, no ONNX graph, ...)."""


@dataclass(frozen=True)
class InferenceResult:
    probabilities: np.ndarray  # float32 (B, C): softmax of the summed logits of the present views
    logits: np.ndarray  # float32 (B, C)
    embeddings: np.ndarray  # float32 (B, 3, 960): per-view features, zero for absent views


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


__all__ = ["BackendUnavailable", "InferenceBackend", "InferenceResult", "check_batch", "softmax"]
