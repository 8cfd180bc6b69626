"""Structure sources, standardisation and spglib labels (xtalsym.offline.structures)."""

from __future__ import annotations

import bz2
import gzip
import itertools
import json
import logging
import lzma
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from xtalsym.offline import structures as st
from xtalsym.offline.structures import (
    LabelledStructure,
    StructureError,
    StructureRecord,
    conventional_standard,
    iter_records,
    label,
    load_structure,
    random_records,
    shipped_structures_dir,
)
from xtalsym.testing import shared_dir

# CI clones the repository into a temporary folder with ../shared beside it.
SHARED = shared_dir()
MP_FILE = SHARED / "data" / "mp_structures" / "structures.jsonl.xz"

SHIPPED = {  # file stem -> (space group, reduced formula)
    "NaCl": (225, "NaCl"),
    "Si": (227, "Si"),
    "Fe": (229, "Fe"),
    "ZnO": (186, "ZnO"),
    "TiO2": (136, "TiO2"),
    "Al2O3": (167, "Al2O3"),
    "ZrO2": (14, "ZrO2"),
    "SnSe": (62, "SnSe"),
}


def shipped(name: str) -> Path:
    return shipped_structures_dir() / f"{name}.cif"


def cif_text(name: str) -> str:
    return shipped(name).read_text()


def p1_cif(*, a: float = 4.0, sites: str = "Na Na1 0 0 0 1\nCl Cl1 0.5 0.5 0.5 1\n") -> str:
    """Minimal P1 CIF of a cubic cell; ``sites`` rows: symbol label x y z occupancy."""
    return (
        "data_test\n"
        f"_cell_length_a {a}\n_cell_length_b {a}\n_cell_length_c {a}\n"
        "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
        "_symmetry_space_group_name_H-M 'P 1'\n"
        "loop_\n_symmetry_equiv_pos_as_xyz\n 'x, y, z'\n"
        "loop_\n_atom_site_type_symbol\n_atom_site_label\n"
        "_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n" + sites
    )


def assert_vesta_frame(structure: Structure) -> None:
    m = structure.lattice.matrix
    assert m[0, 0] > 0 and abs(m[0, 1]) < 1e-8 and abs(m[0, 2]) < 1e-8  # a along +x
    assert abs(m[1, 2]) < 1e-8 and m[1, 1] > 0  # b in the xy plane
    assert m[2, 2] > 0  # right-handed


# --------------------------------------------------------------------------- shipped CIFs + labels


def test_shipped_cifs_are_labelled_as_expected():
    files = sorted(shipped_structures_dir().glob("*.cif"))
    assert {f.stem for f in files} == set(SHIPPED)
    for file in files:
        labelled = load_structure(file)
        number, formula = SHIPPED[file.stem]
        assert (labelled.space_group, labelled.formula) == (number, formula), file.name
        assert "mp-" in file.read_text().splitlines()[0]  # provenance in the header
        assert_vesta_frame(labelled.structure)


@pytest.mark.parametrize(
    ("name", "number", "symbol", "system", "atoms"),
    [
        ("NaCl", 225, "Fm-3m", "cubic", 8),
        ("Si", 227, "Fd-3m", "cubic", 8),
        ("ZnO", 186, "P6_3mc", "hexagonal", 4),
    ],
)
def test_known_labels(name, number, symbol, system, atoms):
    labelled = load_structure(shipped(name))
    assert (labelled.space_group, labelled.symbol, labelled.crystal_system) == (number, symbol, system)
    assert len(labelled.structure) == atoms  # conventional, not primitive
    assert labelled.symprec == 0.1


def test_primitive_input_gives_conventional_cell():
    # NaCl primitive rhombohedral cell (2 atoms) -> conventional cubic cell (8 atoms)
    lattice = Lattice.from_parameters(3.99, 3.99, 3.99, 60, 60, 60)
    primitive = Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    conventional, number = conventional_standard(primitive)
    assert number == 225 and len(conventional) == 8
    assert np.allclose(conventional.lattice.abc, [3.99 * 2**0.5] * 3, atol=1e-3)
    assert np.allclose(conventional.lattice.angles, [90, 90, 90])
    assert conventional.composition.reduced_formula == "NaCl"


def test_monoclinic_conventional_cell_in_vesta_frame():
    labelled = load_structure(shipped("ZrO2"))
    s = labelled.structure
    assert labelled.crystal_system == "monoclinic"
    alpha, beta, gamma = s.lattice.angles
    assert abs(alpha - 90) < 1e-6 and abs(gamma - 90) < 1e-6 and abs(beta - 90) > 1  # unique axis b
    assert_vesta_frame(s)
    # pymatgen's default frame (c along z) differs from VESTA's for this cell
    default = Lattice.from_parameters(*s.lattice.abc, *s.lattice.angles)
    assert not np.allclose(default.matrix, s.lattice.matrix, atol=1e-3)
    # same crystal: relabelling the VESTA-frame cell gives the same cell and group
    again, number = conventional_standard(s)
    assert number == 14
    assert np.allclose(again.lattice.matrix, s.lattice.matrix, atol=1e-6)


