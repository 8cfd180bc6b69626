"""Likelihood models for measured reflection intensities (all in nats).

A node's integrated intensity Î has noise σ (counting + background, from
:mod:`xtalsym.evidence.spots`) plus a systematic part ``SYSTEMATIC × Σ`` (partial excitation,
pixel sampling of a sharp peak, the tails of neighbours), Σ being the mean intensity of
reflections at that |q| (the Wilson scale, fitted per frame).

* absent: the true intensity is 0, Î ~ N(0, σ²).
* allowed: the true intensity follows Wilson's acentric law, I ~ Exp(mean Σ), so Î is an
  exponentially modified Gaussian. Weak-but-allowed reflections are therefore not
  impossible, and an absence is decided by many nodes together, never by one.
* symmetry-related pair: equal true intensities (difference ~ N(0, σ₁²+σ₂²+(SYM_SYSTEMATIC Ī)²))
  against independent Wilson intensities (difference ~ Laplace(Σ)).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy.special import log_ndtr

SYSTEMATIC = 0.03
SYM_SYSTEMATIC = 0.3  # off-node sampling of a finite block breaks Laue symmetry by up to ~25 % (Ewald excitation)
PAIR_OUTLIER = 0.05
_LOG_SQRT_2PI = 0.5 * np.log(2 * np.pi)


def median(values: np.ndarray) -> float:
    """The median of finite values, the same number as ``np.median`` (the middle order statistic, or
    the mean of the two middle ones), by one single-index partition: np.median also partitions for a
    NaN check and goes through ``mean``, and a partition at two indices costs 3-10x one at a single
    index (numpy 2.4), so the lower middle is taken as the maximum of the partitioned lower half."""
    v = np.asarray(values, float).ravel()
    n = v.size
    if n == 0:
        return float("nan")
    k = n // 2
    part = np.partition(v, k)
    if n % 2:
        return float(part[k])
    return float((part[:k].max() + part[k]) / 2.0)


def median_of_sorted(ordered: np.ndarray) -> float:
    """:func:`median` of values already in ascending order."""
    n = ordered.size
    if n == 0:
        return float("nan")
    k = n // 2
    return float(ordered[k]) if n % 2 else float((ordered[k - 1] + ordered[k]) / 2.0)


def quantiles(values: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """``np.quantile(values, probabilities)`` (method "linear") for finite 1-D values, the same
    numbers without its generic machinery (which costs more than the arithmetic on small arrays):
    numpy's formulas, one probability at a time in Python floats (the same IEEE operations)."""
    arr = np.sort(np.asarray(values, float).ravel())
    n = arr.size
    out = []
    for p in np.asarray(probabilities, float).tolist():
        virtual = (n - 1) * p
        if virtual >= n - 1:
            out.append(float(arr[-1]))
            continue
        previous, following = (0, 0) if virtual < 0 else (math.floor(virtual), math.floor(virtual) + 1)
        lo, hi = float(arr[previous]), float(arr[following])
        gamma = virtual - previous
        diff = hi - lo
        out.append(hi - diff * (1 - gamma) if gamma >= 0.5 else lo + diff * gamma)
    return np.array(out)


@functools.lru_cache(maxsize=16)
def _bin_probabilities(bins: int) -> np.ndarray:
    p = np.linspace(0, 1, bins + 1)
    p.setflags(write=False)
    return p


