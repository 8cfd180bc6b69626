"""One calibrated posterior over all 230 space groups from the MSDN, the symmetry evidence
and a prior, and the prediction it supports (what the data can and cannot tell apart).

The model is a conditional-logit product of experts: for each candidate group g,

    s(g) = w_in · log p_T(g)                  the MSDN's tempered softmax (g among its classes)
         + w_sys · log p_T(system of g)       the MSDN's mass on g's crystal system
         + w_brav · log p_T(Bravais of g)     ... and on g's Bravais lattice
         + [g outside the classes] · (b_out + w_ent · H(p_T))
         + w_ev · max(ev(g) − max ev, −clip)  the evidence log-likelihood of g's signature
         + w_top · [ev(g) within 0.5 of max ev] the groups the evidence points to
         + w_prior · log π_train(g)
         + the stacked features (STACKED_FEATURES): the evidence gap clipped at 2, 8 and 32 nats,
           the evidence's own mass on g's indistinguishable set, Bravais lattice and crystal
           system, the MSDN's mass on g's set, and the evidence gap scaled by the MSDN's entropy
         + the tilt features (TILT_FEATURES): the evidence gap, its 32-nat clip, the evidence's set
           and system masses and the MSDN's log-probability, each times the zones' off-axis score
           t and times t² (evidence.axis, capped at 1; 0 where not measured), so that a fit on
           patterns on and off the zone axes learns how far to trust each as the zones tilt away

and p(g | data) = softmax over the 230 groups of s. A file fitted without the stacked features
(the product of experts alone) gives them weight 0. One parameter set per number of views
(1, 2, 3), fitted on the validation split by maximum likelihood (offline.fusion_fit); the
parameters live in the bundle as ``fusion.json``. The fitted posterior is calibrated for
materials drawn at the training frequencies; another prior π' (flat, or a site's own) is
applied exactly by Bayes' rule: p'(g) ∝ p(g) π'(g) / π_train(g).

Groups that three zone-axis patterns cannot tell apart form indistinguishable sets
(xtalsym.symmetry); a prediction names the most probable set, ranks the groups inside it,
and says "cannot decide" with candidates when no set is probable enough.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from xtalsym import spacegroups

log = logging.getLogger(__name__)

FUSION_FILE = "fusion.json"
FUSION_FORMAT = "xtalsym-fusion/1"
N_GROUPS = 230
GROUPS = np.arange(1, N_GROUPS + 1)
PRODUCT_FEATURES = ("msdn", "msdn_system", "msdn_bravais", "outside", "outside_entropy", "evidence", "evidence_top",
                    "prior")
# the stacked model's extra features (fusion.json files without them give them weight 0: the product of experts)
# each of these features times the off-axis score t and times t² (the trust in the zone rules need
# not fall linearly as the zones tilt)
TILT_BASES = ("evidence", "evidence_32", "evidence_set", "evidence_system", "msdn")
TILT_FEATURES = tuple(f"{base}_x_tilt{suffix}" for suffix in ("", "2") for base in TILT_BASES)
STACKED_FEATURES = ("evidence_2", "evidence_8", "evidence_32", "evidence_set", "evidence_bravais", "evidence_system",
                    "msdn_set", "evidence_x_entropy") + TILT_FEATURES
FEATURES = PRODUCT_FEATURES + STACKED_FEATURES
# the tilt features need the off-axis score, which only the evidence measures
EVIDENCE_FEATURES = ("evidence", "evidence_top", "evidence_2", "evidence_8", "evidence_32", "evidence_set",
                     "evidence_bravais", "evidence_system", "evidence_x_entropy") + TILT_FEATURES
TILT_CAP = 1.0  # off-axis scores above this (zones far off their axes) count as this
COLUMN = {f: i for i, f in enumerate(FEATURES)}
EVIDENCE_DEPTHS_NATS = (2.0, 8.0, 32.0)  # evidence_2/8/32: the log-likelihood gap clipped at these depths, / depth
EVIDENCE_TOP_NATS = 0.5  # a group this close to the evidence's best counts as "what the evidence points to"
PRIOR_SMOOTHING = 0.5  # pseudo-count per group: a group absent from training keeps a small prior
DEFAULT_DECIDE_AT = 0.5  # below this set probability a prediction says "cannot decide"
CANDIDATE_MASS = 0.99  # "cannot decide" lists sets until they hold this much probability
MAX_CANDIDATES = 8
LOG_FLOOR = -30.0  # log of a probability that rounds to zero (keeps features finite)
TOP_GROUPS = 5
TOP_SETS = 3


class FusionError(ValueError):
    """Fusion parameters or inputs that cannot be used (named in the message)."""


# --------------------------------------------------------------------------- symmetry tables


@dataclass(frozen=True)
class SymmetryTables:
    """Per-group lookups the fusion needs, computed once from xtalsym.symmetry."""

    cell_known: bool
    set_of: np.ndarray  # (230,) index of each group's indistinguishable set
    sets: tuple[tuple[int, ...], ...]  # the sets, each sorted by group number
    system: np.ndarray  # (230,) index into spacegroups.CRYSTAL_SYSTEMS
    bravais: np.ndarray  # (230,) index into bravais_names
    bravais_names: tuple[str, ...]


    @classmethod
    def from_lists(cls, sets: Sequence[Sequence[int]], bravais_of: Sequence[str], *, cell_known: bool) -> SymmetryTables:
        """Tables from the sets (a partition of 1..230) and each group's Bravais symbol."""
        sets = sorted(tuple(sorted(int(g) for g in members)) for members in sets)
        set_of = np.full(N_GROUPS, -1, dtype=np.int64)
        for i, members in enumerate(sets):
            for g in members:
                if not 1 <= g <= N_GROUPS or set_of[g - 1] >= 0:
                    raise FusionError(f"symmetry sets are not a partition of 1-230 (group {g})")
                set_of[g - 1] = i
        if (set_of < 0).any():
            raise FusionError(f"symmetry sets miss groups {list(GROUPS[set_of < 0])}")
        if len(bravais_of) != N_GROUPS:
            raise FusionError(f"need a Bravais lattice for each of the 230 groups, got {len(bravais_of)}")
        names = tuple(dict.fromkeys(str(b) for b in bravais_of))
        system = np.array([spacegroups.CRYSTAL_SYSTEMS.index(spacegroups.crystal_system(int(g))) for g in GROUPS])
        return cls(
            cell_known=cell_known,
            set_of=set_of,
            sets=tuple(sets),
            system=system,
            bravais=np.array([names.index(str(b)) for b in bravais_of]),
            bravais_names=names,
        )


