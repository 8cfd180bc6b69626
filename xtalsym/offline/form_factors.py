"""Atomic scattering factors evaluated on a grid of |H| values.

X-ray (default): f(s) = Σ a_i exp(−b_i s²) + c with s = |H|/2 = sinθ/λ in Å⁻¹, using the
coefficients shipped with `periodictable.cromermann` (International Tables C /
Waasmaier–Kirfel, within 0.08 e of the CCP4 atomsf.lib table Condor compiles in).
Electron: f_e(s) = Σ a_i exp(−b_i s²) in Å with pymatgen's ATOMIC_SCATTERING_PARAMS
(the Doyle–Turner electron set; pymatgen's XRD code turns it into X-ray factors via
Mott–Bethe, which is why it must not be used for the X-ray default).

All Gaussian terms are decreasing in s, so f(s) ≤ f(0) for every species: the
thresholded simulator relies on that bound.
"""

from __future__ import annotations

import functools

import numpy as np

SCATTERING = ("xray", "electron")


class UnknownSpeciesError(KeyError):
    """No scattering-factor coefficients for this element symbol."""


@functools.cache
def coefficients(symbol: str, scattering: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(a, b, c) for an element symbol; raises UnknownSpeciesError."""
    if scattering == "xray":
        import periodictable.cromermann as cm

        try:
            formula = cm.getCMformula(symbol)
        except (KeyError, ValueError, AttributeError) as exc:
            raise UnknownSpeciesError(symbol) from exc
        if formula is None:
            raise UnknownSpeciesError(symbol)
        return np.array(formula.a, float), np.array(formula.b, float), float(formula.c)
    if scattering == "electron":
        from pymatgen.analysis.diffraction.xrd import ATOMIC_SCATTERING_PARAMS

        if symbol not in ATOMIC_SCATTERING_PARAMS:
            raise UnknownSpeciesError(symbol)
        ab = np.asarray(ATOMIC_SCATTERING_PARAMS[symbol], float)
        return ab[:, 0].copy(), ab[:, 1].copy(), 0.0
    raise ValueError(f"scattering must be one of {SCATTERING}, got {scattering!r}")


def form_factor(symbol: str, s2: np.ndarray, scattering: str = "xray",
                thermal_b_angstrom2: float = 0.0) -> np.ndarray:
    """f(s) on an array of s² = (|H|/2)² values (Å⁻²), with Debye–Waller exp(−B s²)."""
    a, b, c = coefficients(symbol, scattering)
    s2 = np.asarray(s2, float)
    f = np.full(s2.shape, c)
    for ai, bi in zip(a, b):
        f += ai * np.exp(-bi * s2)
    if thermal_b_angstrom2:
        f *= np.exp(-thermal_b_angstrom2 * s2)
    return f


def forward_factor(symbol: str, scattering: str = "xray") -> float:
    """f(0): the upper bound of f(s) over s ≥ 0."""
    a, _, c = coefficients(symbol, scattering)
    return float(a.sum() + c)
