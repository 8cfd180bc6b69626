"""Model bundle: one self-contained, verifiable directory that the daemon loads.

Layout (every file but ``manifest.json`` and ``.cache/`` is listed in the manifest)::

    model.pt          weights-only checkpoint (the release's), identity = its SHA-256
    model.onnx        the exported graph (see xtalsym.inference.export), optional
    model_view.onnx   the per-view graph (MSDN: one zone-axis view per row), optional
    model_view_int8.onnx  its int8 (QDQ) version for the CPU, optional (--int8-calibration)
    labels.json       class index -> space group, symbol, crystal system
    settings.json     geometry + shaping the model was trained with, input layout
    card.json, MODEL_CARD.md (+ any other plain file of the release, e.g. a PNG)
    index/            optional reference index (xtalsym.index); index/index.json has "model_id"
    fusion.json       optional fusion parameters (xtalsym.fusion): the calibrated 230-group
                      posterior; a bundle without it predicts with the model alone
    manifest.json     format, xtalsym version, model_id, SHA-256 + size of every file
    .cache/           not part of the bundle: TensorRT engines and timing caches

:func:`load_bundle` verifies the manifest and refuses (``BundleError``, naming the file)
a bundle with a missing, corrupted (size or SHA-256 mismatch) or unlisted file, a bad
manifest, or an index whose ``model_id`` is not the bundle's. Unlisted files are refused
because a bundle is meant to be exactly what was verified; put notes elsewhere.

The shipped default bundle is ``reference_index/`` at the repository root; see
:func:`default_bundle_path` for how it is found from a checkout and from a wheel.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import site
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xtalsym import __version__, spacegroups
from xtalsym.checksums import sha256_file

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "xtalsym-bundle/1"
MANIFEST = "manifest.json"
MODEL_FILE = "model.pt"
ONNX_FILE = "model.onnx"
VIEW_ONNX_FILE = "model_view.onnx"
INT8_ONNX_FILE = "model_view_int8.onnx"
LABELS_FILE = "labels.json"
SETTINGS_FILE = "settings.json"
CARD_FILE = "card.json"
CARD_MD_FILE = "MODEL_CARD.md"
INDEX_DIR = "index"
FUSION_FILE = "fusion.json"  # the same name as xtalsym.fusion.FUSION_FILE
INDEX_META = "index.json"
CACHE_DIR = ".cache"
REQUIRED_FILES = (MODEL_FILE, LABELS_FILE, SETTINGS_FILE, CARD_FILE, CARD_MD_FILE)
ENV_BUNDLE = "XTALSYM_BUNDLE"
DATA_FILES_SUBDIR = Path("share") / "xtalsym" / "reference_index"
AXES = ("x", "y", "z")


class BundleError(ValueError):
    """A bundle that is not usable: the message names the bundle and the offending file."""


# --------------------------------------------------------------------------- helpers


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _bundle_files(root: Path) -> list[str]:
    """Relative POSIX paths of every file in the bundle except the manifest and .cache/."""
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == CACHE_DIR or rel.as_posix() == MANIFEST:
            continue
        if path.is_symlink():
            raise BundleError(f"bundle {root}: {rel.as_posix()} is a symbolic link (bundles hold plain files)")
        if path.is_file():
            files.append(rel.as_posix())
    return files


def labels_for(classes: list[int]) -> list[dict]:
    return [
        {
            "index": i,
            "space_group": int(sg),
            "symbol": spacegroups.symbol(sg),
            "crystal_system": spacegroups.crystal_system(sg),
        }
        for i, sg in enumerate(classes)
    ]


def _read_index_model_id(index_dir: Path, where: str) -> str:
    meta = index_dir / INDEX_META
    if not meta.is_file():
        raise BundleError(f"{where}: {INDEX_DIR}/{INDEX_META} is missing (not a reference index directory)")
    try:
        model_id = json.loads(meta.read_text()).get("model_id")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where}: {INDEX_DIR}/{INDEX_META} is not a JSON object ({exc})") from None
    if not isinstance(model_id, str) or not model_id:
        raise BundleError(f"{where}: {INDEX_DIR}/{INDEX_META} has no \"model_id\"")
    return model_id


def _check_index_matches(index_dir: Path, model_id: str, where: str) -> None:
    index_id = _read_index_model_id(index_dir, where)
    if index_id != model_id:
        raise BundleError(
            f"{where}: the reference index in {INDEX_DIR}/ was built by another model "
            f"(index model_id {index_id[:12]}…, bundle model_id {model_id[:12]}…); rebuild the index with this bundle"
        )


# --------------------------------------------------------------------------- Bundle


@dataclass
class Bundle:
    """A verified bundle (see :func:`load_bundle`)."""

    path: Path
    manifest: dict
    labels: list[dict]
    settings: dict
    card: dict
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def classes(self) -> list[int]:
        return [int(label["space_group"]) for label in self.labels]

    @property
    def model_spec(self) -> dict:
        return self.manifest["model"]

    @property
    def image_size(self) -> int:
        """H = W of the shaped DPs the bundle's graph and backends take (224 unless exported otherwise)."""
        return int(self.settings["input"]["image_size"])

    @property
    def representation(self) -> str:
        """What the model classifies: "shaped" DPs (MSDN, stacked DenseNet) or "spot" DPs."""
        return str(self.settings["input"].get("representation", "shaped"))

    @property
    def geometry(self) -> dict:
        return self.settings["dataset_config"].get("geometry", {})

    @property
    def onnx_path(self) -> Path | None:
        return self.path / ONNX_FILE if ONNX_FILE in self.manifest["files"] else None

    @property
    def view_onnx_path(self) -> Path | None:
        """The per-view graph, or None (older bundles, models that are not a sum over views)."""
        return self.path / VIEW_ONNX_FILE if VIEW_ONNX_FILE in self.manifest["files"] else None

    @property
    def int8_onnx_path(self) -> Path | None:
        """The int8 (QDQ) per-view graph for the CPU, or None."""
        return self.path / INT8_ONNX_FILE if INT8_ONNX_FILE in self.manifest["files"] else None

    @property
    def index_dir(self) -> Path | None:
        return self.path / INDEX_DIR if self.manifest.get("index") else None

    @property
    def fusion_path(self) -> Path | None:
        """The fusion parameters (verified with the rest), or None for a bundle without them."""
        return self.path / FUSION_FILE if self.manifest.get("fusion") else None

    @property
    def cache_dir(self) -> Path:
        """Where engines are cached: ``.cache/`` inside the bundle if writable, else the user cache."""
        inside = self.path / CACHE_DIR
        try:
            inside.mkdir(exist_ok=True)
            if os.access(inside, os.W_OK):
                return inside
        except OSError:
            pass
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        fallback = base / "xtalsym" / self.model_id[:16]
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback

    def load_model(self, *, map_location: Any = "cpu"):
        """The torch model (eval mode), loaded weights-only."""
        from xtalsym import model as models

        model, _ = models.load_checkpoint(self.path / MODEL_FILE, map_location=map_location)
        return model