def test_conventional_cell_of_rotated_input_is_the_same():
    s = load_structure(shipped("TiO2")).structure
    rotated = Structure(Lattice(s.lattice.matrix[[1, 2, 0]]), s.species, s.frac_coords[:, [1, 2, 0]])
    conventional, number = conventional_standard(rotated)
    assert number == 136
    assert np.allclose(conventional.lattice.matrix, s.lattice.matrix, atol=1e-6)


# --------------------------------------------------------------------------- folders and bad input

BAD_CIFS = {
    "garbage.cif": ("this is not a CIF\n\x00\x01 at all\n", "unparsable CIF"),
    "partial.cif": (p1_cif(sites="Na Na1 0 0 0 0.5\nCl Cl1 0.5 0.5 0.5 1\n"), "partial occupancy"),
    "empty.cif": ("", "empty CIF"),
    "tiny_cell.cif": (p1_cif(a=0.5), "absurd cell"),
    "huge_cell.cif": (p1_cif(a=250.0), "absurd cell"),
    "unknown_element.cif": (p1_cif(sites="Qq Qq1 0 0 0 1\nCl Cl1 0.5 0.5 0.5 1\n"), "unknown element"),
}


def test_folder_with_bad_cifs(tmp_path):
    for name in ("NaCl", "Si", "ZnO"):
        shutil.copy(shipped(name), tmp_path)
    for name, (text, _) in BAD_CIFS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "notes.txt").write_text("not a structure")  # ignored: not *.cif

    records = list(iter_records(tmp_path))
    assert [Path(r.source).name for r in records] == sorted([*BAD_CIFS, "NaCl.cif", "Si.cif", "ZnO.cif"])
    labelled, errors = {}, {}
    for record in records:
        assert isinstance(record, StructureRecord)
        try:
            labelled[record.material_id] = label(record)
        except StructureError as exc:
            errors[Path(exc.source).name] = exc
    assert {k: v.space_group for k, v in labelled.items()} == {"NaCl": 225, "Si": 227, "ZnO": 186}
    assert set(errors) == set(BAD_CIFS)
    for name, (_, reason) in BAD_CIFS.items():
        assert reason in errors[name].reason, (name, errors[name].reason)
        assert str(errors[name]) == f"{errors[name].source}: {errors[name].reason}"


def test_single_cif_file_and_missing_source(tmp_path):
    (record,) = iter_records(shipped("Fe"))
    assert record.material_id == "Fe" and record.cif
    with pytest.raises(FileNotFoundError):
        list(iter_records(tmp_path / "nope.cif"))
    with pytest.raises(StructureError, match="no such file"):
        load_structure(tmp_path / "nope.cif")


def test_overlapping_atoms_are_reported():
    cif = p1_cif(sites="Na Na1 0 0 0 1\nNa Na2 0 0 0.0001 1\n")
    record = StructureRecord("overlap", "overlap", None, cif=cif)
    with pytest.raises(StructureError):
        label(record)


def test_structure_dict_records():
    nacl = load_structure(shipped("NaCl")).structure
    labelled = label(StructureRecord("dict", "dict-1", None, structure_dict=nacl.as_dict()))
    assert labelled.space_group == 225 and labelled.formula == "NaCl"
    bad = nacl.as_dict()
    bad["sites"][0]["species"][0]["element"] = "Qq"
    with pytest.raises(StructureError, match="unknown element"):
        label(StructureRecord("dict", "dict-2", None, structure_dict=bad))
    with pytest.raises(StructureError, match="empty structure"):
        label(StructureRecord("dict", "dict-3", None, structure_dict={**nacl.as_dict(), "sites": []}))


def test_load_structure_from_text():
    assert load_structure(cif_text("Si")).space_group == 227
    nacl = load_structure(shipped("NaCl")).structure
    assert load_structure(json.dumps(nacl.as_dict())).space_group == 225
    assert load_structure(json.dumps({"cif": cif_text("ZnO"), "material_id": "x"})).space_group == 186


def test_error_pickles_with_source_and_reason():
    error = pickle.loads(pickle.dumps(StructureError("a.cif", "bad")))
    assert (error.source, error.reason, str(error)) == ("a.cif", "bad", "a.cif: bad")
    assert isinstance(error, ValueError)


# --------------------------------------------------------------------------- JSON lines


