"""What a SIGHUP may change in a running daemon, and the checks a new bundle must pass first.

A reload re-reads the configuration and re-loads (re-verifies) the bundle, then swaps
config, bundle, backend and index between two inference batches. Keys in
:data:`HOT_KEYS` take effect at once; any other changed key needs new sockets, a new
worker pool or new assembler/series state, so it is reported as needing a restart and
its running value is kept (docs/DAEMON.md, "Running under systemd").
"""

from __future__ import annotations

from xtalsym.daemon.calibrate import CalibrationError, TrainingGeometry
from xtalsym.daemon.config import DaemonConfig

# (section, key); key "*" = every key of the section. All are read per frame or per batch.
HOT_KEYS = frozenset({
    ("bundle", "*"),
    ("index", "*"),
    ("calibration", "*"),
    ("ingest", "protocol"),
    ("ingest", "channel"),
    ("ingest", "max_pixels"),
    ("pipeline", "max_batch"),
    ("pipeline", "latency_budget_seconds"),
    ("pipeline", "shaping_method"),
    ("pipeline", "inference_threads"),
    ("pipeline", "view_inference"),
})


class ReloadError(ValueError):
    """A new bundle or configuration the running daemon cannot take without a restart."""


def is_hot(section: str, key: str) -> bool:
    return (section, "*") in HOT_KEYS or (section, key) in HOT_KEYS


def merge(running: DaemonConfig, new: DaemonConfig) -> tuple[DaemonConfig, list[str]]:
    """The configuration to apply (``new``, with every restart-only key at its running value)
    and one line per restart-only key that changed."""
    sections: dict = {}
    kept: list[str] = []
    for name in sorted(set(running.sections) | set(new.sections)):
        old_values = running.sections.get(name, {})
        new_values = new.sections.get(name, {})
        merged = {}
        for key in list(dict.fromkeys([*old_values, *new_values])):
            old, value = old_values.get(key), new_values.get(key)
            if value != old and not is_hot(name, key):
                kept.append(f"{name}.{key} changed ({old!r} -> {value!r}) but needs a restart; "
                            f"keeping {old!r} until then")
                value = old
            merged[key] = value
        sections[name] = merged
    return DaemonConfig(sections=sections, source=new.source), kept


def check_same_input(running_bundle, new_bundle) -> None:
    """Refuse a bundle that wants differently shaped input: frames already in the workers
    and open samples were shaped for the running one."""
    if new_bundle.image_size != running_bundle.image_size:
        raise ReloadError(f"bundle {new_bundle.path} takes {new_bundle.image_size} px shaped patterns, the running "
                          f"bundle {running_bundle.image_size} px: that needs a restart")
    try:
        new_grid = TrainingGeometry.from_bundle(new_bundle)
    except CalibrationError as exc:
        raise ReloadError(str(exc)) from None
    old_grid = TrainingGeometry.from_bundle(running_bundle)
    if new_grid != old_grid:
        raise ReloadError(f"bundle {new_bundle.path} was trained on another detector grid ({new_grid}) than the "
                          f"running bundle ({old_grid}): that needs a restart")
