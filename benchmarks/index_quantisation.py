"""What product quantisation costs the reference index, on a bundle's real embeddings.

Embeds ``--samples`` random materials of a dataset with the bundle's model, indexes them
exactly (flat) and product-quantised (pq, each ``--pq-m``, 8 bits), and queries every
``--every``-th of them against each index:

- self@1 / self@5: the query's own entry is the nearest / among the 5 nearest (exact
  similarity 3.0, so an exact index always finds it first);
- vote: the similarity-weighted vote of the 5 nearest *other* materials names the
  query's space group (the daemon's match, with the query's own entry left out);
- overlap: share of those 5 neighbours that the exact index also returns.

    python benchmarks/index_quantisation.py --bundle reference_index --dataset data/mp \\
        --samples 6000 --pq-m 96,240
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from xtalsym import index as ix


def neighbour_quality(index, vectors: np.ndarray, groups: np.ndarray, queries: np.ndarray, k: int = 5):
    """self@1, self@5, leave-self-out vote accuracy and the neighbour ids of each query."""
    sims, ids = index.search(vectors[queries], k + 1)
    self1 = float(np.mean(ids[:, 0] == queries))
    self5 = float(np.mean([q in row[:k] for q, row in zip(queries, ids)]))
    right, others = 0, []
    for q, srow, irow in zip(queries, sims, ids):
        keep = irow != q  # the query's own entry left out
        neighbours, similarities = irow[keep][:k], srow[keep][:k]
        others.append({int(i) for i in neighbours})
        right += ix.vote(similarities, groups[neighbours])[0]["space_group"] == groups[q]  # the daemon's vote
    return self1, self5, right / len(queries), others


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="reference_index")
    p.add_argument("--dataset", required=True)
    p.add_argument("--samples", type=int, default=6000, help="random materials to index (default %(default)s)")
    p.add_argument("--every", type=int, default=6, help="query every N-th indexed material (default %(default)s)")
    p.add_argument("--pq-m", default="96,240", help="pq sub-vector counts, dividing 2880 (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ms = [int(m) for m in args.pq_m.split(",") if m]

    samples = ix.select_samples(args.dataset)
    random.Random(args.seed).shuffle(samples)
    samples = samples[: args.samples]
    embedder = ix.Embedder.from_bundle(args.bundle)
    start = time.perf_counter()
    data = ix.embed_dataset(embedder, args.dataset, samples)
    print(f"embedded {len(samples)} materials in {time.perf_counter() - start:.0f} s")
    groups = np.array([e["space_group"] for e in data.entries])
    queries = np.arange(0, len(groups), args.every)

    flat, _ = ix.make_faiss_index(data.vectors, "flat")
    s1, s5, vote, exact = neighbour_quality(flat, data.vectors, groups, queries)
    print(f"{len(queries)} queries against {len(groups)} references\n")
    print("| index | bytes/material | build s | self@1 | self@5 | vote (own entry left out) | overlap with exact |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| flat (exact) | {4 * ix.DIM} | — | {s1:.3f} | {s5:.3f} | {vote:.3f} | 1.000 |")
    for m in ms:
        start = time.perf_counter()
        pq, params = ix.make_faiss_index(data.vectors, "pq", {"m": m, "nbits": 8})
        build = time.perf_counter() - start
        s1, s5, vote, found = neighbour_quality(pq, data.vectors, groups, queries)
        overlap = np.mean([len(a & b) / max(1, len(b)) for a, b in zip(found, exact)])
        print(f"| pq m={m}, nbits={params['nbits']} | {m * params['nbits'] // 8} | {build:.0f} | {s1:.3f} | {s5:.3f} "
              f"| {vote:.3f} | {overlap:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
