"""Inference backends behind one Protocol (:class:`InferenceBackend`) and ``select_backend``.

Backends: ``torch`` (CPU fp32; CUDA fp16 + channels_last + optional CUDA graphs),
``onnxruntime`` (CPU EP; CUDA / TensorRT EPs when onnxruntime-gpu is installed) and
``tensorrt`` (native engine, FP16). Heavy packages are imported only when a backend is made.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from typing import Any

from xtalsym.inference.base import (
    BackendUnavailable,
    InferenceBackend,
    InferenceResult,
    PerViewBackend,
    ViewResult,
    check_batch,
    combine_views,
    softmax,
    supports_views,
)

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
# "auto": int8 on the CPU when the bundle carries the quantised per-view graph (ONNX Runtime)
# and the CPU has VNNI / AMX (cpu_flags.int8_pays: without them int8 was not faster), fp16 on GPUs, fp32 otherwise; "fp32" keeps the CPU at full precision; "int8" insists on it.
PRECISIONS = ("auto", "fp32", "int8")

# (backend, device) in the order `auto` tries them. GPU first: native TensorRT, then the
# TensorRT/CUDA execution providers of ONNX Runtime, then torch fp16 on CUDA. On CPU,
# ONNX Runtime goes before torch: benchmarks/inference.py on the development machine
# (msdn at input 64 from 224 shaped DPs, 1 thread, shared with a training job) measured
# ORT ahead of eager torch at every batch size (see docs/BUNDLE.md for the table).
AUTO_ORDER = (
    ("tensorrt", "cuda"),
    ("onnxruntime", "cuda"),
    ("torch", "cuda"),
    ("onnxruntime", "cpu"),
    ("torch", "cpu"),
)


def make_backend(bundle, name: str, *, device: str = "cpu", precision: str = "auto", **options: Any) -> InferenceBackend:
    """One named backend for ``bundle`` on ``device``; raises BackendUnavailable when it cannot run here.

    ``precision`` (:data:`PRECISIONS`) concerns the CPU: only onnxruntime runs int8 (the
    bundle's ``model_view_int8.onnx``). ``options`` go to the backend's constructor (e.g.
    ``intra_op_threads`` for onnxruntime, ``threads`` / ``cuda_graph_batch_sizes`` for torch,
    ``max_batch`` for tensorrt).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "int8" and name != "onnxruntime":
        raise BackendUnavailable(f"int8 runs on onnxruntime (CPU) only, not {name}")
    if name == "torch":
        if importlib.util.find_spec("torch") is None:
            raise BackendUnavailable("torch is not installed (pip install 'xtalsym[ml]')")
        from xtalsym.inference.torch_backend import TorchBackend

        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise BackendUnavailable("torch sees no CUDA device")
        return TorchBackend.from_bundle(bundle, device=device, **options)
    if name == "onnxruntime":
        from xtalsym.inference.onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend.from_bundle(bundle, device=device, precision=precision, **options)
    if name == "tensorrt":
        from xtalsym.inference.tensorrt_backend import TensorRTBackend

        if device == "cpu":
            raise BackendUnavailable("TensorRT runs on CUDA devices only")
        return TensorRTBackend.from_bundle(bundle, device=device, **options)
    raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(BACKENDS)}")


def cpu_options(name: str, threads: int) -> dict:
    """Constructor options that give backend ``name`` ``threads`` CPU threads and no busy-waiting."""
    if name == "onnxruntime":
        return {"intra_op_threads": threads, "allow_spinning": False}
    if name == "torch":
        return {"threads": threads}
    return {}


def select_backend(
    bundle, name: str = "auto", *, device: str = "auto", cpu_threads: int | None = None, precision: str = "auto",
    **options: Any
) -> InferenceBackend:
    """The backend ``name`` on ``device``, or with ``name="auto"`` the first that works of
    :data:`AUTO_ORDER` (restricted to ``device`` unless it is "auto"). Each skipped
    candidate is logged with its reason, the choice at INFO. ``options`` apply only to a
    named backend (``auto`` uses each backend's defaults); ``cpu_threads`` applies to
    whichever backend runs on the CPU (:func:`cpu_options`); ``precision`` to every
    candidate (:func:`make_backend`: with "auto", ONNX Runtime on a CPU host runs the
    bundle's int8 graph when it has one).
    """
    if name != "auto":
        dev = device
        if dev == "auto":
            dev = "cpu" if name != "tensorrt" else "cuda"
            if name != "tensorrt" and _cuda_available():
                dev = "cuda"
        if cpu_threads and dev == "cpu":
            options = {**cpu_options(name, cpu_threads), **options}
        backend = make_backend(bundle, name, device=dev, precision=precision, **options)
        log.info("inference backend: %r (asked for %s on %s)", backend, name, dev)
        return backend
    skipped = []
    for candidate, dev in AUTO_ORDER:
        if device != "auto" and not (dev == device or (dev == "cuda" and device.startswith("cuda"))):
            continue
        dev = device if device != "auto" else dev
        try:
            extra = cpu_options(candidate, cpu_threads) if cpu_threads and dev == "cpu" else {}
            backend = make_backend(bundle, candidate, device=dev, precision=precision, **extra)
        except BackendUnavailable as exc:
            skipped.append(f"{candidate} on {dev} skipped: {exc}")
            continue
        # The skipped candidates carry install hints (TensorRT, onnxruntime-gpu): worth
        # reading on a GPU host, noise on a CPU one, where they go to one DEBUG line.
        log.log(logging.INFO if _gpu_present() else logging.DEBUG, "auto backend: %s",
                "; ".join(skipped) or "nothing skipped")
        log.info("inference backend: %r (auto)", backend)
        return backend
    raise BackendUnavailable("no inference backend works here: " + "; ".join(skipped))


def _gpu_present() -> bool:
    """An NVIDIA GPU on this host (its device node or driver tool), without importing torch."""
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "PRECISIONS",
    "BackendUnavailable",
    "InferenceBackend",
    "InferenceResult",
    "PerViewBackend",
    "ViewResult",
    "check_batch",
    "combine_views",
    "cpu_options",
    "make_backend",
    "select_backend",
    "softmax",
    "supports_views",
]
