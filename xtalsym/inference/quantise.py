"""int8 for the CPU: ONNX Runtime static quantisation (QDQ) of the per-view graph.

The per-view graph (``model_view.onnx``, :class:`xtalsym.inference.export.ViewExportWrapper`)
is quantised with ``onnxruntime.quantization.quantize_static`` in the QDQ format: int8
weights per output channel, uint8 activations whose ranges are calibrated on shaped DPs
of a dataset's *training* split (never the split the accuracy is measured on). The heads
(960 → C, a few per cent of the cost) stay fp32: the logits are what is summed over views.

:func:`compare_accuracy` measures what the quantisation costs: fp32 and int8 per-view
graphs on the same held-out samples, top-1 of each, the paired difference with its 95 %
confidence interval and McNemar's exact test. ``xtalsym bundle build --int8-calibration``
writes the result into the bundle's model card.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from xtalsym import dataset_format

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_CALIBRATION_SAMPLES = (
    128  # 384 views; ORT keeps every activation of every batch while calibrating (~9 GB RSS at 256)
)
VIEWS_PER_CALIBRATION_BATCH = 24
# Every op ONNX Runtime can quantise, heads excepted. Measured on the shipped model (200
# training samples, percentile ranges): convolutions + ReLU only lost 1.5 points of top-1
# and ran slower than quantising everything (Concat, pooling too: -1.0 point), because each
# dense layer then re-quantises the whole concatenation it reads.
QUANTISED_OPS = None


def _require_ort_quantization():
    try:
        from onnxruntime import quantization
    except ImportError as exc:
        raise RuntimeError("int8 quantisation needs onnxruntime (pip install onnxruntime)") from exc
    return quantization


def dataset_samples(
    root: str | os.PathLike, split: str, *, limit: int | None = None, classes: list[int] | None = None
) -> list[dict]:
    """Metadata of the samples of ``split`` in a dataset directory (``xtalsym simulate
    dataset``), in shard order; only space groups in ``classes`` when given; at most ``limit``."""
    splits = dataset_format.load_splits(root)
    inside = None if classes is None else {int(c) for c in classes}
    chosen = []
    for sample in dataset_format.iter_sample_metadata(root):
        if splits.get(sample["material_id"]) != split:
            continue
        if inside is not None and int(sample["space_group"]) not in inside:
            continue
        chosen.append(sample)
        if limit is not None and len(chosen) >= limit:
            break
    if not chosen:
        raise ValueError(f"dataset {root} has no {split!r} samples" + (" of the model's classes" if classes else ""))
    return chosen


def shaped_views(root: str | os.PathLike, samples: list[dict]) -> Iterator[np.ndarray]:
    """(3 axes, 3 channels, S, S) uint8 per sample: the layout the graphs take."""
    reader = dataset_format.ShardReader(root)
    try:
        for sample in samples:
            yield np.ascontiguousarray(reader.read(sample["shard"], sample["position"], "shaped").transpose(0, 3, 1, 2))
    finally:
        reader.close()


class _CalibrationReader:
    """``CalibrationDataReader`` for the per-view graph: batches of views with their axes."""

    def __init__(self, root: str | os.PathLike, samples: list[dict], image_size: int):
        self._batches = self._make(root, samples, image_size)

    @staticmethod
    def _make(root, samples, image_size) -> Iterator[dict]:
        views, axes = [], []
        for x in shaped_views(root, samples):
            if x.shape[-1] != image_size:
                raise ValueError(f"dataset {root}: shaped DPs are {x.shape[-1]} px, the graph takes {image_size}")
            views.extend(x)
            axes.extend(range(3))
            if len(views) >= VIEWS_PER_CALIBRATION_BATCH:
                yield {"view": np.stack(views), "axis": np.array(axes, np.int64)}
                views, axes = [], []
        if views:
            yield {"view": np.stack(views), "axis": np.array(axes, np.int64)}

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def _head_nodes(model_path: Path) -> list[str]:
    """Names of the nodes of the heads (MatMul / Gemm on the 960-wide embedding): kept fp32."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]


