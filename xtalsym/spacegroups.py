"""Space-group numbers, Hermann-Mauguin symbols and crystal systems."""

from __future__ import annotations

import warnings
from functools import lru_cache

import spglib

CRYSTAL_SYSTEMS = (
    "triclinic",
    "monoclinic",
    "orthorhombic",
    "tetragonal",
    "trigonal",
    "hexagonal",
    "cubic",
)

# Last space-group number of each crystal system (International Tables order).
_SYSTEM_UPPER_BOUNDS = (2, 15, 74, 142, 167, 194, 230)


def check_number(number: int) -> int:
    """Return ``number`` as int if it is a valid space-group number, else raise ValueError."""
    try:
        value = int(number)
    except (TypeError, ValueError):
        raise ValueError(f"space group must be an integer 1-230, got {number!r}") from None
    if value != number or not 1 <= value <= 230:
        raise ValueError(f"space group must be an integer 1-230, got {number!r}")
    return value


def crystal_system(number: int) -> str:
    """Crystal system of space group ``number`` (1-230)."""
    number = check_number(number)
    for system, upper in zip(CRYSTAL_SYSTEMS, _SYSTEM_UPPER_BOUNDS):
        if number <= upper:
            return system
    raise AssertionError("unreachable")


@lru_cache(maxsize=1)
def _standard_settings() -> dict[int, tuple[int, str]]:
    # spglib's Hall table lists every setting; the first Hall number of each space
    # group is its standard setting (unique axis b, origin choice 1, hexagonal axes
    # for R groups), whose short symbol is what we report.
    settings: dict[int, tuple[int, str]] = {}
    for hall in range(1, 531):
        with warnings.catch_warnings():  # spglib's notice about its error-handling mode
            warnings.simplefilter("ignore", DeprecationWarning)
            sg = spglib.get_spacegroup_type(hall)
        number = sg.number if hasattr(sg, "number") else sg["number"]
        short = sg.international_short if hasattr(sg, "international_short") else sg["international_short"]
        settings.setdefault(number, (hall, short))
    return settings


def symbol(number: int) -> str:
    """Short Hermann-Mauguin symbol of space group ``number``, e.g. 225 -> 'Fm-3m'."""
    if type(number) is int and 0 < number <= 230:  # a plain int needs no check (a fused message names ~140)
        return _symbols()[number]
    return _standard_settings()[check_number(number)][1]


@lru_cache(maxsize=1)
def _symbols() -> tuple[str, ...]:
    settings = _standard_settings()
    return ("",) + tuple(settings[g][1] for g in range(1, 231))


def standard_hall_number(number: int) -> int:
    """spglib Hall number of the standard setting of space group ``number`` (14 -> 81)."""
    return _standard_settings()[check_number(number)][0]


def parse_list(text: str) -> list[int]:
    """Parse '1,2,14' or '195-230' or a mix into a sorted list of unique numbers."""
    numbers: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            lo, _, hi = part.partition("-")
            try:
                a, b = check_number(int(lo)), check_number(int(hi))
            except ValueError:
                raise ValueError(f"bad space-group range {part!r} (expected e.g. 195-230)") from None
            if a > b:
                raise ValueError(f"bad space-group range {part!r}: start is after end")
            numbers.update(range(a, b + 1))
        else:
            try:
                numbers.add(check_number(int(part)))
            except ValueError:
                raise ValueError(f"bad space-group number {part!r} (expected 1-230)") from None
    if not numbers:
        raise ValueError(f"no space groups in {text!r}")
    return sorted(numbers)


# The paper's 72 training space groups (Tiong et al. 2020, Supplementary Table 2).
PAPER_72 = (
    1, 2,
    4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    19, 25, 29, 31, 33, 36, 38, 44, 47, 55, 57, 58, 59, 60, 61, 62, 63, 64, 65, 70, 71, 74,
    82, 87, 88, 107, 115, 122, 123, 127, 129, 136, 139, 140, 141,
    146, 148, 156, 160, 164, 166,
    173, 176, 186, 187, 189, 191, 193, 194,
    198, 205, 216, 221, 223, 225, 227, 229, 230,
)

# The paper's 30 unseen space groups for open-set matching (Supplementary Table 3).
PAPER_OPEN_SET_30 = (
    3, 69, 76, 86, 95, 102, 109, 111, 113, 128, 130, 131, 137, 142,
    145, 150, 162, 163, 165, 182, 185, 188,
    197, 200, 203, 212, 214, 215, 218, 226,
)
