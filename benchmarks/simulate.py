"""Time the simulator: ms per 256×256 pattern vs atoms per cell, for each method.

    python benchmarks/simulate.py              # timing table
    python benchmarks/simulate.py --calibrate  # central-spot profile vs block edge

Single-threaded BLAS is forced so the numbers are per core.
"""

from __future__ import annotations

import argparse
import os
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np
from pymatgen.core import Lattice, Structure

from xtalsym.offline import simulate as sim


def _rocksalt() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])


def _random_cell(n_atoms: int, seed: int) -> Structure:
    """Triclinic-ish cell with ~14 Å³ per atom, random positions, 3 species."""
    rng = np.random.default_rng(seed)
    edge = (14.0 * n_atoms) ** (1 / 3)
    lat = Lattice.from_parameters(edge * 0.9, edge, edge * 1.1, 88, 95, 100, vesta=True)
    species = rng.choice(["O", "Si", "Fe"], size=n_atoms)
    return Structure(lat, list(species), rng.random((n_atoms, 3)))


def _time(fn, repeat: int) -> float:
    fn()  # warm caches (pixel grid, form-factor tables)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def timing_table(repeat: int) -> None:
    cases = [("NaCl", _rocksalt())] + [(f"random{n}", _random_cell(n, n)) for n in (8, 20, 40, 60, 120)]
    print("ms per 256x256 pattern, zone z, 1 core; 'dataset' = simulate.DATASET_OPTIONS "
          "(float32 phases + 1e-3 cutoff), what `simulate dataset` uses")
    print(f"{'structure':<10} {'atoms':>5} {'block':>12} {'exact ms':>9} {'dataset ms':>10} "
          f"{'kept %':>7} {'3 axes ms':>9}")
    for name, s in cases:
        block = sim.block_size(s.lattice.matrix)
        exact = _time(lambda: sim.simulate_pattern(s, "z"), repeat)
        fast = _time(lambda: sim.simulate_pattern(s, "z", **sim.DATASET_OPTIONS), repeat)
        axes = _time(lambda: sim.simulate_axes(s, **sim.DATASET_OPTIONS), repeat)
        kept = 100 * np.mean(sim.simulate_pattern(s, "z", **sim.DATASET_OPTIONS) > 0)
        print(f"{name:<10} {len(s):>5} {str(block):>12} {exact:>9.1f} {fast:>10.1f} {kept:>7.1f} {axes:>9.1f}")
    s = _rocksalt()
    direct = _time(lambda: sim.simulate_pattern(s, "z", supercell=(4, 4, 4), method="direct"), 1)
    print(f"direct oracle, NaCl 4×4×4 block ({len(s) * 64} atoms): {direct:.0f} ms")


def calibrate() -> None:
    """Beam-row profile of NaCl (zone z) in 8-bit, pixels 1.5-5.5 px from the beam."""
    s = _rocksalt()
    print("authors' samples (raw_1_z): 1.5 px: 43, 2.5: 5, 3.5: 5, 4.5: 0, 5.5: 10 (of 254)")
    for edge in (75, 80, 85, 90, 95):
        raw = sim.to_raw_uint8(sim.simulate_pattern(s, "z", block_edge_angstrom=edge))
        print(f"edge {edge:>3} Å block {sim.block_size(s.lattice.matrix, edge)}: "
              f"{raw[127, 128:134].tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    calibrate() if args.calibrate else timing_table(args.repeat)


if __name__ == "__main__":
    main()
