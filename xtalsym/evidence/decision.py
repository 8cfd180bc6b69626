"""When the evidence may name a crystal system / Bravais lattice, and when it must say "cannot decide".

The class log-likelihoods of :mod:`.sample` treat every node as independent and are
over-confident (wrong decisions of 3-9 % at log-odds 5 on MP, 40 % under 0.5° misorientation,
docs/RESULTS.md). This module does not change them; it only gates the *decision* on them with
thresholds calibrated on the validation split (``benchmarks/evidence_calibration.py``):

- the log-odds of the best class against all others together (``margin``) must reach a
  calibrated threshold, per kind (crystal system / Bravais lattice);
- every zone must look like an exact zone axis: the Friedel mates (h, −h) of an on-axis kinematic
  pattern have equal intensities, a tilted zone (its Laue circle off the centre) does not. The
  intensity-weighted Friedel asymmetry of the zone's significant nodes must stay below a
  calibrated bound, otherwise the metric and absences are not those of the crystal's axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from xtalsym.evidence import stats
from xtalsym.evidence.frame import FrameEvidence

# Frozen from benchmarks/evidence_calibration.py on the MP *validation* split: 420 materials under
# all 11 conditions and 1400 more noise-free (6020 rows); each threshold sits 1 nat above the
# largest wrong margin of any of those 1820 materials (see docs/EVIDENCE.md, "Decision rule").
SYSTEM_MIN_LOG_ODDS: dict[str, float] = {'cubic': 112.8, 'hexagonal': 30.7, 'monoclinic': 144.6, 'orthorhombic': 301.9,
                                         'tetragonal': 69.4, 'trigonal': 194.4}
BRAVAIS_MIN_LOG_ODDS: dict[str, float] = {'cI': 74.9, 'cP': 12.9, 'hP': 74.7, 'hR': 195.6, 'oP': 249.1, 'tI': 68.8,
                                          'tP': 19.7}
MAX_FRIEDEL_ASYMMETRY = 0.5
MIN_LOG_ODDS_FLOOR = 5.0  # no class is named below this (≈ 99.3 % posterior under a uniform prior)
MIN_FRIEDEL_PAIRS = 2  # fewer significant pairs than this: the zone's tilt is not measured


@dataclass(frozen=True)
class DecisionFeatures:
    system_margin: float  # log-odds of the best crystal system against all others together
    bravais_margin: float
    friedel_asymmetry: float  # worst zone; nan when no zone has enough Friedel pairs
    friedel_zone: str | None  # the zone with that asymmetry
    untested_zones: tuple[str, ...]  # zones with fewer than MIN_FRIEDEL_PAIRS significant pairs


def margin(table: dict[str, float]) -> tuple[str, float]:
    """The best class and its log-odds against all others together."""
    keys = list(table)
    values = np.array([table[k] for k in keys], float)
    i = int(np.argmax(values))
    rest = np.delete(values, i)
    if rest.size == 0:
        return keys[i], math.inf
    m = float(rest.max())
    rest_lse = m + math.log(float(np.exp(rest - m).sum())) if np.isfinite(m) else m
    return keys[i], float(values[i] - rest_lse)


def friedel_asymmetry(ev: FrameEvidence) -> tuple[float, int]:
    """Σ|I(h) − I(−h)| / Σ(I(h) + I(−h)) over the zone's Friedel pairs where either node is
    significant (above 3σ and the spot threshold); and the number of such pairs."""
    if not ev.decided or len(ev.nodes_half) == 0:
        return math.nan, 0
    h = ev.nodes_half
    integer = np.all(h % 2 == 0, axis=1)
    nodes = h[integer] // 2
    value, sigma, q = ev.nodes_intensity[integer], ev.nodes_sigma[integer], ev.nodes_q[integer]
    if len(nodes) == 0:
        return math.nan, 0
    significant = value > np.maximum(3 * stats.total_sigma(sigma, ev.scale_at(q)), ev.threshold)
    index = {(int(a), int(b)): i for i, (a, b) in enumerate(nodes)}
    num = den = 0.0
    pairs = 0
    for (a, b), i in index.items():
        j = index.get((-a, -b))
        if j is None or j <= i or not (significant[i] or significant[j]):
            continue
        vi, vj = max(float(value[i]), 0.0), max(float(value[j]), 0.0)
        num += abs(vi - vj)
        den += vi + vj
        pairs += 1
    if pairs == 0 or den <= 0:
        return math.nan, pairs
    return num / den, pairs


def features(*, system_ll: dict[str, float], bravais_ll: dict[str, float],
             frames: dict[str, FrameEvidence]) -> DecisionFeatures:
    worst, worst_zone, untested = math.nan, None, []
    for axis, ev in sorted(frames.items()):
        if not ev.decided:
            continue
        asym, pairs = friedel_asymmetry(ev)
        if pairs < MIN_FRIEDEL_PAIRS or not math.isfinite(asym):
            untested.append(axis)
            continue
        if not (asym <= worst):  # also replaces nan
            worst, worst_zone = asym, axis
    return DecisionFeatures(system_margin=margin(system_ll)[1], bravais_margin=margin(bravais_ll)[1],
                            friedel_asymmetry=worst, friedel_zone=worst_zone, untested_zones=tuple(untested))


@dataclass(frozen=True)
class Verdict:
    system: str
    system_ok: bool
    bravais: str
    bravais_ok: bool
    features: DecisionFeatures
    warnings: tuple[str, ...]


def on_axis(friedel: float) -> bool:
    """No zone's Friedel asymmetry says it is off its axis (nan: not measured, passes)."""
    return not (friedel > MAX_FRIEDEL_ASYMMETRY)


