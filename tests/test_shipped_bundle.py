"""The shipped default bundle (reference_index/): verifies, and classifies and matches."""

from __future__ import annotations

import numpy as np
import pytest

from xtalsym.testing import REPO_ROOT

SHIPPED = REPO_ROOT / "reference_index"

pytestmark = pytest.mark.skipif(
    not (SHIPPED / "manifest.json").is_file(), reason="this checkout has no shipped bundle in reference_index/"
)


def test_shipped_bundle_passes_its_own_verification():
    from xtalsym import bundle

    b = bundle.load_bundle(SHIPPED)
    assert bundle.default_bundle_path().resolve() == SHIPPED.resolve()
    assert b.index_dir is not None and len(b.classes) == 72
    assert b.settings["dataset_config"]["geometry"]["wavelength_m"] == pytest.approx(3.5e-12)


def test_shipped_bundle_classifies_and_matches_a_shipped_structure():
    from xtalsym import bundle, index
    from xtalsym.inference import select_backend
    from xtalsym.offline import dataset as ds
    from xtalsym.offline import evaluate as ev
    from xtalsym.offline import structures

    b = bundle.load_bundle(SHIPPED)
    labelled = structures.load_structure(structures.shipped_structures_dir() / "NaCl.cif")
    config = ev.build_config_from({"dataset_config": b.settings["dataset_config"]})
    _, shaped = ds.make_sample(labelled, config)
    x = shaped.transpose(0, 3, 1, 2)[None]
    backend = select_backend(b, "auto", device="cpu")
    result = backend.run(np.ascontiguousarray(x), np.ones((1, 3), dtype=bool))
    assert result.probabilities.shape == (1, 72)
    assert abs(float(result.probabilities.sum()) - 1) < 1e-4
    assert b.classes[int(result.probabilities[0].argmax())] == 225  # the shipped model names NaCl's group
    ref = index.ReferenceIndex.load(b.index_dir, expected_model_id=b.model_id, gpu="off")
    sims, ids = ref.search(index.normalise_views(result.embeddings), 5)
    # NaCl's nearest references are cubic materials with nearly the same pattern (a summed
    # cosine near 3). The shipped index is product-quantised (96 bytes per material), so
    # among such near-identical patterns the order is approximate: NaCl itself (mp-22862,
    # an exact similarity of 3.0) need not come first, nor other rock-salt materials.
    groups = [ref.entries[int(i)]["space_group"] for i in ids[0]]
    assert all(195 <= g <= 230 for g in groups), groups
    assert 225 in groups and sims[0, 0] > 2.8
