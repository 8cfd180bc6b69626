"""ONNX export of a model (MSDN) with a dynamic batch and a per-view mask.

The exported graph takes ``x`` uint8 (B, 3, 3, H, W) — the three zone-axis shaped DPs,
channels first, H×W fixed at export time (224, the shaped-DP size, by default) — and
``present`` bool (B, 3). One graph serves one, two or three views: an absent view is
masked out of the logits and its embedding is zero (its pixels may be anything). The
outputs are ``logits`` (B, C, the sum over present views), ``probabilities`` (softmax of
``logits``) and ``embeddings`` (B, 3, 960, zero for absent views).

Why a wrapper: the model resizes a 224 input to its ``input_size`` with
``adaptive_max_pool2d``. Neither ONNX exporter handles that op when the ratio is not an
integer (224 → 64 is 3.5): the TorchScript exporter refuses ("input size not
accessible"), the dynamo exporter fails at conversion. :class:`AdaptiveMaxPool2dExport`
computes exactly the same pooling (same windows, bit-identical result) as two gathers and
two max-reductions — max over a rectangle is separable — or, when the windows tile the
image (224 → 112), one reshape and one max, which every exporter and ONNX runtime handle;
the wrapper applies it to the uint8 image, then casts (:func:`pool_then_cast`), and the
model then sees its own input size and skips its pooling.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from xtalsym.model import _unwrap

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224
DEFAULT_OPSET = 18
INPUT_NAMES = ("x", "present")
OUTPUT_NAMES = ("logits", "probabilities", "embeddings")
# the per-view graph (model_view.onnx): one zone-axis view per row, in any order
VIEW_INPUT_NAMES = ("view", "axis")
VIEW_OUTPUT_NAMES = ("view_logits", "view_embeddings")
GRAPHS = ("whole", "view")


def _window_indices(size_in: int, size_out: int) -> Tensor:
    """(size_out, k) input indices of each adaptive-pooling window, padded by repeating its last index.

    Window i is [floor(i·n/o), ceil((i+1)·n/o)), as in PyTorch's adaptive pooling.
    """
    starts = [(i * size_in) // size_out for i in range(size_out)]
    ends = [-((-(i + 1) * size_in) // size_out) for i in range(size_out)]
    k = max(e - s for s, e in zip(starts, ends))
    rows = [[min(s + j, e - 1) for j in range(k)] for s, e in zip(starts, ends)]
    return torch.tensor(rows, dtype=torch.long)


class AdaptiveMaxPool2dExport(nn.Module):
    """``F.adaptive_max_pool2d(x, size)`` for a fixed input size, as gather + max (exportable)."""

    def __init__(self, size_in: tuple[int, int], size_out: tuple[int, int]):
        super().__init__()
        self.size_in = tuple(size_in)
        self.size_out = tuple(size_out)
        self.register_buffer("rows", _window_indices(size_in[0], size_out[0]).flatten(), persistent=False)
        self.register_buffer("cols", _window_indices(size_in[1], size_out[1]).flatten(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x (..., H, W)
        ho, wo = self.size_out
        (hi, wi) = self.size_in
        if hi % ho == 0 and wi % wo == 0:
            # whole windows (224 -> 112): a reshape and one max, no gathers (they copied the
            # image twice and cost more than a third of the pooling's time in ONNX Runtime)
            return x.unflatten(-1, (wo, wi // wo)).unflatten(-3, (ho, hi // ho)).amax(dim=(-3, -1))
        x = x.index_select(-2, self.rows)  # (..., ho*kh, W)
        x = x.unflatten(-2, (ho, -1)).amax(dim=-2)  # (..., ho, W)
        x = x.index_select(-1, self.cols)
        return x.unflatten(-1, (wo, -1)).amax(dim=-1)


def pool_then_cast(pool: AdaptiveMaxPool2dExport | None, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The model's input: ``x`` (uint8) max-pooled to its input size, then as ``dtype`` (still in
    [0, 255]; the model scales it and skips its own pooling). Pooling the uint8 image first is
    bit-identical to casting first (the cast of a byte is exact and monotonic, so it commutes
    with max) and casts a quarter of the pixels at 224 -> 112."""
    if pool is not None:
        x = pool(x)
    return x.to(dtype)


