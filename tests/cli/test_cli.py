"""The `xtalsym` command line, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xtalsym.cli import main
from xtalsym.offline import structures
from xtalsym.testing import shared_path

SHIPPED = structures.shipped_structures_dir()
SAMPLES = shared_path("reference", "tiong2020_samples")


def _a_cif() -> Path:
    return sorted(SHIPPED.glob("*.cif"))[0]


def test_simulate_pattern_writes_float64_image(tmp_path, capsys):
    out = tmp_path / "p.npy"
    rc = main(["simulate", "pattern", str(_a_cif()), "--axis", "y", "--pixels", "64", "--out", str(out)])
    assert rc == 0
    image = np.load(out)
    assert image.shape == (64, 64) and image.dtype == np.float64
    assert np.isfinite(image).all() and image.max() > 0
    assert "space group" in capsys.readouterr().out


def test_simulate_pattern_supercell_changes_spot_width(tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    base = ["simulate", "pattern", str(_a_cif()), "--axis", "z", "--pixels", "64"]
    assert main(base + ["--supercell", "2", "2", "2", "--out", str(a)]) == 0
    assert main(base + ["--supercell", "8", "8", "8", "--out", str(b)]) == 0
    ia, ib = np.load(a), np.load(b)
    # a bigger block concentrates intensity in sharper spots: fewer pixels above half max
    assert (ib > 0.5 * ib.max()).sum() <= (ia > 0.5 * ia.max()).sum()


def test_simulate_pattern_missing_file_is_one_line_error(tmp_path, capsys):
    rc = main(["simulate", "pattern", str(tmp_path / "nope.cif"), "--axis", "x", "--out", str(tmp_path / "o.npy")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope.cif" in err and "Traceback" not in err


def test_simulate_pattern_bad_geometry_names_the_value(tmp_path, capsys):
    rc = main(
        ["simulate", "pattern", str(_a_cif()), "--axis", "x", "--distance-m", "-1", "--out", str(tmp_path / "o.npy")]
    )
    assert rc == 2
    assert "-1" in capsys.readouterr().err


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/reference not present")
def test_shape_png_and_npy(tmp_path):
    out = tmp_path / "s.png"
    assert main(["shape", str(SAMPLES / "raw_1_z.png"), "--axis", "z", "--out", str(out)]) == 0
    shaped = np.asarray(Image.open(out))
    assert shaped.shape == (224, 224, 3)
    assert shaped[..., 2].max() == 255  # lines of the z axis are blue
    raw = np.asarray(Image.open(SAMPLES / "raw_1_x.png"))
    np.save(tmp_path / "raw.npy", raw.astype(np.float32))
    out2 = tmp_path / "s2.png"
    assert main(["shape", str(tmp_path / "raw.npy"), "--axis", "x", "--method", "reference", "--size", "256",
                 "--out", str(out2)]) == 0
    assert np.asarray(Image.open(out2)).shape == (256, 256, 3)


def test_shape_rejects_garbage_with_a_message(tmp_path, capsys):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert main(["shape", str(junk), "--axis", "x", "--out", str(tmp_path / "o.png")]) == 2
    assert "junk.png" in capsys.readouterr().err
    np.save(tmp_path / "small.npy", np.zeros((10, 10)))
    assert main(["shape", str(tmp_path / "small.npy"), "--axis", "x", "--out", str(tmp_path / "o.png")]) == 2


def test_simulate_dataset_and_show(tmp_path, capsys):
    out = tmp_path / "ds"
    rc = main(["simulate", "dataset", "--structures", str(SHIPPED), "--limit", "2", "--out", str(out),
               "--workers", "1", "--no-progress"])
    assert rc == 0
    assert "samples: 2" in capsys.readouterr().out
    assert main(["dataset", "show", str(out), "--examples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "crystal system" in printed and (out / "examples.png").is_file()


def test_simulate_dataset_needs_input(tmp_path, capsys):
    assert main(["simulate", "dataset", "--out", str(tmp_path / "x")]) == 2
    assert "nothing to simulate" in capsys.readouterr().err
    assert main(["simulate", "dataset", "--random-space-groups", "231", "--random-per-group", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "231" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("xtalsym")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("simulate", "shape", "dataset"):
        assert command in result.stdout
