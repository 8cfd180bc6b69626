"""Fixtures of the daemon tests: one tiny bundle (with a reference index) per module and
its loaded components, so an in-process daemon starts without loading a model."""

from __future__ import annotations

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
