"""Typed, validated configuration of `xtalsym train` (TOML file + ``--set`` overrides).

Keys (TOML tables in brackets; a dotted name is what ``--set`` takes)::

    dataset          required  dataset directory built by `xtalsym simulate dataset`
    out_dir          ""        run directory (checkpoints, metrics); `--out` overrides
    space_groups     "paper72" the label set: "paper72" (the paper's 72), "all" (1-230),
                               "dataset" (groups present in the train split), a list or
                               range string ("1-230", "14,62,225") or a list of numbers.
                               Samples of other groups are left out of train and val.
    train_split      "train"   split names from the dataset's splits.json (by material;
    val_split        "val"     never re-split here). val_split = "" turns validation off
                               (then no best.pt is kept).
    epochs           60        length of the schedule (warm-up, cosine decay)
    stop_after_epochs 0        stop once this many epochs are done (0: run all `epochs`);
                               the schedule stays that of `epochs`, so a run can be
                               trained in chunks (CPU sessions) and resumed later with a
                               larger value, exactly as if uninterrupted
    batch_size       64
    seed             0         model init, data order, dropout, augmentation
    num_workers      4         DataLoader worker processes (items are decoded from zips)
    cpu_threads      0         torch intra-op threads in the training process (0: torch's
                               default, one per core). On a shared CPU, 1-2 threads can be
                               many times faster than oversubscribing the cores.
    device           "auto"    auto | cpu | cuda   (`--device` overrides)
    amp              "auto"    auto (bf16 on CUDA if supported, else fp16; off on CPU)
                               | bf16 | fp16 | off. fp16 uses a GradScaler.
    channels_last    true      CUDA only
    log_every        20        steps between progress-bar/log updates
    checkpoint_every_steps 0   also write last.pt every N steps (0: at epoch ends only)
    progress         true      tqdm progress bar (rank 0)
    extra_datasets   []        more dataset directories whose train and val splits join those of
                               `dataset` (same label set): e.g. the same materials off the zone
                               axes (`simulate dataset --misorientation-deg`) beside those on them
    init_from        ""        a checkpoint (a run's best.pt/last.pt, a bundle's model.pt) whose
                               weights start the model: fine-tuning (e.g. on data off the
                               zone axes, `simulate dataset --misorientation-deg`); its model
                               spec and classes must be this run's. A resumed run ignores it
                               (its own last.pt holds the weights)

    [model]  name "msdn" (msdn | densenet-stacked | ziletti-cnn), input_size 224,
             dropout 0.1, options {} (passed on to build_model)
    [optim]  name "adamw" (adamw | adam), lr 3e-4, weight_decay 0.05 (AdamW: decoupled,
             weights only, not biases), betas [0.9, 0.999], eps 1e-8, grad_clip 1.0 (0: off)
    [schedule] name "cosine" (cosine | constant), warmup_epochs 2.0 (linear warm-up from
             lr/warmup_steps), min_lr_ratio 0.01 (cosine floor, fraction of lr)
    [imbalance] mode "loss" (loss | sampler | none), power 0.5
    [augment] shift_px 0 (random translation of each view by up to N pixels, zero fill),
             drop_view_p 0.0 (probability of hiding each view of a multi-view sample;
             at least one view stays), so the model also learns single/partial views

Why these defaults (the paper: Adam, lr 1e-5, "weight decay" 1e-7, momentum 0.9):

* lr 3e-4 with AdamW, 2 warm-up epochs and a cosine decay. The MSDN has no batch norm;
  at lr 1e-5 Adam moves each weight by at most ~1e-5 per step, so a 1.5 M-parameter
  net from scratch needs very many epochs (the paper changes the validation fold every
  100 epochs but does not give the total). 3e-4 is the usual stable Adam rate for a non-normalised conv net of
  this size; the warm-up and gradient clipping at norm 1 guard the first steps, when
  un-normalised activations are largest. (Not yet tuned on the full Materials Project
  set: treat 3e-4 as a starting point; cpu_small.toml uses 1e-3 for short runs.)
  The paper's exact setting is one edit away: ``[optim] name="adam" lr=1e-5
  weight_decay=1e-7`` and ``[schedule] name="constant" warmup_epochs=0``.
* weight decay 0.05 decoupled (AdamW). The paper's 1e-7 is an L2 term added to the
  gradient inside Adam, where it is rescaled away and has practically no effect.
  A 1.5 M-parameter net on ~25 k materials can overfit; 0.05 decoupled decay on
  conv/linear weights (not biases) is a common, mild regulariser.
* imbalance: the Materials Project set spans ~19 to thousands of structures per
  group. ``loss`` weights each class by count^-power (power 0.5), normalised so the
  mean weight per training sample is 1 (the model's loss then takes the weighted mean
  over each batch, as F.cross_entropy does, so the loss keeps its scale). Full inverse
  frequency (power 1) would let a 19-sample class weigh 100x a common one and overfit
  it; the square root is the usual compromise. ``sampler`` draws each epoch's samples
  with replacement with per-sample probability ∝ count^-power (class share ∝
  count^(1-power)); ``none`` uses plain cross-entropy. Classes absent from the train
  split get weight 0.
* augmentation off by default, as in the paper. A mirror of a zone-axis pattern is the
  pattern of the mirror-image crystal: the same space-group type except for the 11
  enantiomorphic pairs (none of PAPER_72 has its partner in the set), but a mirror of
  each view on its own is not the three-axis pattern of any crystal in the standard
  frame (a 3-D mirror flips different image axes in different views and re-standardises
  monoclinic/triclinic cells), so it is not offered. ``shift_px`` (1-3) models a residual
  beam-centre error at the instrument; ``drop_view_p`` (e.g. 0.15) prepares the model
  for single-view frames.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from xtalsym import spacegroups


class ConfigError(ValueError):
    """One or more bad configuration values; the message lists every one of them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("bad training config: " + "; ".join(self.problems))


