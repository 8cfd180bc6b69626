"""`xtalsym train`: train a model on a dataset directory, resumably, on CPU or GPU(s).

The configuration (keys, defaults and the reasons for them) is documented in
:mod:`xtalsym.offline.train_config`; ``configs/*.toml`` are worked examples.

A run directory holds::

    config.resolved.json  the validated config this run uses (after --set overrides)
    last.pt               latest checkpoint (every epoch, optionally every N steps)
    best.pt               checkpoint with the best validation top-1 so far
    metrics.csv/.json     one row per epoch: train loss/acc, val loss/top-1/top-5, lr,
                          samples/s, seconds
    curves.png            loss and accuracy curves, rewritten every epoch

Checkpoints are written with :func:`xtalsym.model.save_checkpoint`; ``extra`` holds
classes, epoch, step, optimizer, scheduler, grad scaler, RNG states, config, metrics and
the running sums of an unfinished epoch — plain Python values and tensors, so
``torch.load(weights_only=True)`` reads them.

Exact resume: the order of an epoch's samples is a pure function of (seed, epoch) (see
:func:`epoch_indices`), augmentation draws from a generator seeded by (seed, epoch,
step), and the global torch RNG (dropout) is saved and restored; the DataLoaders get
their own generators, so creating one does not advance the global RNG. A run resumed
from ``last.pt`` — at an epoch end or mid-epoch — therefore reproduces the uninterrupted
run's weights (on CPU with the same number of processes; GPU kernels may be
non-deterministic).

Multi-GPU: launch with ``torchrun --nproc_per_node N -m xtalsym train ...``;
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` select DistributedDataParallel (NCCL on CUDA,
gloo on CPU). Each rank takes every N-th index of the epoch's order (padded to a
multiple of N, like DistributedSampler), metrics are all-reduced, and only rank 0
writes files and logs. ``batch_size`` is per process.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from xtalsym.offline import train_config as tc
from xtalsym.offline.train_config import TrainConfig

log = logging.getLogger(__name__)

RESOLVED_CONFIG = "config.resolved.json"
LAST, BEST = "last.pt", "best.pt"
METRIC_FIELDS = (
    "epoch", "step", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5",
    "lr", "samples_per_s", "seconds",
)


class TrainError(ValueError):
    """A run that cannot start: an existing run directory, a resume that does not fit."""


# --------------------------------------------------------------------------- data order


def class_weights(counts: Sequence[int] | np.ndarray, power: float = 0.5) -> np.ndarray:
    """Per-class loss weights w_c ∝ n_c^-power, scaled so the mean weight over the
    training samples is 1 (sum_c n_c w_c = N). Classes with no samples get 0."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.zeros_like(counts)
    seen = counts > 0
    weights[seen] = counts[seen] ** -power
    total = (counts * weights).sum()
    if total > 0:
        weights *= counts.sum() / total
    return weights


def epoch_indices(
    labels: np.ndarray, *, seed: int, epoch: int, sample_weights: np.ndarray | None = None,
    rank: int = 0, world_size: int = 1,
) -> np.ndarray:
    """This rank's sample order for ``epoch``: a permutation (or, with
    ``sample_weights``, N draws with replacement), a pure function of (seed, epoch), padded
    to a multiple of ``world_size`` and strided by rank like DistributedSampler."""
    n = len(labels)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if sample_weights is None:
        order = torch.randperm(n, generator=generator).numpy()
    else:
        w = torch.as_tensor(sample_weights, dtype=torch.float64)
        order = torch.multinomial(w, n, replacement=True, generator=generator).numpy()
    if world_size > 1:
        pad = (-n) % world_size
        order = np.concatenate([order, order[:pad]])[rank::world_size]
    return order


