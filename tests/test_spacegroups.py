import pytest

from xtalsym import spacegroups


@pytest.mark.parametrize(
    "number, symbol, system",
    [(1, "P1", "triclinic"), (14, "P2_1/c", "monoclinic"), (62, "Pnma", "orthorhombic"),
     (139, "I4/mmm", "tetragonal"), (166, "R-3m", "trigonal"), (194, "P6_3/mmc", "hexagonal"),
     (225, "Fm-3m", "cubic"), (230, "Ia-3d", "cubic")],
)
def test_symbols_and_systems(number, symbol, system):
    assert spacegroups.symbol(number) == symbol
    assert spacegroups.crystal_system(number) == system


def test_every_group_has_a_symbol_and_system():
    systems = [spacegroups.crystal_system(n) for n in range(1, 231)]
    assert [systems.count(s) for s in spacegroups.CRYSTAL_SYSTEMS] == [2, 13, 59, 68, 25, 27, 36]
    assert len({spacegroups.symbol(n) for n in range(1, 231)}) == 230


@pytest.mark.parametrize("bad", [0, 231, -5, 2.5, "x", None])
def test_bad_numbers_are_named(bad):
    with pytest.raises(ValueError, match=repr(bad).strip("'") if bad is not None else "None"):
        spacegroups.check_number(bad)


def test_parse_list():
    assert spacegroups.parse_list("1, 3-5,225") == [1, 3, 4, 5, 225]
    assert len(spacegroups.parse_list("1-230")) == 230
    for bad in ("", "0", "5-3", "1-231", "abc"):
        with pytest.raises(ValueError):
            spacegroups.parse_list(bad)


def test_paper_sets_match_the_supplementary_tables():
    assert len(spacegroups.PAPER_72) == len(set(spacegroups.PAPER_72)) == 72
    assert len(spacegroups.PAPER_OPEN_SET_30) == len(set(spacegroups.PAPER_OPEN_SET_30)) == 30
    assert not set(spacegroups.PAPER_72) & set(spacegroups.PAPER_OPEN_SET_30)
    systems = [spacegroups.crystal_system(n) for n in spacegroups.PAPER_72]
    # the paper's text: 2 triclinic, 12 monoclinic, 22 orthorhombic, 13 tetragonal,
    # 6 trigonal, 8 hexagonal and 9 cubic groups
    assert [systems.count(s) for s in spacegroups.CRYSTAL_SYSTEMS] == [2, 12, 22, 13, 6, 8, 9]
