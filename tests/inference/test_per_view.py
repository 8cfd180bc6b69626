"""Each view through the network once: the per-view graph, backends' run_views, the daemon's
per-view path (same probabilities as the whole graph, 1, 2 and 3 views, over real sockets),
old bundles without the per-view graph, and the int8 (QDQ) bundle option."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
zmq = pytest.importorskip("zmq")

from xtalsym import bundle as bundles  # noqa: E402
from xtalsym import model as models  # noqa: E402
from xtalsym.daemon.assemble import Request, View  # noqa: E402
from xtalsym.daemon.client import listen  # noqa: E402
from xtalsym.daemon.config import load_config  # noqa: E402
from xtalsym.daemon.service import Service, load_components  # noqa: E402
from xtalsym.daemon.sim import DetectorGeometry, DetectorSim, push_socket  # noqa: E402
from xtalsym.inference import BackendUnavailable, make_backend, select_backend, supports_views  # noqa: E402
from xtalsym.inference import export as onnx_export  # noqa: E402
from xtalsym.inference.base import run_by_views  # noqa: E402
from xtalsym.offline import dataset as ds  # noqa: E402
from xtalsym.offline import structures  # noqa: E402

CLASSES = [2, 14, 62, 194, 225, 227]
IMAGE = 64
SHIPPED = structures.shipped_structures_dir()
GEOMETRY = DetectorGeometry(pixels_x=300, pixels_y=290, pixel_size_m=55e-6, distance_m=0.33,
                            wavelength_m=3.5e-12, beam_center_x_px=150.5, beam_center_y_px=140.5)


def release(path, seed=3):
    """A release of a fresh msdn whose heads are spread (std 0.5) so that top-1 is no near-tie."""
    torch.manual_seed(seed)
    path.mkdir(parents=True)
    model = models.build_model("msdn", len(CLASSES), input_size=32)
    for head in model.heads:
        torch.nn.init.normal_(head.weight, std=0.5)
    models.save_checkpoint(path / "model.pt", model, extra={
        "classes": CLASSES, "dataset_config": ds.BuildConfig().to_json(), "config": {}, "metrics": [],
        "release": "per-view"})
    (path / "card.json").write_text(json.dumps({"name": "per-view", "classes": CLASSES}))
    (path / "MODEL_CARD.md").write_text("# per-view\n")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("per_view")
    rel = release(tmp / "release")
    return bundles.build_bundle(rel, tmp / "bundle", image_size=IMAGE), tmp


@pytest.fixture(scope="module")
def bundle(built):
    return bundles.load_bundle(built[0])


@pytest.fixture(scope="module")
def old_bundle(built):
    """The same model bundled as before this feature: no model_view.onnx."""
    path, tmp = built
    return bundles.load_bundle(bundles.build_bundle(tmp / "release", tmp / "old", image_size=IMAGE, view_graph=False))


def sparse_views(n, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, 3, IMAGE, IMAGE), np.uint8)
    lit = rng.random(x.shape) < 0.05
    x[lit] = rng.integers(50, 256, size=int(lit.sum()), dtype=np.uint8)
    return x


def test_bundle_lists_and_verifies_the_per_view_graph(bundle, old_bundle):
    assert bundle.view_onnx_path is not None and bundle.view_onnx_path.name == "model_view.onnx"
    assert "model_view.onnx" in bundle.manifest["files"]
    assert bundle.manifest["onnx"]["view"]["inputs"] == ["view", "axis"]
    assert old_bundle.view_onnx_path is None and "model_view.onnx" not in old_bundle.manifest["files"]
    assert bundle.int8_onnx_path is None


def test_corrupted_view_graph_is_refused(built, tmp_path):
    copy = shutil.copytree(built[0], tmp_path / "b")
    data = bytearray((copy / "model_view.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model_view.onnx").write_bytes(bytes(data))
    with pytest.raises(bundles.BundleError, match="model_view.onnx is corrupted"):
        bundles.load_bundle(copy)


BACKENDS = [("onnxruntime", "cpu"), ("torch", "cpu"), ("onnxruntime", "cuda"), ("torch", "cuda"), ("tensorrt", "cuda")]


@pytest.mark.parametrize("name, device", BACKENDS, ids=[f"{n}-{d}" for n, d in BACKENDS])
def test_run_views_sums_to_the_whole_graph(bundle, name, device):
    """Rows of run_views summed per sample = run() on the same samples, for 1, 2 and 3 views
    (fp32 within 1e-5 in probabilities; fp16 GPU engines within 1e-2). fp32 is not bit-exact: the
    per-view graph adds the views' logits in another order than the whole graph, and torch's
    oneDNN picks convolution kernels by batch size and CPU (1.25e-6 seen on one Xeon)."""
    try:
        backend = make_backend(bundle, name, device=device)
    except BackendUnavailable as exc:
        pytest.skip(f"{name} on {device} not available here: {exc}")
    assert supports_views(backend)
    x = sparse_views(14)
    present = onnx_export.example_masks(14)
    whole = backend.run(x, present)
    by_views = run_by_views(backend, x, present)
    tol = 1e-5 if backend.precision == "fp32" else 1e-2
    np.testing.assert_allclose(by_views.probabilities, whole.probabilities, rtol=0, atol=tol)
    np.testing.assert_allclose(by_views.logits, whole.logits, rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(by_views.embeddings, whole.embeddings, rtol=tol * 10, atol=tol * 10)
    if backend.precision == "fp32":
        assert (by_views.probabilities.argmax(1) == whole.probabilities.argmax(1)).all()
    with pytest.raises(ValueError, match="axes must be 0"):
        backend.run_views(x[:2, 0], np.array([0, 3]))
    with pytest.raises(ValueError, match="views must have shape"):
        backend.run_views(x[:2], np.array([0, 1]))


def test_old_bundle_backend_has_no_per_view_path(old_bundle):
    backend = make_backend(old_bundle, "onnxruntime", device="cpu")
    assert not supports_views(backend)
    assert backend.run(sparse_views(2)).probabilities.shape == (2, len(CLASSES))


def test_stacked_densenet_gets_no_view_graph(tmp_path):
    torch.manual_seed(0)
    rel = tmp_path / "rel"
    rel.mkdir()
    model = models.build_model("densenet-stacked", len(CLASSES), input_size=32)
    assert not onnx_export.per_view_supported(model)
    models.save_checkpoint(rel / "model.pt", model, extra={
        "classes": CLASSES, "dataset_config": ds.BuildConfig().to_json(), "config": {}, "metrics": []})
    (rel / "card.json").write_text("{}")
    (rel / "MODEL_CARD.md").write_text("# stacked\n")
    with pytest.raises(bundles.BundleError, match="int8 quantises the per-view graph"):
        bundles.build_bundle(rel, tmp_path / "b", image_size=IMAGE, onnx=False, int8_calibration=tmp_path)


def _requests(x):
    """Requests of one sample as the assembler makes them: x, then x+y, then x+y+z (shared View objects)."""
    views = {a: View(sample_key="s", axis=a, series_id=1, image_id=i, shaped=np.ascontiguousarray(
        x[i].transpose(1, 2, 0)), received=0.0) for i, a in enumerate("xyz")}
    out = []
    for n in (1, 2, 3):
        vs = {a: views[a] for a in "xyz"[:n]}
        out.append(Request("s", vs, "complete" if n == 3 else "partial", n == 3, None, vs["xyz"[n - 1]]))
    return out


def test_per_view_batches_equal_whole_and_run_each_view_once(bundle):
    """The daemon's two paths (xtalsym.daemon.infer): the whole graph over 1, 2, 3 views vs each
    view once with its row kept on the View; a new backend generation recomputes."""
    from xtalsym.daemon.infer import infer_by_views, infer_whole

    backend = make_backend(bundle, "onnxruntime", device="cpu")
    x = sparse_views(3, seed=5)[0]
    requests = _requests(np.stack([x[0], x[1], x[2]]))
    whole, n_whole = infer_whole(requests, backend, IMAGE)
    assert n_whole == 6  # 1 + 2 + 3
    per_view = [infer_by_views([r], backend, 0) for r in requests]  # one request at a time, as views arrive
    assert [n for _, n in per_view] == [1, 1, 1]  # each view once
    for i, (result, _) in enumerate(per_view):
        np.testing.assert_allclose(result.probabilities[0], whole.probabilities[i], rtol=0, atol=1e-6)
        np.testing.assert_allclose(result.embeddings[0], whole.embeddings[i], rtol=1e-5, atol=1e-5)
    # a swapped-in backend (next generation) does not reuse the old one's rows
    assert infer_by_views(requests[2:], backend, 1)[1] == 3


# --------------------------------------------------------------------------- through the daemon


def serve(components, endpoint, view_inference):
    cfg = load_config(overrides={
        "ingest": {"address": endpoint},
        "publish": {"address": "tcp://127.0.0.1:*", "metrics_interval_seconds": 0.5},
        "pipeline": {"workers": 1, "latency_budget_seconds": 0.01, "overload": "block",
                     "view_inference": view_inference},
        "metrics": {"port": 0}})
    return Service(cfg, components=components).start()


def run_daemon(components, view_inference, structure_files):
    sim = DetectorSim(structure_files, geometry=GEOMETRY)
    sock = push_socket(zmq.Context.instance(), "tcp://127.0.0.1:*")
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    service = serve(components, endpoint, view_inference)
    stop, ready, out = threading.Event(), threading.Event(), {}
    thread = threading.Thread(target=lambda: out.update(s=listen(service.pipeline.publish_endpoint, stop=stop,
                                                                  ready=ready)), daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.3)
    try:
        sim.send(sock)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if service.pipeline.metrics.snapshot()["counts"].get("predictions_complete", 0) >= len(structure_files):
                break
            time.sleep(0.1)
    finally:
        sock.close(linger=0)
        service.pipeline.stop()
        time.sleep(0.3)
        stop.set()
        thread.join(5)
    return out["s"].messages, service.pipeline.metrics.snapshot(), service.pipeline.model_info


def test_daemon_per_view_predictions_equal_the_whole_graph(bundle):
    """The same frames through the daemon with view_inference = auto and off: every partial
    (1 and 2 views) and complete (3 views) prediction has the same probabilities."""
    components = load_components(load_config(overrides={"bundle": {"path": str(bundle.path),
                                                                    "backend": "onnxruntime", "device": "cpu"}}))
    files = [SHIPPED / "NaCl.cif", SHIPPED / "Si.cif"]
    new, new_metrics, _ = run_daemon(components, "auto", files)
    old, old_metrics, _ = run_daemon(components, "off", files)
    key = lambda m: (m["user_data"]["formula"], tuple(m["axes"]))  # noqa: E731
    new_by, old_by = {key(m): m for m in new}, {key(m): m for m in old}
    assert len(new) == len(old) == 6 and set(new_by) == set(old_by)
    assert {len(k[1]) for k in new_by} == {1, 2, 3}
    for k, m in new_by.items():
        a = {t["space_group"]: t["probability"] for t in m["top"]}
        b = {t["space_group"]: t["probability"] for t in old_by[k]["top"]}
        assert m["top"][0]["space_group"] == old_by[k]["top"][0]["space_group"], k
        for sg in set(a) & set(b):
            assert abs(a[sg] - b[sg]) <= 2e-6, (k, sg, a[sg], b[sg])
        assert m["open_set"] is None and old_by[k]["open_set"] is None  # no index in this bundle
    # each of the 6 frames through the network once, against 1 + 2 + 3 per sample before
    assert new_metrics["counts"]["views_inferred"] == 6
    assert old_metrics["counts"]["views_inferred"] == 12
    assert set(new_metrics["cpu_seconds"]) >= {"decode", "calibrate_shape", "infer"}


def test_daemon_serves_an_old_bundle_without_the_view_graph(old_bundle):
    components = load_components(load_config(overrides={"bundle": {"path": str(old_bundle.path),
                                                                    "backend": "onnxruntime", "device": "cpu"}}))
    msgs, metrics, model = run_daemon(components, "auto", [SHIPPED / "NaCl.cif"])
    assert [m["status"] for m in msgs] == ["partial", "partial", "complete"]
    assert metrics["counts"]["views_inferred"] == 6  # the whole graph per request
    assert model["precision"] == "fp32"


# --------------------------------------------------------------------------- int8


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    """A bundle at 224 px (the dataset's shaped size) with the int8 graph, calibrated and measured
    on a dataset of the eight shipped structures."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("int8")
    data = tmp / "data"
    records, _ = ds.collect_records([SHIPPED])
    # every material in train and test alike: this checks the mechanics, not the accuracy
    ds.build_dataset(records, data, config=ds.BuildConfig(split_fractions={"train": 1.0, "val": 0.0, "test": 0.0}),
                     workers=1, progress=False)
    rel = release(tmp / "release")
    out = bundles.build_bundle(rel, tmp / "bundle", int8_calibration=data, int8_samples=8, int8_test=data,
                                int8_test_split="train")
    return bundles.load_bundle(out), data


def test_int8_bundle_option(int8_bundle):
    b, data = int8_bundle
    assert b.int8_onnx_path is not None and b.int8_onnx_path.name == "model_view_int8.onnx"
    assert b.int8_onnx_path.stat().st_size < b.view_onnx_path.stat().st_size / 2  # int8 weights
    info = b.manifest["onnx"]["int8"]
    assert info["format"] == "QDQ" and info["calibration"]["split"] == "train"
    assert info["calibration"]["samples"] >= 1
    # the card states the measured accuracy
    assert b.card["int8"]["accuracy"]["samples"] == info["accuracy"]["samples"]
    md = (b.path / "MODEL_CARD.md").read_text()
    assert "## int8 (CPU)" in md and "int8 − fp32" in md
    # auto picks int8 on the CPU; fp32 keeps fp32; int8 runs everything through the quantised view graph
    auto = select_backend(b, "auto", device="cpu")
    assert (auto.name, auto.precision) == ("onnxruntime", "int8") and supports_views(auto)
    fp32 = select_backend(b, "auto", device="cpu", precision="fp32")
    assert fp32.precision == "fp32"
    import onnx

    proto = onnx.load(str(b.int8_onnx_path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = np.stack([s.transpose(0, 3, 1, 2) for s in _shaped(data)])
    present = onnx_export.example_masks(len(x))
    r8, r32 = auto.run(x, present), fp32.run(x, present)
    assert r8.probabilities.shape == r32.probabilities.shape
    np.testing.assert_allclose(r8.probabilities.sum(1), 1, atol=1e-5)
    assert np.abs(r8.probabilities - r32.probabilities).max() < 0.25  # quantised, not a different model


def _shaped(data):
    from xtalsym.inference import quantise

    samples = quantise.dataset_samples(data, "train")
    return [x.transpose(0, 2, 3, 1) for x in quantise.shaped_views(data, samples)]


def test_int8_refused_where_it_cannot_run(bundle):
    with pytest.raises(BackendUnavailable, match="no int8 graph"):
        make_backend(bundle, "onnxruntime", device="cpu", precision="int8")
    with pytest.raises(BackendUnavailable, match="int8 runs on onnxruntime"):
        make_backend(bundle, "torch", device="cpu", precision="int8")


def test_paired_difference_statistics():
    from xtalsym.inference.quantise import paired_difference

    a = np.array([1, 1, 1, 0, 0, 1, 1, 0, 1, 1] * 10, bool)
    b = a.copy()
    b[:10] = ~b[:10]  # 10 discordant pairs: 7 right only in a, 3 only in b
    stats = paired_difference(a, b)
    assert stats["only_a_right"] == 7 and stats["only_b_right"] == 3
    assert stats["delta"] == pytest.approx(-0.04)
    lo, hi = stats["ci95"]
    assert lo < -0.04 < hi and lo < 0 < hi
    assert stats["mcnemar_p"] == pytest.approx(2 * sum(__import__("math").comb(10, i) for i in range(4)) / 2**10)
    same = paired_difference(a, a)
    assert same["delta"] == 0 and same["mcnemar_p"] == 1.0 and same["ci95"] == [0.0, 0.0]
