"""What a new user runs into (issue 13): one line and exit 2 instead of a traceback, the
bundle they hold used and verified, outputs never inside a bundle, pictures with a scale."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from xtalsym import logsetup
from xtalsym.cli import main, missing_extra
from xtalsym.offline import structures
from xtalsym.progress import LogProgress, progress
from xtalsym.testing import REPO_ROOT

SHIPPED = structures.shipped_structures_dir()
BUNDLE = REPO_ROOT / "reference_index"


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("xtalsym: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- simulate pattern


def test_simulate_pattern_png_is_a_png_with_a_reciprocal_scale(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert (
        main(["simulate", "pattern", str(SHIPPED / "NaCl.cif"), "--axis", "z", "--pixels", "64", "--out", str(out)])
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "x.png.npy").exists()
    with Image.open(out) as image:
        assert "1/Angstrom per pixel" in image.text["xtalsym:reciprocal_scale"]
    assert "Å⁻¹ per pixel" in capsys.readouterr().out


def test_simulate_pattern_refuses_other_suffixes(tmp_path, capsys):
    assert (
        main(["simulate", "pattern", str(SHIPPED / "NaCl.cif"), "--axis", "z", "--out", str(tmp_path / "x.tif")]) == 2
    )
    assert "x.tif" in _one_line_error(capsys.readouterr().err)


def test_a_pattern_too_large_for_memory_is_refused_before_allocating(tmp_path, capsys):
    assert (
        main(
            [
                "simulate",
                "pattern",
                str(SHIPPED / "NaCl.cif"),
                "--axis",
                "z",
                "--pixels",
                "100000",
                "--out",
                str(tmp_path / "x.npy"),
            ]
        )
        == 2
    )
    line = _one_line_error(capsys.readouterr().err)
    assert "100000" in line and "GiB" in line


def test_shape_png_keeps_its_pixels_and_carries_the_scale(tmp_path):
    raw = np.zeros((256, 256), np.uint8)
    raw[127, 127] = raw[127, 160] = raw[160, 127] = raw[94, 127] = 255
    np.save(tmp_path / "raw.npy", raw)
    out = tmp_path / "s.png"
    assert main(["shape", str(tmp_path / "raw.npy"), "--axis", "x", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (224, 224)
        assert float(image.text["xtalsym:reciprocal_scale"].split()[0]) == pytest.approx(0.005357 * 256 / 224, rel=1e-3)


# --------------------------------------------------------------------------- errors as one line


def test_a_closed_pipe_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xtalsym",
            "simulate",
            "pattern",
            str(SHIPPED / "NaCl.cif"),
            "--axis",
            "z",
            "--pixels",
            "32",
            "--out",
            str(tmp_path / "p.npy"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    proc.stdout.close()  # the reader is gone before the command prints, as `| head` after its lines
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 2
    assert "broken pipe" in _one_line_error(err)


def test_missing_extras_are_named():
    assert "xtalsym[daemon]" in missing_extra(ModuleNotFoundError("no zmq", name="zmq"))
    assert "xtalsym[daemon]" in missing_extra(ModuleNotFoundError("no lz4", name="lz4.block"))
    assert "torch==2.13.0" in missing_extra(ModuleNotFoundError("no torch", name="torch"))
    assert "xtalsym[distributed]" in missing_extra(ModuleNotFoundError("no dask", name="dask"))
    assert missing_extra(ModuleNotFoundError("typo", name="numpyy")) is None


def test_a_wrapped_import_error_of_ours_is_one_line(monkeypatch, capsys):
    import xtalsym.cli.model as model_cli

    def info(args):
        try:
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        except ModuleNotFoundError as exc:
            raise ImportError("xtalsym's models need torch: pip install torch==2.13.0, then 'xtalsym[ml]'") from exc

    monkeypatch.setattr(model_cli, "_info", info)
    assert main(["model", "info", "msdn", "--classes", "3"]) == 2
    assert "xtalsym's models need torch" in _one_line_error(capsys.readouterr().err)


def test_the_parser_imports_no_optional_dependency():
    code = (
        "import sys; from xtalsym.cli import build_parser; build_parser(); "
        "bad = [m for m in ('torch', 'zmq', 'lz4', 'cbor2', 'faiss', 'onnxruntime', 'prometheus_client') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_listen_garbage_address_is_one_line(capsys):
    pytest.importorskip("zmq")
    assert main(["listen", "--address", "garbage", "--duration", "1"]) == 2
    assert "garbage" in _one_line_error(capsys.readouterr().err)


def test_detector_sim_address_in_use_is_one_line(capsys):
    zmq = pytest.importorskip("zmq")
    holder = zmq.Context.instance().socket(zmq.PUSH)
    holder.bind("tcp://127.0.0.1:*")
    endpoint = holder.getsockopt(zmq.LAST_ENDPOINT).decode()
    try:
        assert main(["detector-sim", str(SHIPPED / "NaCl.cif"), "--pixels", "64", "--address", endpoint]) == 2
    finally:
        holder.close(linger=0)
    line = _one_line_error(capsys.readouterr().err)
    assert endpoint in line and "--address" in line


def test_dataset_settings_mismatch_names_the_key(tmp_path, capsys):
    out = tmp_path / "d"
    base = [
        "simulate",
        "dataset",
        "--structures",
        str(SHIPPED / "Si.cif"),
        "--out",
        str(out),
        "--workers",
        "1",
        "--no-progress",
    ]
    assert main(base) == 0
    assert main(base + ["--shard-size", "7"]) == 2
    assert "config.shard_size is 64 there, 7 now" in _one_line_error(capsys.readouterr().err)


def test_train_with_a_missing_dataset_folder(tmp_path, capsys):
    pytest.importorskip("torch")
    config = tmp_path / "c.toml"
    config.write_text(f'dataset = "{tmp_path / "nowhere"}"\n')
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "does not exist" in line and "nowhere" in line


@pytest.mark.parametrize(
    ("option", "named"), [(["--int8-keep-fp32", "heads,trunk"], "trunk"), (["--int8-percentile", "0"], "percentile")]
)
def test_bad_int8_options_are_one_line_before_any_work(tmp_path, capsys, option, named):
    argv = ["bundle", "build", "--release", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]
    assert main([*argv, "--int8-calibration", str(tmp_path), *option]) == 2
    assert named in _one_line_error(capsys.readouterr().err)


# --------------------------------------------------------------------------- the bundle a user holds


@pytest.fixture
def shipped_copy(tmp_path):
    if not (BUNDLE / "manifest.json").is_file():
        pytest.skip("no shipped bundle in this checkout")
    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns(".cache"))
    return copy


def test_a_zeroed_model_pt_inside_a_bundle_is_refused(shipped_copy, capsys):
    pytest.importorskip("torch")
    model = shipped_copy / "model.pt"
    data = bytearray(model.read_bytes())
    data[1000:5096] = bytes(4096)
    model.write_bytes(bytes(data))
    assert main(["predict", str(SHIPPED / "Si.cif"), "--checkpoint", str(model), "--device", "cpu"]) == 2
    assert "model.pt" in _one_line_error(capsys.readouterr().err)


def test_evaluate_never_writes_inside_a_bundle(shipped_copy, capsys):
    pytest.importorskip("torch")
    out = shipped_copy / "evaluation-test"
    assert (
        main(
            [
                "evaluate",
                "--bundle",
                str(shipped_copy),
                "--structures",
                str(SHIPPED / "Si.cif"),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "inside the model bundle" in _one_line_error(capsys.readouterr().err) and not out.exists()


@pytest.mark.slow
def test_predict_and_evaluate_take_the_bundle_and_every_structure_of_a_json_lines_file(
    shipped_copy, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("torch")
    lines = tmp_path / "two.jsonl"
    lines.write_text(
        "".join(
            json.dumps({"material_id": name, "cif": (SHIPPED / f"{name}.cif").read_text()}) + "\n"
            for name in ("Si", "NaCl")
        )
    )
    assert main(["predict", str(lines), "--bundle", str(shipped_copy), "--device", "cpu", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["material_id"] for r in rows] == ["Si", "NaCl"]
    # the shipped bundle carries fusion parameters: each row is the fused prediction (top-5 groups)
    assert all(len(r["prediction"]["top_groups"]) == 5 for r in rows)
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            ["evaluate", "--bundle", str(shipped_copy), "--structures", str(lines), "--device", "cpu", "--no-progress"]
        )
        == 0
    )
    assert (tmp_path / "evaluation-structures" / "metrics.json").is_file()
    assert sorted(p.name for p in shipped_copy.iterdir()) == sorted(
        p.name for p in BUNDLE.iterdir() if p.name != ".cache"
    )


# --------------------------------------------------------------------------- structure formats


def test_poscar_and_xsf_are_read_and_bad_text_names_the_formats_tried(tmp_path):
    from pymatgen.core import Structure

    nacl = Structure.from_file(SHIPPED / "NaCl.cif")
    nacl.to(filename=str(tmp_path / "POSCAR"))
    nacl.to(filename=str(tmp_path / "nacl.xsf"))
    assert structures.load_structure(tmp_path / "POSCAR").space_group == 225
    assert structures.load_structure(tmp_path / "nacl.xsf").space_group == 225
    assert {r.source.split("/")[-1] for r in structures.iter_records(tmp_path)} == {"POSCAR", "nacl.xsf"}
    (tmp_path / "mystery").write_text("just some words\nand more\n")
    with pytest.raises(structures.StructureError, match="tried POSCAR, XSF, CSSR, CIF"):
        structures.load_structure(tmp_path / "mystery")
    (tmp_path / "CONTCAR").write_text("not a poscar\n")
    with pytest.raises(structures.StructureError, match="unparsable POSCAR"):
        structures.load_structure(tmp_path / "CONTCAR")


# --------------------------------------------------------------------------- logs and progress


def test_verbosity_levels(tmp_path):
    def run(verbosity: int) -> str:
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        root.handlers = []
        path = tmp_path / f"log{verbosity}"
        try:
            with open(path, "w") as stream:
                logsetup.configure_cli(verbosity, stream=stream, environ={})
                logging.getLogger("xtalsym.x").info("own info")
                logging.getLogger("xtalsym.x").debug("own debug")
                logging.getLogger("faiss.loader").info("Loading faiss with AVX512 support.")
                logging.getLogger("faiss.loader").warning("library warning")
                for handler in root.handlers:
                    handler.flush()
        finally:
            root.handlers, root.level = saved
        return path.read_text()

    quiet, v, vv = run(0), run(1), run(2)
    assert "own info" in quiet and "own debug" not in quiet and "AVX512" not in quiet and "library warning" in quiet
    assert "own debug" in v and "AVX512" not in v
    assert "own debug" in vv and "AVX512" in vv


def test_spglib_c_warnings_are_off_unless_asked():
    code = "import os, xtalsym.offline.structures; print(os.environ.get('SPGLIB_WARNING'))"
    env = {k: v for k, v in os.environ.items() if k != "SPGLIB_WARNING"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "OFF", out.stderr
    env["SPGLIB_WARNING"] = "ON"  # the user's own setting wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "ON", out.stderr


def test_progress_logs_lines_when_not_on_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="xtalsym.progress")
    bar = progress(total=10, desc="evaluate", unit="structure", every_s=0.0)
    assert isinstance(bar, LogProgress)  # pytest's stderr is not a terminal
    for _ in range(10):
        bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "xtalsym.progress"]
    assert lines and "evaluate: 10/10 structure (100%)" in lines[-1] and not any("\r" in line for line in lines)
