"""Inference backends: parity with torch fp32 on shaped DPs (1, 2, 3 views), selection, export."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

import torch.nn.functional as F
from test_bundle import make_release

from xtalsym import bundle as bundles
from xtalsym.inference import BackendUnavailable, InferenceBackend, make_backend, select_backend
from xtalsym.inference import export as onnx_export
from xtalsym.inference.base import check_batch
from xtalsym.offline import dataset as ds
from xtalsym.offline import structures

IMAGE = 224  # shaped DPs as the daemon makes them; the tiny model pools them to 32 (ratio 7)
SAMPLES = 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("inference")
    model = make_release(tmp / "release", seed=1)
    # spread the initial logits (heads are N(0, 0.01²) at init) so top-1 is not a near-tie
    for head in model.heads:
        torch.nn.init.normal_(head.weight, std=0.5)
    from xtalsym import model as models

    extra = models.load_checkpoint(tmp / "release" / "model.pt")[1]
    models.save_checkpoint(tmp / "release" / "model.pt", model, extra=extra)
    return bundles.load_bundle(bundles.build_bundle(tmp / "release", tmp / "bundle", image_size=IMAGE))


@pytest.fixture(scope="module")
def batch():
    """The eight shipped CIFs' shaped DPs plus sparse random ones; masks with 1, 2 and 3 views."""
    records, _ = ds.collect_records([structures.shipped_structures_dir()])
    real = [ds.make_sample(structures.label(r), ds.BuildConfig())[1].transpose(0, 3, 1, 2) for r in records]
    rng = np.random.default_rng(0)
    x = np.zeros((SAMPLES, 3, 3, IMAGE, IMAGE), dtype=np.uint8)
    lit = rng.random(x.shape) < 0.03
    x[lit] = rng.integers(50, 256, size=int(lit.sum()), dtype=np.uint8)
    x[: len(real)] = np.stack(real)
    present = onnx_export.example_masks(SAMPLES)
    return x, present


@pytest.fixture(scope="module")
def reference(bundle, batch):
    x, present = batch
    model = bundle.load_model().float()
    with torch.no_grad():
        out = model(torch.from_numpy(x), torch.from_numpy(present))
    return torch.softmax(out.logits, -1).numpy(), out.logits.numpy(), out.embeddings.numpy()


CANDIDATES = [("torch", "cpu"), ("onnxruntime", "cpu"), ("torch", "cuda"), ("onnxruntime", "cuda"), ("tensorrt", "cuda")]


@pytest.mark.parametrize("name, device", CANDIDATES, ids=[f"{n}-{d}" for n, d in CANDIDATES])
def test_parity_with_torch_fp32(bundle, batch, reference, name, device):
    try:
        backend = make_backend(bundle, name, device=device)
    except BackendUnavailable as exc:
        pytest.skip(f"{name} on {device} not available here: {exc}")
    assert isinstance(backend, InferenceBackend)
    x, present = batch
    try:
        result = backend.run(x, present)
    finally:
        backend.close()
    probabilities, logits, embeddings = reference
    assert result.probabilities.dtype == np.float32 and result.probabilities.shape == probabilities.shape
    assert result.embeddings.dtype == np.float32 and result.embeddings.shape == (SAMPLES, 3, 960)
    assert backend.classes == bundle.classes
    top1 = (result.probabilities.argmax(1) == probabilities.argmax(1)).mean()
    diff = np.abs(result.probabilities - probabilities).max()
    if backend.precision == "fp32":
        assert diff <= 1e-4, diff
        assert top1 == 1.0
        np.testing.assert_allclose(result.embeddings, embeddings, rtol=1e-4, atol=1e-4)
    else:
        assert top1 >= 0.999, top1
        assert diff <= 1e-2, diff
    assert np.all(result.embeddings[~present] == 0)  # absent views have no embedding


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_absent_views_are_ignored(bundle, batch, name):
    backend = make_backend(bundle, name, device="cpu")
    x, present = batch
    x, present = x[:7].copy(), present[:7]
    first = backend.run(x, present)
    x[~present] = 255  # garbage in the absent views
    second = backend.run(x, present)
    np.testing.assert_array_equal(first.logits, second.logits)
    one_view = backend.run(x[:1], np.array([[False, True, False]]))  # a single view, batch of one
    assert one_view.probabilities.shape == (1, len(bundle.classes))
    np.testing.assert_allclose(one_view.probabilities.sum(), 1.0, rtol=1e-5)