def write_jsonl(path: Path, opener=open) -> None:
    nacl = load_structure(shipped("NaCl")).structure
    lines = [
        json.dumps({"material_id": "mp-si", "formula": "Si", "cif": cif_text("Si")}),
        "{this is not json",
        "",  # blank lines are skipped, not errors
        json.dumps({"material_id": "mp-nacl", "structure": nacl.as_dict()}),
        json.dumps({"material_id": "mp-none", "formula": "X"}),
        json.dumps([1, 2, 3]),
        json.dumps({"cif": cif_text("ZnO")}),
    ]
    with opener(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("suffix", "opener"),
    [(".jsonl", open), (".jsonl.gz", gzip.open), (".jsonl.xz", lzma.open), (".jsonl.bz2", bz2.open)],
)
def test_jsonl_with_bad_lines(tmp_path, suffix, opener):
    path = tmp_path / f"structures{suffix}"
    write_jsonl(path, opener)
    items = list(iter_records(path))
    errors = [i for i in items if isinstance(i, StructureError)]
    records = [i for i in items if isinstance(i, StructureRecord)]
    assert [e.source for e in errors] == [f"{path.name}:2", f"{path.name}:5", f"{path.name}:6"]
    assert "bad JSON line" in errors[0].reason and "neither" in errors[1].reason
    assert [r.source for r in records] == [f"{path.name}:1", f"{path.name}:4", f"{path.name}:7"]
    assert [r.material_id for r in records] == ["mp-si", "mp-nacl", f"{path.name}:7"]
    assert [label(r).space_group for r in records] == [227, 225, 186]
    assert label(records[0]).formula == "Si"


def test_truncated_compressed_jsonl_yields_error(tmp_path):
    path = tmp_path / "broken.jsonl.xz"
    write_jsonl(path, lzma.open)
    path.write_bytes(path.read_bytes()[:60])
    items = list(iter_records(path))
    assert items and isinstance(items[-1], StructureError) and "cannot read" in items[-1].reason


@pytest.mark.skipif(not MP_FILE.exists(), reason=f"shared MP data not found at {MP_FILE}")
def test_materials_project_lines():
    records = list(itertools.islice(iter_records(MP_FILE), 8))
    assert all(isinstance(r, StructureRecord) for r in records)
    assert records[0].source == "structures.jsonl.xz:1"
    for record in records:
        record = pickle.loads(pickle.dumps(record))  # as a worker would receive it
        labelled = label(record)
        assert labelled.material_id.startswith("mp-") and labelled.formula == record.formula
        assert 1 <= labelled.space_group <= 230 and labelled.symprec == 0.1
        assert_vesta_frame(labelled.structure)


# --------------------------------------------------------------------------- random crystals

GROUPS = [1, 14, 62, 139, 166, 194, 225]


def test_random_records_are_seeded_and_disjoint():
    records = random_records([14, 225], 3, seed=0)
    assert [r.space_group_request for r in records] == [14, 14, 14, 225, 225, 225]
    assert records == random_records([14, 225], 3, seed=0)
    assert len({r.seed for r in records}) == 3  # the same seeds in each group
    assert {r.seed for r in records}.isdisjoint({r.seed for r in random_records([14], 3, seed=1)})
    assert records[0].source == f"pyxtal:sg=14:seed={records[0].seed}"
    with pytest.raises(ValueError):
        random_records([231], 1)


@pytest.mark.parametrize("sg", GROUPS)
def test_random_crystal_has_requested_group(sg):
    (record,) = random_records([sg], 1, seed=11)
    labelled = label(record)
    s = labelled.structure
    assert labelled.space_group == sg and labelled.attempts >= 1
    assert st.RANDOM_MIN_EDGE_A <= min(s.lattice.abc) and max(s.lattice.abc) <= st.RANDOM_MAX_EDGE_A
    assert len(s) <= st.RANDOM_MAX_ATOMS
    assert_vesta_frame(s)
    assert conventional_standard(s)[1] == sg  # stable under relabelling


@pytest.mark.parametrize("sg", [14, 166])
def test_same_seed_same_crystal(sg):
    records = random_records([sg], 1, seed=5) * 2 + random_records([sg], 1, seed=6)
    first, second, other = (label(r) for r in records)
    assert first.structure == second.structure and first.formula == second.formula
    assert np.allclose(first.structure.lattice.matrix, second.structure.lattice.matrix)
    assert np.allclose(first.structure.frac_coords, second.structure.frac_coords)
    assert other.structure != first.structure


def test_random_gives_up_with_group_and_attempts(monkeypatch, caplog):
    monkeypatch.setattr(st, "_generate", lambda sg, seed, attempt=0: None)
    (record,) = random_records([62], 1)
    with caplog.at_level(logging.INFO, logger=st.__name__), pytest.raises(StructureError) as info:
        label(record, max_attempts=3)
    assert "space group 62" in info.value.reason and "3 attempts" in info.value.reason
    assert info.value.source == record.source
    assert any("gave up" in r.message for r in caplog.records)


def test_labelled_structure_pickles():
    labelled = load_structure(shipped("Al2O3"))
    again = pickle.loads(pickle.dumps(labelled))
    assert isinstance(again, LabelledStructure) and again.structure == labelled.structure
    assert again.attempts == 1