class ExportWrapper(nn.Module):
    """(x uint8 (B,3,3,H,W), present bool (B,3)) -> (logits, probabilities, embeddings)."""

    def __init__(self, model: nn.Module, image_size: int = DEFAULT_IMAGE_SIZE):
        super().__init__()
        m = _unwrap(model)
        if m.name != "msdn":
            raise ValueError(f"ONNX export supports the multistream model 'msdn' only, got {m.name!r}")
        self.model = m
        self.image_size = int(image_size)
        s = m.input_size
        if self.image_size < s:
            raise ValueError(f"image size {self.image_size} is smaller than the model's input size {s}")
        self.pool = (
            None if self.image_size == s else AdaptiveMaxPool2dExport((self.image_size,) * 2, (s, s))
        )

    def forward(self, x: Tensor, present: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = pool_then_cast(self.pool, x, self.model._dtype())
        out = self.model(x, present)
        return out.logits, torch.softmax(out.logits, dim=-1), out.embeddings


class ViewExportWrapper(nn.Module):
    """(view uint8 (N,3,H,W), axis int64 (N,)) -> (view_logits (N,C), view_embeddings (N,960)).

    One row per zone-axis view: the shared trunk on that view and the head of its axis
    (0 = x, 1 = y, 2 = z). The MSDN's prediction is the softmax of the *sum* of its views'
    logits, so a sample's partial and complete predictions are sums of these rows
    (:func:`xtalsym.inference.base.combine_views`) and each view goes through the network
    once. Same pooling, scaling and layers as :class:`ExportWrapper`, so the rows equal its
    per-view terms.
    """

    def __init__(self, model: nn.Module, image_size: int = DEFAULT_IMAGE_SIZE):
        super().__init__()
        self.inner = ExportWrapper(model, image_size)
        self.model = self.inner.model

    def forward(self, view: Tensor, axis: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        x = pool_then_cast(self.inner.pool, view, m._dtype())
        embeddings = m.trunk(m._prepare(x))  # (N, 960)
        every_head = torch.stack([head(embeddings) for head in m.heads], dim=1)  # (N, 3, C): cheap beside the trunk
        index = axis.to(torch.long).reshape(-1, 1, 1).expand(-1, 1, every_head.shape[-1])
        return every_head.gather(1, index).squeeze(1), embeddings


def per_view_supported(model: nn.Module) -> bool:
    """Whether the model's prediction is a sum over independent views (MSDN): only then is
    there a per-view graph. The stacked DenseNet mixes the views in its first conv."""
    try:
        return _unwrap(model).name == "msdn"
    except TypeError:
        return False


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    opset: int = DEFAULT_OPSET,
    max_batch: int = 4096,
    graph: str = "whole",
) -> Path:
    """Export ``model`` (fp32, CPU, eval) to ``out`` atomically; returns the path.

    ``graph="whole"``: inputs ``x`` (B, 3, 3, H, W) and ``present`` (B, 3) (model.onnx);
    ``graph="view"``: the per-view graph (:class:`ViewExportWrapper`, model_view.onnx).
    Uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) with the batch as
    the only dynamic dimension; the graph is self-contained (weights inside, no external
    data file: MSDN is ~6 MB).
    """
    import copy

    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    m = copy.deepcopy(_unwrap(model)).float().cpu().eval()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    if graph == "whole":
        wrapper: nn.Module = ExportWrapper(m, image_size).eval()
        example = (
            torch.zeros((2, 3, 3, image_size, image_size), dtype=torch.uint8),
            torch.ones((2, 3), dtype=torch.bool),
        )
        names = (INPUT_NAMES, OUTPUT_NAMES)
    else:
        wrapper = ViewExportWrapper(m, image_size).eval()
        example = (
            torch.zeros((3, 3, image_size, image_size), dtype=torch.uint8),
            torch.tensor([0, 1, 2], dtype=torch.int64),
        )
        names = (VIEW_INPUT_NAMES, VIEW_OUTPUT_NAMES)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                example,
                input_names=list(names[0]),
                output_names=list(names[1]),
                dynamic_shapes={names[0][0]: {0: batch}, names[0][1]: {0: batch}},
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        program.save(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("exported %s %s graph (opset %d, image %d, model input %d) to %s", m.name, graph, opset, image_size,
             m.input_size, out)
    return out


def check_onnx(
    model: nn.Module, onnx_path: str | os.PathLike, *, batch: int = 4, seed: int = 0, intra_op_threads: int = 1
) -> dict:
    """onnx.checker on the file, then ONNX Runtime (CPU) against torch fp32 on a random batch.

    The batch mixes one-, two- and three-view samples. Returns the maximum absolute
    differences and top-1 agreement; raises ValueError when probabilities differ by > 1e-4.
    """
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(onnx_path), full_check=True)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    image_size = shape[-1]
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(batch, 3, 3, image_size, image_size), dtype=np.uint8)
    present = example_masks(batch)
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    logits, probabilities, embeddings = session.run(list(OUTPUT_NAMES), {"x": x, "present": present})
    m = _unwrap(model).float().cpu().eval()
    with torch.no_grad():
        ref = m(torch.from_numpy(x), torch.from_numpy(present))
    ref_prob = torch.softmax(ref.logits, -1).numpy()
    report = {
        "batch": batch,
        "max_abs_logits": float(np.abs(logits - ref.logits.numpy()).max()),
        "max_abs_probabilities": float(np.abs(probabilities - ref_prob).max()),
        "max_abs_embeddings": float(np.abs(embeddings - ref.embeddings.numpy()).max()),
        "top1_agreement": float((probabilities.argmax(1) == ref_prob.argmax(1)).mean()),
    }
    if report["max_abs_probabilities"] > 1e-4:
        raise ValueError(f"{onnx_path}: ONNX Runtime disagrees with torch: {report}")
    return report


