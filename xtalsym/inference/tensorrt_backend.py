"""Native TensorRT backend (TensorRT 10 Python API). UNTESTED on the development machine.

``import tensorrt`` fails where this was written (no GPU, no TensorRT): the code follows
the TensorRT 10 API (``Builder``, ``OnnxParser``, ``BuilderFlag.FP16``, optimisation
profile, timing cache, ``build_serialized_network``, ``Runtime.deserialize_cuda_engine``,
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``) with device buffers
held as torch CUDA tensors. The parity tests exercise it wherever TensorRT and a GPU are
present and skip it otherwise.

The engine is built from the bundle's ONNX graph with FP16 enabled and one optimisation
profile for batch 1..``max_batch`` (optimum ``opt_batch``), and cached in the bundle's
cache directory under a name keyed by the GPU name, compute capability, TensorRT version,
model_id and profile; a different GPU, TensorRT or model therefore finds no engine and
builds (and caches) a new one. The timing cache is kept beside it (per GPU and TensorRT
version) so rebuilds are fast.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from xtalsym.inference.base import BackendUnavailable, InferenceResult, check_batch

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed: pip install tensorrt-cu12 (TensorRT 10, matching your CUDA 12 driver), "
    "or use --backend onnxruntime / torch"
)


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(INSTALL_HINT) from exc
    return trt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def engine_key(*, gpu_name: str, capability: tuple[int, int], trt_version: str, model_id: str,
               max_batch: int, opt_batch: int, fp16: bool) -> str:
    """File stem of a cached engine: changes whenever anything the engine depends on changes."""
    return (
        f"msdn-{model_id[:16]}_{_slug(gpu_name)}_sm{capability[0]}{capability[1]}_trt{_slug(trt_version)}"
        f"_b1-{opt_batch}-{max_batch}_{'fp16' if fp16 else 'fp32'}"
    )


class TensorRTBackend:
    name = "tensorrt"

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        classes: list[int],
        *,
        image_size: int,
        model_id: str,
        cache_dir: str | os.PathLike,
        device: str = "cuda",
        max_batch: int = 64,
        opt_batch: int | None = None,
        fp16: bool = True,
        workspace_bytes: int = 2 << 30,
    ):
        trt = _import_tensorrt()
        try:
            import torch
        except ImportError as exc:  # buffers are torch CUDA tensors
            raise BackendUnavailable("the TensorRT backend needs torch with CUDA for its buffers") from exc
        if not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT needs a CUDA GPU; torch sees none")
        if onnx_path is None or not Path(onnx_path).is_file():
            raise BackendUnavailable(f"no ONNX graph ({onnx_path}) to build a TensorRT engine from")
        self._trt, self._torch = trt, torch
        self.device = device if device.startswith("cuda") else "cuda"
        self._dev = torch.device(self.device)
        torch.cuda.set_device(self._dev)
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.max_batch = int(max_batch)
        self.opt_batch = int(opt_batch or min(32, self.max_batch))
        self.precision = "fp16" if fp16 else "fp32"
        self._logger = trt.Logger(trt.Logger.WARNING)
        props = torch.cuda.get_device_properties(self._dev)
        key = engine_key(gpu_name=props.name, capability=(props.major, props.minor), trt_version=trt.__version__,
                         model_id=model_id, max_batch=self.max_batch, opt_batch=self.opt_batch, fp16=fp16)
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.engine_path = cache_dir / f"{key}.engine"
        timing_path = cache_dir / f"timing_{_slug(props.name)}_sm{props.major}{props.minor}_trt{_slug(trt.__version__)}.cache"
        runtime = trt.Runtime(self._logger)
        engine = None
        if self.engine_path.is_file():
            engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if engine is None:
                log.warning("cached engine %s does not deserialise; rebuilding", self.engine_path)
            else:
                log.info("TensorRT engine loaded from %s", self.engine_path)
        if engine is None:
            serialized = self._build(Path(onnx_path), timing_path, fp16=fp16, workspace_bytes=workspace_bytes)
            tmp = self.engine_path.with_name(self.engine_path.name + f".{os.getpid()}.tmp")
            tmp.write_bytes(serialized)
            os.replace(tmp, self.engine_path)
            self.engine_path.with_suffix(".json").write_text(json.dumps({
                "gpu": props.name, "compute_capability": [props.major, props.minor], "tensorrt": trt.__version__,
                "model_id": model_id, "batch": [1, self.opt_batch, self.max_batch], "fp16": fp16,
                "onnx": str(onnx_path)}, indent=1))
            engine = runtime.deserialize_cuda_engine(serialized)
            if engine is None:
                raise RuntimeError(f"TensorRT could not deserialise the engine it just built ({self.engine_path})")
        self.engine = engine
        self.context = engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self._dev)
        self._out_dtypes = {
            name: self._torch_dtype(engine.get_tensor_dtype(name)) for name in ("logits", "probabilities", "embeddings")
        }

    def _torch_dtype(self, trt_dtype):
        trt, torch = self._trt, self._torch
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.int64: torch.int64, trt.bool: torch.bool, trt.uint8: torch.uint8}
        return table[trt_dtype]

    def _build(self, onnx_path: Path, timing_path: Path, *, fp16: bool, workspace_bytes: int) -> bytes:
        trt = self._trt
        started = time.perf_counter()
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        s = self.image_size
        profile = builder.create_optimization_profile()
        profile.set_shape("x", (1, 3, 3, s, s), (self.opt_batch, 3, 3, s, s), (self.max_batch, 3, 3, s, s))
        profile.set_shape("present", (1, 3), (self.opt_batch, 3), (self.max_batch, 3))
        config.add_optimization_profile(profile)
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=True)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
        tmp = timing_path.with_name(timing_path.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, timing_path)
        log.info("built TensorRT engine (%s, batch 1..%d) in %.0f s", self.precision, self.max_batch,
                 time.perf_counter() - started)
        return bytes(serialized)

    @classmethod
    def from_bundle(cls, bundle, **kwargs) -> TensorRTBackend:
        _import_tensorrt()
        if bundle.onnx_path is None:
            raise BackendUnavailable(f"bundle {bundle.path} has no model.onnx to build an engine from")
        return cls(bundle.onnx_path, bundle.classes, image_size=bundle.image_size, model_id=bundle.model_id,
                   cache_dir=bundle.cache_dir / "tensorrt", **kwargs)

    def run(self, x: np.ndarray, present: np.ndarray | None = None) -> InferenceResult:
        torch = self._torch
        x, present = check_batch(x, present, self.image_size)
        if x.shape[0] > self.max_batch:  # the profile's upper bound: split
            parts = [self.run(x[i : i + self.max_batch], present[i : i + self.max_batch])
                     for i in range(0, x.shape[0], self.max_batch)]
            return InferenceResult(*(np.concatenate(arrays) for arrays in zip(
                *((p.probabilities, p.logits, p.embeddings) for p in parts))))
        with torch.cuda.stream(self._stream):
            tx = torch.from_numpy(x).pin_memory().to(self._dev, non_blocking=True)
            tp = torch.from_numpy(present).to(self._dev, non_blocking=True)
            ctx = self.context
            ctx.set_input_shape("x", tuple(tx.shape))
            ctx.set_input_shape("present", tuple(tp.shape))
            ctx.set_tensor_address("x", tx.data_ptr())
            ctx.set_tensor_address("present", tp.data_ptr())
            outputs = {}
            for name, dtype in self._out_dtypes.items():
                out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device=self._dev)
                ctx.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            logits = outputs["logits"].float()
            probabilities = torch.softmax(logits, dim=-1)  # fp32 softmax of the engine's logits
            result = InferenceResult(
                probabilities=probabilities.cpu().numpy(),
                logits=logits.cpu().numpy(),
                embeddings=outputs["embeddings"].float().cpu().numpy(),
            )
        self._stream.synchronize()
        return result

    def close(self) -> None:
        self.context = None
        self.engine = None

    def __repr__(self) -> str:
        return f"TensorRTBackend(engine={self.engine_path.name!r})"