@lru_cache(maxsize=2)
def symmetry_tables(cell_known: bool = True) -> SymmetryTables:
    """Tables computed from the groups' operations (xtalsym.symmetry; ~10 CPU-s, so the
    fitted parameters carry a copy and predictions never recompute them)."""
    from xtalsym import symmetry

    sets = symmetry.indistinguishable_sets(list(GROUPS), cell_known=cell_known)
    return SymmetryTables.from_lists(sets, [symmetry.bravais_lattice(int(g)) for g in GROUPS], cell_known=cell_known)


def set_label(members: Sequence[int]) -> str:
    """'Fm-3m or F-43m' (groups in the order given)."""
    symbols = [spacegroups.symbol(int(g)) for g in members]
    if len(symbols) <= 2:
        return " or ".join(symbols)
    return ", ".join(symbols[:-1]) + " or " + symbols[-1]


# --------------------------------------------------------------------------- priors


def training_prior(counts: np.ndarray) -> np.ndarray:
    """Smoothed training frequencies (230,), summing to 1."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (N_GROUPS,) or (counts < 0).any():
        raise FusionError(f"prior counts must be 230 non-negative numbers, got shape {counts.shape}")
    smoothed = counts + PRIOR_SMOOTHING
    return smoothed / smoothed.sum()


def load_prior(spec: str | os.PathLike | Mapping | None, train_prior: np.ndarray) -> tuple[np.ndarray, str]:
    """(prior (230,), description) from ``spec``: None/"training" (the bundle's training
    frequencies), "flat", or a site's JSON file / mapping {space group: weight}; groups
    it does not list get the smallest weight it gives (never zero: a zero would make a
    group impossible whatever the data say)."""
    if spec is None or spec == "training":
        return train_prior, "training frequencies"
    if spec == "flat":
        return np.full(N_GROUPS, 1.0 / N_GROUPS), "flat"
    source = "mapping"
    if not isinstance(spec, Mapping):
        path = Path(spec)
        if not path.is_file():
            raise FusionError(f"prior must be 'training', 'flat' or a JSON file of {{space group: weight}}; no file {path}")
        try:
            spec = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FusionError(f"prior file {path} is not valid JSON ({exc})") from None
        source = str(path)
        if not isinstance(spec, Mapping):
            raise FusionError(f"prior file {path} must hold a JSON object {{space group: weight}}, got {type(spec).__name__}")
    weights = np.zeros(N_GROUPS)
    for key, value in spec.items():
        try:
            group = spacegroups.check_number(int(key))
        except (TypeError, ValueError):
            raise FusionError(f"prior {source}: {key!r} is not a space group number 1-230") from None
        if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise FusionError(f"prior {source}: weight of group {key} must be a finite number >= 0, got {value!r}")
        weights[group - 1] = float(value)
    if weights.sum() <= 0:
        raise FusionError(f"prior {source}: all weights are zero")
    positive = weights[weights > 0]
    weights[weights == 0] = positive.min()
    return weights / weights.sum(), f"site prior {source}"


# --------------------------------------------------------------------------- parameters


@dataclass
class FusionParams:
    """What ``fusion.json`` holds: the model's classes, the prior counts and the fitted weights."""

    classes: list[int]
    prior_counts: np.ndarray  # (230,) training materials per group
    weights: dict[int, dict[str, float]]  # views present (1, 2, 3) -> feature -> weight (with evidence)
    temperature: dict[int, float]  # views present -> MSDN temperature
    # the same fitted without evidence: used when a prediction has none (a caller that cannot
    # measure it), so that its absence is not read as "uninformative evidence"
    weights_no_evidence: dict[int, dict[str, float]] = field(default_factory=dict)
    temperature_no_evidence: dict[int, float] = field(default_factory=dict)
    evidence_clip: float = 20.0
    decide_at: float = DEFAULT_DECIDE_AT
    cell_known: bool = True
    sets: list[list[int]] = field(default_factory=list)  # indistinguishable sets (a copy of xtalsym.symmetry's)
    bravais: list[str] = field(default_factory=list)  # Bravais lattice of groups 1..230
    fitted: dict = field(default_factory=dict)  # what it was fitted on, with which figures
    # no decision where the evidence's off-axis score (evidence.axis) is above this: the weights were
    # fitted on zone-axis patterns, and off the axis they decide wrongly (docs/RESULTS.md, issue 15,
    # session 5); None: no such rule (files written before it)
    off_axis_above: float | None = None

    def __post_init__(self):
        # weights written before the stacked features existed give those features weight 0
        self.weights = {k: _weights_from_json(v) for k, v in self.weights.items()}
        self.weights_no_evidence = {k: _weights_from_json(v) for k, v in self.weights_no_evidence.items()}

    def tables(self) -> SymmetryTables:
        if not self.sets or not self.bravais:
            return symmetry_tables(self.cell_known)
        return SymmetryTables.from_lists(self.sets, self.bravais, cell_known=self.cell_known)

    def to_json(self) -> dict:
        return {
            "format": FUSION_FORMAT,
            "classes": [int(c) for c in self.classes],
            "prior_counts": [int(c) for c in self.prior_counts],
            "weights": {str(k): {f: float(v[f]) for f in FEATURES} for k, v in sorted(self.weights.items())},
            "temperature": {str(k): float(v) for k, v in sorted(self.temperature.items())},
            "weights_no_evidence": {str(k): {f: float(v[f]) for f in FEATURES}
                                    for k, v in sorted(self.weights_no_evidence.items())},
            "temperature_no_evidence": {str(k): float(v) for k, v in sorted(self.temperature_no_evidence.items())},
            "evidence_clip": float(self.evidence_clip),
            "decide_at": float(self.decide_at),
            "cell_known": bool(self.cell_known),
            "sets": [[int(g) for g in members] for members in self.sets],
            "bravais": [str(b) for b in self.bravais],
            "off_axis_above": None if self.off_axis_above is None else float(self.off_axis_above),
            "fitted": self.fitted,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "fusion parameters") -> FusionParams:
        if not isinstance(data, dict) or data.get("format") != FUSION_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise FusionError(f"{where}: format {got!r}, expected {FUSION_FORMAT!r}")
        try:
            weights = {int(k): _weights_from_json(v) for k, v in data["weights"].items()}
            temperature = {int(k): float(v) for k, v in data["temperature"].items()}
            weights_ne = {int(k): _weights_from_json(v) for k, v in data.get("weights_no_evidence", {}).items()}
            temperature_ne = {int(k): float(v) for k, v in data.get("temperature_no_evidence", {}).items()}
            params = cls(
                classes=[int(c) for c in data["classes"]],
                prior_counts=np.asarray(data["prior_counts"], dtype=np.float64),
                weights=weights,
                temperature=temperature,
                weights_no_evidence=weights_ne,
                temperature_no_evidence=temperature_ne,
                evidence_clip=float(data.get("evidence_clip", 20.0)),
                decide_at=float(data.get("decide_at", DEFAULT_DECIDE_AT)),
                cell_known=bool(data.get("cell_known", True)),
                sets=[[int(g) for g in members] for members in data.get("sets", [])],
                bravais=[str(b) for b in data.get("bravais", [])],
                fitted=dict(data.get("fitted", {})),
                off_axis_above=None if data.get("off_axis_above") is None else float(data["off_axis_above"]),
            )
            params.tables()  # a malformed partition is refused now, not at the first prediction
        except (KeyError, TypeError, ValueError) as exc:
            raise FusionError(f"{where}: missing or malformed entry ({type(exc).__name__}: {exc})") from None
        if params.prior_counts.shape != (N_GROUPS,):
            raise FusionError(f"{where}: prior_counts has {params.prior_counts.size} entries, expected 230")
        missing = [k for k in (1, 2, 3) if k not in params.weights or k not in params.temperature]
        if missing:
            raise FusionError(f"{where}: no weights for {missing} view(s)")
        if set(params.weights_no_evidence) != set(params.temperature_no_evidence):
            raise FusionError(f"{where}: weights_no_evidence and temperature_no_evidence list different view counts")
        if params.off_axis_above is not None and not (math.isfinite(params.off_axis_above) and params.off_axis_above >= 0):
            raise FusionError(f"{where}: off_axis_above must be a number >= 0 or null, got {params.off_axis_above}")
        if any(t <= 0 for t in list(params.temperature.values()) + list(params.temperature_no_evidence.values())):
            raise FusionError(f"{where}: temperatures must be > 0, got {params.temperature}")
        for c in params.classes:
            spacegroups.check_number(c)
        return params

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FusionParams:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FusionError(f"{path} is not readable JSON ({exc})") from None
        return cls.from_json(data, where=str(path))


