"""The daemon's typed configuration: TOML in, validated at start-up, every error at once.

Keys, defaults and meanings: docs/DAEMON.md (and systemd/xtalsym.example.toml, which
lists every key with its default). :func:`load_config` raises :class:`ConfigError` whose
message lists every bad key with its value; :meth:`DaemonConfig.to_toml` writes the
resolved copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from xtalsym.daemon.endpoints import (  # noqa: F401 (re-exported: callers import them from here)
    DEFAULT_INGEST_ADDRESS,
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_METRICS_PORT,
    DEFAULT_PUBLISH_ADDRESS,
    DEFAULT_TOPIC,
    METRICS_TOPIC,
)
from xtalsym.daemon.protocols import GEOMETRY_KEYS, PROTOCOLS

AXES = ("x", "y", "z")


class ConfigError(ValueError):
    """Invalid configuration; ``errors`` lists one line per bad key."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = list(errors)
        super().__init__(f"{source}: {len(errors)} error(s):\n  " + "\n  ".join(errors))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# (section, key) -> (default, check(value) -> error text or None)
def _choice(*options):
    return lambda v: None if v in options else f"must be one of {', '.join(map(repr, options))}"


def _str(v):
    return None if isinstance(v, str) else "must be a string"


def _address(v):
    if not isinstance(v, str) or "://" not in v:
        return "must be a ZeroMQ endpoint like tcp://127.0.0.1:31001"
    return None


def _pos_int(v):
    return None if _is_int(v) and v > 0 else "must be an integer > 0"


def _nonneg_int(v):
    return None if _is_int(v) and v >= 0 else "must be an integer >= 0"


def _pos_num(v):
    return None if _is_num(v) and v > 0 else "must be a number > 0"


def _nonneg_num(v):
    return None if _is_num(v) and v >= 0 else "must be a number >= 0"


def _bool(v):
    return None if isinstance(v, bool) else "must be true or false"


def _host(v):
    if not isinstance(v, str) or not v or any(c in v for c in "/ \t[]") or v.count(":") == 1:
        return "must be a host name or IP address like 127.0.0.1 (no scheme, no port)"
    return None


def _port(v):
    return None if _is_int(v) and 0 <= v <= 65535 else "must be an integer 0..65535 (0 = any free port)"


def _axis_order(v):
    if isinstance(v, list) and sorted(v) == sorted(AXES):
        return None
    return 'must be a permutation of ["x", "y", "z"]'


def _geometry_value(key):
    def check(v):
        if not _is_num(v):
            return "must be a number"
        if key.startswith("beam_center"):
            return None
        if key.startswith("image_size") and not _is_int(v):
            return "must be an integer"
        return None if v > 0 else "must be > 0"
    return check


SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "bundle": {
        "path": ("", _str),  # "" = the shipped default bundle (reference_index/)
        "backend": ("auto", _choice("auto", "torch", "onnxruntime", "tensorrt")),
        "device": ("auto", _str),
        # CPU precision: auto = int8 when the bundle carries the quantised per-view graph
        # (model card: its accuracy), fp32 = the fp32 graphs, int8 = refuse a bundle without it
        "precision": ("auto", _choice("auto", "fp32", "int8")),
    },
    "ingest": {
        "protocol": ("stream_v2", _choice(*PROTOCOLS)),
        "socket": ("pull", _choice("pull", "sub")),
        "mode": ("connect", _choice("connect", "bind")),
        "address": (DEFAULT_INGEST_ADDRESS, _address),
        "channel": ("", _str),  # "" = the first channel of each image
        "max_pixels": (64 * 1024 * 1024, _pos_int),
        "receive_hwm": (1000, _pos_int),
        "frames_before_start": ("drop", _choice("drop", "config")),
    },
    "geometry": {key: (None, _geometry_value(key)) for key in GEOMETRY_KEYS},
    "calibration": {
        # "auto": area when a training-grid pixel spans >= 2 detector pixels, else bilinear
        "method": ("auto", _choice("auto", "bilinear", "area")),
        "saturation_value": (0, _nonneg_num),  # 0 = none
        "use_stream_mask": (True, _bool),
        # the start message's flatfield: "auto" applies it only when the detector says it did
        # not (V2 flatfield_enabled / V1 flatfield_correction_applied false); "apply"; "off"
        "flatfield": ("auto", _choice("auto", "apply", "off")),
    },
    "assembly": {
        # "auto": user_data[axis_key] when a frame has it, else the image-id order (warned once per series)
        "axis_from": ("auto", _choice("auto", "user_data", "image_id")),
        "axis_key": ("axis", _str),
        "axis_order": (list(AXES), _axis_order),
        "sample_key": ("sample_id", _str),
        "timeout_seconds": (5.0, _pos_num),
        "publish_partial": (True, _bool),
        "max_open_samples": (1000, _pos_int),  # beyond: the oldest open sample is closed as partial
    },
    "pipeline": {
        "workers": (2, _pos_int),
        "queue_size": (64, _pos_int),
        "max_batch": (16, _pos_int),
        "latency_budget_seconds": (0.02, _nonneg_num),
        "shaping_method": ("fast", _choice("fast", "reference")),
        "inference_threads": (0, _nonneg_int),  # 0 = the cores the shaping workers leave
        # auto: each view through the per-view graph once, predictions from the sums (when the
        # backend has one); off: the whole graph over every request's views (the previous path)
        "view_inference": ("auto", _choice("auto", "off")),
        # frames arriving while queue_size are waiting: drop the oldest waiting (fresh frames win),
        # drop the new one, or block the sender (back-pressure up to the detector)
        "overload": ("drop_oldest", _choice("drop_oldest", "drop_new", "block")),
        # measure the symmetry evidence of every frame (workers) and publish it per sample
        "evidence": (True, _bool),
        # with more than queue_size / 2 frames waiting for the workers or the inference thread, or a
        # request waiting for the combine thread longer than evidence_max_lag_seconds, a new sample goes
        # without evidence ("shed", said in its messages and counted evidence_shed) so that the daemon
        # keeps up instead of dropping or blocking frames; "keep": never
        "evidence_under_load": ("shed", _choice("shed", "keep")),
        "evidence_max_lag_seconds": (1.0, _nonneg_num),
        # a batch's open-set match, fusion and messages on a thread of their own, while the
        # inference thread runs the next batch's network (false: all on the inference thread)
        "publish_thread": (True, _bool),
    },
    "index": {
        "enabled": (True, _bool),
        "neighbours": (5, _pos_int),
        # which predictions get the open-set match: "final" (a sample's last; partial ones carry
        # open_set null) or "every" (partial ones too, ~1 ms CPU per request more)
        "query": ("final", _choice("final", "every")),
    },
    "publish": {
        "address": (DEFAULT_PUBLISH_ADDRESS, _address),
        "mode": ("bind", _choice("connect", "bind")),
        "topic": (DEFAULT_TOPIC, _str),
        "metrics_interval_seconds": (5.0, _nonneg_num),  # 0 = no metrics messages
        "send_hwm": (10000, _pos_int),
        "curve_secret_key_file": ("", _str),  # "" = no CURVE; else zmq.auth secret certificate of the PUB
        "curve_public_keys_dir": ("", _str),  # public certificates of the subscribers allowed in
    },
    "metrics": {  # Prometheus /metrics, /healthz, /readyz over HTTP (xtalsym/daemon/httpd.py)
        "enabled": (True, _bool),
        "address": (DEFAULT_METRICS_ADDRESS, _host),
        "port": (DEFAULT_METRICS_PORT, _port),
        "heartbeat_timeout_seconds": (10.0, _pos_num),  # /healthz fails when a loop is quiet longer
    },
}