def total_sigma(sigma: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.sqrt(np.asarray(sigma) ** 2 + (SYSTEMATIC * np.asarray(scale)) ** 2) + 1e-300


def log_absent(value: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """log N(Î; 0, σ²)."""
    z = np.asarray(value) / sigma
    return -0.5 * z * z - np.log(sigma) - _LOG_SQRT_2PI


def log_allowed(value: np.ndarray, sigma: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """log of Exp(mean Σ) convolved with N(0, σ²), at Î (stable for σ ≪ Σ and σ ≫ Σ)."""
    value, sigma, scale = np.broadcast_arrays(np.asarray(value, float), np.asarray(sigma, float),
                                              np.maximum(np.asarray(scale, float), 1e-300))
    lam = 1.0 / scale
    return np.log(lam) + 0.5 * (sigma * lam) ** 2 - value * lam + log_ndtr(value / sigma - sigma * lam)


def _log_below_absent_and_allowed(threshold, sigma, scale) -> tuple[np.ndarray, np.ndarray]:
    """(log Φ(T/σ), log P(Î < T) of an allowed reflection), sharing log Φ(T/σ)."""
    t, s, sc = np.broadcast_arrays(np.asarray(threshold, float), np.asarray(sigma, float),
                                   np.maximum(np.asarray(scale, float), 1e-300))
    lam = 1.0 / sc
    a = log_ndtr(t / s)
    b = 0.5 * (s * lam) ** 2 - t * lam + log_ndtr(t / s - s * lam)
    # log(exp(a) - exp(b)), b < a
    diff = np.clip(b - a, None, -1e-12)
    return a, a + np.log1p(-np.exp(diff))


def log_below_allowed(threshold: np.ndarray, sigma: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """log P(Î < T) for an allowed reflection (a node where no spot was detected)."""
    return _log_below_absent_and_allowed(threshold, sigma, scale)[1]


def log_below_absent(threshold: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return log_ndtr(np.asarray(threshold, float) / np.asarray(sigma, float))


def log_below_ratio(threshold: np.ndarray, sigma: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """log_below_allowed − log_below_absent (the score of a node without a spot), the shared
    log Φ(T/σ) computed once: the same numbers as the two calls, in about 2/3 of the time."""
    absent, allowed = _log_below_absent_and_allowed(threshold, sigma, scale)
    return allowed - absent


def pair_llr(i1: np.ndarray, s1: np.ndarray, i2: np.ndarray, s2: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """log p(pair | equal intensities) − log p(pair | independent), per pair."""
    d = np.asarray(i1) - np.asarray(i2)
    mean = 0.5 * (np.maximum(i1, 0.0) + np.maximum(i2, 0.0))
    s = np.sqrt(np.asarray(s1) ** 2 + np.asarray(s2) ** 2 + (SYM_SYSTEMATIC * mean) ** 2
                + (SYSTEMATIC * np.asarray(scale)) ** 2) + 1e-300
    b = np.maximum(np.asarray(scale, float), 1e-300)
    sym = -0.5 * (d / s) ** 2 - np.log(s) - _LOG_SQRT_2PI
    indep = -np.log(2 * b) - np.abs(d) / b
    # a share PAIR_OUTLIER of pairs breaks the symmetry for reasons outside the model (a spot on the
    # edge of the excitation, a neighbour's tail): one pair is then worth a bounded amount either way
    return np.logaddexp(np.log1p(-PAIR_OUTLIER) + sym, np.log(PAIR_OUTLIER) + indep) - indep


def wilson_scale(q: np.ndarray, values: np.ndarray, *, bins: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Mean intensity against |q|: (bin centres, means), from the lattice nodes' intensities.

    Interpolate with :func:`scale_at`. Empty frames give one bin with mean 0."""
    q = np.asarray(q, float)
    v = np.maximum(np.asarray(values, float), 0.0)
    if q.size == 0:
        return np.array([0.0]), np.array([0.0])
    edges = quantiles(q, _bin_probabilities(min(bins, max(1, q.size // 4)))).tolist()
    centres, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (q >= lo) & (q <= hi)
        count = int(np.count_nonzero(sel))
        if count:  # sum / count: what ndarray.mean computes, without its wrapper
            centres.append(float(q[sel].sum() / count))
            means.append(float(v[sel].sum() / count))
    means_arr = np.maximum(np.array(means), max(float(v.mean()), 1e-300) * 1e-3)
    return np.array(centres), means_arr


def scale_at(q: np.ndarray, centres: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Σ(|q|): log-linear interpolation of the binned means, flat beyond the ends."""
    return np.exp(np.interp(np.asarray(q, float), centres, np.log(np.maximum(means, 1e-300))))
