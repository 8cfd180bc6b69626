"""Far-field diffraction patterns of a crystal block, equivalent to Condor's atom model.

Physics (FXIhub/condor + spsim atom model, see docs DESIGN.md):

* F(H) = Σ_j f_j(|H|) exp(−2πi H·r_j) at each pixel centre, with
  H = (p_x/L, p_y/L, D/L − 1)/λ for a pixel at (p_x, p_y) on a flat detector at distance D,
  L = |(p_x, p_y, D)| (Ewald-sphere curvature included). Pixel centres lie at
  (i − (N−1)/2)·pixel_size; images are I[row = y, column = x], so the beam hits the
  centre (between pixels 127 and 128 for N = 256).
* f_j: Cromer–Mann X-ray factors (default) or Doyle–Turner electron factors, see
  `form_factors`. Species with an oxidation state (pymatgen "Fe2+") use the element.
* I = |F|² × solid angle × polarisation, normalised to 1 at the beam:
  solid angle ∝ (D/L)³, polarisation = unpolarised (1 + cos²2θ)/2 with cos 2θ = D/L.
  (Condor's default ignores polarisation; the two differ by < 0.1 % on this detector.)
  Units: electrons² (X-ray) or Å² (electron) per cell-block, times that weight.
* The crystal is a block of n₁×n₂×n₃ cells: F = F_cell(H) × Π_i Σ_{m<n_i} exp(−2πi m H·a_i).
  The "fast" method uses the closed-form Dirichlet sums (|Σ|² = sin²(π n u)/sin²(π u),
  u = H·a_i); the "direct" method sums every atom of the explicit block,
  (frac + (i, j, k)) @ lattice, recentred on its centre of mass, and is the test oracle.
  Recentring is a global phase, so the intensity of the fast method does not need it.

Zone-axis convention. The lattice matrix of the structure is used *as given*: its rows
are a, b, c in Å in the crystal's Cartesian frame (the VESTA convention, a along +x and
b in the xy plane, is what the project's structures use, but nothing here relies on
it). The beam travels along +z of the lab, image x = lab x, image y = lab y:
  axis "z": no rotation (lab = crystal x, y, z);
  axis "x": crystal x → beam, crystal y → image x, crystal z → image y;
  axis "y": crystal y → beam, crystal z → image x, crystal x → image y (cyclic).

Default geometry (the lead's choice): λ = 3.5 pm (the paper's), D = 0.4 m, 75 µm
pixels, 256×256. q per pixel = 0.00536 Å⁻¹, so d-spacings of 4–6 Å (typical Materials
Project cells) put first-order spots 30–47 px from the beam, as in the authors' raw DPs
(spots at 30.5, 43.5, 49.5 px); the edge of the image is at q = 0.69 Å⁻¹.

Block size: n_i = max(1, round(block_edge / |a_i|)) with DEFAULT_BLOCK_EDGE_ANGSTROM =
85 Å. In the authors' raw DPs the central spot is 2×2 pixels at ~253, its 4-neighbours
at 35–73 (ratio 0.14–0.29) and the first zero at about 2.5 px from the beam centre,
side lobes ~2 px apart. For an edge E the first zero of the shape transform lies at
q = 1/E; E = 85 Å puts it at 2.2 px and gives a neighbour ratio ≈ 0.2 for a cubic cell
(rock-salt NaCl at 85 Å: 47/255 at 1.5 px, ~0 at 2.5 px, a side lobe of 11 at 3.5 px,
0 at 4.5 px, against the authors' 43, 5, 5, 0 on raw_1_z; `python benchmarks/simulate.py
--calibrate` prints the profile for 75–95 Å). 90 Å already gives 35/255 at 1.5 px and a
filled-in zero at 2.5 px.

Speed. `simulate_pattern` returns the exact noise-free float64 intensity everywhere.
Dataset builders pass ``DATASET_OPTIONS``. ``cutoff=DATASET_CUTOFF`` (1e-3): F_cell is then
evaluated only where the rigorous per-pixel bound (Σ_j |f_j(|H|)|)²·|Dirichlet|² reaches
cutoff × the exact intensity at the
brightest-lattice-factor pixel (a lower bound of the maximum). Every pixel it sets to 0
has a true intensity below 1e-3 × max — a quarter of an 8-bit grey level, which
`to_raw_uint8` rounds to 0 anyway — so its raw 8-bit image is identical to the exact one.
``precision="single"``: phases and their sin/cos in float32 (SIMD in numpy, ~15× faster
than float64) on positions recentred on the cell; the intensity is then within ~1e-5
relative of the exact one, so 8-bit images differ at most by one grey level on a
rounding tie.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from xtalsym.offline import form_factors

log = logging.getLogger(__name__)

AXES = ("x", "y", "z")
METHODS = ("fast", "direct")
DEFAULT_BLOCK_EDGE_ANGSTROM = 85.0
DATASET_CUTOFF = 1e-3  # < 0.5/255: zeroed pixels would round to 0 in 8 bits anyway
PRECISIONS = ("double", "single")
# What dataset builders pass: 8-bit output identical to the exact pattern but for
# rare ±1 grey-level rounding ties, at a fraction of the cost.
DATASET_OPTIONS = {"cutoff": DATASET_CUTOFF, "precision": "single"}

# Crystal Cartesian component that goes to lab (x, y, z) for each zone axis.
_AXIS_PERMUTATION = {"z": (0, 1, 2), "x": (1, 2, 0), "y": (2, 0, 1)}
_MIN_EDGE_A, _MAX_EDGE_A = 0.5, 1000.0
_CHUNK = 8192  # pixels per block of the exact sum: keeps the (pixels × atoms) arrays in cache


class SimulationError(ValueError):
    """Bad input to the simulator; the message names the offending value."""


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class Geometry:
    """Flat detector centred on the beam; SI units."""

    wavelength_m: float = 3.5e-12
    distance_m: float = 0.4
    pixel_size_m: float = 75e-6
    pixels: int = 256

    def __post_init__(self) -> None:
        _check_positive("wavelength_m", self.wavelength_m)
        _check_positive("distance_m", self.distance_m)
        _check_positive("pixel_size_m", self.pixel_size_m)
        if not isinstance(self.pixels, (int, np.integer)) or isinstance(self.pixels, bool) \
                or self.pixels < 8:
            raise ValueError(f"pixels must be an integer >= 8, got {self.pixels!r}")

    @property
    def q_per_pixel(self) -> float:
        """|H| step near the beam, Å⁻¹ per pixel."""
        return self.pixel_size_m / (self.distance_m * self.wavelength_m) * 1e-10

    def scattering_vectors(self) -> np.ndarray:
        """H in Å⁻¹ at every pixel centre, shape (N, N, 3), [row = y, column = x]."""
        return _pixel_grid(self).h.reshape(self.pixels, self.pixels, 3).copy()


@dataclass(frozen=True)
class _Grid:
    h: np.ndarray        # (N², 3) Å⁻¹
    s2: np.ndarray       # (N²,) (|H|/2)² in Å⁻²
    weight: np.ndarray   # (N²,) solid angle × polarisation, 1 at the beam


# Peak bytes per detector pixel of one simulation: the pixel grid (H, s², weights) and the
# complex structure factor with its temporaries, all float64.
BYTES_PER_PIXEL = 64


def _available_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: no check
        return None


def check_memory(geometry: Geometry) -> None:
    """Refuse a grid that cannot fit in this machine's free memory, before allocating it."""
    need = geometry.pixels**2 * BYTES_PER_PIXEL
    free = _available_memory_bytes()
    if free is not None and need > free:
        raise SimulationError(
            f"pixels {geometry.pixels}: a {geometry.pixels} x {geometry.pixels} pattern needs about "
            f"{need / 2**30:.1f} GiB of memory and {free / 2**30:.1f} GiB is free; use fewer pixels "
            f"(the model's patterns have 256)"
        )