def batches(order: np.ndarray, batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def augment(
    x: torch.Tensor, views: int, config: tc.AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random shifts (each view of each sample, zero fill) and hidden views."""
    present = None
    b = x.shape[0]
    if config.shift_px > 0:
        s = config.shift_px
        flat = x.reshape(-1, *x.shape[-3:])  # (B*views, channels, H, W) or (B, channels, H, W)
        h, w = flat.shape[-2:]
        padded = F.pad(flat, (s, s, s, s))
        offsets = torch.randint(0, 2 * s + 1, (flat.shape[0], 2), generator=generator)
        flat = torch.stack(
            [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())]
        )
        x = flat.reshape(x.shape)
    if config.drop_view_p > 0 and views > 1:
        present = torch.rand(b, views, generator=generator) >= config.drop_view_p
        keep = torch.randint(0, views, (b,), generator=generator)
        present[torch.arange(b), keep] = True  # at least one view stays
    return x, present


# --------------------------------------------------------------------------- distributed


class Dist:
    """Process-group facts; a no-op single process when WORLD_SIZE is unset or 1."""

    def __init__(self, device_kind: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        self.owns_group = False
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device_kind == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Global RNG states as weights_only-loadable values (tensors, lists, ints)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- setup


def _device(kind: str, dist: Dist | None = None) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("device 'cuda' requested but torch sees no CUDA device")
        index = dist.local_rank if dist is not None else 0
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.amp == "off" or (config.amp == "auto" and device.type != "cuda"):
        return None
    if config.amp == "fp16":
        return torch.float16
    if config.amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, config: tc.OptimConfig) -> torch.optim.Optimizer:
    betas = tuple(float(b) for b in config.betas)
    if config.name == "adamw":
        return torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=betas, eps=config.eps)
    # Adam as in the paper: weight decay is an L2 term added to the gradient.
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas, eps=config.eps, weight_decay=config.weight_decay)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, name: str, min_ratio: float) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps: linear warm-up, then
    cosine from 1 down to ``min_ratio`` at ``total_steps`` (or constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- files


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metrics(out: Path, history: list[dict]) -> None:
    _atomic_write_text(out / "metrics.json", json.dumps(history, indent=1))
    tmp = out / "metrics.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k) for k in METRIC_FIELDS})
    os.replace(tmp, out / "metrics.csv")
    try:
        plot_curves(out / "curves.png", history)
    except Exception:  # a plot must never stop a training run
        log.exception("could not draw %s", out / "curves.png")


def plot_curves(path: Path, history: list[dict]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]

    def series(key):
        return [row.get(key) if row.get(key) is not None else float("nan") for row in history]

    ax_loss.plot(epochs, series("train_loss"), "o-", label="train")
    ax_loss.plot(epochs, series("val_loss"), "s-", label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, series("train_acc"), "o-", label="train top-1")
    ax_acc.plot(epochs, series("val_top1"), "s-", label="val top-1")
    ax_acc.plot(epochs, series("val_top5"), "^-", label="val top-5")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    ax_lr = ax_acc.twinx()
    ax_lr.plot(epochs, series("lr"), ":", color="gray")
    ax_lr.set_ylabel("lr (dotted)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- training


class _Loader:
    """A DataLoader over a fixed list of index batches, with its own generator so that
    building it leaves the global torch RNG untouched."""

    @staticmethod
    def make(dataset, batch_list: list[list[int]], *, num_workers: int, pin_memory: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batch_list,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(0),
            persistent_workers=False,
        )


def evaluate(model, loader: DataLoader, device: torch.device, amp_dtype, dist: Dist) -> dict:
    """Unweighted loss (the model's own), top-1 and top-5 over ``loader``, all ranks."""
    module = getattr(model, "module", model)
    model.eval()
    loss_sum = correct1 = correct5 = n = 0.0
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                out = model(x)
            logits = out.logits.float()
            loss = module.loss(_float_output(out), y)
            loss_sum += float(loss) * len(y)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            correct1 += float((top[:, 0] == y).sum())
            correct5 += float((top == y[:, None]).any(dim=1).sum())
            n += len(y)
    loss_sum, correct1, correct5, n = dist.sum([loss_sum, correct1, correct5, n], device)
    if n == 0:
        return {"val_loss": None, "val_top1": None, "val_top5": None}
    return {"val_loss": loss_sum / n, "val_top1": correct1 / n, "val_top5": correct5 / n}


def _float_output(out):
    """The model output with float32 tensors (autocast may leave them in half)."""
    if hasattr(out, "_replace"):
        return out._replace(**{k: v.float() for k, v in out._asdict().items() if torch.is_tensor(v)})
    return out


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(config: dict | TrainConfig, out: str | Path, *, resume: bool = False, device: str | None = None) -> dict:
    """Train per ``config`` into run directory ``out``; return the final epoch's metrics.

    ``resume`` continues from ``out/last.pt``; without it, ``out`` must not hold a run.
    ``device`` (auto|cpu|cuda) overrides the config's.
    """
    config = tc.coerce(config)
    if device is not None:
        config = tc.coerce({**config.to_dict(), "device": device})
    for root in [config.dataset, *config.extra_datasets]:
        if not Path(root).is_dir():
            raise TrainError(f"dataset folder does not exist: {root} (make one with `xtalsym simulate dataset "
                             f"--out {root}`, or set dataset / extra_datasets in the config)")
    out = Path(out)
    try:
        trainer = Trainer(config, out, resume=resume)
        try:
            return trainer.run()
        finally:
            trainer.dist.close()
    finally:
        # The flush-to-zero mode is process-wide: leave the caller's floating point as it was
        # (Python's default), e.g. for hypothesis, which refuses to run with FTZ on.
        torch.set_flush_denormal(False)


class Trainer:
    def __init__(self, config: TrainConfig, out: Path, *, resume: bool):
        from xtalsym import model as model_lib
        from xtalsym.offline.torch_data import open_datasets

        self.model_lib = model_lib
        self.out = out
        self.last_path = out / LAST
        checkpoint = None
        if resume:
            if not self.last_path.is_file():
                raise TrainError(f"--resume: no {LAST} in {out}")
            self._loaded, checkpoint = model_lib.load_checkpoint(self.last_path, map_location="cpu")
            saved = tc.from_dict(checkpoint["config"])
            changed = {k: v for k, v in tc.differences(saved, config).items() if k not in tc.RESUMABLE_CHANGES}
            if changed:
                raise TrainError(
                    "--resume with a different config: "
                    + "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in changed.items())
                )
        elif self.last_path.exists():
            raise TrainError(f"{out} already holds a run ({LAST}); pass --resume or choose another --out")
        self.config = config
        self.dist = Dist("cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = _device(config.device, self.dist)
        self.amp_dtype = _amp_dtype(config, self.device)
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        # Without batch norm, trained weights drift into denormal floats that x86 CPUs
        # handle in microcode: measured here, training slowed from ~80 to ~30 samples/s
        # within two epochs. Flushing them to zero costs no accuracy.
        torch.set_flush_denormal(True)
        seed_everything(config.seed)

        classes = config.classes()
        roots = [config.dataset, *config.extra_datasets]
        self.train_set = open_datasets(roots, config.train_split, representation="shaped", classes=classes)
        # The representation depends on the model: build the model, then re-open if needed.
        self.classes = list(self.train_set.classes)
        if not self.classes:
            raise TrainError(f"no space groups to train on in split {config.train_split!r} of {config.dataset}")
        options = dict(config.model.options)
        options.setdefault("dropout", config.model.dropout)
        self.model = model_lib.build_model(
            config.model.name, len(self.classes), input_size=config.model.input_size, **options
        )
        if config.init_from and checkpoint is None:
            self._init_from(config.init_from)
        representation = getattr(self.model, "representation", "shaped")
        if representation != "shaped":
            self.train_set = open_datasets(roots, config.train_split, representation=representation, classes=self.classes)
        if len(self.train_set) == 0:
            raise TrainError(
                f"split {config.train_split!r} of {config.dataset} has no samples of the configured space groups"
            )
        self.val_set = None
        if config.val_split:
            self.val_set = open_datasets(roots, config.val_split, representation=representation, classes=self.classes)
        counts = self.train_set.class_counts()
        self.class_counts = counts
        weights = class_weights(counts, config.imbalance.power)
        self.loss_weight = (
            torch.tensor(weights, dtype=torch.float32, device=self.device) if config.imbalance.mode == "loss" else None
        )
        self.sample_weights = weights[self.train_set.labels] if config.imbalance.mode == "sampler" else None

        self.model.to(self.device)
        if self.device.type == "cuda" and config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.optimizer = make_optimizer(self.module, config.optim)
        self.steps_per_epoch = math.ceil(
            math.ceil(len(self.train_set) / self.dist.world_size) / config.batch_size
        )
        self.warmup_steps = int(round(config.schedule.warmup_epochs * self.steps_per_epoch))
        self.total_steps = config.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.epoch = 0  # epochs completed
        self.step = 0  # optimiser steps completed
        self.batch_in_epoch = 0  # batches of the current epoch already trained
        self.running = {"loss": 0.0, "correct": 0.0, "n": 0.0, "seconds": 0.0}
        self.history: list[dict] = []
        self.best_top1 = -1.0
        if checkpoint is not None:
            self._restore(checkpoint)
        elif self.dist.main:
            out.mkdir(parents=True, exist_ok=True)
        if self.dist.main:
            _atomic_write_text(out / RESOLVED_CONFIG, json.dumps(config.to_dict(), indent=1))
        log.info(
            "training %s on %d samples (%d classes; %d left out), val %d, %d steps/epoch, device %s, amp %s",
            config.model.name, len(self.train_set), len(self.classes), self.train_set.excluded,
            len(self.val_set) if self.val_set is not None else 0, self.steps_per_epoch, self.device, self.amp_dtype,
        )

    def _init_from(self, path: str) -> None:
        """Start from another checkpoint's weights (fine-tuning); refused unless it is the same
        model over the same classes."""
        try:
            start, extra = self.model_lib.load_checkpoint(path)
        except (FileNotFoundError, ValueError) as exc:
            raise TrainError(f"init_from: {exc}") from None
        spec, wanted = self.model_lib.model_spec(start), self.model_lib.model_spec(self.model)
        if spec != wanted:
            raise TrainError(f"init_from {path}: its model {spec} is not this run's {wanted}")
        theirs = [int(c) for c in extra.get("classes", [])]
        if theirs and theirs != self.classes:
            raise TrainError(f"init_from {path}: its {len(theirs)} classes are not this run's {len(self.classes)}")
        self.model.load_state_dict(start.state_dict())
        log.info("model weights from %s (fine-tuning)", path)

    def _lr_lambda(self, step: int) -> float:
        s = self.config.schedule
        return lr_factor(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, name=s.name,
                         min_ratio=s.min_lr_ratio)

    # ---------------------------------------------------------------- checkpoints

    def _extra(self) -> dict:
        rngs = self.dist.gather(rng_state())
        return {
            "classes": [int(c) for c in self.classes],
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "running": dict(self.running),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs[0] if len(rngs) == 1 else {"per_rank": rngs},
            "world_size": self.dist.world_size,
            "config": self.config.to_dict(),
            "metrics": list(self.history),
            "best_top1": self.best_top1,
            "class_counts": [int(c) for c in self.class_counts],
        }

    def save(self, path: Path, extra: dict | None = None) -> None:
        extra = self._extra() if extra is None else extra
        if self.dist.main:
            self.model_lib.save_checkpoint(path, self.module, extra=extra)
        self.dist.barrier()

    def _restore(self, extra: dict) -> None:
        self.module.load_state_dict(self._loaded.state_dict())
        del self._loaded
        if [int(c) for c in extra["classes"]] != self.classes:
            raise TrainError(f"{self.last_path}: its classes differ from this dataset's")
        if int(extra.get("world_size", 1)) != self.dist.world_size:
            log.warning("resuming a %s-process run with %d processes: the data order per rank changes",
                        extra.get("world_size"), self.dist.world_size)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        self.scaler.load_state_dict(extra["scaler"])
        self.epoch, self.step = int(extra["epoch"]), int(extra["step"])
        self.batch_in_epoch = int(extra["batch_in_epoch"])
        self.running = dict(extra["running"])
        self.history = list(extra["metrics"])
        self.best_top1 = float(extra["best_top1"])
        rng = extra["rng"]
        if "per_rank" in rng:
            per_rank = rng["per_rank"]
            rng = per_rank[self.dist.rank] if self.dist.rank < len(per_rank) else per_rank[0]
        set_rng_state(rng)
        log.info("resumed %s at epoch %d, step %d", self.last_path, self.epoch, self.step)

    # ---------------------------------------------------------------- loop

    def run(self) -> dict:
        config = self.config
        pin = self.device.type == "cuda"
        val_loader = None
        if self.val_set is not None and len(self.val_set):
            order = np.arange(len(self.val_set))[self.dist.rank :: self.dist.world_size]
            val_loader = _Loader.make(self.val_set, batches(order, config.batch_size), num_workers=config.num_workers,
                                      pin_memory=pin)
        elif self.val_set is not None and self.dist.main:
            log.warning("validation split %r has no samples of the configured space groups", config.val_split)
        last_epoch = config.last_epoch()
        if self.epoch >= last_epoch and self.dist.main:
            log.info("nothing to train: %d of %d epochs done (stop_after_epochs %d)", self.epoch, config.epochs,
                     config.stop_after_epochs)
        while self.epoch < last_epoch:
            self._train_epoch(pin)
            self._finish_epoch(val_loader)
        return self.history[-1] if self.history else {}

    def _train_epoch(self, pin: bool) -> None:
        config = self.config
        epoch = self.epoch
        order = epoch_indices(self.train_set.labels, seed=config.seed, epoch=epoch, sample_weights=self.sample_weights,
                              rank=self.dist.rank, world_size=self.dist.world_size)
        batch_list = batches(order, config.batch_size)[self.batch_in_epoch :]
        loader = _Loader.make(self.train_set, batch_list, num_workers=config.num_workers, pin_memory=pin)
        views = getattr(self.module, "views", 1)
        self.model.train()
        bar = None
        if config.progress and self.dist.main:
            from xtalsym.progress import progress

            bar = progress(total=self.steps_per_epoch, initial=self.batch_in_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                           unit="batch", dynamic_ncols=True, leave=False)
        last_log = time.perf_counter()
        window_n = 0
        start = time.perf_counter()
        for x, y in loader:
            generator = torch.Generator().manual_seed(
                (config.seed * 1_000_003 + epoch) * 1_000_003 + self.batch_in_epoch
            )
            x, present = augment(x, views, config.augment, generator)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if present is not None:
                present = present.to(self.device, non_blocking=True)
            with _autocast(self.device, self.amp_dtype):
                output = self.model(x, present)
            output = _float_output(output)
            loss = self.module.loss(output, y, present, weight=self.loss_weight)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if config.optim.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), config.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            self.batch_in_epoch += 1
            n = len(y)
            loss_value = float(loss.detach())
            self.running["loss"] += loss_value * n
            self.running["correct"] += float((output.logits.detach().argmax(1) == y).sum())
            self.running["n"] += n
            window_n += n
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at epoch {epoch + 1}, step {self.step}")
            if bar is not None:
                bar.update(1)
            if self.batch_in_epoch % config.log_every == 0 or self.batch_in_epoch == self.steps_per_epoch:
                now = time.perf_counter()
                rate = window_n * self.dist.world_size / max(now - last_log, 1e-9)
                last_log, window_n = now, 0
                acc = self.running["correct"] / max(self.running["n"], 1)
                avg = self.running["loss"] / max(self.running["n"], 1)
                if bar is not None:
                    bar.set_postfix(loss=f"{avg:.3f}", acc=f"{acc:.3f}", samples_s=f"{rate:.1f}")
                elif self.dist.main:
                    log.info("epoch %d step %d loss %.4f acc %.3f %.1f samples/s", epoch + 1, self.step, avg, acc, rate)
            if config.checkpoint_every_steps and self.step % config.checkpoint_every_steps == 0 \
                    and self.batch_in_epoch < self.steps_per_epoch:
                self.running["seconds"] += time.perf_counter() - start
                start = time.perf_counter()
                self.save(self.last_path)
        self.running["seconds"] += time.perf_counter() - start
        if bar is not None:
            bar.close()

    def _finish_epoch(self, val_loader) -> dict:
        loss_sum, correct, n = self.dist.sum(
            [self.running["loss"], self.running["correct"], self.running["n"]], self.device
        )
        seconds = self.running["seconds"]
        row: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "train_loss": loss_sum / max(n, 1),
            "train_acc": correct / max(n, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": n / max(seconds, 1e-9),
            "seconds": seconds,
        }
        if val_loader is not None:
            row.update(evaluate(self.model, val_loader, self.device, self.amp_dtype, self.dist))
        else:
            row.update({"val_loss": None, "val_top1": None, "val_top5": None})
        self.history.append(row)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.running = {"loss": 0.0, "correct": 0.0, "n": 0.0, "seconds": 0.0}
        improved = row["val_top1"] is not None and row["val_top1"] > self.best_top1
        if improved:
            self.best_top1 = row["val_top1"]
        extra = self._extra()
        if self.dist.main:
            write_metrics(self.out, self.history)
            log.info(
                "epoch %d: train loss %.4f acc %.3f | val loss %s top-1 %s top-5 %s | %.1f samples/s, %.0f s",
                row["epoch"], row["train_loss"], row["train_acc"], _fmt(row["val_loss"]), _fmt(row["val_top1"]),
                _fmt(row["val_top5"]), row["samples_per_s"], seconds,
            )
        self.save(self.last_path, extra)
        if improved:
            self.save(self.out / BEST, extra)
        return row


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
