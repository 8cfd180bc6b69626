"""index.query: the open-set match for the final predictions only (default) or for every one."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from xtalsym.daemon.assemble import Request, View
from xtalsym.daemon.config import ConfigError, load_config
from xtalsym.daemon.infer import classify_batch, model_info


def one_sample(size: int, seed: int = 0) -> list[Request]:
    """x, then x+y, then x+y+z of one sample, as the assembler makes them."""
    rng = np.random.default_rng(seed)
    views = {}
    for i, axis in enumerate("xyz"):
        shaped = np.zeros((size, size, 3), np.uint8)
        lit = rng.random(shaped.shape) < 0.05
        shaped[lit] = rng.integers(50, 256, size=int(lit.sum()), dtype=np.uint8)
        views[axis] = View(sample_key="s", axis=axis, series_id=1, image_id=i, shaped=shaped, received=0.0)
    return [Request("s", {a: views[a] for a in "xyz"[:n]}, "complete" if n == 3 else "partial", n == 3,
                    "complete" if n == 3 else None, views["xyz"[n - 1]]) for n in (1, 2, 3)]


def test_open_set_for_final_predictions_only_unless_every(components):
    bundle, backend, index = components
    assert index is not None
    run = {}
    for query in ("final", "every"):
        result = classify_batch(one_sample(int(bundle.image_size)), backend=backend, size=int(bundle.image_size),
                                model=model_info(bundle, backend, index), index=index, index_query=query)
        assert result.index_error is None and result.match_seconds is not None
        run[query] = [message for _, message in result.messages]
    assert [m["open_set"] is None for m in run["final"]] == [True, True, False]
    assert all(m["open_set"] is not None for m in run["every"])
    # the final prediction's match does not depend on which others were queried with it
    assert run["final"][2]["open_set"] == run["every"][2]["open_set"]
    assert [m["top"] for m in run["final"]] == [m["top"] for m in run["every"]]
    with pytest.raises(ValueError, match="index_query"):
        classify_batch(one_sample(int(bundle.image_size)), backend=backend, size=int(bundle.image_size),
                       model={}, index=index, index_query="partial")


def test_config_default_and_refusal():
    assert load_config().index.query == "final"
    assert load_config(overrides={"index": {"query": "every"}}).index.query == "every"
    with pytest.raises(ConfigError, match="query"):
        load_config(overrides={"index": {"query": "sometimes"}})