@functools.lru_cache(maxsize=8)
def _pixel_grid(geometry: Geometry) -> _Grid:
    check_memory(geometry)
    n = geometry.pixels
    coord = (np.arange(n) - (n - 1) / 2) * geometry.pixel_size_m
    py, px = np.meshgrid(coord, coord, indexing="ij")
    d = geometry.distance_m
    inv_l = 1.0 / np.sqrt(px**2 + py**2 + d**2)
    scale = 1e-10 / geometry.wavelength_m  # 1/λ in Å⁻¹
    h = np.stack([px * inv_l, py * inv_l, d * inv_l - 1.0], axis=-1) * scale
    h = h.reshape(-1, 3)
    cos2t = (d * inv_l).ravel()
    weight = cos2t**3 * (1.0 + cos2t**2) / 2.0
    s2 = np.einsum("ij,ij->i", h, h) / 4.0
    for arr in (h, s2, weight):
        arr.setflags(write=False)
    return _Grid(h=h, s2=s2, weight=weight)


@dataclass(frozen=True)
class Realism:
    """Optional experimental effects; every one is off by default, all seeded by `seed`.

    dose: Poisson noise; expected counts at the brightest noise-free pixel (the
        pattern is returned in counts). None = no noise.
    background: constant diffuse level added to every pixel, as a fraction of the
        brightest noise-free pixel (before noise).
    beam_stop_radius_px: pixels whose centre is closer than this to the beam are set to 0.
    misorientation_deg: the crystal is turned about a uniformly random axis by an angle
        drawn from N(0, σ) degrees (independently per zone axis).
    thermal_b_angstrom2: Debye–Waller B; f *= exp(−B s²), s = |H|/2.
    pixel_scale_error: signed fractional error of the detector's pixel scale (distance or
        pixel size miscalibrated): the pattern is rendered with pixels (1 + error) times the
        nominal size, so an analysis that assumes the nominal q per pixel measures every
        reciprocal length (1 + error) too long. One error for all zone axes of a sample (it is
        the instrument's calibration, not the crystal's).
    """

    dose: float | None = None
    background: float = 0.0
    beam_stop_radius_px: float = 0.0
    misorientation_deg: float = 0.0
    thermal_b_angstrom2: float = 0.0
    pixel_scale_error: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dose is not None:
            _check_positive("dose", self.dose)
        for name in ("background", "beam_stop_radius_px", "misorientation_deg",
                     "thermal_b_angstrom2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.number)) and math.isfinite(value)
                    and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        e = self.pixel_scale_error
        if not (isinstance(e, (int, float, np.number)) and math.isfinite(e) and abs(e) < 0.5):
            raise ValueError(f"pixel_scale_error must be a finite fraction with |error| < 0.5, got {e!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) \
                or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


def block_size(lattice_matrix, block_edge_angstrom: float = DEFAULT_BLOCK_EDGE_ANGSTROM,
               ) -> tuple[int, int, int]:
    """Cells per lattice vector so the block is about `block_edge_angstrom` on each edge."""
    _check_positive("block_edge_angstrom", block_edge_angstrom)
    lengths = np.linalg.norm(np.asarray(lattice_matrix, float), axis=1)
    if lengths.shape != (3,) or not np.all(np.isfinite(lengths)) or np.any(lengths <= 0):
        raise SimulationError(f"lattice matrix must be 3×3 with non-zero rows, got {lattice_matrix!r}")
    return tuple(max(1, round(block_edge_angstrom / length)) for length in lengths)


@dataclass(frozen=True)
class _Cell:
    lattice: np.ndarray   # (3, 3) rows a, b, c in Å (crystal frame)
    frac: np.ndarray      # (M, 3)
    symbols: tuple[str, ...]  # unique element symbols
    species: np.ndarray   # (M,) index into symbols
    masses: np.ndarray    # (M,)


def _cell_from_structure(structure, scattering: str) -> _Cell:
    """Validate a pymatgen Structure and reduce it to arrays."""
    try:
        n_sites = len(structure)
    except TypeError as exc:
        raise SimulationError(f"expected a pymatgen Structure, got {type(structure).__name__}") from exc
    if n_sites == 0:
        raise SimulationError(f"empty structure: {structure!r}")
    if not structure.is_ordered:
        bad = next(i for i, s in enumerate(structure) if not s.is_ordered)
        raise SimulationError(
            f"partial occupancy at site {bad}: {structure[bad].species} (the simulator needs an ordered structure)")
    lattice = np.array(structure.lattice.matrix, float)
    _check_cell(lattice)
    symbols, species, masses = [], [], []
    for site in structure:
        specie = site.specie
        element = getattr(specie, "element", specie)  # Species("Fe", 2) -> Element Fe
        symbol = getattr(element, "symbol", str(element))
        try:
            form_factors.coefficients(symbol, scattering)
        except form_factors.UnknownSpeciesError as exc:
            raise SimulationError(f"unknown element {str(specie)!r}: no {scattering} scattering factors") from exc
        if symbol not in symbols:
            symbols.append(symbol)
        species.append(symbols.index(symbol))
        masses.append(float(getattr(element, "atomic_mass", 1.0) or 1.0))
    frac = np.array(structure.frac_coords, float)
    if not np.all(np.isfinite(frac)):
        raise SimulationError("non-finite fractional coordinates")
    return _Cell(lattice, frac, tuple(symbols), np.array(species), np.array(masses))


def _check_cell(lattice: np.ndarray) -> None:
    lengths = np.linalg.norm(lattice, axis=1)
    if not np.all(np.isfinite(lattice)) or np.any(lengths < _MIN_EDGE_A) or np.any(lengths > _MAX_EDGE_A):
        raise SimulationError(
            f"absurd cell: edge lengths {np.round(lengths, 4).tolist()} Å (allowed {_MIN_EDGE_A}–{_MAX_EDGE_A})")
    flatness = abs(np.linalg.det(lattice)) / np.prod(lengths)
    if flatness < 1e-3:
        raise SimulationError(f"absurd cell: degenerate lattice (volume/(abc) = {flatness:.2e})")


def _zone_rotation(axis: str) -> np.ndarray:
    """3×3 matrix R with lab = R @ crystal for the zone axis."""
    if axis not in _AXIS_PERMUTATION:
        raise SimulationError(f"axis must be one of {AXES}, got {axis!r}")
    return np.eye(3)[list(_AXIS_PERMUTATION[axis])]


def _random_rotation(rng: np.random.Generator, std_deg: float) -> np.ndarray:
    """Rotation about a uniformly random axis by an angle ~ N(0, std_deg)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.normal(0.0, std_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


@functools.lru_cache(maxsize=512)
def _form_factor_grid(geometry: Geometry, symbol: str, scattering: str, b_factor: float) -> np.ndarray:
    """f(|H|) of one element at every pixel (shared across axes and structures)."""
    f = form_factors.form_factor(symbol, _pixel_grid(geometry).s2, scattering, b_factor)
    f.setflags(write=False)
    return f


def dirichlet_squared(u: np.ndarray, n: Iterable[int], precision: str = "double") -> np.ndarray:
    """Π_i |Σ_{m<n_i} exp(−2πi m u_i)|² = Π_i sin²(π n_i u_i)/sin²(π u_i); u has shape (..., 3).

    "single" takes the sines in float32 after the exact reduction (see _amplitude_squared).
    """
    out = None
    for i, ni in enumerate(n):
        # Reduce to [-0.5, 0.5]: both sines only change sign, and the limit n² at integers is exact.
        v = u[..., i] - np.round(u[..., i])
        if precision == "single":
            v = v.astype(np.float32)
        den = np.sin(np.pi * v)
        small = np.abs(v) < 1e-12
        ratio = np.where(small, float(ni), np.sin(np.pi * ni * v) / np.where(small, 1.0, den))
        term = (ratio * ratio).astype(np.float64)
        out = term if out is None else out * term
    return out


def _amplitude_squared(h: np.ndarray, positions: np.ndarray, species: np.ndarray,
                       f_table: np.ndarray, precision: str = "double") -> np.ndarray:
    """|Σ_j f_j exp(−2πi H·r_j)|² for H (K, 3), positions (M, 3), f_table (K, S).

    "single" computes the phases and their sin/cos in float32: numpy's float32
    trigonometry is SIMD and ~15× faster than float64. Positions are recentred on the
    cell (|r| ≲ 20 Å, |H| ≲ 1 Å⁻¹), so phases stay below ~130 rad and their float32 error
    is ~1e-5 rad: relative intensity errors ~1e-5, far below one 8-bit grey level.
    """
    # Atoms sorted by species, so per-species sums are contiguous column slices.
    order = np.argsort(species, kind="stable")
    species_sorted = species[order]
    present = np.unique(species_sorted)
    starts = np.searchsorted(species_sorted, present)
    dtype = np.float32 if precision == "single" else np.float64
    two_pi_r = ((2.0 * np.pi) * positions[order]).T.astype(dtype)
    out = np.empty(len(h))
    for start in range(0, len(h), _CHUNK):
        sl = slice(start, start + _CHUNK)
        phase = h[sl].astype(dtype) @ two_pi_r
        f = f_table[sl][:, present]
        re = np.einsum("ks,ks->k", np.add.reduceat(np.cos(phase), starts, axis=1), f)
        im = np.einsum("ks,ks->k", np.add.reduceat(np.sin(phase), starts, axis=1), f)
        out[sl] = re * re + im * im
    return out


def _block_positions(cell: _Cell, lattice: np.ndarray, supercell: tuple[int, int, int]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Every atom of the explicit n₁×n₂×n₃ block (no wrapping), recentred on its centre of mass."""
    shifts = np.stack(np.meshgrid(*[np.arange(n) for n in supercell], indexing="ij"), -1).reshape(-1, 3)
    frac = (cell.frac[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    positions = frac @ lattice
    masses = np.tile(cell.masses, len(shifts))
    positions -= (masses[:, None] * positions).sum(0) / masses.sum()
    return positions, np.tile(cell.species, len(shifts))


def _physics_intensity(cell: _Cell, lattice: np.ndarray, supercell: tuple[int, int, int],
                       geometry: Geometry, f_tables: np.ndarray, method: str, cutoff: float,
                       precision: str = "double") -> np.ndarray:
    """Noise-free intensity (N²,) for a lab-frame lattice (rows a, b, c)."""
    grid = _pixel_grid(geometry)
    if method == "direct":
        positions, species = _block_positions(cell, lattice, supercell)
        return _amplitude_squared(grid.h, positions, species, f_tables) * grid.weight
    positions = cell.frac @ lattice
    positions = positions - (cell.masses[:, None] * positions).sum(0) / cell.masses.sum()
    lattice_sq = dirichlet_squared(grid.h @ lattice.T, supercell, precision)
    if cutoff <= 0:
        return _amplitude_squared(grid.h, positions, cell.species, f_tables, precision) * lattice_sq * grid.weight
    # Rigorous per-pixel bound: |F_cell(H)| <= Σ_j |f_j(|H|)| and weight <= 1. Form factors
    # fall with |H|, so the bound is far tighter at high angles than F(0) would be.
    counts = np.bincount(cell.species, minlength=f_tables.shape[1]).astype(np.float64)
    f_bound = np.abs(f_tables) @ counts
    ref = int(np.argmax(lattice_sq))
    i_ref = (_amplitude_squared(grid.h[ref:ref + 1], positions, cell.species, f_tables[ref:ref + 1])
             * lattice_sq[ref] * grid.weight[ref])[0]
    keep = np.flatnonzero(f_bound * f_bound * lattice_sq >= cutoff * i_ref)
    out = np.zeros(len(grid.h))
    out[keep] = (_amplitude_squared(grid.h[keep], positions, cell.species, f_tables[keep], precision)
                 * lattice_sq[keep] * grid.weight[keep])
    return out


def _apply_realism(intensity: np.ndarray, realism: Realism, geometry: Geometry,
                   rng: np.random.Generator) -> np.ndarray:
    peak = float(intensity.max())
    out = intensity + realism.background * peak
    if realism.dose is not None:
        out = rng.poisson(out * (realism.dose / peak)).astype(np.float64)
    if realism.beam_stop_radius_px > 0:
        n = geometry.pixels
        c = np.arange(n) - (n - 1) / 2
        r2 = c[:, None] ** 2 + c[None, :] ** 2
        out = out.reshape(n, n)
        out[r2 < realism.beam_stop_radius_px**2] = 0.0
    return out.reshape(-1)


def _check_supercell(supercell) -> tuple[int, int, int]:
    try:
        values = tuple(supercell)
    except TypeError:
        values = ()
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                   and v >= 1 for v in values):
        raise SimulationError(f"supercell must be three integers >= 1, got {supercell!r}")
    return tuple(int(v) for v in values)


def simulate_axes(structure, *, axes: Iterable[str] = AXES, geometry: Geometry = Geometry(),
                  supercell: tuple[int, int, int] | None = None, scattering: str = "xray",
                  realism: Realism | None = None, method: str = "fast",
                  block_edge_angstrom: float = DEFAULT_BLOCK_EDGE_ANGSTROM,
                  cutoff: float = 0.0, precision: str = "double") -> dict[str, np.ndarray]:
    """Patterns for several zone axes of one structure, {axis: float64 (N, N)}.

    Form factors and the pixel grid are computed once and shared by all axes.
    `cutoff` > 0 (fast method only) zeroes pixels whose intensity is provably below
    cutoff × max; `precision="single"` (fast method only) takes the phases and
    trigonometry in float32 (relative error ~1e-5). Datasets use both
    (`DATASET_OPTIONS`); see the module docstring.
    """
    axes = tuple(axes)
    for axis in axes:
        _zone_rotation(axis)
    if scattering not in form_factors.SCATTERING:
        raise SimulationError(f"scattering must be one of {form_factors.SCATTERING}, got {scattering!r}")
    if method not in METHODS:
        raise SimulationError(f"method must be one of {METHODS}, got {method!r}")
    if not (isinstance(cutoff, (int, float)) and 0 <= cutoff < 1):
        raise SimulationError(f"cutoff must be in [0, 1), got {cutoff!r}")
    if cutoff and method != "fast":
        raise SimulationError(f"cutoff applies to method 'fast' only, got method {method!r}")
    if precision not in PRECISIONS:
        raise SimulationError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "single" and method != "fast":
        raise SimulationError(f"precision 'single' applies to method 'fast' only, got method {method!r}")
    realism = realism or Realism()
    if realism.pixel_scale_error:
        geometry = dataclasses.replace(geometry, pixel_size_m=geometry.pixel_size_m * (1 + realism.pixel_scale_error))
    cell = _cell_from_structure(structure, scattering)
    supercell = block_size(cell.lattice, block_edge_angstrom) if supercell is None \
        else _check_supercell(supercell)
    f_tables = np.stack([_form_factor_grid(geometry, s, scattering, float(realism.thermal_b_angstrom2))
                         for s in cell.symbols], axis=1)
    n = geometry.pixels
    patterns = {}
    for axis in axes:
        rng = np.random.default_rng([realism.seed, AXES.index(axis)])
        rotation = _zone_rotation(axis)
        if realism.misorientation_deg > 0:
            rotation = _random_rotation(rng, realism.misorientation_deg) @ rotation
        lattice = cell.lattice @ rotation.T  # rows a, b, c in the lab frame
        intensity = _physics_intensity(cell, lattice, supercell, geometry, f_tables, method, cutoff, precision)
        patterns[axis] = _apply_realism(intensity, realism, geometry, rng).reshape(n, n)
    log.debug("simulated %s: %d atoms, block %s, axes %s", structure.composition.reduced_formula,
              len(cell.frac), supercell, axes)
    return patterns


def simulate_pattern(structure, axis: str, *, geometry: Geometry = Geometry(),
                     supercell: tuple[int, int, int] | None = None, scattering: str = "xray",
                     realism: Realism | None = None, method: str = "fast",
                     block_edge_angstrom: float = DEFAULT_BLOCK_EDGE_ANGSTROM,
                     cutoff: float = 0.0, precision: str = "double") -> np.ndarray:
    """Float64 (N, N) pattern of `structure` along zone `axis` ("x", "y" or "z").

    method "fast": closed-form Dirichlet block sum (default); "direct": every atom of the
    block (the oracle, O(block atoms × pixels)). Exact everywhere unless cutoff > 0.
    """
    if axis not in AXES:
        raise SimulationError(f"axis must be one of {AXES}, got {axis!r}")
    return simulate_axes(structure, axes=(axis,), geometry=geometry, supercell=supercell,
                         scattering=scattering, realism=realism, method=method,
                         block_edge_angstrom=block_edge_angstrom, cutoff=cutoff,
                         precision=precision)[axis]


def to_raw_uint8(intensity) -> np.ndarray:
    """Linear 8-bit image, round(I / I.max() * 255), like the authors' raw DPs."""
    arr = np.asarray(intensity, dtype=np.float64)
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError("to_raw_uint8: intensity must be a non-empty array of finite values")
    peak = arr.max()
    if peak <= 0:
        raise ValueError(f"to_raw_uint8: intensity has no positive value (max {peak!r}); "
                         "an all-zero pattern cannot be scaled")
    return np.rint(np.clip(arr, 0, None) / peak * 255.0).astype(np.uint8)
