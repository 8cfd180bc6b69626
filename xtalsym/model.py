"""MSDN (the authors' trained layout) and two baselines behind one interface, plus checkpoint I/O.

Every model is a :class:`DiffractionModel`: it takes the batch exactly as
:class:`xtalsym.offline.torch_data.DiffractionDataset` yields it (uint8, or float in
[0, 255]), scales it to [0, 1] itself, resizes it to its ``input_size`` with adaptive
*max* pooling when needed (1-pixel lines survive), and returns a :class:`ModelOutput`.

Models (``MODELS``):

``msdn``
    Multistream DenseNet as in the authors' published checkpoint (see DESIGN.md): one
    trunk shared by the three zone-axis streams, three separate 960→C heads, prediction
    softmax(sum of the heads' logits), loss = sum of the three cross-entropies.
    Exactly 1,542,424 parameters at C = 72. Choices the checkpoint does not fix:

    * stem: 7×7 conv with stride 2, then 3×3 max pool with stride 2 (as in DenseNet on
      ImageNet): 224 → 56 before the first block, ≈ 0.54 GMAC per stream at 224×224.
    * activation: ReLU after every conv (the paper's dense layer is conv, ReLU, dropout),
      post-activation since there is no batch norm; the embedding is the global average
      of non-negative features.
    * dropout (option ``dropout``, default 0.1) after each of the two ReLUs of every dense
      layer, none in stem, transitions or heads.
    * initialisation: without batch norm the scale has to come from the weights. Every conv
      is Kaiming-normal (fan-in, ReLU gain √2) with zero bias: conv+ReLU then keeps the mean
      square of its input, and because a dense block only *concatenates* outputs of such
      layers, every channel of every block has about the same mean square as the block
      input — no growth or decay with depth (40 convs). Heads are N(0, 0.01²) with zero
      bias, so the initial logits are ≈ 0 and the initial loss ≈ 3·ln C.

``densenet-stacked``
    The same trunk with the three shaped DPs stacked as 9 input channels, one head.
    An absent view (``present`` False) is fed as zeros.

``ziletti-cnn``
    Spot DP (3 channels) into a single-stream CNN after Ziletti et al. 2018: conv 32-32,
    max pool, conv 16-16, max pool, conv 8-8, max pool (7×7 kernels, "same" padding,
    ReLU), dense 128 + dropout, then a 960-wide ReLU embedding layer and the head. The
    flattened width follows the input size (8 × (input_size // 8)²). Ziletti et al. ran it
    at 64×64; at 224×224 it costs ≈ 3.3 GMAC, so ``input_size=64`` is the faithful setting.
    ``present`` is ignored (the spot DP has already merged the axes).

Dense-block concatenation, reshapes with ``-1`` for the batch and ``torch.where`` for the
view mask keep the forward traceable (``torch.jit.trace``, ``torch.export``,
``torch.onnx.export``) with a dynamic batch; the only Python branches are on shapes and on
``present is None``.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

try:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn
except ImportError as exc:  # torch is the `ml` extra
    raise ImportError(
        "xtalsym's models need torch: pip install torch==2.13.0 (CPU) or a CUDA build, "
        "then pip install 'xtalsym[ml]'"
    ) from exc

EMBEDDING_DIM = 960
CHECKPOINT_FORMAT = "xtalsym-model-checkpoint/1"
REPRESENTATIONS = ("shaped", "spot")


class ModelOutput(NamedTuple):
    logits: Tensor  # (B, C): sum of the logits of the views present
    view_logits: Tensor  # (B, V, C): zeros for absent views
    embeddings: Tensor  # (B, V, EMBEDDING_DIM): per-stream features before the heads (zeros when absent)


# --------------------------------------------------------------------------- base class


class DiffractionModel(nn.Module):
    """Base of every model: input scaling/resizing, output packing, loss, spec."""

    name: ClassVar[str] = ""
    representation: ClassVar[str] = "shaped"
    views: ClassVar[int] = 1
    default_options: ClassVar[dict[str, Any]] = {}
    min_input_size: ClassVar[int] = 32

    def __init__(self, num_classes: int, input_size: int, options: Mapping[str, Any]):
        super().__init__()
        self.num_classes = int(num_classes)
        self.input_size = int(input_size)
        self.options = dict(options)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample at the model's own input size (without the batch axis)."""
        s = self.input_size
        return (3, 3, s, s) if self.representation == "shaped" else (3, s, s)

    # ---- helpers for subclasses

    def _check_input(self, x: Tensor) -> None:
        expected = 5 if self.representation == "shaped" else 4
        if x.dim() != expected or x.shape[-3] != 3 or (expected == 5 and x.shape[1] != 3):
            layout = "(B, 3 axes, 3, H, W)" if expected == 5 else "(B, 3, H, W)"
            raise ValueError(f"{self.name} expects {self.representation} input {layout}, got shape {tuple(x.shape)}")

    def _prepare(self, x: Tensor) -> Tensor:
        """(N, C, H, W) uint8 or float in [0, 255] -> float in [0, 1] at input_size."""
        x = x.to(self._dtype())
        if x.shape[-2] != self.input_size or x.shape[-1] != self.input_size:
            x = F.adaptive_max_pool2d(x, (self.input_size, self.input_size))
        return x * (1.0 / 255.0)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @staticmethod
    def _check_present(present: Tensor, batch: int) -> Tensor:
        if present.dim() != 2 or present.shape[1] != 3 or present.shape[0] != batch:
            raise ValueError(f"present must have shape ({batch}, 3), got {tuple(present.shape)}")
        return present.to(torch.bool)

    def forward(self, x: Tensor, present: Tensor | None = None) -> ModelOutput:  # pragma: no cover
        raise NotImplementedError

    def loss(
        self,
        out: ModelOutput,
        target: Tensor,
        present: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> Tensor:
        """Cross-entropy of the summed logits (single-stream models); ``weight`` per class."""
        return F.cross_entropy(out.logits, target, weight=weight)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_classes={self.num_classes}, input_size={self.input_size}, options={self.options}"


# --------------------------------------------------------------------------- DenseNet trunk


class _DenseLayer(nn.Module):
    """1×1 conv (c_in→growth) → ReLU → dropout → 3×3 conv (growth→growth) → ReLU → dropout."""

    def __init__(self, in_channels: int, growth: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, growth, 1, bias=True)
        self.conv2 = nn.Conv2d(growth, growth, 3, padding=1, bias=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(F.relu(self.conv1(x)))
        return self.drop(F.relu(self.conv2(x)))


class _DenseBlock(nn.Module):
    def __init__(self, in_channels: int, layers: int, growth: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(_DenseLayer(in_channels + i * growth, growth, dropout) for i in range(layers))
        self.out_channels = in_channels + layers * growth

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class _Transition(nn.Module):
    """1×1 conv without compression → ReLU → 2×2 average pool."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=True)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(F.relu(self.conv(x)))


class DenseTrunk(nn.Module):
    """Stem (7×7/2 conv, ReLU, 3×3/2 max pool), dense blocks 3-6-12-8, growth 32, global average.

    No batch norm; channels 32 → 128 → 320 → 704 → 960. Output (N, 960).
    """

    BLOCKS = (3, 6, 12, 8)
    GROWTH = 32
    STEM_CHANNELS = 32

    def __init__(self, in_channels: int, dropout: float):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, self.STEM_CHANNELS, 7, stride=2, padding=3, bias=True)
        self.stem_pool = nn.MaxPool2d(3, stride=2, padding=1)
        stages: list[nn.Module] = []
        channels = self.STEM_CHANNELS
        for i, n in enumerate(self.BLOCKS):
            block = _DenseBlock(channels, n, self.GROWTH, dropout)
            stages.append(block)
            channels = block.out_channels
            if i < len(self.BLOCKS) - 1:
                stages.append(_Transition(channels))
        self.stages = nn.Sequential(*stages)
        self.out_channels = channels
        assert channels == EMBEDDING_DIM
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_pool(F.relu(self.stem(x)))
        return self.stages(x).mean(dim=(2, 3))


def _head(num_classes: int) -> nn.Linear:
    head = nn.Linear(EMBEDDING_DIM, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


# --------------------------------------------------------------------------- models


class MSDN(DiffractionModel):
    """Multistream DenseNet: shared trunk over the three axes, one head per axis."""

    name = "msdn"
    representation = "shaped"
    views = 3
    default_options = {"dropout": 0.1}

    def __init__(self, num_classes: int, input_size: int, options: Mapping[str, Any]):
        super().__init__(num_classes, input_size, options)
        self.trunk = DenseTrunk(3, float(self.options["dropout"]))
        self.heads = nn.ModuleList(_head(num_classes) for _ in range(self.views))

    def forward(self, x: Tensor, present: Tensor | None = None) -> ModelOutput:
        self._check_input(x)
        streams = self._prepare(x.flatten(0, 1))  # (B*3, 3, s, s): the axes share the trunk
        embeddings = self.trunk(streams).reshape(-1, self.views, EMBEDDING_DIM)
        view_logits = torch.stack([head(embeddings[:, v]) for v, head in enumerate(self.heads)], dim=1)
        if present is not None:
            mask = self._check_present(present, x.shape[0]).unsqueeze(-1)
            # where, not multiply: an absent view's content (even NaN) cannot leak in
            view_logits = torch.where(mask, view_logits, torch.zeros_like(view_logits))
            embeddings = torch.where(mask, embeddings, torch.zeros_like(embeddings))
        return ModelOutput(view_logits.sum(dim=1), view_logits, embeddings)

    def loss(
        self,
        out: ModelOutput,
        target: Tensor,
        present: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> Tensor:
        """Sum over present views of the per-view cross-entropy, averaged over the batch.

        With ``weight`` the average is the weighted one of ``F.cross_entropy`` (divided by
        the sum of the targets' weights), so with every view present this equals
        ``sum(F.cross_entropy(view_logits[:, v], target, weight=weight) for v)``.
        """
        b, v, c = out.view_logits.shape
        per = F.cross_entropy(
            out.view_logits.reshape(b * v, c), target.repeat_interleave(v), reduction="none"
        ).reshape(b, v)
        if present is not None:
            per = per * self._check_present(present, b).to(per.dtype)
        if weight is None:
            return per.sum(dim=1).mean()
        w = weight.to(per.dtype)[target]
        return (per.sum(dim=1) * w).sum() / w.sum()


class DenseNetStacked(DiffractionModel):
    """Single-stream DenseNet on the three shaped DPs stacked as 9 channels."""

    name = "densenet-stacked"
    representation = "shaped"
    views = 1
    default_options = {"dropout": 0.1}

    def __init__(self, num_classes: int, input_size: int, options: Mapping[str, Any]):
        super().__init__(num_classes, input_size, options)
        self.trunk = DenseTrunk(9, float(self.options["dropout"]))
        self.head = _head(num_classes)

    def forward(self, x: Tensor, present: Tensor | None = None) -> ModelOutput:
        self._check_input(x)
        if present is not None:
            mask = self._check_present(present, x.shape[0])[:, :, None, None, None]
            x = torch.where(mask, x, torch.zeros_like(x))
        stacked = self._prepare(x.flatten(1, 2))  # (B, 9, s, s)
        embedding = self.trunk(stacked)
        logits = self.head(embedding)
        return ModelOutput(logits, logits.unsqueeze(1), embedding.unsqueeze(1))


class ZilettiCNN(DiffractionModel):
    """Spot DP into a CNN after Ziletti et al. 2018, with a 960-wide embedding layer."""

    name = "ziletti-cnn"
    representation = "spot"
    views = 1
    default_options = {"dropout": 0.25, "kernel_size": 7}
    min_input_size = 8

    def __init__(self, num_classes: int, input_size: int, options: Mapping[str, Any]):
        super().__init__(num_classes, input_size, options)
        k = int(self.options["kernel_size"])
        if k < 1 or k % 2 == 0:
            raise ValueError(f"ziletti-cnn kernel_size must be odd and positive, got {k}")
        dropout = float(self.options["dropout"])
        layers: list[nn.Module] = []
        channels = 3
        for width in (32, 16, 8):
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, k, padding=k // 2), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        flat = channels * (input_size // 8) ** 2
        self.dense = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, EMBEDDING_DIM), nn.ReLU()
        )
        self.drop = nn.Dropout(dropout)
        self.head = _head(num_classes)
        for m in [*self.features.modules(), *self.dense.modules()]:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, present: Tensor | None = None) -> ModelOutput:
        self._check_input(x)
        embedding = self.dense(self.features(self._prepare(x)))
        logits = self.head(self.drop(embedding))
        return ModelOutput(logits, logits.unsqueeze(1), embedding.unsqueeze(1))


MODELS: dict[str, type[DiffractionModel]] = {
    "msdn": MSDN,
    "densenet-stacked": DenseNetStacked,
    "ziletti-cnn": ZilettiCNN,
}


# --------------------------------------------------------------------------- build / inspect


def build_model(name: str, num_classes: int, *, input_size: int = 224, **options: Any) -> DiffractionModel:
    """A freshly initialised model; ``options`` override the model's ``default_options``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    cls = MODELS[name]
    unknown = sorted(set(options) - set(cls.default_options))
    if unknown:
        known = ", ".join(cls.default_options) or "none"
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; known: {known}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(input_size, bool) or int(input_size) != input_size or input_size < cls.min_input_size:
        raise ValueError(f"input_size for {name!r} must be an integer >= {cls.min_input_size}, got {input_size!r}")
    resolved = {**cls.default_options, **options}
    if "dropout" in resolved and not 0.0 <= float(resolved["dropout"]) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {resolved['dropout']!r}")
    return cls(int(num_classes), int(input_size), resolved)


def _unwrap(model: nn.Module) -> DiffractionModel:
    """The DiffractionModel inside torch.compile / DataParallel / DDP wrappers."""
    for _ in range(4):
        if isinstance(model, DiffractionModel):
            return model
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if model is None:
            break
    raise TypeError("not an xtalsym DiffractionModel (or a torch.compile/DDP wrapper of one)")


def model_spec(model: nn.Module) -> dict[str, Any]:
    """Plain JSON-able description, enough for :func:`build_model` to rebuild the model."""
    m = _unwrap(model)
    return {
        "name": m.name,
        "num_classes": m.num_classes,
        "input_size": m.input_size,
        "options": dict(m.options),
    }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def multiply_adds(model: nn.Module, batch: int = 1) -> int:
    """Multiply-adds per sample at the model's input size (conv and linear layers; FLOPs/2).

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` on a zero input on CPU, in
    eval mode and without gradients; pooling, activations and additions are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    m = _unwrap(model)
    if any(p.device.type != "cpu" for p in m.parameters()):
        m = copy.deepcopy(m).cpu()
    was_training = m.training
    m.eval()
    try:
        x = torch.zeros((batch, *m.input_shape), dtype=torch.uint8)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(x)
        return int(counter.get_total_flops()) // 2 // batch
    finally:
        m.train(was_training)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, extra: dict | None = None) -> None:
    """Write ``{"format", "spec", "state_dict", "extra"}`` atomically (temporary file + os.replace).

    Tensors are stored on CPU and contiguous; ``extra`` must be weights_only-loadable
    (dicts, lists, str, int, float, bool, None, tensors).
    """
    m = _unwrap(model)
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "spec": model_spec(m),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()},
        "extra": {} if extra is None else extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> tuple[DiffractionModel, dict]:
    """Rebuild the model of a checkpoint (in eval mode) and return it with its ``extra``.

    Loads with ``weights_only=True``: nothing but tensors and plain containers is ever
    unpickled. A file that is not an xtalsym checkpoint raises ValueError naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...
        raise ValueError(f"{path} is not an xtalsym model checkpoint ({type(exc).__name__}: {exc})") from exc
    if not (
        isinstance(payload, dict)
        and isinstance(payload.get("spec"), dict)
        and isinstance(payload.get("state_dict"), Mapping)
        and payload.get("format", CHECKPOINT_FORMAT) == CHECKPOINT_FORMAT
    ):
        raise ValueError(f"{path} is not an xtalsym model checkpoint (expected a dict with 'spec' and 'state_dict')")
    spec = payload["spec"]
    try:
        model = build_model(
            spec["name"], spec["num_classes"], input_size=spec.get("input_size", 224), **spec.get("options", {})
        )
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: checkpoint does not match its model spec {spec!r}: {exc}") from exc
    model.eval()
    extra = payload.get("extra") or {}
    return model, extra


def describe(model: nn.Module) -> str:
    """One line: name, parameters, multiply-adds per sample and the input it assumes."""
    m = _unwrap(model)
    s = m.input_size
    if m.name == "msdn":
        shape = f"{m.views} views × {s}×{s}"
    elif m.representation == "shaped":
        shape = f"3 views stacked as 9 channels × {s}×{s}"
    else:
        shape = f"spot DP, 3 channels × {s}×{s}"
    macs = multiply_adds(m)
    return f"{m.name}: {count_parameters(m):,} parameters, {_format_macs(macs)} per sample ({shape})"


def _format_macs(macs: int) -> str:
    if macs >= 1e9:
        return f"{macs / 1e9:.2f} GMAC"
    return f"{macs / 1e6:.1f} MMAC"


__all__ = [
    "EMBEDDING_DIM",
    "MODELS",
    "DiffractionModel",
    "ModelOutput",
    "build_model",
    "count_parameters",
    "describe",
    "load_checkpoint",
    "model_spec",
    "multiply_adds",
    "save_checkpoint",
]
