"""Reference-index throughput on synthetic embeddings: build time, memory, batched queries/s.

Random non-negative (like the MSDN's ReLU features) per-view unit vectors, 3 × 960 = 2,880
floats per reference, seeded. For every (kind, references, threads): build time and RSS
growth per 10,000 references, the serialised index size, and queries/s at batch 1, 64
and 1024 with k = 5 (each measured for at least --seconds). Target: >= 2,000 batched
queries/s on CPU against 10,000 references (flat, exact).

    python benchmarks/index.py                       # 10k and 100k, flat + ivf, 1 and 2 threads
    python benchmarks/index.py --sizes 10000 --kinds flat,hnsw,ivf
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np

from xtalsym import index as ix


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, ix.DIM), dtype=np.float32)
    for i in range(0, n, 10_000):  # in chunks: the float64 draw of 100k x 2880 would be 2.3 GB
        e = np.abs(rng.standard_normal((min(10_000, n - i), ix.VIEWS, ix.VIEW_DIM), dtype=np.float32))
        out[i : i + len(e)] = ix.normalise_views(e)
    return out


def queries_per_second(index, queries: np.ndarray, batch: int, k: int, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while True:
        i = (done // batch * batch) % max(len(queries) - batch, 1)
        index.search(queries[i : i + batch], k)
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and done >= batch:
            return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--kinds", default="flat,ivf")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batches", default="1,64,1024")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    queries = vectors(4096, seed=1)
    print(f"faiss {faiss.__version__}, {os.cpu_count()} CPUs, dim {ix.DIM}, k={args.k}; "
          f"params: hnsw {ix.DEFAULT_PARAMS['hnsw']}, ivf {ix.DEFAULT_PARAMS['ivf']}")
    header = f"{'kind':<5} {'refs':>7} {'thr':>3} {'build s':>8} {'s/10k':>6} {'RSS MB/10k':>10} {'index MB/10k':>12} " + " ".join(
        f"{f'q/s b={b}':>11}" for b in batches)
    print(header)
    print("-" * len(header))
    for n in sizes:
        refs = vectors(n, seed=0)
        for kind in args.kinds.split(","):
            for t in threads:
                faiss.omp_set_num_threads(t)
                before = rss_bytes()
                start = time.perf_counter()
                index, _ = ix.make_faiss_index(refs, kind)
                build = time.perf_counter() - start
                grown = rss_bytes() - before
                size = len(faiss.serialize_index(index))
                qps = [queries_per_second(index, queries, b, args.k, args.seconds) for b in batches]
                per = 10_000 / n
                print(f"{kind:<5} {n:>7} {t:>3} {build:>8.2f} {build * per:>6.2f} {grown * per / 1e6:>10.1f} "
                      f"{size * per / 1e6:>12.1f} " + " ".join(f"{q:>11,.0f}" for q in qps), flush=True)
                del index


if __name__ == "__main__":
    main()
