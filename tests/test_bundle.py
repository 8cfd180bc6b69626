"""Model bundles: build, load, verification refusals, add-index, CLI, default-path lookup."""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from xtalsym import bundle as bundles
from xtalsym import model as models
from xtalsym.offline import dataset as ds

CLASSES = [2, 14, 62, 225]


def make_release(path, *, seed=0, input_size=32):
    """A release folder as `xtalsym model release` writes it, for a freshly initialised msdn."""
    torch.manual_seed(seed)
    path.mkdir(parents=True)
    model = models.build_model("msdn", len(CLASSES), input_size=input_size)
    models.save_checkpoint(path / "model.pt", model, extra={
        "classes": CLASSES, "dataset_config": ds.BuildConfig().to_json(), "config": {}, "metrics": [], "release": "tiny",
    })
    (path / "card.json").write_text(json.dumps({"name": "tiny", "classes": CLASSES}))
    (path / "MODEL_CARD.md").write_text("# Model card: tiny\n")
    return model


def make_index(path, model_id):
    path.mkdir(parents=True)
    (path / "index.json").write_text(json.dumps({"model_id": model_id, "entries": 2}))
    (path / "vectors.bin").write_bytes(b"\x00" * 64)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    model = make_release(tmp / "release")
    out = bundles.build_bundle(tmp / "release", tmp / "bundle", image_size=64)
    return out, model


@pytest.fixture
def bundle_copy(built, tmp_path):
    return shutil.copytree(built[0], tmp_path / "b")


def test_roundtrip(built):
    path, model = built
    b = bundles.load_bundle(path)
    assert b.model_id == bundles.sha256_file(path / "model.pt")
    assert b.classes == CLASSES and b.labels[3] == {
        "index": 3, "space_group": 225, "symbol": "Fm-3m", "crystal_system": "cubic"}
    assert b.settings["dataset_config"]["geometry"]["wavelength_m"] == pytest.approx(3.5e-12)
    assert b.image_size == 64 and b.settings["input"]["model_input_size"] == 32
    assert b.card["name"] == "tiny" and b.onnx_path.is_file() and b.index_dir is None
    assert set(b.manifest["files"]) == {"model.pt", "model.onnx", "model_view.onnx", "labels.json", "settings.json",
                                        "card.json", "MODEL_CARD.md"}  # model_view.onnx: msdn's per-view graph
    assert b.manifest["xtalsym_version"] and b.manifest["onnx"]["image_size"] == 64
    x = torch.randint(0, 256, (2, 3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(b.load_model()(x).logits, model.eval()(x).logits)
    assert not list(path.parent.glob(".bundle.*")), "temporary build directory left behind"


def test_build_refuses_existing_and_incomplete_release(built, tmp_path):
    path, _ = built
    with pytest.raises(FileExistsError):
        bundles.build_bundle(path.parent / "release", path, onnx=False)
    (tmp_path / "r").mkdir()
    with pytest.raises(bundles.BundleError, match="model.pt is missing"):
        bundles.build_bundle(tmp_path / "r", tmp_path / "out", onnx=False)
    assert not (tmp_path / "out").exists()


def test_missing_file(bundle_copy):
    (bundle_copy / "labels.json").unlink()
    with pytest.raises(bundles.BundleError, match="labels.json is missing"):
        bundles.load_bundle(bundle_copy)


def test_flipped_byte(bundle_copy):
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(bundles.BundleError, match="model.onnx is corrupted: SHA-256"):
        bundles.load_bundle(bundle_copy)


def test_truncated_file(bundle_copy):
    (bundle_copy / "model.pt").write_bytes((bundle_copy / "model.pt").read_bytes()[:-10])
    with pytest.raises(bundles.BundleError, match="model.pt is corrupted: .* bytes"):
        bundles.load_bundle(bundle_copy)


def test_unlisted_file(bundle_copy):
    (bundle_copy / "notes.txt").write_text("hello")
    with pytest.raises(bundles.BundleError, match="notes.txt is not listed"):
        bundles.load_bundle(bundle_copy)
    (bundle_copy / "notes.txt").unlink()
    (bundle_copy / ".cache" / "tensorrt").mkdir(parents=True)
    (bundle_copy / ".cache" / "tensorrt" / "x.engine").write_bytes(b"engine")  # caches are not bundle content
    bundles.load_bundle(bundle_copy)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[]", "not a JSON object"),
    ('{"format": "other/1"}', "format"),
])
def test_bad_manifest(bundle_copy, text, message):
    (bundle_copy / "manifest.json").write_text(text)
    with pytest.raises(bundles.BundleError, match=f"bad manifest.json: {message}"):
        bundles.load_bundle(bundle_copy)


