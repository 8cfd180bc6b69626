"""The reference index of shaped-DP embeddings: nearest materials, the paper's per-class
cosine score, an "unknown" decision and the open-set evaluation (Fig. 3f); docs/INDEX.md.

One module per job, re-exported here so ``from xtalsym import index as ix`` reaches all:

- :mod:`~xtalsym.index.scoring`: vectors, per-class score, γ, vote, thresholds (numpy only);
- :mod:`~xtalsym.index.store`: the FAISS index, built, saved, loaded, queried (the daemon's part);
- :mod:`~xtalsym.index.embed`: embeddings of stored dataset samples via a backend (structures,
  which need the simulator, are :mod:`xtalsym.offline.embed`'s);
- :mod:`~xtalsym.index.open_set`: the paper's open-set experiment and its report.
"""

from __future__ import annotations

from xtalsym.checksums import sha256_file  # noqa: F401 (part of the old flat module's surface)
from xtalsym.index.embed import (
    Embedded,
    Embedder,
    EmbedFn,
    embed_dataset,
    select_samples,
)
from xtalsym.index.open_set import (
    PAPER_OPEN_SET,
    evaluate_open_set,
    format_open_set,
    ranking_from_neighbours,
    reference_half,
    topk_from_rankings,
)
from xtalsym.index.scoring import (
    DEFAULT_TEMPERATURE,
    DIM,
    ENTRY_FIELDS,
    VIEW_DIM,
    VIEWS,
    ReferenceIndexError,
    Thresholds,
    calibrate,
    class_vectors,
    gamma,
    normalise_views,
    reference_entry,
    sigma_total,
    vote,
)
from xtalsym.index.store import (
    CLASS_VECTORS_FILE,
    DEFAULT_PARAMS,
    ENTRIES_FILE,
    FORMAT,
    INDEX_FILE,
    KINDS,
    META_FILE,
    ModelMismatchError,
    QueryResult,
    ReferenceIndex,
    bundle_index_dir,
    check_model_id,
    gpu_available,
    make_faiss_index,
)

__all__ = [
    "CLASS_VECTORS_FILE",
    "DEFAULT_PARAMS",
    "DEFAULT_TEMPERATURE",
    "DIM",
    "ENTRIES_FILE",
    "ENTRY_FIELDS",
    "FORMAT",
    "INDEX_FILE",
    "KINDS",
    "META_FILE",
    "PAPER_OPEN_SET",
    "VIEWS",
    "VIEW_DIM",
    "EmbedFn",
    "Embedded",
    "Embedder",
    "ModelMismatchError",
    "QueryResult",
    "ReferenceIndex",
    "ReferenceIndexError",
    "Thresholds",
    "bundle_index_dir",
    "calibrate",
    "check_model_id",
    "class_vectors",
    "embed_dataset",
    "evaluate_open_set",
    "format_open_set",
    "gamma",
    "gpu_available",
    "make_faiss_index",
    "normalise_views",
    "ranking_from_neighbours",
    "reference_entry",
    "reference_half",
    "select_samples",
    "sigma_total",
    "topk_from_rankings",
    "vote",
]
