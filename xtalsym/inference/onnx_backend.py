"""ONNX Runtime backend: CPU execution provider; CUDA / TensorRT execution providers when installed.

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

from xtalsym.inference.base import BackendUnavailable, InferenceResult, check_batch, softmax

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
    ):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from exc
        if onnx_path is None or not Path(onnx_path).is_file():
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
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        used = self.session.get_providers()
        self.provider = used[0]
        if device != "cpu" and self.provider == "CPUExecutionProvider":
            raise BackendUnavailable(f"ONNX Runtime fell back to the CPU provider (asked for {providers[0]})")
        self.device = "cpu" if self.provider == "CPUExecutionProvider" else device
        self.precision = "fp16" if self.provider == "TensorrtExecutionProvider" and fp16 else "fp32"
        self.classes = list(classes)
        self.image_size = int(image_size)
        self._outputs = ["logits", "embeddings"]
        log.info("onnxruntime session on %s (%s)", self.provider, self.precision)

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
    def from_bundle(cls, bundle, **kwargs) -> OnnxRuntimeBackend:
        if bundle.onnx_path is None:
            raise BackendUnavailable(f"bundle {bundle.path} has no {bundle.path.name}/model.onnx")
        kwargs.setdefault("cache_dir", bundle.cache_dir if kwargs.get("device", "cpu") != "cpu" else None)
        return cls(bundle.onnx_path, bundle.classes, image_size=bundle.image_size, **kwargs)

    def run(self, x: np.ndarray, present: np.ndarray | None = None) -> InferenceResult:
        x, present = check_batch(x, present, self.image_size)
        logits, embeddings = self.session.run(self._outputs, {"x": x, "present": present})
        logits = logits.astype(np.float32, copy=False)
        return InferenceResult(
            probabilities=softmax(logits), logits=logits, embeddings=embeddings.astype(np.float32, copy=False)
        )

    def close(self) -> None:
        self.session = None

    def __repr__(self) -> str:
        return f"OnnxRuntimeBackend(provider={self.provider!r}, precision={self.precision!r})"
