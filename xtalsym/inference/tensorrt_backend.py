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
version) so rebuilds are fast. With the bundle's per-view graph (``model_view.onnx``) a
second engine (``…_view`` in its name, profile 1..3 × ``max_batch`` views) serves
``run_views``, so the daemon runs each view once on the GPU too; a per-view engine that
fails to build leaves the backend on the whole graph (``per_view`` False, logged).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from xtalsym.inference.base import BackendUnavailable, InferenceResult, ViewResult, check_batch, check_views

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
    OUTPUTS = ("logits", "probabilities", "embeddings")
    VIEW_OUTPUTS = ("view_logits", "view_embeddings")

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
        view_onnx_path: str | os.PathLike | None = None,
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
        self._timing_path = cache_dir / f"timing_{_slug(props.name)}_sm{props.major}{props.minor}_trt{_slug(trt.__version__)}.cache"
        self._runtime = trt.Runtime(self._logger)
        self._fp16, self._workspace = fp16, int(workspace_bytes)
        self._meta = {"gpu": props.name, "compute_capability": [props.major, props.minor], "tensorrt": trt.__version__,
                      "model_id": model_id, "fp16": fp16}
        s, b, o = self.image_size, self.max_batch, self.opt_batch
        self.engine = self._engine(Path(onnx_path), self.engine_path, {
            "x": ((1, 3, 3, s, s), (o, 3, 3, s, s), (b, 3, 3, s, s)),
            "present": ((1, 3), (o, 3), (b, 3))})
        self.context = self.engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self._dev)
        self._out_dtypes = {name: self._torch_dtype(self.engine.get_tensor_dtype(name)) for name in self.OUTPUTS}
        self.view_engine = self.view_context = None
        self.view_engine_path = cache_dir / f"{key}_view.engine"
        if view_onnx_path is not None and Path(view_onnx_path).is_file():
            try:  # a sample's three views fit one call at max_batch samples
                self.view_engine = self._engine(Path(view_onnx_path), self.view_engine_path, {
                    "view": ((1, 3, s, s), (o, 3, s, s), (3 * b, 3, s, s)), "axis": ((1,), (o,), (3 * b,))})
                self.view_context = self.view_engine.create_execution_context()
                self._view_dtypes = {name: self._torch_dtype(self.view_engine.get_tensor_dtype(name))
                                     for name in self.VIEW_OUTPUTS}
                self._axis_int32 = self.view_engine.get_tensor_dtype("axis") == trt.int32
            except Exception as exc:  # noqa: BLE001 - the whole graph still serves
                log.warning("TensorRT per-view engine from %s not available (%s: %s); running the whole graph",
                            view_onnx_path, type(exc).__name__, exc)
                self.view_engine = self.view_context = None
        self.per_view = self.view_context is not None

    def _engine(self, onnx_path: Path, engine_path: Path, shapes: dict):
        """The cached engine at ``engine_path``, else one built from ``onnx_path`` (and cached)."""
        engine = None
        if engine_path.is_file():
            engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if engine is None:
                log.warning("cached engine %s does not deserialise; rebuilding", engine_path)
            else:
                log.info("TensorRT engine loaded from %s", engine_path)
        if engine is None:
            serialized = self._build(onnx_path, shapes)
            tmp = engine_path.with_name(engine_path.name + f".{os.getpid()}.tmp")
            tmp.write_bytes(serialized)
            os.replace(tmp, engine_path)
            engine_path.with_suffix(".json").write_text(json.dumps({
                **self._meta, "profile": {k: [list(v) for v in dims] for k, dims in shapes.items()},
                "onnx": str(onnx_path)}, indent=1))
            engine = self._runtime.deserialize_cuda_engine(serialized)
            if engine is None:
                raise RuntimeError(f"TensorRT could not deserialise the engine it just built ({engine_path})")
        return engine

    def _torch_dtype(self, trt_dtype):
        trt, torch = self._trt, self._torch
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.int64: torch.int64, trt.bool: torch.bool, trt.uint8: torch.uint8}
        return table[trt_dtype]

    def _build(self, onnx_path: Path, shapes: dict) -> bytes:
        trt = self._trt
        started = time.perf_counter()
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self._workspace)
        if self._fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        timing_path = self._timing_path
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=True)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
        tmp = timing_path.with_name(timing_path.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, timing_path)
        log.info("built TensorRT engine from %s (%s) in %.0f s", onnx_path.name, self.precision,
                 time.perf_counter() - started)
        return bytes(serialized)

    @classmethod
    def from_bundle(cls, bundle, **kwargs) -> TensorRTBackend:
        _import_tensorrt()
        if bundle.onnx_path is None:
            raise BackendUnavailable(f"bundle {bundle.path} has no model.onnx to build an engine from")
        kwargs.setdefault("view_onnx_path", getattr(bundle, "view_onnx_path", None))
        return cls(bundle.onnx_path, bundle.classes, image_size=bundle.image_size, model_id=bundle.model_id,
                   cache_dir=bundle.cache_dir / "tensorrt", **kwargs)

    def _execute(self, context, inputs: dict, out_dtypes: dict) -> dict:
        """Copy ``inputs`` (numpy) to the GPU, run ``context``, return the outputs as float32 torch tensors."""
        torch = self._torch
        with torch.cuda.stream(self._stream):
            outputs = {}
            held = []
            for name, array in inputs.items():
                t = torch.from_numpy(array)
                t = (t.pin_memory() if t.dtype == torch.uint8 else t).to(self._dev, non_blocking=True)
                held.append(t)
                context.set_input_shape(name, tuple(t.shape))
                context.set_tensor_address(name, t.data_ptr())
            for name, dtype in out_dtypes.items():
                out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=self._dev)
                context.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            result = {name: out.float() for name, out in outputs.items()}
        self._stream.synchronize()
        return result

    def run(self, x: np.ndarray, present: np.ndarray | None = None) -> InferenceResult:
        torch = self._torch
        x, present = check_batch(x, present, self.image_size)
        if x.shape[0] > self.max_batch:  # the profile's upper bound: split
            parts = [self.run(x[i : i + self.max_batch], present[i : i + self.max_batch])
                     for i in range(0, x.shape[0], self.max_batch)]
            return InferenceResult(*(np.concatenate(arrays) for arrays in zip(
                *((p.probabilities, p.logits, p.embeddings) for p in parts))))
        out = self._execute(self.context, {"x": x, "present": present}, self._out_dtypes)
        logits = out["logits"]
        probabilities = torch.softmax(logits, dim=-1)  # fp32 softmax of the engine's logits
        return InferenceResult(probabilities=probabilities.cpu().numpy(), logits=logits.cpu().numpy(),
                               embeddings=out["embeddings"].cpu().numpy())

    def run_views(self, views: np.ndarray, axes: np.ndarray) -> ViewResult:
        """Per-view logits and embeddings through the per-view engine."""
        if self.view_context is None:
            raise RuntimeError("no per-view TensorRT engine (the bundle has no model_view.onnx)")
        views, axes = check_views(views, axes, self.image_size)
        if self._axis_int32:  # the parser may have kept the ONNX int64 input or made it int32
            axes = axes.astype(np.int32)
        limit = 3 * self.max_batch
        if views.shape[0] > limit:
            parts = [self.run_views(views[i : i + limit], axes[i : i + limit]) for i in range(0, len(views), limit)]
            return ViewResult(logits=np.concatenate([p.logits for p in parts]),
                              embeddings=np.concatenate([p.embeddings for p in parts]))
        out = self._execute(self.view_context, {"view": views, "axis": axes}, self._view_dtypes)
        return ViewResult(logits=out["view_logits"].cpu().numpy(), embeddings=out["view_embeddings"].cpu().numpy())

    def close(self) -> None:
        self.context = self.view_context = None
        self.engine = self.view_engine = None

    def __repr__(self) -> str:
        return f"TensorRTBackend(engine={self.engine_path.name!r}, per_view={self.per_view})"