def quantise_view_graph(
    view_onnx: str | os.PathLike,
    out: str | os.PathLike,
    *,
    calibration_dataset: str | os.PathLike,
    classes: list[int] | None = None,
    samples: int = DEFAULT_CALIBRATION_SAMPLES,
    method: str = "percentile",
    reduce_range: bool = False,
    split: str = "train",
) -> dict:
    """Write the QDQ int8 version of ``view_onnx`` to ``out`` (atomically); returns what was done.

    Calibration: the shaped DPs of the first ``samples`` ``split`` samples of
    ``calibration_dataset`` (all three views of each). ``method``: ``minmax``,
    ``percentile`` (99.999th) or ``entropy``. ``reduce_range`` quantises weights to 7 bits,
    for x86 CPUs without VNNI where u8×s8 products can saturate.
    """
    q = _require_ort_quantization()
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    import onnx

    view_onnx, out = Path(view_onnx), Path(out)
    proto = onnx.load(str(view_onnx), load_external_data=False)
    image_size = int(proto.graph.input[0].type.tensor_type.shape.dim[-1].dim_value)
    chosen = dataset_samples(calibration_dataset, split, limit=samples, classes=classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xtalsym-int8-", dir=out.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference + constant folding first, as ONNX Runtime's quantisation guide asks
        quant_pre_process(
            str(view_onnx), str(prepared), skip_symbolic_shape=True
        )  # ORT's symbolic pass fails on the pooling gathers
        calibrate = {
            "minmax": q.CalibrationMethod.MinMax,
            "percentile": q.CalibrationMethod.Percentile,
            "entropy": q.CalibrationMethod.Entropy,
        }[method]
        extra = {"CalibMovingAverage": False}
        if method == "percentile":
            extra["CalibPercentile"] = 99.999
        staged = Path(tmp) / "int8.onnx"
        q.quantize_static(
            str(prepared),
            str(staged),
            _CalibrationReader(calibration_dataset, chosen, image_size),
            quant_format=q.QuantFormat.QDQ,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            per_channel=True,
            reduce_range=reduce_range,
            calibrate_method=calibrate,
            op_types_to_quantize=None if QUANTISED_OPS is None else list(QUANTISED_OPS),
            nodes_to_exclude=_head_nodes(prepared),
            extra_options=extra,
        )
        os.chmod(staged, 0o644)
        os.replace(staged, out)
    info = {
        "file": out.name,
        "format": "QDQ",
        "weights": "int8 per channel" + (" (7-bit range)" if reduce_range else ""),
        "activations": "uint8 per tensor",
        "kept_fp32": "heads (960 -> C)",
        "calibration": {
            "dataset": str(calibration_dataset),
            "split": split,
            "samples": len(chosen),
            "views": 3 * len(chosen),
            "method": method,
        },
    }
    log.info("int8 per-view graph %s: calibrated on %d %s samples (%s)", out, len(chosen), split, method)
    return info


def _view_session(path: str | os.PathLike, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _sample_probabilities(session, root, samples: list[dict], batch: int) -> np.ndarray:
    from xtalsym.inference.base import softmax

    out, pending = [], []

    def flush():
        x = np.stack(pending)  # (b, 3, 3, S, S)
        views = x.reshape(-1, *x.shape[2:])
        axes = np.tile(np.arange(3, dtype=np.int64), len(pending))
        logits, _ = session.run(["view_logits", "view_embeddings"], {"view": views, "axis": axes})
        out.append(softmax(logits.reshape(len(pending), 3, -1).sum(axis=1)))
        pending.clear()

    for x in shaped_views(root, samples):
        pending.append(x)
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    return np.concatenate(out)


def paired_difference(right_a: np.ndarray, right_b: np.ndarray) -> dict:
    """Top-1 of a and b on the same samples, b − a with a 95 % confidence interval (paired
    normal approximation) and McNemar's exact two-sided p-value on the discordant pairs."""
    right_a, right_b = np.asarray(right_a, bool), np.asarray(right_b, bool)
    n = len(right_a)
    only_a = int((right_a & ~right_b).sum())
    only_b = int((right_b & ~right_a).sum())
    delta = (only_b - only_a) / n
    var = ((only_a + only_b) / n - delta**2) / n
    half = 1.959964 * math.sqrt(max(var, 0.0))
    discordant = only_a + only_b
    if discordant == 0:
        p = 1.0
    else:
        k = min(only_a, only_b)
        p = min(1.0, 2 * sum(math.comb(discordant, i) for i in range(k + 1)) / 2**discordant)
    return {
        "n": n,
        "top1_a": float(right_a.mean()),
        "top1_b": float(right_b.mean()),
        "delta": delta,
        "ci95": [delta - half, delta + half],
        "only_a_right": only_a,
        "only_b_right": only_b,
        "mcnemar_p": p,
    }


def compare_accuracy(
    fp32_view_onnx: str | os.PathLike,
    int8_view_onnx: str | os.PathLike,
    *,
    test_dataset: str | os.PathLike,
    classes: list[int],
    split: str = "test",
    limit: int | None = None,
    batch: int = 8,
    threads: int = 1,
) -> dict:
    """fp32 vs int8 per-view graphs on the same held-out samples (all three views each):
    top-1 of both, the paired difference (int8 − fp32) with its 95 % CI, top-1 agreement and
    the largest probability difference."""
    samples = dataset_samples(test_dataset, split, limit=limit, classes=classes)
    index = {int(c): i for i, c in enumerate(classes)}
    targets = np.array([index[int(s["space_group"])] for s in samples])
    p32 = _sample_probabilities(_view_session(fp32_view_onnx, threads), test_dataset, samples, batch)
    p8 = _sample_probabilities(_view_session(int8_view_onnx, threads), test_dataset, samples, batch)
    stats = paired_difference(p32.argmax(1) == targets, p8.argmax(1) == targets)
    return {
        "dataset": str(test_dataset),
        "split": split,
        "samples": len(samples),
        "views": "x, y, z",
        "top1_fp32": stats["top1_a"],
        "top1_int8": stats["top1_b"],
        "delta_top1": stats["delta"],
        "delta_top1_ci95": stats["ci95"],
        "mcnemar_p": stats["mcnemar_p"],
        "only_fp32_right": stats["only_a_right"],
        "only_int8_right": stats["only_b_right"],
        "top1_agreement": float((p32.argmax(1) == p8.argmax(1)).mean()),
        "max_abs_probability_difference": float(np.abs(p32 - p8).max()),
    }


def card_section(info: dict) -> str:
    """The model card's int8 paragraph (Markdown) from :func:`quantise_view_graph` + :func:`compare_accuracy`."""
    cal = info["calibration"]
    lines = [
        "",
        "## int8 (CPU)",
        "",
        f"- `{info['file']}`: the per-view graph quantised statically by ONNX Runtime ({info['format']}: "
        f"{info['weights']} weights, {info['activations']} activations; {info['kept_fp32']} kept fp32)",
        f"- Calibration: {cal['samples']} samples ({cal['views']} shaped DPs) of the `{cal['split']}` split "
        f"of `{cal['dataset']}`, {cal['method']} ranges",
    ]
    acc = info.get("accuracy")
    if acc is None:
        lines.append("- Accuracy: not measured at build time (no --int8-test dataset given)")
    else:
        lo, hi = acc["delta_top1_ci95"]
        lines += [
            f"- Accuracy on {acc['samples']} held-out `{acc['split']}` samples of `{acc['dataset']}` (3 views each), "
            "fp32 and int8 on the same samples:",
            "",
            "| graph | top-1 |",
            "|---|---|",
            f"| fp32 | {acc['top1_fp32'] * 100:.2f} % |",
            f"| int8 | {acc['top1_int8'] * 100:.2f} % |",
            "",
            f"- int8 − fp32: {acc['delta_top1'] * 100:+.2f} points (95 % CI {lo * 100:+.2f} to {hi * 100:+.2f}; "
            f"McNemar p = {acc['mcnemar_p']:.2g}, {acc['only_fp32_right']} samples right only in fp32, "
            f"{acc['only_int8_right']} only in int8); top-1 agreement {acc['top1_agreement'] * 100:.2f} %, "
            f"largest probability difference {acc['max_abs_probability_difference']:.3f}",
        ]
    lines.append(
        "- Served by `onnxruntime` on the CPU when `bundle.precision` is `auto` (default) or `int8`; "
        "`fp32` keeps the fp32 graphs"
    )
    return "\n".join(lines) + "\n"


__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_CALIBRATION_SAMPLES",
    "card_section",
    "compare_accuracy",
    "dataset_samples",
    "paired_difference",
    "quantise_view_graph",
    "shaped_views",
]