@dataclass(frozen=True)
class DaemonConfig:
    """Validated configuration; ``sections[name][key]`` with every default filled in."""

    sections: dict = field(default_factory=dict)
    source: str = "defaults"

    def __getattr__(self, name: str) -> Any:
        sections = object.__getattribute__(self, "sections")
        if name in sections:
            return _Section(sections[name])
        raise AttributeError(name)

    @property
    def geometry_override(self) -> dict:
        return {k: v for k, v in self.sections["geometry"].items() if v is not None}

    def to_dict(self) -> dict:
        return {name: {k: v for k, v in values.items() if v is not None} for name, values in self.sections.items()}

    def to_toml(self) -> str:
        lines = [f"# resolved xtalsym daemon configuration (from {self.source})"]
        for name, values in self.to_dict().items():
            lines.append(f"\n[{name}]")
            for k, v in values.items():
                lines.append(f"{k} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"


class _Section:
    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"Section({self.__dict__})"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def validate(data: dict, source: str = "config") -> DaemonConfig:
    """Check ``data`` (parsed TOML) against :data:`SCHEMA`; ConfigError lists every error."""
    errors: list[str] = []
    sections: dict = {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a table, got {type(data).__name__}"], source)
    for name in data:
        if name not in SCHEMA:
            errors.append(f"[{name}]: unknown section (known: {', '.join(SCHEMA)})")
    for name, keys in SCHEMA.items():
        given = data.get(name, {})
        if not isinstance(given, dict):
            errors.append(f"[{name}] = {given!r}: must be a table")
            given = {}
        for key in given:
            if key not in keys:
                errors.append(f"{name}.{key} = {given[key]!r}: unknown key (known: {', '.join(keys)})")
        values = {}
        for key, (default, check) in keys.items():
            value = given.get(key, default)
            if key in given:
                problem = check(value)
                if problem:
                    errors.append(f"{name}.{key} = {value!r}: {problem}")
            if isinstance(value, int) and not isinstance(value, bool) and isinstance(default, float):
                value = float(value)
            values[key] = list(value) if isinstance(value, list) else value
        sections[name] = values
    if errors:
        raise ConfigError(errors, source)
    return DaemonConfig(sections=sections, source=source)


def load_config(path: str | Path | None = None, *, overrides: dict | None = None) -> DaemonConfig:
    """Read and validate a TOML file (None = defaults), then apply ``overrides`` {section: {key: value}}."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError([f"{path}: no such file"], source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"not valid TOML: {exc}"], source) from None
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    return validate(data, source)


def defaults() -> dict:
    """{section: {key: default}} as documented."""
    return {name: {k: d for k, (d, _) in keys.items()} for name, keys in SCHEMA.items()}


__all__ = ["AXES", "ConfigError", "DaemonConfig", "DEFAULT_INGEST_ADDRESS", "DEFAULT_METRICS_ADDRESS",
           "DEFAULT_METRICS_PORT", "DEFAULT_PUBLISH_ADDRESS", "DEFAULT_TOPIC", "METRICS_TOPIC", "SCHEMA", "defaults",
           "load_config", "validate"]
