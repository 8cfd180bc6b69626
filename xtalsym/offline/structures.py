"""Sources of crystal structures and their space-group labels.

Three sources feed the dataset builder: structure files (one file or a folder: CIF, and
every other file format pymatgen reads — POSCAR/CONTCAR/``*.vasp``, XSF, CSSR — by name or
by content), JSON lines
(the Materials Project dump in ``shared/data/mp_structures``: one object per line with
``cif`` or ``structure`` plus optional ``material_id`` / ``formula``; ``.xz``, ``.gz``
and ``.bz2`` are read transparently) and random crystals from pyxtal.

The builder runs in several processes, so reading a source only yields small picklable
:class:`StructureRecord` s (CIF text or a structure dict, or a space group and a seed);
:func:`label` parses or generates the structure inside the worker, converts it to the
conventional standard cell with spglib and labels it.  Bad input never aborts a batch:
:func:`iter_records` yields a :class:`StructureError` in place of a bad item and
:func:`label` raises one, always naming the source and the reason.

Rejected as absurd (checked on the parsed input, before standardisation):

- no sites, partial occupancy, non-finite coordinates;
- a cell edge < 1 A or > 200 A; a volume per atom < 1 A^3 or > 500 A^3.  The
  Materials Project set spans 4.8-134 A^3 per atom and 1.8-162 A edges (the longest
  are 12 long-period stacking polytypes, c = 101-162 A: real, so they are kept);
- more than 2,000 sites (simulation cost grows with the atom count);
- anything spglib cannot analyse (e.g. overlapping atoms).

Random crystals (pyxtal): 1-3 elements (a cation-like element, optionally a second,
and an anion-like one), each count a sum of 1-3 Wyckoff multiplicities of the group
(at most 120 atoms requested), pyxtal's volume factor 1.1.  pyxtal often returns a
higher symmetry than asked, so each crystal is labelled with spglib and regenerated
from a derived seed until the group matches and the conventional cell has edges in
[2.5, 30] A and at most 200 atoms.  ``(space group, seed)`` fixes the crystal.

Cartesian frame: the returned conventional cell is rebuilt from its cell parameters
with ``Lattice.from_parameters(..., vesta=True)`` (a along +x, b in the xy plane), the
frame the simulator's zone axes are defined in (see DESIGN.md).
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import IO, Any

import numpy as np

# spglib's C library prints "spglib: ssm_get_exact_positions failed." to the process's
# stderr for every near-miss of a symmetry search, thousands of lines in one evaluation;
# the failures that matter reach us as return values. SPGLIB_WARNING=ON brings them back.
os.environ.setdefault("SPGLIB_WARNING", "OFF")

import spglib  # noqa: E402 (after the environment switch above, which it reads)
from pymatgen.core import DummySpecies, Lattice, Structure

from xtalsym import spacegroups

log = logging.getLogger(__name__)

DEFAULT_SYMPREC = 0.1  # what Materials Project uses

# Sanity limits for real (parsed) structures; see the module docstring.
MIN_EDGE_A = 1.0
MAX_EDGE_A = 200.0
MIN_VOLUME_PER_ATOM_A3 = 1.0
MAX_VOLUME_PER_ATOM_A3 = 500.0
MAX_INPUT_SITES = 2000

# Limits for random crystals (on the conventional standard cell).
RANDOM_MIN_EDGE_A = 2.5
RANDOM_MAX_EDGE_A = 30.0
RANDOM_MAX_ATOMS = 200
RANDOM_MAX_ATOMS_REQUESTED = 120  # keeps pyxtal fast; conventional cell stays <= 200
DEFAULT_MAX_ATTEMPTS = 50
PYXTAL_VOLUME_FACTOR = 1.1  # pyxtal's default: close-packed-ish, plausible densities

CIF_SUFFIXES = (".cif", ".mcif")
# Other structure files pymatgen reads, by file name: (pymatgen's format name, suffixes, name prefixes)
OTHER_FORMATS = (
    ("poscar", (".vasp", ".poscar"), ("POSCAR", "CONTCAR")),
    ("xsf", (".xsf",), ()),
    ("cssr", (".cssr",), ()),
)
FORMAT_NAMES = {"cif": "CIF", "poscar": "POSCAR", "xsf": "XSF", "cssr": "CSSR"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSED_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class StructureRecord:
    """One structure to label: small and picklable, it travels to worker processes."""

    source: str  # "structures.jsonl.xz:17", "path/NaCl.cif", "pyxtal:sg=14:seed=3"
    material_id: str
    formula: str | None
    cif: str | None = None
    structure_dict: dict | None = None
    space_group_request: int | None = None  # for pyxtal records
    seed: int | None = None


@dataclass(frozen=True)
class LabelledStructure:
    """A structure in its conventional standard cell (VESTA frame) with its spglib label."""

    material_id: str
    formula: str
    source: str
    structure: Structure
    space_group: int
    symbol: str
    crystal_system: str
    symprec: float
    attempts: int = 1  # pyxtal crystals generated to get this one (1 for real structures)


class StructureError(ValueError):
    """A structure that cannot be used; ``str()`` is ``"<source>: <reason>"``."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self):  # keep (source, reason) when pickled back from a worker
        return (type(self), (self.source, self.reason))