def _weights_from_json(entry: Mapping) -> dict[str, float]:
    """One view count's weights; the stacked features default to 0 (a product-of-experts file)."""
    return {f: float(entry[f]) if f in entry or f not in STACKED_FEATURES else 0.0 for f in FEATURES}


# --------------------------------------------------------------------------- the posterior


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _group_log_mass(logp: np.ndarray, class_key: np.ndarray, group_key: np.ndarray, n_keys: int) -> np.ndarray:
    """log of a probability (the MSDN's over its classes, or the evidence's over the 230 groups)
    summed over the columns sharing a key (crystal system, Bravais lattice, set), per group."""
    onehot = np.zeros((len(class_key), n_keys))
    onehot[np.arange(len(class_key)), class_key] = 1.0
    mass = np.exp(logp) @ onehot
    return np.maximum(np.log(np.maximum(mass, 1e-300)), LOG_FLOOR)[..., group_key]


def feature_tensor(
    msdn_logits: np.ndarray,
    evidence_loglik: np.ndarray | None,
    *,
    classes: Sequence[int],
    temperature: float,
    evidence_clip: float,
    log_prior_train: np.ndarray,
    tables: SymmetryTables,
    off_axis: np.ndarray | float | None = None,
) -> np.ndarray:
    """(B, 230, len(FEATURES)) features of every group for a batch of summed MSDN logits
    (B, C), evidence log-likelihoods (B, 230) or None (no evidence), and the evidence's
    off-axis scores (B,) or None (not measured: the tilt features are 0)."""
    logits = np.atleast_2d(np.asarray(msdn_logits, dtype=np.float64))
    batch = logits.shape[0]
    columns = np.asarray(classes, dtype=np.int64) - 1
    logp = _log_softmax(logits / temperature)
    feats = np.zeros((batch, N_GROUPS, len(FEATURES)))
    inside = np.zeros(N_GROUPS, dtype=bool)
    inside[columns] = True
    c = COLUMN
    feats[:, columns, c["msdn"]] = np.maximum(logp, LOG_FLOOR)
    feats[:, :, c["msdn_system"]] = _group_log_mass(logp, tables.system[columns], tables.system,
                                                    len(spacegroups.CRYSTAL_SYSTEMS))
    feats[:, :, c["msdn_bravais"]] = _group_log_mass(logp, tables.bravais[columns], tables.bravais,
                                                     len(tables.bravais_names))
    feats[:, :, c["msdn_set"]] = _group_log_mass(logp, tables.set_of[columns], tables.set_of, len(tables.sets))
    feats[:, ~inside, c["outside"]] = 1.0
    entropy = -(np.exp(logp) * logp).sum(axis=-1)
    feats[:, ~inside, c["outside_entropy"]] = entropy[:, None]
    if evidence_loglik is not None:
        ev = np.atleast_2d(np.asarray(evidence_loglik, dtype=np.float64))
        if ev.shape != (batch, N_GROUPS):
            raise FusionError(f"evidence log-likelihoods must have shape ({batch}, 230), got {ev.shape}")
        ev = np.where(np.isfinite(ev), ev, -np.inf)
        top = ev.max(axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        gap = ev - top  # <= 0; -inf where the evidence rules a group out
        feats[:, :, c["evidence"]] = np.maximum(gap, -evidence_clip)
        feats[:, :, c["evidence_top"]] = (gap >= -EVIDENCE_TOP_NATS) & np.isfinite(ev)
        # the stacked model: a saturating response to the gap (near-ties count, deep gaps less) ...
        for depth in EVIDENCE_DEPTHS_NATS:
            feats[:, :, c[f"evidence_{depth:g}"]] = np.maximum(gap, -depth) / depth
        # ... the evidence's own mass (flat prior) on g's set, Bravais lattice and crystal system ...
        ev_logp = _log_softmax(np.maximum(gap, -700.0))
        scale = -LOG_FLOOR  # masses are floored at LOG_FLOOR: these features lie in [-1, 0]
        feats[:, :, c["evidence_set"]] = _group_log_mass(ev_logp, tables.set_of, tables.set_of, len(tables.sets)) / scale
        feats[:, :, c["evidence_bravais"]] = _group_log_mass(ev_logp, tables.bravais, tables.bravais,
                                                             len(tables.bravais_names)) / scale
        feats[:, :, c["evidence_system"]] = _group_log_mass(ev_logp, tables.system, tables.system,
                                                            len(spacegroups.CRYSTAL_SYSTEMS)) / scale
        # ... and the evidence trusted more where the MSDN is unsure
        feats[:, :, c["evidence_x_entropy"]] = np.maximum(gap, -32.0) / 32.0 * entropy[:, None]
        tilt = tilt_of(off_axis, batch)[:, None]
        for base in TILT_BASES:
            feats[:, :, c[f"{base}_x_tilt"]] = feats[:, :, c[base]] * tilt
            feats[:, :, c[f"{base}_x_tilt2"]] = feats[:, :, c[base]] * tilt ** 2
    feats[:, :, c["prior"]] = log_prior_train[None, :]
    return feats


def tilt_of(off_axis: np.ndarray | Sequence[float | None] | float | None, batch: int) -> np.ndarray:
    """(batch,) off-axis scores as the tilt features take them: capped at TILT_CAP, 0 where not
    measured (None or NaN, for the batch or one row: read as on the axis, as the fusion did before
    it saw the score)."""
    if off_axis is None:
        return np.zeros(batch)
    if not isinstance(off_axis, np.ndarray):  # a score, or one per row (SampleEvidence.off_axis: None if not measured)
        off_axis = [np.nan if v is None else v for v in np.atleast_1d(np.asarray(off_axis, dtype=object))]
    t = np.broadcast_to(np.asarray(off_axis, dtype=np.float64), (batch,))
    return np.clip(np.nan_to_num(t, nan=0.0), 0.0, TILT_CAP)


def scores(feats: np.ndarray, weights: Mapping[str, float]) -> np.ndarray:
    w = np.array([weights[f] for f in FEATURES])
    return feats @ w


@dataclass(frozen=True)
class GroupScore:
    space_group: int
    symbol: str
    probability: float
    in_model_classes: bool

    def to_json(self) -> dict:
        return {
            "space_group": self.space_group,
            "symbol": self.symbol,
            "probability": round(self.probability, 6),
            "in_model_classes": self.in_model_classes,
        }


@dataclass(frozen=True)
class SetScore:
    groups: tuple[GroupScore, ...]  # ranked inside the set
    probability: float

    @property
    def label(self) -> str:
        return set_label([g.space_group for g in self.groups])

    @property
    def members(self) -> list[int]:
        return [g.space_group for g in self.groups]

    def statement(self) -> str:
        if len(self.groups) == 1:
            return f"{self.label}: the data single it out"
        return f"{self.label}: these data cannot separate them"

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "probability": round(self.probability, 6),
            "groups": [g.to_json() for g in self.groups],
            "statement": self.statement(),
        }