def test_manifest_paths_must_stay_inside(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"]["../escape"] = {"sha256": "0" * 64, "bytes": 1}
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(bundles.BundleError, match="not a plain relative path"):
        bundles.load_bundle(bundle_copy)


def test_missing_manifest(bundle_copy):
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(bundles.BundleError, match="manifest.json is missing"):
        bundles.load_bundle(bundle_copy)


def test_index_roundtrip_and_other_model(built, bundle_copy, tmp_path):
    model_id = bundles.load_bundle(bundle_copy).model_id
    other = make_index(tmp_path / "other_index", "f" * 64)
    with pytest.raises(bundles.BundleError, match="built by another model"):
        bundles.add_index(bundle_copy, other)
    bundles.load_bundle(bundle_copy)  # untouched by the refused add
    with pytest.raises(bundles.BundleError, match="built by another model"):
        bundles.build_bundle(built[0].parent / "release", tmp_path / "nb", index_dir=other, onnx=False)

    good = make_index(tmp_path / "index", model_id)
    bundles.add_index(bundle_copy, good)
    b = bundles.load_bundle(bundle_copy)
    assert b.index_dir == bundle_copy / "index"
    assert {"index/index.json", "index/vectors.bin"} <= set(b.manifest["files"])
    assert b.manifest["index"]["model_id"] == model_id

    # an index swapped for another model's, with a consistent manifest, is still refused
    shutil.rmtree(bundle_copy / "index")
    make_index(bundle_copy / "index", "f" * 64)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    base = {k: v for k, v in manifest.items() if k not in ("files", "format", "xtalsym_version", "model_id")}
    bundles._write_manifest(bundle_copy, base)
    with pytest.raises(bundles.BundleError, match="built by another model"):
        bundles.load_bundle(bundle_copy)


def test_build_with_index(built, tmp_path):
    release = built[0].parent / "release"
    model_id = bundles.sha256_file(release / "model.pt")
    out = bundles.build_bundle(release, tmp_path / "nb", index_dir=make_index(tmp_path / "i", model_id), onnx=False)
    b = bundles.load_bundle(out)
    assert b.index_dir is not None and b.onnx_path is None and b.model_id == model_id


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_main():
    """xtalsym.cli.main: the `bundle` commands are registered by xtalsym.cli.model."""
    from xtalsym import cli

    return cli.main


def test_verify_cli(cli_main, bundle_copy, capsys):
    assert cli_main(["bundle", "verify", str(bundle_copy)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK ") and bundles.load_bundle(bundle_copy).model_id in out
    (bundle_copy / "card.json").write_text("{}")
    assert cli_main(["bundle", "verify", str(bundle_copy)]) == 2
    assert "card.json is corrupted" in capsys.readouterr().err


def test_add_index_cli(cli_main, bundle_copy, tmp_path, capsys):
    index = make_index(tmp_path / "index", bundles.load_bundle(bundle_copy).model_id)
    assert cli_main(["bundle", "add-index", str(bundle_copy), str(index)]) == 0
    assert "index added" in capsys.readouterr().out
    assert cli_main(["bundle", "verify", str(bundle_copy)]) == 0
    assert "index yes" in capsys.readouterr().out


def test_build_cli(cli_main, built, tmp_path, capsys):
    release = built[0].parent / "release"
    assert cli_main(["bundle", "build", "--release", str(release), "--out", str(tmp_path / "o"), "--no-onnx"]) == 0
    assert "model_id" in capsys.readouterr().out
    assert cli_main(["bundle", "build", "--release", str(release), "--out", str(tmp_path / "o"), "--no-onnx"]) == 2


# --------------------------------------------------------------------------- default path


@pytest.fixture
def fake_prefixes(monkeypatch, tmp_path):
    monkeypatch.delenv(bundles.ENV_BUNDLE, raising=False)
    checkout = tmp_path / "checkout"
    monkeypatch.setattr(bundles, "__file__", str(checkout / "xtalsym" / "bundle.py"))
    prefix = tmp_path / "venv"
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "base"))
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(prefix))
    monkeypatch.setattr(bundles.site, "USER_BASE", str(tmp_path / "user"), raising=False)
    return checkout / "reference_index", prefix / "share" / "xtalsym" / "reference_index", tmp_path


def _fake_bundle(path):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text("{}")
    return path


def test_default_path_lookup(fake_prefixes, monkeypatch):
    checkout, installed, tmp = fake_prefixes
    with pytest.raises(bundles.BundleError, match="no default bundle found .*reference_index"):
        bundles.default_bundle_path()
    _fake_bundle(installed)
    assert bundles.default_bundle_path() == installed  # wheel: <prefix>/share/xtalsym/reference_index
    _fake_bundle(checkout)
    assert bundles.default_bundle_path() == checkout  # a checkout wins over an install
    monkeypatch.setenv(bundles.ENV_BUNDLE, str(tmp / "elsewhere"))
    assert bundles.default_bundle_path() == tmp / "elsewhere"  # the environment wins over both


def test_default_path_user_install(fake_prefixes):
    *_, tmp = fake_prefixes
    user = _fake_bundle(tmp / "user" / "share" / "xtalsym" / "reference_index")
    assert bundles.default_bundle_path() == user