# --------------------------------------------------------------------------- reading sources


def iter_records(source: str | Path) -> Iterator[StructureRecord | StructureError]:
    """Records from a CIF file, a folder of CIFs (``*.cif``, sorted) or a JSON-lines file.

    Problems with single items (unreadable file, bad JSON line) are yielded as
    :class:`StructureError`; only a missing ``source`` raises (FileNotFoundError).
    """
    path = Path(source)
    if path.is_dir():
        for file in sorted(p for p in path.iterdir() if p.is_file() and is_structure_file(p)):
            yield _file_record(file)
    elif not path.exists():
        raise FileNotFoundError(f"no such structure source: {path}")
    elif _is_jsonl(path):
        yield from _jsonl_records(path)
    else:
        yield _file_record(path)


def is_structure_file(path: Path) -> bool:
    """A file a folder scan takes: CIF or another format pymatgen reads, by its name."""
    return path.suffix.lower() in CIF_SUFFIXES or _format_by_name(path) is not None


def _format_by_name(path: Path) -> str | None:
    for fmt, suffixes, prefixes in OTHER_FORMATS:
        if path.suffix.lower() in suffixes or any(path.name.startswith(p) for p in prefixes):
            return fmt
    return None


def is_json_lines(path: str | Path) -> bool:
    """True for ``*.jsonl`` / ``*.ndjson`` files (also compressed: ``.xz``, ``.gz``, ``.bz2``)."""
    return _is_jsonl(Path(path))