@dataclass(frozen=True)
class FusedPrediction:
    """What one prediction says (see the module docstring)."""

    posterior: np.ndarray  # (230,)
    views: tuple[str, ...]
    top_groups: tuple[GroupScore, ...]
    top_sets: tuple[SetScore, ...]
    crystal_system: tuple[str, float]
    bravais_lattice: tuple[str, float]
    decided: bool
    candidates: tuple[SetScore, ...]  # when not decided: the sets still in play, best first
    reason: str  # why it cannot decide ("" when decided)
    prior: str
    evidence_used: bool
    warnings: tuple[str, ...] = ()

    @property
    def best_set(self) -> SetScore:
        return self.top_sets[0]

    def probability_of(self, group: int) -> float:
        return float(self.posterior[spacegroups.check_number(group) - 1])

    def set_probability_of(self, group: int, tables: SymmetryTables | None = None) -> float:
        tables = tables or symmetry_tables(True)
        members = tables.sets[tables.set_of[group - 1]]
        return float(self.posterior[np.asarray(members) - 1].sum())

    def truth_verdict(self, group: int) -> str:
        """How a known true group relates to this prediction: 'top-1', 'in set', 'candidate', 'wrong'."""
        if self.top_groups and self.top_groups[0].space_group == group:
            return "top-1"
        if group in self.best_set.members:
            return "in set"
        if not self.decided and any(group in c.members for c in self.candidates):
            return "candidate"
        return "wrong"

    def headline(self) -> str:
        if self.decided:
            return f"{self.best_set.statement()} (p = {self.best_set.probability:.2f})"
        listed = "; ".join(f"{c.label} ({c.probability:.2f})" for c in self.candidates)
        return f"cannot decide ({self.reason}); candidates: {listed}"

    def to_json(self) -> dict:
        return {
            "decided": self.decided,
            "headline": self.headline(),
            "set": self.best_set.to_json(),
            "top_sets": [s.to_json() for s in self.top_sets],
            "top_groups": [g.to_json() for g in self.top_groups],
            "crystal_system": {"name": self.crystal_system[0], "probability": round(self.crystal_system[1], 6)},
            "bravais_lattice": {"name": self.bravais_lattice[0], "probability": round(self.bravais_lattice[1], 6)},
            "cannot_decide": None
            if self.decided
            else {"reason": self.reason, "candidates": [c.to_json() for c in self.candidates]},
            "views": list(self.views),
            "prior": self.prior,
            "evidence_used": self.evidence_used,
            "warnings": list(self.warnings),
        }


