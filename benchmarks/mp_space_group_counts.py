"""Space-group frequencies of the shared Materials Project set, labelled once with spglib.

    nice -n 10 python benchmarks/mp_space_group_counts.py [--workers 2] [--out xtalsym/data/mp_space_group_counts.json]

Labels every structure of ``shared/data/mp_structures/structures.jsonl.xz`` exactly as the
dataset builder does (:func:`xtalsym.offline.structures.label`, spglib at symprec 0.1,
the same rejections of absurd inputs) and writes the per-group counts as a small JSON, so
that the symmetry ceilings (xtalsym.symmetry, benchmarks/symmetry_ceilings.py) and their
tests never relabel 31k structures. ~21 ms CPU per structure (~11 min CPU in all).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from xtalsym.testing import shared_path

MP_FILE = shared_path("data", "mp_structures", "structures.jsonl.xz")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "xtalsym" / "data" / "mp_space_group_counts.json"
log = logging.getLogger("mp_space_group_counts")
COMMAND = "nice -n 10 python benchmarks/mp_space_group_counts.py --workers 2"


def _label_one(record, symprec: float) -> tuple[int | None, str | None]:
    from xtalsym.offline import structures

    if isinstance(record, structures.StructureError):
        return None, record.reason
    try:
        return structures.label(record, symprec=symprec).space_group, None
    except structures.StructureError as exc:
        return None, exc.reason


def count_groups(source: Path, *, symprec: float, limit: int | None = None, workers: int = 1) -> dict:
    import functools
    import itertools
    import multiprocessing

    import spglib

    from xtalsym.offline import structures

    counts: Counter[int] = Counter()
    rejected: Counter[str] = Counter()
    records = itertools.islice(structures.iter_records(source), limit)
    work = functools.partial(_label_one, symprec=symprec)
    t0 = time.perf_counter()
    seen = 0
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(work, records, chunksize=32) if pool else map(work, records)
        for group, reason in results:
            seen += 1
            if group is None:
                rejected[_reason_kind(reason)] += 1
            else:
                counts[group] += 1
            if seen % 2000 == 0:
                log.info("%d structures labelled (%.0f s)", seen, time.perf_counter() - t0)
    finally:
        if pool:
            pool.close()
            pool.join()
    return {
        "source": "shared/data/mp_structures/structures.jsonl.xz",
        "command": COMMAND,
        "labeller": "xtalsym.offline.structures.label (spglib, conventional standard cell)",
        "symprec": symprec,
        "spglib_version": spglib.__version__,
        "structures_read": seen,
        "labelled": sum(counts.values()),
        "rejected": dict(sorted(rejected.items())),
        "wall_s": round(time.perf_counter() - t0, 1),
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
    parser.add_argument("--workers", type=int, default=1, help="labelling processes")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        print(f"error: no Materials Project file at {args.source}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = count_groups(args.source, symprec=args.symprec, limit=args.limit, workers=args.workers)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['labelled']} of {result['structures_read']} structures labelled into "
          f"{len(result['counts'])} space groups; rejected {result['rejected']}; {result['wall_s']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
