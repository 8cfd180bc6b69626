"""Fixtures of the daemon tests: one tiny bundle (with a reference index) per module and
its loaded components, so an in-process daemon starts without loading a model; the same
with a fusion that weighs the symmetry evidence (``fused_components``)."""

from __future__ import annotations

import numpy as np
import pytest

from xtalsym.testing import tiny_bundle


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    torch.set_num_threads(1)
    return tiny_bundle(tmp_path_factory.mktemp("daemon"))


@pytest.fixture(scope="module")
def components(bundle_path):
    from xtalsym.daemon.config import load_config
    from xtalsym.daemon.service import load_components

    cfg = load_config(overrides={"bundle": {"path": str(bundle_path), "backend": "onnxruntime", "device": "cpu"}})
    return load_components(cfg)


def fusion_params(classes):
    """Evidence weighed at 2 and 3 views, not at 1 (as a fit where one zone buys nothing), and
    other weights and temperature without evidence: fusing without it would give another answer."""
    from xtalsym import fusion, symmetry

    plain = {f: 0.0 for f in fusion.FEATURES} | {"msdn": 1.0, "outside": -4.0, "prior": 0.5}
    with_evidence = plain | {"evidence": 0.3, "evidence_top": 1.0, "evidence_8": 0.5}
    return fusion.FusionParams(
        classes=list(classes),
        prior_counts=np.ones(230),
        weights={1: plain, 2: with_evidence, 3: with_evidence},
        temperature={1: 1.0, 2: 1.3, 3: 1.0},
        weights_no_evidence={k: plain for k in (1, 2, 3)},
        temperature_no_evidence={1: 1.0, 2: 1.0, 3: 1.0},
        sets=[[g] for g in range(1, 231)],
        bravais=[symmetry.bravais_lattice(g) for g in range(1, 231)],
    )


@pytest.fixture(scope="module")
def fused_components(tmp_path_factory):
    """A tiny bundle with :func:`fusion_params` as its fusion, loaded."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from xtalsym.bundle import add_fusion, load_bundle
    from xtalsym.daemon.config import load_config
    from xtalsym.daemon.service import load_components

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("fused")
    path = tiny_bundle(tmp)
    add_fusion(path, fusion_params(load_bundle(path).classes).save(tmp / "fusion.json"))
    cfg = load_config(overrides={"bundle": {"path": str(path), "backend": "onnxruntime", "device": "cpu"}})
    return load_components(cfg)