class Fusion:
    """The posterior of a bundle's fusion parameters under a chosen prior."""

    def __init__(self, params: FusionParams, *, prior: str | os.PathLike | Mapping | None = None):
        self.params = params
        self.tables = params.tables()
        self.train_prior = training_prior(params.prior_counts)
        self.log_prior_train = np.log(self.train_prior)
        self.prior, self.prior_name = load_prior(prior, self.train_prior)
        if prior in (None, "training") and params.fitted.get("prior"):
            self.prior_name = f"frequencies of the {params.fitted['prior']}"  # where the bundle's counts came from
        self.log_prior_shift = np.log(self.prior) - self.log_prior_train
        self._inside = set(int(c) for c in params.classes)

    def uses_evidence(self, n_views: int) -> bool:
        """Whether evidence moves the posterior with ``n_views`` views: some evidence feature has
        a weight there. A fit where the evidence of that many zones bought nothing on validation
        keeps the no-evidence weights for it (benchmarks/fusion.py), and a caller may then skip
        combining those zones (the daemon's partial predictions: milliseconds per request)."""
        k = int(n_views)
        weights = self.params.weights.get(k if k > 0 else 1, {})
        return any(weights.get(f, 0.0) != 0.0 for f in EVIDENCE_FEATURES)

    def posterior(self, view_logits: np.ndarray, present: np.ndarray | None = None,
                  evidence_loglik: np.ndarray | None = None, off_axis: np.ndarray | float | None = None) -> np.ndarray:
        """(B, 230) posterior from per-view MSDN logits (B, 3, C), views present (B, 3)
        (None: all), evidence log-likelihoods (B, 230) or None, and the evidence's off-axis
        scores (B,) or None (not measured)."""
        view_logits = np.asarray(view_logits, dtype=np.float64)
        if view_logits.ndim == 2:
            view_logits = view_logits[None]
        batch, views, classes = view_logits.shape
        if classes != len(self.params.classes) or views != 3:
            raise FusionError(f"view logits must have shape (B, 3, {len(self.params.classes)}), got {view_logits.shape}")
        present = np.ones((batch, 3), dtype=bool) if present is None else np.broadcast_to(np.asarray(present, dtype=bool), (batch, 3))
        summed = (view_logits * present[..., None]).sum(axis=1)
        return self.posterior_summed(summed, present.sum(axis=1), evidence_loglik, off_axis)

    def posterior_summed(self, logits: np.ndarray, n_views: np.ndarray | int,
                         evidence_loglik: np.ndarray | None = None, off_axis: np.ndarray | float | None = None,
                         ) -> np.ndarray:
        """(B, 230) posterior from the MSDN's summed logits over the views present (B, C), as
        the inference backends return them, the number of those views (B,), evidence (B, 230)
        or None, and its off-axis scores (B,) or None. Rows with no view get the prior (or the
        evidence alone)."""
        logits = np.atleast_2d(np.asarray(logits, dtype=np.float64))
        batch, classes = logits.shape
        if classes != len(self.params.classes):
            raise FusionError(f"logits must have {len(self.params.classes)} columns (the model's classes), got {classes}")
        counts = np.broadcast_to(np.asarray(n_views, dtype=np.int64), (batch,))
        if ((counts < 0) | (counts > 3)).any():
            raise FusionError(f"the number of views must be 0-3, got {sorted(set(counts.tolist()))}")
        ev = None
        if evidence_loglik is not None:
            ev = np.asarray(evidence_loglik, dtype=np.float64)
            if ev.shape not in ((N_GROUPS,), (batch, N_GROUPS)):
                raise FusionError(f"evidence log-likelihoods must have shape ({batch}, 230), got {ev.shape}")
            ev = np.broadcast_to(ev, (batch, N_GROUPS))
        tilt = tilt_of(off_axis, batch)
        out = np.zeros((batch, N_GROUPS))
        for k in np.unique(counts):
            rows = np.flatnonzero(counts == k)
            # evidence the weights of k views ignore is no evidence: the no-evidence fit, exactly
            with_ev = (ev is not None and self.uses_evidence(int(k))) or not self.params.weights_no_evidence
            weights = self.params.weights if with_ev else self.params.weights_no_evidence
            temperature = self.params.temperature if with_ev else self.params.temperature_no_evidence
            if k == 0:
                s = np.zeros((len(rows), N_GROUPS)) + self.log_prior_train
                if ev is not None:
                    # no view of the model at all: the evidence alone can speak, at the 1-view weight
                    feats = feature_tensor(np.zeros((len(rows), classes)), ev[rows], classes=self.params.classes,
                                           temperature=1.0, evidence_clip=self.params.evidence_clip,
                                           log_prior_train=self.log_prior_train, tables=self.tables,
                                           off_axis=tilt[rows])
                    w = self.params.weights[1]
                    s = s + sum(w[f] * feats[..., COLUMN[f]] for f in EVIDENCE_FEATURES if not f.startswith("msdn_x_tilt"))
            else:
                feats = feature_tensor(logits[rows], ev[rows] if ev is not None and with_ev else None,
                                       classes=self.params.classes,
                                       temperature=temperature[int(k)], evidence_clip=self.params.evidence_clip,
                                       log_prior_train=self.log_prior_train, tables=self.tables,
                                       off_axis=tilt[rows])
                s = scores(feats, weights[int(k)])
            s = s + self.log_prior_shift
            out[rows] = np.exp(_log_softmax(s))
        return out

    def predict(self, view_logits: np.ndarray, present: np.ndarray | None = None, evidence_loglik: np.ndarray | None = None,
                *, views: Sequence[str] = ("x", "y", "z"), warnings: Sequence[str] = (),
                evidence_decided: bool = True, off_axis: float | None = None) -> FusedPrediction:
        """One sample's prediction (view_logits (3, C), present (3,), evidence (230,); ``off_axis``:
        the evidence's off-axis score, :attr:`SampleEvidence.off_axis`)."""
        post = self.posterior(np.asarray(view_logits)[None], None if present is None else np.asarray(present)[None],
                              None if evidence_loglik is None else np.asarray(evidence_loglik)[None],
                              off_axis)[0]
        n_views = 3 if present is None else int(np.asarray(present, dtype=bool).sum())
        used = evidence_loglik is not None and self.uses_evidence(n_views)
        return self.describe(post, views=views, evidence_used=used, warnings=warnings,
                             evidence_decided=evidence_decided, off_axis=off_axis if used else None)

    def _group(self, g: int, p: float) -> GroupScore:
        return GroupScore(int(g), spacegroups.symbol(int(g)), float(p), int(g) in self._inside)

    def _set(self, index: int, post: np.ndarray) -> SetScore:
        members = np.asarray(self.tables.sets[index])
        p = post[members - 1]
        order = np.argsort(-p, kind="stable")
        return SetScore(tuple(self._group(members[i], p[i]) for i in order), float(p.sum()))

    def describe(self, post: np.ndarray, *, views: Sequence[str] = ("x", "y", "z"), evidence_used: bool = False,
                 warnings: Sequence[str] = (), evidence_decided: bool = True,
                 off_axis: float | None = None) -> FusedPrediction:
        """``off_axis``: the evidence's off-axis score of the zones used (None: not measured); above
        the parameters' ``off_axis_above`` nothing is decided."""
        set_mass = np.bincount(self.tables.set_of, weights=post, minlength=len(self.tables.sets))
        set_order = np.argsort(-set_mass, kind="stable")
        group_order = np.argsort(-post, kind="stable")
        system_mass = np.bincount(self.tables.system, weights=post, minlength=len(spacegroups.CRYSTAL_SYSTEMS))
        bravais_mass = np.bincount(self.tables.bravais, weights=post, minlength=len(self.tables.bravais_names))
        best = set_order[0]
        limit = self.params.off_axis_above
        tilted = limit is not None and off_axis is not None and off_axis > limit
        confident = bool(set_mass[best] >= self.params.decide_at)
        decided = confident and not tilted
        candidates: list[SetScore] = []
        reason = ""
        warnings = list(warnings)
        if tilted:
            warnings.append(f"the zones look off their axes (Friedel asymmetry {off_axis:.2f} > {limit:.2f}): "
                            "a tilted crystal shows only part of its reflections; the answer is not reliable")
        if not decided:
            if confident:
                reason = (f"the zones look off their axes (Friedel asymmetry {off_axis:.2f} > {limit:.2f}), "
                          f"where the fusion decides wrongly: the most probable set's p = {set_mass[best]:.2f} is not trusted")
            else:
                reason = f"the most probable set holds only p = {set_mass[best]:.2f} (< {self.params.decide_at:.2f})"
            if not evidence_decided:
                reason += "; the symmetry evidence is thin"
            total = 0.0
            for i in set_order[:MAX_CANDIDATES]:
                candidates.append(self._set(int(i), post))
                total += set_mass[i]
                if total >= CANDIDATE_MASS:
                    break
        return FusedPrediction(
            posterior=post,
            views=tuple(views),
            top_groups=tuple(self._group(GROUPS[i], post[i]) for i in group_order[:TOP_GROUPS]),
            top_sets=tuple(self._set(int(i), post) for i in set_order[:TOP_SETS]),
            crystal_system=(spacegroups.CRYSTAL_SYSTEMS[int(system_mass.argmax())], float(system_mass.max())),
            bravais_lattice=(self.tables.bravais_names[int(bravais_mass.argmax())], float(bravais_mass.max())),
            decided=decided,
            candidates=tuple(candidates),
            reason=reason,
            prior=self.prior_name,
            evidence_used=evidence_used,
            warnings=tuple(warnings),
        )


def load_fusion(bundle, *, prior: str | os.PathLike | Mapping | None = None) -> Fusion | None:
    """The bundle's fusion (``fusion.json``, verified with the bundle), or None for an older
    bundle without one (its predictions stay the model's own)."""
    path = bundle.fusion_path
    if path is None:
        return None
    params = FusionParams.load(path)
    if [int(c) for c in params.classes] != [int(c) for c in bundle.classes]:
        raise FusionError(f"bundle {bundle.path}: {FUSION_FILE} was fitted for other classes than the model's")
    return Fusion(params, prior=prior)
