"""Guards shared by every test."""

from __future__ import annotations

import numpy as np
import pytest


def _flush_to_zero_on() -> bool:
    tiny = np.array([1e-39], dtype=np.float32)  # a float32 subnormal
    return float((tiny * np.float32(1.0))[0]) == 0.0


@pytest.fixture(autouse=True)
def _keeps_ieee_floats():
    """Flush-to-zero is process (thread) state: code that turns it on for speed (torch on the
    CPU) must turn it off again, or later code — hypothesis among it — computes differently."""
    before = _flush_to_zero_on()
    yield
    if _flush_to_zero_on() and not before:
        pytest.fail("the test left flush-to-zero on (torch.set_flush_denormal(True) not undone)")
