"""pipeline.inference_threads: 0 gives the backend every core the daemon may use (no spinning)."""

from __future__ import annotations

import os

from xtalsym.daemon.config import load_config
from xtalsym.daemon.service import inference_cpu_threads


def test_zero_means_every_usable_core_and_a_number_is_kept():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for workers in (1, 2, 64):  # no longer the cores the workers leave: never below all of them
        assert inference_cpu_threads(load_config(overrides={"pipeline": {"workers": workers}})) == cores
    assert inference_cpu_threads(load_config(overrides={"pipeline": {"inference_threads": 3}})) == 3