def _is_jsonl(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_OPENERS:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in JSONL_SUFFIXES


def _open_text(path: Path) -> IO[str]:
    opener = COMPRESSED_OPENERS.get(path.suffix.lower())
    if opener is None:
        return open(path, encoding="utf-8", errors="replace")
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _file_record(path: Path) -> StructureRecord | StructureError:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return StructureError(str(path), f"cannot read file: {exc}")
    if path.suffix.lower() in CIF_SUFFIXES:
        return StructureRecord(source=str(path), material_id=path.stem, formula=None, cif=text)
    return _text_record(text, str(path), path.stem, name_format=_format_by_name(path))


def _jsonl_records(path: Path) -> Iterator[StructureRecord | StructureError]:
    try:
        with _open_text(path) as lines:
            for number, line in enumerate(lines, start=1):  # 1-based, as editors count
                if line.strip():
                    yield _json_record(line, f"{path.name}:{number}")
    except (OSError, EOFError, lzma.LZMAError) as exc:  # truncated/corrupt archive
        yield StructureError(str(path), f"cannot read file: {exc}")


def _json_record(line: str, source: str) -> StructureRecord | StructureError:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return StructureError(source, f"bad JSON line: {exc}")
    return _object_record(obj, source)


def _object_record(obj: Any, source: str) -> StructureRecord | StructureError:
    """A record from a JSON-lines object: ``cif`` or ``structure``, ``material_id``, ``formula``."""
    if not isinstance(obj, dict):
        return StructureError(source, f"bad JSON: expected an object, got {type(obj).__name__}")
    cif, struct = obj.get("cif"), obj.get("structure")
    if not isinstance(cif, str) and not isinstance(struct, dict):
        return StructureError(source, "JSON object has neither 'cif' (text) nor 'structure' (dict)")
    formula = obj.get("formula")
    return StructureRecord(
        source=source,
        material_id=str(obj.get("material_id") or source),
        formula=str(formula) if formula else None,
        cif=cif if isinstance(cif, str) else None,
        structure_dict=None if isinstance(cif, str) else struct,
    )


def random_records(space_groups: Sequence[int], per_group: int, *, seed: int = 0) -> list[StructureRecord]:
    """``per_group`` pyxtal records for each space group; nothing is generated yet.

    Record seeds are 32-bit hashes of (seed, index), so different base seeds give
    practically disjoint crystals (a train set from seed 0 and a test set from seed 1
    do not share seeds the way seed + index would).
    """
    if per_group < 0:
        raise ValueError(f"per_group must be >= 0, got {per_group}")
    groups = [spacegroups.check_number(n) for n in space_groups]
    seeds = np.random.SeedSequence([seed]).generate_state(per_group, dtype=np.uint32)
    return [
        StructureRecord(
            source=f"pyxtal:sg={sg}:seed={int(s)}",
            material_id=f"pyxtal-{sg}-{int(s)}",
            formula=None,
            space_group_request=sg,
            seed=int(s),
        )
        for sg in groups
        for s in seeds
    ]


# --------------------------------------------------------------------------- labelling


def label(
    record: StructureRecord, *, symprec: float = DEFAULT_SYMPREC, max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> LabelledStructure:
    """Parse (or generate) ``record``, standardise it and label it; raises StructureError."""
    if record.space_group_request is not None:
        return _label_random(record, symprec=symprec, max_attempts=max_attempts)
    structure = _parse(record)
    _check_sane(structure, record.source)
    conventional, number = _standardise(structure, record.source, symprec)
    return _labelled(record, conventional, number, symprec, formula=record.formula or _formula(structure))


def conventional_standard(structure: Structure, *, symprec: float = DEFAULT_SYMPREC) -> tuple[Structure, int]:
    """Conventional standard cell (spglib, idealised, VESTA frame) and its space group."""
    return _standardise(structure, "structure", symprec)


def load_structure(path_or_text: str | Path, *, symprec: float = DEFAULT_SYMPREC) -> LabelledStructure:
    """One labelled structure from a structure file (CIF, POSCAR/CONTCAR, XSF, CSSR, ...;
    JSON or JSON lines) or from such text.

    A JSON-lines file gives its first structure. Raises StructureError.
    """
    record = single_record(path_or_text)
    if isinstance(record, StructureError):
        raise record
    return label(record, symprec=symprec)


def shipped_structures_dir() -> Path:
    """Folder of the small CIFs shipped with the package (demo and tests)."""
    return Path(str(resources.files("xtalsym") / "data" / "structures"))


def single_record(path_or_text: str | Path) -> StructureRecord | StructureError:
    """The record of one structure file (a JSON-lines file: its first line) or text."""
    if isinstance(path_or_text, str) and ("\n" in path_or_text or path_or_text.lstrip().startswith("{")):
        return _text_record(path_or_text, "<text>", "text")
    path = Path(path_or_text)
    if not path.is_file():
        return StructureError(str(path), "no such file")
    if _is_jsonl(path):
        return next(iter_records(path), StructureError(str(path), "empty JSON-lines file"))
    return _file_record(path)


def _looks_like_cif(text: str) -> bool:
    return bool(re.search(r"^\s*data_", text, re.MULTILINE)) or "_cell_length_a" in text


def _text_record(text: str, source: str, material_id: str, *, name_format: str | None = None
                 ) -> StructureRecord | StructureError:
    """CIF text, a JSON object like a JSON-lines entry, a bare Structure.as_dict(), or
    another format pymatgen reads (``name_format`` from the file name, else by content)."""
    if not text.lstrip().startswith("{"):
        if name_format is None and (_looks_like_cif(text) or not text.strip()):
            return StructureRecord(source=source, material_id=material_id, formula=None, cif=text)
        return _other_format_record(text, source, material_id, name_format)
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return StructureError(source, f"bad JSON: {exc}")
    if isinstance(obj, dict) and "lattice" in obj and "sites" in obj:
        return StructureRecord(source=source, material_id=material_id, formula=None, structure_dict=obj)
    return _object_record(obj, source)


def _other_format_record(text: str, source: str, material_id: str, name_format: str | None
                         ) -> StructureRecord | StructureError:
    """Parse POSCAR/XSF/CSSR/... text with pymatgen (the format the name says, else each in
    turn, CIF last); the error names every format tried and why the first one failed."""
    tried = [name_format] if name_format else [fmt for fmt, _, _ in OTHER_FORMATS] + ["cif"]
    first_reason = None
    for fmt in tried:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_str(text, fmt=fmt)
        except Exception as exc:  # pymatgen raises many types for text of another format
            first_reason = first_reason or f"{type(exc).__name__}: {_clip(str(exc), 120)}"
            continue
        return StructureRecord(source=source, material_id=material_id, formula=None,
                               structure_dict=structure.as_dict())
    names = ", ".join(FORMAT_NAMES.get(f, f) for f in tried)
    what = f"unparsable {names}" if len(tried) == 1 else f"not a structure file pymatgen reads (tried {names})"
    return StructureError(source, f"{what}: {first_reason}")


def _labelled(
    record: StructureRecord,
    structure: Structure,
    number: int,
    symprec: float,
    *,
    formula: str,
    attempts: int = 1,
) -> LabelledStructure:
    return LabelledStructure(
        material_id=record.material_id,
        formula=formula,
        source=record.source,
        structure=structure,
        space_group=number,
        symbol=spacegroups.symbol(number),
        crystal_system=spacegroups.crystal_system(number),
        symprec=symprec,
        attempts=attempts,
    )


def _formula(structure: Structure) -> str:
    return structure.composition.reduced_formula


# --------------------------------------------------------------------------- parsing + checks


def _parse(record: StructureRecord) -> Structure:
    if record.cif is not None:
        return _parse_cif(record.cif, record.source)
    if record.structure_dict is not None:
        return _parse_dict(record.structure_dict, record.source)
    raise StructureError(record.source, "record has no CIF text and no structure")


def _parse_cif(text: str, source: str) -> Structure:
    # CifParser is the fastest pymatgen route (~3 ms for an MP CIF). Its warnings are
    # noisy and sometimes the only explanation of a failure: capture them for this
    # call only and quote the first one in the error.
    from pymatgen.io.cif import CifParser

    if not text.strip():
        raise StructureError(source, "empty CIF")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            structures = CifParser.from_str(text).parse_structures(primitive=False, check_occu=True)
        except Exception as exc:  # pymatgen raises ValueError, KeyError, IndexError, ...
            raise StructureError(source, _cif_failure(exc, caught)) from None
    if not structures:
        raise StructureError(source, _cif_failure(None, caught))
    if len(structures) > 1:
        log.debug("%s: %d data blocks, using the first", source, len(structures))
    return structures[0]


def _cif_failure(exc: Exception | None, caught: list[warnings.WarningMessage]) -> str:
    messages = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    # pymatgen says why a CIF failed only in its warnings; occupancy problems first
    details = [m for m in messages if "occupanc" in m.lower()] or messages
    reason = "unparsable CIF" if exc is not None else "unparsable CIF: no structure found"
    if exc is not None and str(exc):
        reason += f": {type(exc).__name__}: {_clip(str(exc))}"
    if details:
        reason += f" ({_clip(details[0])})"
    if any(_is_unknown_element(d) for d in details) or (exc is not None and _is_unknown_element(str(exc))):
        reason = "unknown element; " + reason
    return reason


def _is_unknown_element(message: str) -> bool:
    lowered = message.lower()
    return "not a valid element" in lowered or "unknown element" in lowered or "is not a valid" in lowered


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_dict(obj: dict, source: str) -> Structure:
    if not obj.get("sites"):  # pymatgen refuses to build an empty Structure
        raise StructureError(source, "empty structure (no sites)")
    try:
        return Structure.from_dict(obj)
    except Exception as exc:  # any malformed dict
        prefix = "unknown element; " if _is_unknown_element(str(exc)) else ""
        reason = f"{prefix}bad structure dict: {type(exc).__name__}: {_clip(str(exc))}"
        raise StructureError(source, reason) from None


def _check_sane(structure: Structure, source: str) -> None:
    """Raise StructureError for structures that are empty, disordered or absurd."""
    n = len(structure)
    if n == 0:
        raise StructureError(source, "empty structure (no sites)")
    if n > MAX_INPUT_SITES:
        raise StructureError(source, f"too many sites ({n} > {MAX_INPUT_SITES})")
    if not structure.is_ordered:
        raise StructureError(source, "partial occupancy (disordered sites) is not supported")
    # pymatgen turns unknown CIF symbols into DummySpecies (whose Z is a hash)
    unknown = {sp.symbol for sp in structure.composition if isinstance(sp, DummySpecies)}
    if unknown:
        raise StructureError(source, f"unknown element(s): {', '.join(sorted(unknown))}")
    if not np.all(np.isfinite(structure.frac_coords)) or not np.all(np.isfinite(structure.lattice.matrix)):
        raise StructureError(source, "non-finite lattice or coordinates")
    edges = structure.lattice.abc
    if min(edges) < MIN_EDGE_A or max(edges) > MAX_EDGE_A:
        raise StructureError(
            source, f"absurd cell: edges {_fmt(edges)} A outside [{MIN_EDGE_A:g}, {MAX_EDGE_A:g}] A"
        )
    per_atom = abs(structure.lattice.volume) / n
    if not MIN_VOLUME_PER_ATOM_A3 <= per_atom <= MAX_VOLUME_PER_ATOM_A3:
        raise StructureError(
            source,
            f"absurd cell: {per_atom:.3g} A^3 per atom outside "
            f"[{MIN_VOLUME_PER_ATOM_A3:g}, {MAX_VOLUME_PER_ATOM_A3:g}]",
        )


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


# --------------------------------------------------------------------------- standardisation


def _standardise(structure: Structure, source: str, symprec: float) -> tuple[Structure, int]:
    # spglib's dataset already holds the idealised conventional cell (what
    # standardize_cell(to_primitive=False, no_idealize=False) returns): one call gives
    # label and cell, ~1.3 ms for an MP structure against ~6 ms for SpacegroupAnalyzer.
    species = list(dict.fromkeys(site.specie for site in structure))  # unique, ordered
    index = {sp: i for i, sp in enumerate(species)}
    types = [index[site.specie] for site in structure]
    cell = (structure.lattice.matrix, structure.frac_coords, types)
    dataset = _symmetry_dataset(cell, symprec)
    if dataset is None:
        raise StructureError(source, f"spglib found no symmetry at symprec={symprec:g} (overlapping atoms?)")
    lattice = Lattice(dataset.std_lattice)
    vesta = Lattice.from_parameters(*lattice.abc, *lattice.angles, vesta=True)
    coords = np.mod(dataset.std_positions, 1.0)
    conventional = Structure(vesta, [species[t] for t in dataset.std_types], coords)
    return conventional, int(dataset.number)


def _symmetry_dataset(cell: tuple, symprec: float) -> Any | None:
    with warnings.catch_warnings():
        # spglib 2.x warns about its old None-on-error convention on every failure
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return spglib.get_symmetry_dataset(cell, symprec=symprec)
        except getattr(spglib, "SpglibError", RuntimeError):
            return None


# --------------------------------------------------------------------------- random crystals

# Chemistry for random crystals: a cation-like element, optionally a second one, and an
# anion-like element -- the compositions of common inorganic solids (oxides, sulfides,
# halides, nitrides, intermetallics). Counts are sums of Wyckoff multiplicities, so they
# are compatible with the group more often than not; pyxtal checks the rest.
CATIONS = (
    "Li", "Na", "K", "Rb", "Cs", "Be", "Mg", "Ca", "Sr", "Ba", "Sc", "Y", "La", "Ce",
    "Ti", "Zr", "Hf", "V", "Nb", "Ta", "Cr", "Mo", "W", "Mn", "Fe", "Co", "Ni", "Cu",
    "Ag", "Au", "Zn", "Cd", "Al", "Ga", "In", "Si", "Ge", "Sn", "Pb", "Bi", "Pt", "Pd",
)  # fmt: skip
ANIONS = ("O", "S", "Se", "Te", "N", "P", "As", "Sb", "F", "Cl", "Br", "I", "C", "B", "H")
ELEMENT_COUNT_WEIGHTS = {1: 0.2, 2: 0.5, 3: 0.3}
MAX_CHEMISTRY_DRAWS = 40  # compositions tried per attempt before pyxtal is even called


@dataclass
class RandomStats:
    """Per-process totals for pyxtal generation (workers should sum LabelledStructure.attempts)."""

    crystals: int = 0  # labelled successfully
    generated: int = 0  # crystals pyxtal produced
    rejected_symmetry: int = 0  # spglib found another group
    rejected_cell: int = 0  # edge or atom-count limits
    pyxtal_failures: int = 0  # pyxtal raised or gave up

    @property
    def rejection_rate(self) -> float:
        return 1.0 - self.crystals / self.generated if self.generated else 0.0


RANDOM_STATS = RandomStats()


@cache
def _wyckoff(sg: int) -> tuple[Any, tuple[int, ...]]:
    """pyxtal Group (slow to build, so cached) and its Wyckoff multiplicities, smallest first."""
    from pyxtal.symmetry import Group

    group = Group(sg)
    return group, tuple(sorted({int(w.multiplicity) for w in group}))


def _draw_chemistry(sg: int, rng: np.random.Generator, attempt: int) -> tuple[list[str], list[int]] | None:
    """Elements and conventional-cell counts compatible with the group's Wyckoff positions.

    Small multiplicities (small cells) are favoured at first; later attempts shift
    towards large ones, because some groups (e.g. 219 F-43c) only keep their symmetry
    when atoms sit on general or near-general positions.
    """
    group, multiplicities = _wyckoff(sg)
    exponent = max(-1.0, 1.0 - 0.2 * attempt)  # 1/m at attempt 0, uniform at 5, m at 10+
    weights = np.asarray(multiplicities, dtype=float) ** -exponent
    weights /= weights.sum()
    for _ in range(MAX_CHEMISTRY_DRAWS):
        n_elements = int(rng.choice(list(ELEMENT_COUNT_WEIGHTS), p=list(ELEMENT_COUNT_WEIGHTS.values())))
        if n_elements == 1:
            species = [str(rng.choice(CATIONS))]
        else:
            species = [str(s) for s in rng.choice(CATIONS, size=n_elements - 1, replace=False)]
            species.append(str(rng.choice(ANIONS)))
        # each count is the sum of 1-3 Wyckoff multiplicities
        counts = [int(rng.choice(multiplicities, size=rng.integers(1, 4), p=weights).sum()) for _ in species]
        if sum(counts) > RANDOM_MAX_ATOMS_REQUESTED:
            continue
        if group.check_compatible(counts)[0]:
            return species, counts
    return None


def _generate(sg: int, seed: int, attempt: int = 0) -> Structure | None:
    """One pyxtal crystal for (sg, seed), or None if the chemistry or pyxtal failed."""
    from pyxtal import pyxtal

    rng = np.random.default_rng(seed)
    chemistry = _draw_chemistry(sg, rng, attempt)
    if chemistry is None:
        return None
    species, counts = chemistry
    crystal = pyxtal()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            crystal.from_random(
                3, sg, species, counts, factor=PYXTAL_VOLUME_FACTOR, random_state=int(rng.integers(2**32))
            )
            return crystal.to_pymatgen() if crystal.valid else None
        except Exception as exc:  # pyxtal raises RuntimeError, ValueError, ... on failure
            log.debug("pyxtal sg=%d seed=%d %s/%s: %s", sg, seed, species, counts, exc)
            return None


def _random_cell_problem(structure: Structure) -> str | None:
    edges = structure.lattice.abc
    if min(edges) < RANDOM_MIN_EDGE_A or max(edges) > RANDOM_MAX_EDGE_A:
        return f"edges {_fmt(edges)} A"
    if len(structure) > RANDOM_MAX_ATOMS:
        return f"{len(structure)} atoms"
    return None


def _label_random(record: StructureRecord, *, symprec: float, max_attempts: int) -> LabelledStructure:
    """Generate with derived seeds until spglib agrees with the requested group."""
    sg = spacegroups.check_number(record.space_group_request)
    seed = 0 if record.seed is None else int(record.seed)
    for attempt in range(max_attempts):
        # attempt k's seed depends only on (sg, seed, k): fully reproducible
        derived = int(np.random.SeedSequence([sg, seed, attempt]).generate_state(1)[0])
        structure = _generate(sg, derived, attempt)
        if structure is None:
            RANDOM_STATS.pyxtal_failures += 1
            continue
        RANDOM_STATS.generated += 1
        try:
            conventional, number = _standardise(structure, record.source, symprec)
        except StructureError:
            RANDOM_STATS.rejected_symmetry += 1
            continue
        if number != sg:
            RANDOM_STATS.rejected_symmetry += 1
            continue
        if _random_cell_problem(conventional):
            RANDOM_STATS.rejected_cell += 1
            continue
        RANDOM_STATS.crystals += 1
        if RANDOM_STATS.crystals % 100 == 0:
            log_random_stats()
        if attempt:
            log.debug("%s: %d attempts", record.source, attempt + 1)
        formula = _formula(conventional)
        return _labelled(record, conventional, number, symprec, formula=formula, attempts=attempt + 1)
    log.info("pyxtal sg=%d: gave up after %d attempts (%s)", sg, max_attempts, RANDOM_STATS)
    raise StructureError(record.source, f"no crystal of space group {sg} after {max_attempts} attempts")


def log_random_stats(stats: RandomStats = RANDOM_STATS) -> None:
    """Log this process's pyxtal rejection rate at INFO."""
    log.info(
        "pyxtal: %d crystals from %d generated (rejection rate %.0f%%: %d other group, %d cell limits), "
        "%d pyxtal failures",
        stats.crystals,
        stats.generated,
        100 * stats.rejection_rate,
        stats.rejected_symmetry,
        stats.rejected_cell,
        stats.pyxtal_failures,
    )