def check_view_onnx(
    model: nn.Module, onnx_path: str | os.PathLike, *, batch: int = 4, seed: int = 0, intra_op_threads: int = 1
) -> dict:
    """onnx.checker on the per-view graph, then its rows summed per sample (ONNX Runtime,
    CPU) against torch fp32's whole-model output on a batch mixing one-, two- and three-view
    samples; raises ValueError when probabilities differ by > 1e-4."""
    import onnx
    import onnxruntime as ort

    from xtalsym.inference.base import combine_views

    onnx.checker.check_model(str(onnx_path), full_check=True)
    image_size = image_size_of(onnx_path)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(batch, 3, 3, image_size, image_size), dtype=np.uint8)
    present = example_masks(batch)
    rows = np.argwhere(present)
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    view_logits, view_embeddings = session.run(
        list(VIEW_OUTPUT_NAMES), {"view": x[rows[:, 0], rows[:, 1]], "axis": rows[:, 1].astype(np.int64)})
    terms = [[None] * 3 for _ in range(batch)]
    features = [[None] * 3 for _ in range(batch)]
    for k, (i, v) in enumerate(rows):
        terms[i][v], features[i][v] = view_logits[k], view_embeddings[k]
    m = _unwrap(model).float().cpu().eval()
    combined = combine_views(terms, features, m.num_classes)
    with torch.no_grad():
        ref = m(torch.from_numpy(x), torch.from_numpy(present))
    ref_prob = torch.softmax(ref.logits, -1).numpy()
    report = {
        "batch": batch,
        "max_abs_logits": float(np.abs(combined.logits - ref.logits.numpy()).max()),
        "max_abs_probabilities": float(np.abs(combined.probabilities - ref_prob).max()),
        "max_abs_embeddings": float(np.abs(combined.embeddings - ref.embeddings.numpy()).max()),
        "top1_agreement": float((combined.probabilities.argmax(1) == ref_prob.argmax(1)).mean()),
    }
    if report["max_abs_probabilities"] > 1e-4:
        raise ValueError(f"{onnx_path}: the per-view graph disagrees with torch: {report}")
    return report


def example_masks(batch: int) -> np.ndarray:
    """(batch, 3) bool cycling through three, one and two present views."""
    patterns = np.array(
        [[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=bool
    )
    return patterns[np.arange(batch) % len(patterns)]


def image_size_of(onnx_path: str | os.PathLike) -> int:
    """H (= W) of the ``x`` input of an exported graph."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return int(proto.graph.input[0].type.tensor_type.shape.dim[-1].dim_value)


__all__ = [
    "AdaptiveMaxPool2dExport",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_OPSET",
    "ExportWrapper",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "GRAPHS",
    "VIEW_INPUT_NAMES",
    "VIEW_OUTPUT_NAMES",
    "ViewExportWrapper",
    "check_onnx",
    "check_view_onnx",
    "example_masks",
    "export_onnx",
    "image_size_of",
    "per_view_supported",
]
