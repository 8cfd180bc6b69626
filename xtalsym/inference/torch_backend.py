"""PyTorch backend: CPU fp32; on CUDA fp16 + channels_last, optional CUDA graphs per batch size.

The CUDA paths (half precision, channels_last, CUDA graphs) are written against the
PyTorch 2.x API but cannot be exercised on the CPU-only development machine; the parity
tests run them wherever ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from xtalsym.inference.base import BackendUnavailable, InferenceResult, ViewResult, check_batch, check_views

log = logging.getLogger(__name__)


class TorchBackend:
    """Eager PyTorch inference on a model loaded weights-only from a bundle.

    ``precision`` defaults to fp32 on CPU and fp16 on CUDA. ``cuda_graph_batch_sizes``
    captures one CUDA graph per listed batch size (static input/output buffers, replayed
    when a batch has exactly that size; other sizes run eagerly). ``threads`` sets
    ``torch.set_num_threads`` (process-wide, so only when given).
    """

    name = "torch"

    def __init__(
        self,
        model,
        classes: list[int],
        *,
        image_size: int,
        device: str = "cpu",
        precision: str | None = None,
        channels_last: bool | None = None,
        cuda_graph_batch_sizes: Iterable[int] = (),
        threads: int | None = None,
    ):
        import torch

        self._torch = torch
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("torch has no CUDA device here (CPU build or no GPU)")
        if dev.type not in ("cpu", "cuda"):
            raise BackendUnavailable(f"torch backend supports cpu and cuda, not {device!r}")
        precision = precision or ("fp16" if dev.type == "cuda" else "fp32")
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
        if precision == "fp16" and dev.type == "cpu":
            raise ValueError("fp16 is for CUDA; the CPU backend runs fp32")
        if threads:
            torch.set_num_threads(int(threads))
        self.device = str(dev)
        self.precision = precision
        self.classes = list(classes)
        self.image_size = int(image_size)
        dtype = torch.float16 if precision == "fp16" else torch.float32
        model = model.eval().to(device=dev, dtype=dtype)
        self.channels_last = bool(dev.type == "cuda" if channels_last is None else channels_last)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # conv weights NHWC: tensor-core friendly
        self.model = model
        # MSDN's prediction is a sum over views: run_views can classify single views
        self.per_view = getattr(model, "name", "") == "msdn"
        self._graphs: dict[int, tuple] = {}
        sizes = sorted({int(b) for b in cuda_graph_batch_sizes})
        if sizes and dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        for batch in sizes:
            self._graphs[batch] = self._capture(batch)

    @classmethod
    def from_bundle(cls, bundle, **kwargs) -> TorchBackend:
        return cls(bundle.load_model(), bundle.classes, image_size=bundle.image_size, **kwargs)

    def _forward(self, x, present):
        out = self.model(x, present)
        return out.logits, out.embeddings

    def _capture(self, batch: int) -> tuple:
        """Warm up on a side stream, then capture one forward pass into a CUDA graph."""
        torch = self._torch
        dev = torch.device(self.device)
        static_x = torch.zeros((batch, 3, 3, self.image_size, self.image_size), dtype=torch.uint8, device=dev)
        static_present = torch.ones((batch, 3), dtype=torch.bool, device=dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):
                self._forward(static_x, static_present)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            static_logits, static_embeddings = self._forward(static_x, static_present)
        log.info("captured a CUDA graph for batch %d", batch)
        return graph, static_x, static_present, static_logits, static_embeddings

    def run(self, x: np.ndarray, present: np.ndarray | None = None) -> InferenceResult:
        torch = self._torch
        x, present = check_batch(x, present, self.image_size)
        tx, tp = torch.from_numpy(x), torch.from_numpy(present)
        with torch.inference_mode():
            graph = self._graphs.get(x.shape[0])
            if graph is not None:
                g, static_x, static_present, static_logits, static_embeddings = graph
                static_x.copy_(tx, non_blocking=True)
                static_present.copy_(tp, non_blocking=True)
                g.replay()
                logits, embeddings = static_logits, static_embeddings
            elif self.device == "cpu":
                # Denormal activations are ~2x slower on x86. The flush-to-zero mode belongs to
                # the calling thread: on for this forward only, so the caller's floats stay IEEE.
                torch.set_flush_denormal(True)
                try:
                    logits, embeddings = self._forward(tx, tp)
                finally:
                    torch.set_flush_denormal(False)
            else:
                tx, tp = tx.pin_memory().to(self.device, non_blocking=True), tp.to(self.device)
                logits, embeddings = self._forward(tx, tp)
            logits = logits.float()
            probabilities = torch.softmax(logits, dim=-1)  # in fp32 even for fp16 models
            return InferenceResult(
                probabilities=probabilities.cpu().numpy(),
                logits=logits.cpu().numpy(),
                embeddings=embeddings.float().cpu().numpy(),
            )

    def run_views(self, views: np.ndarray, axes: np.ndarray) -> ViewResult:
        """Per-view logits (the view's own head) and trunk embeddings; MSDN only."""
        if not self.per_view:
            raise RuntimeError(f"model {getattr(self.model, 'name', '?')!r} does not classify single views")
        torch = self._torch
        views, axes = check_views(views, axes, self.image_size)
        m = self.model
        with torch.inference_mode():
            tv = torch.from_numpy(views)
            if self.device != "cpu":
                tv = tv.pin_memory().to(self.device, non_blocking=True)
            flush = self.device == "cpu"
            if flush:
                torch.set_flush_denormal(True)  # as in run(): denormals are slow on x86
            try:
                embeddings = m.trunk(m._prepare(tv))
                every_head = torch.stack([head(embeddings) for head in m.heads], dim=1)
                index = torch.from_numpy(axes).to(every_head.device)
                logits = every_head[torch.arange(len(index), device=every_head.device), index]
            finally:
                if flush:
                    torch.set_flush_denormal(False)
            return ViewResult(logits=logits.float().cpu().numpy(), embeddings=embeddings.float().cpu().numpy())

    def close(self) -> None:
        self._graphs.clear()
        self.model = None
        if self.device != "cpu":
            self._torch.cuda.empty_cache()

    def __repr__(self) -> str:
        graphs = f", cuda_graphs={sorted(self._graphs)}" if self._graphs else ""
        return f"TorchBackend(device={self.device!r}, precision={self.precision!r}{graphs})"