def test_auto_on_this_host_logs_its_choice(bundle, caplog):
    caplog.set_level(logging.INFO, logger="xtalsym.inference")
    backend = select_backend(bundle, "auto")
    assert backend.name in ("tensorrt", "onnxruntime", "torch")
    assert "inference backend" in caplog.text
    if not torch.cuda.is_available():
        assert (backend.name, backend.device) == ("onnxruntime", "cpu")
        assert "tensorrt on cuda skipped" in caplog.text and "torch on cuda skipped" in caplog.text
    cpu = select_backend(bundle, "auto", device="cpu")
    assert cpu.device == "cpu" and cpu.name == "onnxruntime"


def test_missing_tensorrt_is_unavailable_with_hint(bundle):
    try:
        import tensorrt  # noqa: F401 (imported only to see whether TensorRT is installed)
    except ImportError:
        with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
            make_backend(bundle, "tensorrt", device="cuda")
    else:
        pytest.skip("tensorrt is installed here; the parity test covers it")


def test_no_onnx_graph_is_unavailable(bundle, tmp_path):
    path = shutil.copytree(bundle.path, tmp_path / "b")
    (path / "model.onnx").unlink()
    b = bundles.load_bundle(path, verify=False)
    b.manifest["files"].pop("model.onnx")
    with pytest.raises(BackendUnavailable, match="no .*model.onnx"):
        make_backend(b, "onnxruntime", device="cpu")


def test_engine_key_changes_with_everything_it_depends_on():
    from xtalsym.inference.tensorrt_backend import engine_key

    base = dict(gpu_name="NVIDIA H100 80GB HBM3", capability=(9, 0), trt_version="10.3.0", model_id="ab" * 32,
                max_batch=64, opt_batch=32, fp16=True)
    keys = {engine_key(**base)}
    for change in [dict(gpu_name="NVIDIA A100"), dict(capability=(8, 0)), dict(trt_version="10.4.0"),
                   dict(model_id="cd" * 32), dict(max_batch=128), dict(fp16=False)]:
        keys.add(engine_key(**{**base, **change}))
    assert len(keys) == 7 and all("/" not in k and " " not in k for k in keys)


def test_check_batch_validates():
    with pytest.raises(ValueError, match="uint8"):
        check_batch(np.zeros((1, 3, 3, 8, 8), np.float32), None, 8)
    with pytest.raises(ValueError, match="shape"):
        check_batch(np.zeros((1, 3, 3, 8, 9), np.uint8), None, 8)
    with pytest.raises(ValueError, match="present"):
        check_batch(np.zeros((2, 3, 3, 8, 8), np.uint8), np.ones((1, 3), bool), 8)
    _, present = check_batch(np.zeros((2, 3, 3, 8, 8), np.uint8), None, 8)
    assert present.dtype == bool and present.all()


@pytest.mark.parametrize("size_in, size_out", [(224, 64), (224, 32), (224, 56), (50, 7), (64, 64), (9, 4)])
def test_export_pooling_is_exact(size_in, size_out):
    x = torch.rand(2, 3, size_in, size_in) * 255
    pool = onnx_export.AdaptiveMaxPool2dExport((size_in, size_in), (size_out, size_out))
    assert torch.equal(pool(x), F.adaptive_max_pool2d(x, (size_out, size_out)))


def test_export_cli_with_check(bundle, tmp_path, capsys):
    from xtalsym import cli

    out = tmp_path / "m.onnx"
    assert cli.main(["export", "--bundle", str(bundle.path), "--out", str(out), "--image-size", "64", "--check"]) == 0
    text = capsys.readouterr().out
    assert "check OK" in text and out.is_file() and onnx_export.image_size_of(out) == 64
