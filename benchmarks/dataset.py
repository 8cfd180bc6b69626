"""Dataset throughput: build (simulate + shape) and read for training.

    python benchmarks/dataset.py [--limit 512] [--workers 2] [--dataset DIR]

Builds a dataset from the first --limit shared Materials Project structures (or reads an
existing --dataset), then reads it through the PyTorch Dataset/DataLoader in random order.
Prints a table; the whole-set estimate scales the build rate to 31,170 structures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from xtalsym.testing import shared_path

MP_FILE = shared_path("data", "mp_structures", "structures.jsonl.xz")
MP_COUNT = 31170


def bench_build(limit: int, workers: int, out: Path) -> dict:
    from xtalsym.offline import dataset as ds

    t0 = time.perf_counter()
    records, errors = ds.collect_records([MP_FILE], limit=limit)
    read_s = time.perf_counter() - t0
    summary = ds.build_dataset(records, out, workers=workers, progress=False, read_errors=errors)
    size = sum(p.stat().st_size for p in (out / ds.SHARD_DIR).glob("*"))
    return {
        "structures": len(records),
        "samples": summary.samples,
        "failed": len(summary.errors),
        "read_records_s": read_s,
        "build_s": summary.seconds,
        "rate": len(records) / summary.seconds,
        "bytes_per_sample": size / max(summary.samples, 1),
    }


def bench_read(root: Path, workers: int, batches: int = 40, batch_size: int = 32) -> float:
    import torch

    from xtalsym.offline.torch_data import DiffractionDataset

    data = DiffractionDataset(root, split=None)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    seen = 0
    it = iter(loader)
    next(it)  # start-up (worker spawn) is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        seen += len(x)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dataset", type=Path, help="read-benchmark an existing dataset instead of building one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dataset
        if root is None:
            root = Path(tmp) / "bench"
            b = bench_build(args.limit, args.workers, root)
            print(f"build: {b['structures']} MP structures, {args.workers} workers")
            print(f"  read records          {b['read_records_s']:8.2f} s")
            print(f"  simulate+shape        {b['build_s']:8.2f} s  ({b['rate']:.1f} structures/s, 3 axes each)")
            print(f"  failed structures     {b['failed']:8d}")
            print(f"  stored per structure  {b['bytes_per_sample'] / 1024:8.1f} KiB (raw + shaped, 3 axes)")
            print(f"  whole MP set estimate {MP_COUNT / b['rate'] / 60:8.1f} min for {MP_COUNT} structures")
        print("read (DataLoader, shuffled, shaped 3x3x224x224 uint8):")
        for workers in (0, 2):
            print(f"  num_workers={workers}        {bench_read(root, workers):8.0f} samples/s")


if __name__ == "__main__":
    main()
