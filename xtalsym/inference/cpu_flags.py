"""Whether this CPU runs the int8 graph faster than fp32: decided by its instruction-set flags.

Measured (docs/RESULTS.md, issue 12): on an x86 CPU with AVX2 but no VNNI, ONNX Runtime's
u8×s8 kernels made the int8 per-view graph no faster than fp32 (and it lost accuracy); on
one with AVX-512 VNNI, AVX-VNNI and AMX-INT8 it took about a third less CPU per view. So
``bundle.precision = "auto"`` takes int8 only where the CPU has one of :data:`INT8_FLAGS`
(x86 Linux, ``/proc/cpuinfo``). Other CPUs (ARM, other systems) are not measured and keep
fp32 unless ``precision = "int8"`` asks for it.
"""

from __future__ import annotations

from pathlib import Path

# x86 dot-product instructions on u8×s8 that ONNX Runtime's MLAS int8 kernels use
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | Path = CPUINFO) -> set[str]:
    """The x86 ``flags`` of the first processor in ``cpuinfo``; empty where unreadable or not x86."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def int8_pays(flags: set[str] | None = None) -> tuple[bool, str]:
    """(int8 is expected to be faster here, why) from the CPU's flags (read when None)."""
    flags = cpu_flags() if flags is None else flags
    found = [f for f in INT8_FLAGS if f in flags]
    if found:
        return True, f"CPU has {', '.join(found)}"
    if not flags:
        return False, "CPU flags unknown (not x86 Linux): int8 not measured to pay here"
    return False, f"CPU has none of {', '.join(INT8_FLAGS)}: int8 is not faster there"


__all__ = ["INT8_FLAGS", "cpu_flags", "int8_pays"]