def _bad_manifest(root: Path, why: str) -> BundleError:
    return BundleError(f"bundle {root}: bad {MANIFEST}: {why}")


def _parse_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle {root} is not a directory")
    if not path.is_file():
        raise BundleError(f"bundle {root}: {MANIFEST} is missing (not a bundle, or an unfinished build)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad_manifest(root, f"not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise _bad_manifest(root, "not a JSON object")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise _bad_manifest(root, f"format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _bad_manifest(root, "no \"files\" table")
    for name, entry in files.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or parts[0] == CACHE_DIR or name == MANIFEST:
            raise _bad_manifest(root, f"file entry {name!r} is not a plain relative path inside the bundle")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
            raise _bad_manifest(root, f"file entry {name!r} needs \"sha256\" and \"bytes\"")
    for key in ("model_id", "model"):
        if key not in manifest:
            raise _bad_manifest(root, f"no {key!r}")
    for name in REQUIRED_FILES:
        if name not in files:
            raise _bad_manifest(root, f"required file {name} is not listed")
    if manifest["model_id"] != files[MODEL_FILE]["sha256"]:
        raise _bad_manifest(root, f"model_id is not the SHA-256 of {MODEL_FILE}")
    return manifest


def verify_bundle(path: str | os.PathLike) -> dict:
    """Check every file against the manifest and the index against the model; return the manifest."""
    root = Path(path)
    manifest = _parse_manifest(root)
    for name, entry in manifest["files"].items():
        file = root / name
        if not file.is_file():
            raise BundleError(f"bundle {root}: {name} is missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"bundle {root}: {name} is corrupted: {size} bytes, manifest says {entry['bytes']}")
        digest = sha256_file(file)
        if digest != entry["sha256"]:
            raise BundleError(
                f"bundle {root}: {name} is corrupted: SHA-256 {digest[:12]}…, manifest says {entry['sha256'][:12]}…"
            )
    unlisted = [name for name in _bundle_files(root) if name not in manifest["files"]]
    if unlisted:
        raise BundleError(
            f"bundle {root}: {unlisted[0]} is not listed in {MANIFEST}"
            + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else "")
            + "; a bundle holds only what its manifest lists (use `xtalsym bundle add-index` to add an index)"
        )
    if manifest.get("index"):
        _check_index_matches(root / INDEX_DIR, manifest["model_id"], f"bundle {root}")
    elif any(name.startswith(INDEX_DIR + "/") for name in manifest["files"]):
        raise _bad_manifest(root, f"files under {INDEX_DIR}/ are listed but \"index\" is not set")
    if manifest.get("fusion"):
        if FUSION_FILE not in manifest["files"]:
            raise _bad_manifest(root, f"\"fusion\" is set but {FUSION_FILE} is not listed")
        _check_fusion(root / FUSION_FILE, manifest.get("classes"), f"bundle {root}")
    elif FUSION_FILE in manifest["files"]:
        raise _bad_manifest(root, f"{FUSION_FILE} is listed but \"fusion\" is not set")
    return manifest


def _check_fusion(path: Path, classes: list | None, where: str) -> dict:
    """Refuse fusion parameters that do not parse or were fitted for other classes."""
    from xtalsym.fusion import FusionError, FusionParams

    try:
        params = FusionParams.load(path)
    except FusionError as exc:
        raise BundleError(f"{where}: {FUSION_FILE}: {exc}") from None
    if classes is not None and [int(c) for c in params.classes] != [int(c) for c in classes]:
        raise BundleError(f"{where}: {FUSION_FILE} was fitted for other classes than the model's")
    return {"file": FUSION_FILE, "format": params.to_json()["format"], "fitted": params.fitted.get("split", "")}


def load_bundle(path: str | os.PathLike | None = None, *, verify: bool = True) -> Bundle:
    """Open (and by default verify) the bundle at ``path`` (default: :func:`default_bundle_path`)."""
    root = Path(path) if path is not None else default_bundle_path()
    manifest = verify_bundle(root) if verify else _parse_manifest(root)

    def read(name: str) -> Any:
        try:
            return json.loads((root / name).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"bundle {root}: {name} is not readable JSON ({exc})") from None

    labels, settings, card = read(LABELS_FILE), read(SETTINGS_FILE), read(CARD_FILE)
    if not isinstance(labels, list) or not all(isinstance(x, dict) and "space_group" in x for x in labels):
        raise BundleError(f"bundle {root}: {LABELS_FILE} is not a list of labels")
    if not isinstance(settings, dict) or "input" not in settings or "dataset_config" not in settings:
        raise BundleError(f"bundle {root}: {SETTINGS_FILE} lacks \"input\" or \"dataset_config\"")
    if len(labels) != manifest["model"].get("num_classes"):
        raise BundleError(f"bundle {root}: {LABELS_FILE} has {len(labels)} classes, the model {manifest['model'].get('num_classes')}")
    return Bundle(path=root, manifest=manifest, labels=labels, settings=settings, card=card)


# --------------------------------------------------------------------------- building


def _write_manifest(root: Path, base: dict) -> dict:
    files = {}
    for name in _bundle_files(root):
        file = root / name
        files[name] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
    manifest = {
        **base,
        "format": BUNDLE_FORMAT,
        "xtalsym_version": __version__,
        "model_id": files[MODEL_FILE]["sha256"],
        "files": files,
    }
    _write_json(root / MANIFEST, manifest)
    return manifest


def _swap_in(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out`` (replacing an existing bundle only if ``overwrite``)."""
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _copy_index(index_dir: Path, dest: Path, model_id: str) -> None:
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise BundleError(f"index {index_dir} is not a directory")
    _check_index_matches(index_dir, model_id, f"index {index_dir}")
    shutil.copytree(index_dir, dest, symlinks=False)


def build_bundle(
    release_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    index_dir: str | os.PathLike | None = None,
    onnx: bool = True,
    image_size: int | None = None,
    opset: int | None = None,
    overwrite: bool = False,
    view_graph: bool = True,
    int8_calibration: str | os.PathLike | None = None,
    int8_samples: int | None = None,
    int8_method: str = "percentile",
    int8_options: dict | None = None,
    int8_test: str | os.PathLike | None = None,
    int8_test_limit: int | None = None,
    int8_test_split: str = "test",
) -> Path:
    """Bundle a release folder (``xtalsym model release``) at ``out``; returns ``out``.

    Copies every plain file of the release, writes labels.json and settings.json from the
    checkpoint, exports model.onnx (``onnx=True``) and, for a model whose prediction is a
    sum over views (MSDN), the per-view graph model_view.onnx (``view_graph``). With
    ``int8_calibration`` (a dataset directory) the per-view graph is also quantised to int8
    (QDQ, calibrated on ``int8_samples`` samples of its train split,
    :mod:`xtalsym.inference.quantise`); with ``int8_test`` its accuracy against fp32 on
    that dataset's test split goes into the model card (card.json ``int8`` and
    MODEL_CARD.md). Copies ``index_dir`` (refused when its model_id is not this model's)
    and writes manifest.json last. Everything is assembled in a temporary sibling
    directory and renamed into place, so ``out`` is either the old bundle or the complete
    new one.
    """
    from xtalsym import model as models

    release_dir, out = Path(release_dir), Path(out)
    for name in (MODEL_FILE, CARD_FILE, CARD_MD_FILE):
        if not (release_dir / name).is_file():
            raise BundleError(f"release {release_dir}: {name} is missing (make one with `xtalsym model release`)")
    model, extra = models.load_checkpoint(release_dir / MODEL_FILE)
    if "classes" not in extra or "dataset_config" not in extra:
        raise BundleError(
            f"release {release_dir}: {MODEL_FILE} lacks extra[\"classes\"] or extra[\"dataset_config\"] "
            "(release it with `xtalsym model release`)"
        )
    classes = [int(c) for c in extra["classes"]]
    if len(classes) != model.num_classes:
        raise BundleError(f"release {release_dir}: {len(classes)} classes listed, the model has {model.num_classes}")
    from xtalsym.inference import export as onnx_export

    image_size = int(image_size or onnx_export.DEFAULT_IMAGE_SIZE)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        for file in sorted(release_dir.iterdir()):
            if file.is_file() and not file.is_symlink() and file.name != MANIFEST:
                shutil.copy2(file, tmp / file.name)
        model_id = sha256_file(tmp / MODEL_FILE)
        _write_json(tmp / LABELS_FILE, labels_for(classes))
        settings = {
            "dataset_config": extra["dataset_config"],
            "input": {
                "layout": "x uint8 (B, 3 zone axes, 3 channels, H, W), present bool (B, 3)",
                "axes": list(AXES),
                "image_size": image_size,
                "model_input_size": model.input_size,
                "representation": model.representation,
            },
        }
        _write_json(tmp / SETTINGS_FILE, settings)
        _drop_int8_card(tmp)  # a card re-bundled from an earlier bundle says nothing old about int8
        onnx_info = None
        if int8_calibration is not None and not (onnx and view_graph and onnx_export.per_view_supported(model)):
            raise BundleError(f"release {release_dir}: int8 quantises the per-view graph, which needs ONNX export "
                              f"and a model that sums its views (msdn), not {model.name!r}")
        if onnx:
            onnx_opset = int(opset or onnx_export.DEFAULT_OPSET)
            onnx_export.export_onnx(model, tmp / ONNX_FILE, image_size=image_size, opset=onnx_opset)
            onnx_info = {"file": ONNX_FILE, "opset": onnx_opset, "image_size": image_size,
                         "inputs": list(onnx_export.INPUT_NAMES), "outputs": list(onnx_export.OUTPUT_NAMES)}
            if view_graph and onnx_export.per_view_supported(model):
                onnx_export.export_onnx(model, tmp / VIEW_ONNX_FILE, image_size=image_size, opset=onnx_opset,
                                        graph="view")
                onnx_info["view"] = {"file": VIEW_ONNX_FILE, "inputs": list(onnx_export.VIEW_INPUT_NAMES),
                                     "outputs": list(onnx_export.VIEW_OUTPUT_NAMES)}
            if int8_calibration is not None:
                onnx_info["int8"] = _build_int8(tmp, classes, calibration=int8_calibration, samples=int8_samples,
                                                method=int8_method, options=int8_options or {}, test=int8_test,
                                                test_limit=int8_test_limit, test_split=int8_test_split)
        index_info = None
        if index_dir is not None:
            _copy_index(Path(index_dir), tmp / INDEX_DIR, model_id)
            index_info = {"dir": INDEX_DIR, "model_id": model_id}
        fusion_info = _check_fusion(tmp / FUSION_FILE, classes, f"release {release_dir}") \
            if (tmp / FUSION_FILE).is_file() else None
        base = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "release": extra.get("release") or release_dir.name,
            "model": models.model_spec(model),
            "classes": classes,
            "onnx": onnx_info,
            "index": index_info,
            "fusion": fusion_info,
        }
        _write_manifest(tmp, base)
        verify_bundle(tmp)
        _swap_in(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle %s: model_id %s", out, model_id)
    return out


INT8_CARD_HEADING = "\n## int8 (CPU)\n"


def _drop_int8_card(tmp: Path) -> None:
    card_path, md = tmp / CARD_FILE, tmp / CARD_MD_FILE
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"release card {CARD_FILE} is not readable JSON ({exc})") from None
    if isinstance(card, dict) and "int8" in card:
        del card["int8"]
        _write_json(card_path, card)
    text = md.read_text()
    cut = text.find(INT8_CARD_HEADING)
    if cut >= 0:
        md.write_text(text[: cut + 1])


def _build_int8(tmp: Path, classes: list[int], *, calibration, samples, method, options, test, test_limit,
                test_split) -> dict:
    """Quantise tmp/model_view.onnx into tmp/model_view_int8.onnx, measure it, write it into the card.
    ``options``: further keyword arguments of quantise_view_graph (percentile, keep_fp32, ...)."""
    from xtalsym.inference import quantise

    info = quantise.quantise_view_graph(
        tmp / VIEW_ONNX_FILE, tmp / INT8_ONNX_FILE, calibration_dataset=calibration,
        samples=samples or quantise.DEFAULT_CALIBRATION_SAMPLES, method=method, **options)
    if test is not None:
        info["accuracy"] = quantise.compare_accuracy(tmp / VIEW_ONNX_FILE, tmp / INT8_ONNX_FILE, test_dataset=test,
                                                     classes=classes, limit=test_limit, split=test_split)
    card_path = tmp / CARD_FILE
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"release card {CARD_FILE} is not readable JSON ({exc})") from None
    card["int8"] = info
    _write_json(card_path, card)
    md = tmp / CARD_MD_FILE
    md.write_text(md.read_text().rstrip("\n") + "\n" + quantise.card_section(info))
    return info


def _rewrite_bundle(root: Path, manifest: dict, *, job: str, change) -> Path:
    """Copy the bundle beside itself, let ``change(tmp, base)`` edit the copy and the manifest's
    base (everything but files/format/version/model_id), re-write the manifest, verify the copy,
    keep the engine cache and swap it in; on any failure the original stays as it was."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.{job}-", dir=root.parent))
    try:
        shutil.rmtree(tmp)
        shutil.copytree(root, tmp, ignore=shutil.ignore_patterns(CACHE_DIR, MANIFEST), symlinks=False)
        base = {k: v for k, v in manifest.items() if k not in ("files", "format", "xtalsym_version", "model_id")}
        change(tmp, base)
        _write_manifest(tmp, base)
        verify_bundle(tmp)
        cache = root / CACHE_DIR
        if cache.is_dir():
            shutil.copytree(cache, tmp / CACHE_DIR)
        _swap_in(tmp, root, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def add_index(bundle: str | os.PathLike, index_dir: str | os.PathLike) -> Path:
    """Put (or replace) the reference index of an existing bundle and re-write its manifest.

    The bundle is verified first; the new bundle is assembled beside it and swapped in.
    """
    root = Path(bundle)
    manifest = verify_bundle(root)

    def change(tmp: Path, base: dict) -> None:
        shutil.rmtree(tmp / INDEX_DIR, ignore_errors=True)
        _copy_index(Path(index_dir), tmp / INDEX_DIR, manifest["model_id"])
        base["index"] = {"dir": INDEX_DIR, "model_id": manifest["model_id"]}

    return _rewrite_bundle(root, manifest, job="add-index", change=change)


def add_fusion(bundle: str | os.PathLike, params_file: str | os.PathLike) -> Path:
    """Put (or replace) the fusion parameters of an existing bundle and re-write its manifest.

    The parameters are refused (BundleError) unless they parse and were fitted for the
    bundle's classes; the new bundle is assembled beside the old one and swapped in.
    """
    root = Path(bundle)
    manifest = verify_bundle(root)
    params_file = Path(params_file)
    if not params_file.is_file():
        raise BundleError(f"fusion parameters {params_file} do not exist")
    info = _check_fusion(params_file, manifest.get("classes"), f"fusion parameters {params_file}")

    def change(tmp: Path, base: dict) -> None:
        shutil.copyfile(params_file, tmp / FUSION_FILE)
        _card_fusion_section(tmp, json.loads(params_file.read_text()).get("fitted", {}))
        base["fusion"] = info

    return _rewrite_bundle(root, manifest, job="add-fusion", change=change)


FUSION_CARD_HEADING = "## Fusion over 230 space groups"


def _card_fusion_section(root: Path, fitted: dict) -> None:
    """Record in card.json and MODEL_CARD.md what the fusion was fitted on and what it measured."""
    card_path, md_path = root / CARD_FILE, root / CARD_MD_FILE
    card = json.loads(card_path.read_text())
    card["fusion"] = fitted
    _write_json(card_path, card)
    text = md_path.read_text()
    if FUSION_CARD_HEADING in text:  # replace the section of an earlier add-fusion
        head, _, rest = text.partition(FUSION_CARD_HEADING)
        tail = rest[rest.find("\n## ") + 1:] if "\n## " in rest else ""
        text = head.rstrip() + "\n\n" + tail
    lines = ["", FUSION_CARD_HEADING, "",
             f"`{FUSION_FILE}`: calibrated posterior over all 230 groups (MSDN + symmetry evidence + prior), "
             f"fitted on the `{fitted.get('split', '?')}` split ({fitted.get('materials', '?')} materials, evidence: "
             f"{fitted.get('evidence', '?')}; prior: {fitted.get('prior', 'training frequencies')}). "
             "Measured on the test split (by material), 3 views unless a row names 1 or 2 (then every subset of "
             "that many views of each material, averaged)" + _evidence_views(fitted)
             + _conditions(fitted) + "; details and the command in docs/RESULTS.md \"Fusion (issue 15)\".", "",
             "| test | n | group top-1 | set top-1 | ECE |", "|---|---|---|---|---|"]
    for name, row in (fitted.get("test") or {}).items():
        lines.append(f"| {name.replace(' | ', ', ')} | {row.get('n', '?')} | {row.get('group_top1', 0):.1%} | {row.get('set_top1', 0):.1%} | "
                     f"{row.get('ece', 0):.3f} |")
    open_set = fitted.get("open_set")
    if open_set:  # benchmarks/fusion_open_set.py --record
        lines += ["", f"The paper's {open_set.get('groups', 30)} unseen groups ({open_set.get('materials', '?')} test-half "
                  f"materials, none in the model's classes): top-1 / top-5 within them "
                  f"{open_set.get('top1_within_30', 0):.1%} / {open_set.get('top5_within_30', 0):.1%} (paper "
                  f"{open_set.get('paper_top1', 0):.1%} / {open_set.get('paper_top5', 0):.1%}); over all 230 groups "
                  f"top-1 {open_set.get('top1_230', 0):.1%}, set top-1 {open_set.get('set_top1_230', 0):.1%}.", "",
                  "| 'outside the model's classes' flag | threshold | false alarms, known-class test | recall, unseen groups |",
                  "|---|---|---|---|"]
        for row in open_set.get("outside_flag", []):
            lines.append(f"| {row.get('chosen_as', '?')} | {row.get('threshold', 0):.3f} | "
                         f"{row.get('false_alarms_known_test', 0):.1%} | {row.get('recall_open_set', 0):.1%} |")
    tilted = fitted.get("misorientation_test")
    if tilted:  # benchmarks/fusion.py --params ... --record
        lines += ["", "On and off the zone axes (72 groups, natural frequencies, 3 views, test split; each zone misoriented "
                  "at random by σ):", "",
                  "| misorientation σ | n | group top-1 | set top-1 | crystal system | group top-5 | ECE | decided |",
                  "|---|---|---|---|---|---|---|---|"]
        for sigma, row in sorted(tilted.items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {sigma}° | {row.get('n', '?')} | {row.get('group_top1', 0):.1%} | {row.get('set_top1', 0):.1%} | "
                         f"{row.get('crystal_system', 0):.1%} | {row.get('group_top5', 0):.1%} | {row.get('ece', 0):.3f} | "
                         f"{row.get('decided', 0):.0%} |")
    off_axis = fitted.get("off_axis")
    if off_axis:  # benchmarks/fusion_off_axis.py --record
        lines += ["", f"Off the zone axes: no answer is decided where the zones' Friedel asymmetry (the evidence's "
                  f"`off_axis`) exceeds {off_axis.get('threshold', 0):.2f}, the largest threshold that kept wrong decisions "
                  f"≤ {off_axis.get('max_wrong', 0):.0%} of the materials in every tilted validation cache:", "",
                  "| validation cache | misorientation σ | decided | wrong decisions (without the rule) |", "|---|---|---|---|"]
        for row in off_axis.get("caches", []):
            lines.append(f"| {Path(str(row.get('features', '?'))).name} | {row.get('misorientation_deg', 0):g}° | "
                         f"{row.get('decided', 0):.1%} | {row.get('wrong_decisions', 0):.2%} "
                         f"({row.get('wrong_decisions_without', 0):.2%}) |")
    md_path.write_text(text.rstrip() + "\n" + "\n".join(lines) + "\n")


def _conditions(fitted: dict) -> str:
    """"; fitted on patterns on the zone axes and 0.5° and 2° off them" from `fusion.py --fit-also`'s record."""
    tilts = sorted({float(c.get("misorientation_deg", 0.0)) for c in fitted.get("conditions") or []})
    if len(tilts) < 2:
        return ""
    off = [f"{t:g}°" for t in tilts if t > 0]
    alone = [k for k, r in sorted((fitted.get("per_views") or {}).items()) if isinstance(r, dict) and r.get("features")]
    return (f"; fitted on patterns {'on the zone axes and ' if 0.0 in tilts else ''}{' and '.join(off)} off them "
            "(misorientation σ)" + (f", the {' and '.join(alone)}-view weights on the first of them alone (the only one "
                                    "with the evidence of every such subset)" if alone else ""))


def _evidence_views(fitted: dict) -> str:
    """"; the evidence ... weighed with 2 and 3 views (not 1: ...)" from a fit's per-view record."""
    per = {k: fitted.get("per_views", {}).get(k) or {} for k in ("1", "2", "3")}
    used = [k for k, r in per.items() if r.get("evidence_kept", r.get("evidence"))]
    if not used:
        return ""
    dropped = [k for k, r in per.items() if r.get("evidence") and not r.get("evidence_kept", True)]
    absent = [k for k, r in per.items() if not r.get("evidence")]
    notes = ([f"{' or '.join(dropped)}: there it bought nothing on validation"] if dropped else []) + (
        [f"{' or '.join(absent)}: fitted without that evidence"] if absent else [])
    return f"; the evidence of the zones present is weighed with {' and '.join(used)} views" + (
        f" (not {'; not '.join(notes)})" if notes else "")


# --------------------------------------------------------------------------- default bundle


def _candidate_paths() -> list[Path]:
    """Where the shipped bundle may be, in order: the checkout, then the data-files installs."""
    checkout = Path(__file__).resolve().parent.parent / "reference_index"
    prefixes = [sysconfig.get_path("data"), sys.prefix, getattr(site, "USER_BASE", None), sys.base_prefix]
    candidates = [checkout]
    for prefix in prefixes:
        if prefix:
            path = Path(prefix) / DATA_FILES_SUBDIR
            if path not in candidates:
                candidates.append(path)
    return candidates


def default_bundle_path() -> Path:
    """The default bundle: ``$XTALSYM_BUNDLE`` if set, else the first of the checkout's
    ``reference_index/`` and ``<prefix>/share/xtalsym/reference_index`` (where the wheel's
    data-files put it) that has a manifest.json. Raises BundleError listing where it looked.
    """
    env = os.environ.get(ENV_BUNDLE)
    if env:
        return Path(env).expanduser()
    candidates = _candidate_paths()
    for path in candidates:
        if (path / MANIFEST).is_file():
            return path
    raise BundleError(
        "no default bundle found (looked in "
        + ", ".join(str(p) for p in candidates)
        + f"); set {ENV_BUNDLE} or pass a bundle path"
    )


def bundle_containing(path: str | os.PathLike) -> Path | None:
    """The bundle a file lies in (its folder holds a manifest.json), or None."""
    folder = Path(path).resolve().parent
    return folder if (folder / MANIFEST).is_file() else None


def verify_checkpoint(path: str | os.PathLike) -> None:
    """A checkpoint inside a bundle (``BUNDLE/model.pt``) is used only if that bundle
    verifies: a modified or truncated copy is refused with the manifest's reason."""
    folder = bundle_containing(path) if Path(path).is_file() else None
    if folder is not None:
        verify_bundle(folder)


__all__ = [
    "BUNDLE_FORMAT",
    "INT8_ONNX_FILE",
    "VIEW_ONNX_FILE",
    "Bundle",
    "BundleError",
    "ENV_BUNDLE",
    "add_fusion",
    "add_index",
    "build_bundle",
    "bundle_containing",
    "default_bundle_path",
    "labels_for",
    "load_bundle",
    "sha256_file",
    "verify_bundle",
    "verify_checkpoint",
]