@dataclass
class ModelConfig:
    name: str = "msdn"
    input_size: int = 224
    dropout: float = 0.1
    options: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_epochs: float = 2.0
    min_lr_ratio: float = 0.01


@dataclass
class ImbalanceConfig:
    mode: str = "loss"
    power: float = 0.5


@dataclass
class AugmentConfig:
    shift_px: int = 0
    drop_view_p: float = 0.0


@dataclass
class TrainConfig:
    dataset: str = ""
    out_dir: str = ""
    space_groups: Any = "paper72"
    train_split: str = "train"
    val_split: str = "val"
    epochs: int = 60
    stop_after_epochs: int = 0
    batch_size: int = 64
    seed: int = 0
    num_workers: int = 4
    cpu_threads: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    log_every: int = 20
    checkpoint_every_steps: int = 0
    progress: bool = True
    extra_datasets: list = field(default_factory=list)
    init_from: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    imbalance: ImbalanceConfig = field(default_factory=ImbalanceConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def classes(self) -> list[int] | None:
        """The label set; None for "dataset" (taken from the train split)."""
        return resolve_space_groups(self.space_groups)

    def last_epoch(self) -> int:
        """The epoch this run stops after: ``stop_after_epochs`` of the schedule, else all of it."""
        return min(self.epochs, self.stop_after_epochs or self.epochs)


SECTIONS = {
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "imbalance": ImbalanceConfig,
    "augment": AugmentConfig,
}
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "amp": ("auto", "bf16", "fp16", "off"),
    "model.name": ("msdn", "densenet-stacked", "ziletti-cnn"),
    "optim.name": ("adamw", "adam"),
    "schedule.name": ("cosine", "constant"),
    "imbalance.mode": ("loss", "sampler", "none"),
}
# Keys that may change between an interrupted run and its resume (the rest must match).
RESUMABLE_CHANGES = {"epochs", "stop_after_epochs", "num_workers", "cpu_threads", "device", "log_every", "checkpoint_every_steps", "progress", "out_dir"}


def resolve_space_groups(value: Any) -> list[int] | None:
    if isinstance(value, str):
        key = value.strip().lower()
        if key == "paper72":
            return list(spacegroups.PAPER_72)
        if key == "all":
            return list(range(1, 231))
        if key == "dataset":
            return None
        return spacegroups.parse_list(value)
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return sorted({spacegroups.check_number(v) for v in value})
    raise ValueError(f"expected 'paper72', 'all', 'dataset', a list string like '1-230' or a list of numbers, got {value!r}")


# --------------------------------------------------------------------------- checking


def _type_ok(expected: Any, value: Any) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def _field_types(cls) -> dict[str, Any]:
    names = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict, "Any": object}
    return {f.name: names.get(f.type if isinstance(f.type, str) else f.type.__name__, object) for f in dataclasses.fields(cls)}


def _coerce(expected: Any, value: Any) -> Any:
    return float(value) if expected is float else value


def _take(out: dict, types: dict, key: str, value: Any, name: str, problems: list[str], *, known: bool) -> None:
    """Type-check one config entry into ``out``, or record why it is refused."""
    if key not in types:
        hint = f"; known: {', '.join(types)}" if known else ""
        problems.append(f"{name}: unknown key (value {value!r}{hint})")
    elif not _type_ok(types[key], value):
        problems.append(f"{name}: expected {types[key].__name__}, got {value!r}")
    else:
        out[key] = _coerce(types[key], value)


