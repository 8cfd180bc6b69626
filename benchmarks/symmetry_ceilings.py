"""Symmetry ceilings: the best top-1 reachable from three zone-axis patterns' symmetry alone.

    python benchmarks/symmetry_ceilings.py [--sets]

For the paper's 72 groups and for all 230, with the conventional cell known and with its
scale unknown (xtalsym.symmetry): how many distinct signatures, how many sets of groups no
symmetry evidence separates, and the ceiling on a class-balanced test and at the shared
Materials Project frequencies (xtalsym/data/mp_space_group_counts.json, spglib symprec 0.1).
--sets also lists every inseparable set among the 72 with its MP counts.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", action="store_true", help="list the inseparable sets among the 72")
    args = parser.parse_args()

    t0 = time.process_time()
    from xtalsym import spacegroups, symmetry

    symmetry.indistinguishable_sets(cell_known=True)
    build_known = time.process_time() - t0
    t1 = time.process_time()
    symmetry.indistinguishable_sets(cell_known=False)
    build_unknown = time.process_time() - t1

    counts = symmetry.materials_project_counts()
    groups = {"paper 72": tuple(spacegroups.PAPER_72), "all 230": tuple(range(1, 231))}
    print(f"{'groups':<9} {'cell':<8} {'signatures':>10} {'inseparable':>11} {'balanced':>9} "
          f"{'MP freq':>8} {'MP structures':>13}")
    for name, members in groups.items():
        mp_labels = symmetry.materials_project_labels(members)
        for cell_known in (True, False):
            sets = symmetry.indistinguishable_sets(members, cell_known=cell_known)
            balanced = symmetry.symmetry_ceiling(members, members, cell_known=cell_known)
            mp = symmetry.symmetry_ceiling(mp_labels, members, cell_known=cell_known)
            print(f"{name:<9} {'known' if cell_known else 'unknown':<8} {len(sets):>10} "
                  f"{sum(len(s) > 1 for s in sets):>11} {100 * balanced:>8.1f}% {100 * mp:>7.1f}% {len(mp_labels):>13}")
    print(f"\ntables built in {build_known:.2f} s CPU (cell known) + {build_unknown:.2f} s CPU (scale unknown), "
          f"load average {os.getloadavg()[0]:.1f}")

    if args.sets:
        for cell_known in (True, False):
            print(f"\ninseparable sets among the 72, cell {'known' if cell_known else 'scale unknown'} "
                  "(MP count; first = most frequent):")
            for members in symmetry.indistinguishable_sets(spacegroups.PAPER_72, cell_known=cell_known):
                if len(members) > 1:
                    ranked = sorted(members, key=lambda g: (-counts.get(g, 0), g))
                    print("  " + ", ".join(f"{spacegroups.symbol(g)} ({g}: {counts.get(g, 0)})" for g in ranked))


if __name__ == "__main__":
    main()
