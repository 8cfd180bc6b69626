"""ONNX Runtime backend: CPU execution provider; CUDA / TensorRT execution providers when installed.

A bundle with the per-view graph (``model_view.onnx``) gets a second session for it:
``run_views`` classifies single zone-axis views (``per_view`` is True), which the daemon
uses to put each view through the network once. With ``precision="int8"`` (CPU only) the
backend runs the statically quantised per-view graph (``model_view_int8.onnx``) for both
``run_views`` and ``run`` (the sum of the present views' rows). ``precision="auto"``
takes int8 on the CPU when the bundle carries it and the CPU has u8×s8 dot products
(VNNI / AMX: :mod:`xtalsym.inference.cpu_flags`), fp32 otherwise.

Provider choice follows ``onnxruntime.get_available_providers()``: ``device="cpu"`` uses
the CPU EP; ``device="cuda"`` uses the TensorRT EP (fp16, engine cache in the bundle's
cache directory) if present, else the CUDA EP, with the CPU EP as ORT's fallback for
unsupported nodes. Only the CPU EP is installed on the development machine; the GPU
providers are configured from the ONNX Runtime documentation and untested here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from xtalsym.inference.base import (
    BackendUnavailable,
    InferenceResult,
    ViewResult,
    check_batch,
    check_views,
    run_by_views,
    softmax,
)

log = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        classes: list[int],
        *,
        image_size: int,
        device: str = "cpu",
        provider: str | None = None,
        intra_op_threads: int | None = None,
        allow_spinning: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        fp16: bool = True,
        view_onnx_path: str | os.PathLike | None = None,
        int8: bool = False,
    ):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from exc
        if int8 and device != "cpu":
            raise BackendUnavailable("the int8 graph runs on the CPU only (GPUs use fp16)")
        if int8 and view_onnx_path is None:
            raise BackendUnavailable("int8 needs the quantised per-view graph (model_view_int8.onnx)")
        whole = None if int8 else onnx_path  # int8: everything through the quantised per-view graph
        for path in (whole, view_onnx_path):
            if path is not None and not Path(path).is_file():
                raise BackendUnavailable(f"no ONNX graph ({path}); build the bundle with ONNX export")
        if whole is None and view_onnx_path is None:
            raise BackendUnavailable(f"no ONNX graph ({onnx_path}); build the bundle with ONNX export")
        available = ort.get_available_providers()
        providers = self._providers(device, provider, available, cache_dir, fp16)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
        if allow_spinning is not None:
            # ORT's pool threads busy-wait after each run by default: fine on dedicated cores,
            # but beside the daemon's shaping workers it burns the cores they need.
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        self.session = None if whole is None else ort.InferenceSession(str(whole), options, providers=providers)
        self.view_session = (None if view_onnx_path is None
                             else ort.InferenceSession(str(view_onnx_path), options, providers=providers))
        used = (self.session or self.view_session).get_providers()
        self.provider = used[0]
        if device != "cpu" and self.provider == "CPUExecutionProvider":
            raise BackendUnavailable(f"ONNX Runtime fell back to the CPU provider (asked for {providers[0]})")
        self.device = "cpu" if self.provider == "CPUExecutionProvider" else device
        self.precision = "int8" if int8 else "fp16" if self.provider == "TensorrtExecutionProvider" and fp16 else "fp32"
        self.per_view = self.view_session is not None
        self.classes = list(classes)
        self.image_size = int(image_size)
        self._outputs = ["logits", "embeddings"]
        log.info("onnxruntime session on %s (%s%s)", self.provider, self.precision,
                 ", per-view graph" if self.per_view else "")

    @staticmethod
    def _providers(device: str, provider: str | None, available: list[str], cache_dir, fp16: bool) -> list:
        if device == "cpu" and provider in (None, "CPUExecutionProvider"):
            return ["CPUExecutionProvider"]
        if device == "cpu":
            raise ValueError(f"provider {provider} is not a CPU provider")
        wanted = [provider] if provider else ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        chosen = [p for p in wanted if p in available]
        if not chosen:
            raise BackendUnavailable(
                f"ONNX Runtime has none of {wanted} (available: {available}); "
                "pip install onnxruntime-gpu for CUDA / TensorRT execution providers"
            )
        device_id = int(device.split(":")[1]) if ":" in device else 0
        providers: list = []
        for p in chosen:
            if p == "TensorrtExecutionProvider":
                opts = {"device_id": device_id, "trt_fp16_enable": bool(fp16)}
                if cache_dir is not None:
                    opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(Path(cache_dir) / "ort_trt"),
                                trt_timing_cache_enable=True)
                providers.append((p, opts))
            elif p == "CUDAExecutionProvider":
                providers.append((p, {"device_id": device_id}))
        return [providers[0], "CPUExecutionProvider"]

    @classmethod
    def from_bundle(cls, bundle, *, precision: str = "auto", **kwargs) -> OnnxRuntimeBackend:
        """``precision``: "auto" (int8 on the CPU when the bundle carries the quantised graph
        and the CPU has VNNI / AMX, :func:`xtalsym.inference.cpu_flags.int8_pays`; else fp32;
        fp16 with the TensorRT EP), "fp32", or "int8" (CPU; refused without it)."""
        if precision not in ("auto", "fp32", "int8"):
            raise ValueError(f"onnxruntime precision must be auto, fp32 or int8, got {precision!r}")
        device = kwargs.get("device", "cpu")
        int8_path = getattr(bundle, "int8_onnx_path", None)
        if precision == "int8" and int8_path is None:
            raise BackendUnavailable(f"bundle {bundle.path} has no int8 graph (build it with --int8-calibration)")
        int8 = device == "cpu" and int8_path is not None and precision in ("auto", "int8")
        if int8 and precision == "auto":  # only where it is faster: CPUs with u8×s8 dot products
            from xtalsym.inference.cpu_flags import int8_pays

            int8, why = int8_pays()
            # DEBUG: a command's output stays one line; the daemon's start line names the precision
            log.debug("bundle has an int8 graph; precision auto -> %s (%s)", "int8" if int8 else "fp32", why)
        if precision == "int8" and device != "cpu":
            raise BackendUnavailable("the int8 graph runs on the CPU only")
        if not int8 and bundle.onnx_path is None:
            raise BackendUnavailable(f"bundle {bundle.path} has no {bundle.path.name}/model.onnx")
        kwargs.setdefault("cache_dir", bundle.cache_dir if device != "cpu" else None)
        view_path = int8_path if int8 else getattr(bundle, "view_onnx_path", None)
        return cls(bundle.onnx_path, bundle.classes, image_size=bundle.image_size, view_onnx_path=view_path,
                   int8=int8, **kwargs)

    def run_views(self, views: np.ndarray, axes: np.ndarray) -> ViewResult:
        """Per-view logits and embeddings of single zone-axis views (axis 0 = x, 1 = y, 2 = z)."""
        if self.view_session is None:
            raise RuntimeError("this bundle has no per-view graph (model_view.onnx)")
        views, axes = check_views(views, axes, self.image_size)
        logits, embeddings = self.view_session.run(["view_logits", "view_embeddings"], {"view": views, "axis": axes})
        return ViewResult(logits=logits.astype(np.float32, copy=False),
                          embeddings=embeddings.astype(np.float32, copy=False))

    def run(self, x: np.ndarray, present: np.ndarray | None = None) -> InferenceResult:
        x, present = check_batch(x, present, self.image_size)
        if self.session is None:  # int8: the quantised per-view graph on the present views only
            return run_by_views(self, x, present)
        logits, embeddings = self.session.run(self._outputs, {"x": x, "present": present})
        logits = logits.astype(np.float32, copy=False)
        return InferenceResult(
            probabilities=softmax(logits), logits=logits, embeddings=embeddings.astype(np.float32, copy=False)
        )

    def close(self) -> None:
        self.session = None
        self.view_session = None

    def __repr__(self) -> str:
        return (f"OnnxRuntimeBackend(provider={self.provider!r}, precision={self.precision!r}, "
                f"per_view={self.per_view})")