def from_dict(data: dict) -> TrainConfig:
    """Build and validate a config; every problem (unknown key, wrong type, bad value)
    is collected and raised together in one ConfigError."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"config must be a table, got {data!r}"])
    top_types = _field_types(TrainConfig)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{key}: must be a table, got {value!r}")
                continue
            types = _field_types(SECTIONS[key])
            section: dict[str, Any] = {}
            for sub, sub_value in value.items():
                _take(section, types, sub, sub_value, f"{key}.{sub}", problems, known=True)
            values[key] = SECTIONS[key](**section)
        else:
            _take(values, top_types, key, value, key, problems, known=False)
    config = TrainConfig(**values)
    problems.extend(_check_values(config, given=data))
    if problems:
        raise ConfigError(problems)
    return config


def _check_values(c: TrainConfig, given: dict) -> list[str]:
    problems: list[str] = []

    def bad(name: str, value: Any, why: str) -> None:
        problems.append(f"{name}: {why}, got {value!r}")

    def skip(name: str) -> bool:
        # Do not report a value twice when its type was already wrong.
        section, _, sub = name.partition(".")
        raw = given.get(section, {}) if sub else given
        key = sub or section
        return isinstance(raw, dict) and key in raw and not _type_ok(
            _field_types(SECTIONS[section] if sub else TrainConfig)[key], raw[key]
        )

    for name, choices in CHOICES.items():
        if skip(name):
            continue
        value = _get(c, name)
        if value not in choices:
            bad(name, value, f"must be one of {', '.join(choices)}")
    if not c.dataset and not skip("dataset"):
        bad("dataset", c.dataset, "required: the dataset directory")
    if not skip("extra_datasets") and not all(isinstance(d, str) and d for d in c.extra_datasets):
        bad("extra_datasets", c.extra_datasets, "must be a list of dataset directories")
    if not skip("space_groups"):
        try:
            resolve_space_groups(c.space_groups)
        except ValueError as exc:
            bad("space_groups", c.space_groups, str(exc))
    if not c.train_split and not skip("train_split"):
        bad("train_split", c.train_split, "must name a split")
    positive = ["epochs", "batch_size", "log_every", "model.input_size"]
    non_negative = ["stop_after_epochs", "seed", "num_workers", "cpu_threads", "checkpoint_every_steps", "augment.shift_px", "optim.grad_clip",
                    "optim.weight_decay", "schedule.warmup_epochs", "imbalance.power"]
    for name in positive:
        if not skip(name) and _get(c, name) <= 0:
            bad(name, _get(c, name), "must be > 0")
    for name in non_negative:
        if not skip(name) and _get(c, name) < 0:
            bad(name, _get(c, name), "must be >= 0")
    if not skip("model.input_size") and c.model.input_size < 16:
        bad("model.input_size", c.model.input_size, "must be >= 16")
    if not skip("optim.lr") and not c.optim.lr > 0:
        bad("optim.lr", c.optim.lr, "must be > 0")
    if not skip("optim.eps") and not c.optim.eps > 0:
        bad("optim.eps", c.optim.eps, "must be > 0")
    if not skip("optim.betas") and not (
        len(c.optim.betas) == 2 and all(_type_ok(float, b) and 0 <= b < 1 for b in c.optim.betas)
    ):
        bad("optim.betas", c.optim.betas, "must be two numbers in [0, 1)")
    for name in ("model.dropout", "augment.drop_view_p"):
        if not skip(name) and not 0 <= _get(c, name) < 1:
            bad(name, _get(c, name), "must be in [0, 1)")
    if not skip("schedule.min_lr_ratio") and not 0 <= c.schedule.min_lr_ratio <= 1:
        bad("schedule.min_lr_ratio", c.schedule.min_lr_ratio, "must be in [0, 1]")
    return problems


def _get(c: TrainConfig, name: str) -> Any:
    obj: Any = c
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.input_size=112' -> (['model', 'input_size'], 112). The value is read as a
    TOML value (numbers, true/false, [lists], "quoted strings"); anything that is not
    valid TOML is taken as a bare string (``--set dataset=/data/mp``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"--set {text!r}: expected key=value, e.g. epochs=3 or model.input_size=112"])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of ``data`` with each ``key=value`` set (type checking happens in from_dict)."""
    data, problems = _apply(data, overrides)
    if problems:
        raise ConfigError(problems)
    return data


def _apply(data: dict, overrides: list[str]) -> tuple[dict, list[str]]:
    data = json.loads(json.dumps(data))
    problems = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if len(path) > 2:
            problems.append(f"--set {text!r}: keys are at most two levels deep (section.key)")
            continue
        target = data
        for part in path[:-1]:
            node = target.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {text!r}: {part} is not a table")
                break
            target = node
        else:
            target[path[-1]] = value
    return data, problems


def load(path: str | Path | None, overrides: list[str] = (), *, base: dict | None = None) -> TrainConfig:
    """Read a TOML file (or start from ``base``), apply ``--set`` overrides, validate."""
    data: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML ({exc})"]) from None
    data, problems = _apply(data, list(overrides))
    try:
        config = from_dict(data)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return config


def coerce(config: dict | TrainConfig) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return from_dict(config.to_dict())  # re-validate (fields may have been edited)
    return from_dict(config)


def differences(a: TrainConfig, b: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (a value, b value) for every key that differs."""
    flat_a, flat_b = _flatten(a.to_dict()), _flatten(b.to_dict())
    return {k: (flat_a.get(k), flat_b.get(k)) for k in sorted(set(flat_a) | set(flat_b)) if flat_a.get(k) != flat_b.get(k)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in SECTIONS:
            out.update(_flatten(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out