def rule(*, system: str, system_margin: float, bravais: str, bravais_margin: float,
         friedel: float) -> tuple[bool, bool]:
    """(crystal system decided, Bravais lattice decided) under the frozen thresholds; a class
    without a threshold (inf) is never named: on validation its decisions were wrong too often."""
    return thresholded(system=system, system_margin=system_margin, bravais=bravais, bravais_margin=bravais_margin,
                       friedel=friedel, system_min=SYSTEM_MIN_LOG_ODDS, bravais_min=BRAVAIS_MIN_LOG_ODDS,
                       friedel_max=MAX_FRIEDEL_ASYMMETRY)


def thresholded(*, system: str, system_margin: float, bravais: str, bravais_margin: float, friedel: float,
                system_min: dict[str, float], bravais_min: dict[str, float], friedel_max: float) -> tuple[bool, bool]:
    """The rule for given thresholds (the calibration tries many). A Bravais lattice is named only
    with a decided crystal system it belongs to (hP: hexagonal or trigonal), so that the two
    answers never contradict each other."""
    ok_axis = not (friedel > friedel_max)
    system_ok = ok_axis and system_margin >= system_min.get(system, math.inf)
    bravais_ok = (system_ok and system in BRAVAIS_SYSTEMS.get(bravais, ())
                  and bravais_margin >= bravais_min.get(bravais, math.inf))
    return system_ok, bravais_ok


BRAVAIS_SYSTEMS = {"aP": ("triclinic",), "mP": ("monoclinic",), "mS": ("monoclinic",),
                   **{b: ("orthorhombic",) for b in ("oP", "oS", "oI", "oF")},
                   "tP": ("tetragonal",), "tI": ("tetragonal",), "hR": ("trigonal",), "hP": ("hexagonal", "trigonal"),
                   **{b: ("cubic",) for b in ("cP", "cI", "cF")}}


def decide(*, system_ll: dict[str, float], bravais_ll: dict[str, float],
           frames: dict[str, FrameEvidence]) -> Verdict:
    """The calibrated rule on one sample's class log-likelihoods and zones."""
    f = features(system_ll=system_ll, bravais_ll=bravais_ll, frames=frames)
    system, bravais = margin(system_ll)[0], margin(bravais_ll)[0]
    system_ok, bravais_ok = rule(system=system, system_margin=f.system_margin, bravais=bravais,
                                 bravais_margin=f.bravais_margin, friedel=f.friedel_asymmetry)
    warnings: list[str] = []
    if not on_axis(f.friedel_asymmetry):
        warnings.append(f"cannot decide: zone {f.friedel_zone} looks tilted off its axis (Friedel asymmetry "
                        f"{f.friedel_asymmetry:.2f} > {MAX_FRIEDEL_ASYMMETRY:g}): cell and absences not trusted")
    else:
        for kind, name, ok, m, table in (("crystal system", system, system_ok, f.system_margin, SYSTEM_MIN_LOG_ODDS),
                                         ("Bravais lattice", bravais, bravais_ok, f.bravais_margin,
                                          BRAVAIS_MIN_LOG_ODDS)):
            if not ok:
                need = table.get(name, math.inf)
                why = ("never named from this evidence (wrong too often on validation)" if math.isinf(need)
                       else f"log-odds {m:.1f} below its calibrated threshold {need:g}" if m < need
                       else "not named without a decided crystal system it belongs to")
                warnings.append(f"{kind} {name} most likely but not decided: {why}")
    return Verdict(system=system, system_ok=system_ok, bravais=bravais, bravais_ok=bravais_ok,
                   features=f, warnings=tuple(warnings))
