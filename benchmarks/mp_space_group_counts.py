"""Space-group frequencies of the shared Materials Project set, labelled once with spglib.

    nice -n 10 python benchmarks/mp_space_group_counts.py [--out xtalsym/data/mp_space_group_counts.json]

Labels every structure of ``shared/data/mp_structures/structures.jsonl.xz`` exactly as the
dataset builder does (:func:`xtalsym.offline.structures.label`, spglib at symprec 0.1,
the same rejections of absurd inputs) and writes the per-group counts as a small JSON, so
that the symmetry ceilings (xtalsym.symmetry, benchmarks/symmetry_ceilings.py) and their
tests never relabel 31k structures. One pass takes ~15-30 min on one loaded core.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

MP_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mp_structures" / "structures.jsonl.xz"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "xtalsym" / "data" / "mp_space_group_counts.json"
COMMAND = "nice -n 10 python benchmarks/mp_space_group_counts.py"


def count_groups(source: Path, *, symprec: float, limit: int | None = None) -> dict:
    import spglib

    from xtalsym.offline import structures

    counts: Counter[int] = Counter()
    rejected: Counter[str] = Counter()
    seen = 0
    t0 = time.process_time()
    for record in structures.iter_records(source):
        if limit is not None and seen >= limit:
            break
        seen += 1
        if isinstance(record, structures.StructureError):
            rejected[_reason_kind(record.reason)] += 1
            continue
        try:
            labelled = structures.label(record, symprec=symprec)
        except structures.StructureError as exc:
            rejected[_reason_kind(exc.reason)] += 1
            continue
        counts[labelled.space_group] += 1
        if seen % 2000 == 0:
            logging.info("%d structures labelled (%.1f ms CPU each)", seen, 1e3 * (time.process_time() - t0) / seen)
    return {
        "source": "shared/data/mp_structures/structures.jsonl.xz",
        "command": COMMAND,
        "labeller": "xtalsym.offline.structures.label (spglib, conventional standard cell)",
        "symprec": symprec,
        "spglib_version": spglib.__version__,
        "structures_read": seen,
        "labelled": sum(counts.values()),
        "rejected": dict(sorted(rejected.items())),
        "cpu_s": round(time.process_time() - t0, 1),
        "counts": {str(g): counts[g] for g in sorted(counts)},
    }


def _reason_kind(reason: str) -> str:
    # keep the kind of problem, not the per-structure numbers
    return reason.split(":")[0].split("(")[0].strip()[:80]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=MP_FILE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--symprec", type=float, default=0.1)
    parser.add_argument("--limit", type=int, default=None, help="only the first N structures (a dry run)")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        print(f"error: no Materials Project file at {args.source}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = count_groups(args.source, symprec=args.symprec, limit=args.limit)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['labelled']} of {result['structures_read']} structures labelled into "
          f"{len(result['counts'])} space groups; rejected {result['rejected']}; {result['cpu_s']} s CPU -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
