"""DECTRIS SIMPLON stream V2: one single-part CBOR message per event.

Spec: github.com/dectris/documentation, stream_v2/README.md (types start, image, end),
RFC 8746 (tag 40 row-major / 1040 column-major multi-dim arrays, typed arrays) and the
DECTRIS compression tag 56500 [algorithm, element size, bytes] in HDF5-filter framing.
Units in, per spec: beam centre in pixels, pixel size in m, incident_wavelength in
angstrom (converted to m), incident_energy in eV.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import cbor2
import numpy as np

from .common import (
    ANGSTROM_M,
    DEFAULT_MAX_PIXELS,
    HC_EV_ANGSTROM,
    BadMessage,
    CompressedFrame,
    Event,
    Image,
    SeriesEnd,
    SeriesStart,
    _short,
    as_seconds,
    bslz4_compress,
    decompress_framed,
    deferred,
    dims_2d,
    failed_as,
    hdf5_lz4_compress,
    optional,
    optional_number,
    plain,
    require,
)

SELF_DESCRIBE = b"\xd9\xd9\xf7"
TAG_MULTIDIM_ROW = 40
TAG_MULTIDIM_COL = 1040
TAG_COMPRESSION = 56500

TYPED_ARRAY_TAGS: dict[int, str] = {
    64: "|u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "|u1",
    69: "<u2", 70: "<u4", 71: "<u8",
    72: "|i1", 73: ">i2", 74: ">i4", 75: ">i8",
    77: "<i2", 78: "<i4", 79: "<i8",
    80: ">f2", 81: ">f4", 82: ">f8",
    84: "<f2", 85: "<f4", 86: "<f8",
}  # fmt: skip
DTYPE_TO_TAG: dict[str, int] = {
    "uint8": 64, "uint16": 69, "uint32": 70, "uint64": 71,
    "int8": 72, "int16": 77, "int32": 78, "int64": 79,
    "float16": 84, "float32": 85, "float64": 86,
}  # fmt: skip
MESSAGE_TYPES = ("start", "image", "end")
MAX_MESSAGE_BYTES = 1 << 31


# ---------------------------------------------------------------- decoding


def decode_stream_v2(frames: list[bytes], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                     defer_decompression: bool = False) -> Event:
    """Decode one stream V2 ZeroMQ message (exactly one frame) into an event.

    ``defer_decompression``: compressed image data become :class:`CompressedFrame` (checked,
    decompressed later by whoever needs the pixels)."""
    if not isinstance(frames, (list, tuple)) or len(frames) != 1:
        n = len(frames) if isinstance(frames, (list, tuple)) else type(frames).__name__
        raise BadMessage("bad_frames", f"stream V2 messages have 1 frame, got {n}")
    msg = _load(frames[0])
    kind = msg.get("type")
    if kind == "image":
        return _image(msg, max_pixels, defer_decompression)
    if kind == "start":
        try:
            return _start(msg, max_pixels)
        except BadMessage as exc:
            raise failed_as(exc, "start", msg.get("series_id")) from None
    if kind == "end":
        return SeriesEnd(
            series_id=_series_id(msg, "end"),
            series_unique_id=optional(msg, "series_unique_id", str, "end"),
        )
    if "type" not in msg:
        raise BadMessage("missing_field", "stream V2 message has no 'type'")
    raise BadMessage("unknown_type", f"stream V2 message type {_short(kind)}")


def decode_stream_v2_parts(frames: list[bytes], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                           defer_decompression: bool = False) -> list[Event | BadMessage]:
    """One ZeroMQ message -> the events of the stream V2 messages it carries, in order.

    Normally one. A start that arrived together with the next message(s) as one multipart
    ZeroMQ message (seen from an EIGER-compatible stream: start and image 0 as two parts)
    gives the start and then each further part decoded on its own (a part that does not
    decode is its BadMessage in the list). Anything else with several parts is
    ``bad_frames``, as :func:`decode_stream_v2` says.
    """
    if isinstance(frames, (list, tuple)) and len(frames) > 1:
        try:
            first = decode_stream_v2(frames[:1], max_pixels=max_pixels)
        except BadMessage:
            first = None
        if isinstance(first, SeriesStart):
            out: list[Event | BadMessage] = [first]
            for part in frames[1:]:
                try:
                    out.append(decode_stream_v2([part], max_pixels=max_pixels,
                                                defer_decompression=defer_decompression))
                except BadMessage as exc:
                    out.append(exc)
            return out
    return [decode_stream_v2(frames, max_pixels=max_pixels, defer_decompression=defer_decompression)]


def _load(frame: Any) -> dict:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise BadMessage("bad_frames", f"frame is {type(frame).__name__}, not bytes")
    if len(frame) > MAX_MESSAGE_BYTES:
        raise BadMessage("too_large", f"message of {len(frame)} bytes")
    try:
        msg = cbor2.loads(bytes(frame), max_depth=64)
    except Exception as exc:  # noqa: BLE001 - CBORDecodeError, RecursionError, MemoryError...
        raise BadMessage("not_cbor", f"{type(exc).__name__}: {_short(str(exc))}") from None
    if isinstance(msg, cbor2.CBORTag):
        raise BadMessage("bad_tag", f"top-level tag {msg.tag}, expected a map (tag 55799)")
    if not _is_map(msg):  # cbor2 >= 6 returns frozendict inside tag 55799
        raise BadMessage("bad_field", f"top level is {type(msg).__name__}, not a map")
    return msg


def _is_map(value: Any) -> bool:
    return isinstance(value, dict) or type(value).__name__ == "frozendict"


def _series_id(msg: Any, where: str) -> int:
    value = require(msg, "series_id", int, where)
    if value < 0:
        raise BadMessage("bad_field", f"{where} series_id is negative: {value}")
    return value


def _image(msg: Any, max_pixels: int, defer: bool = False) -> Image:
    series_id = _series_id(msg, "image")
    image_id = require(msg, "image_id", int, "image")
    if image_id < 0:
        raise BadMessage("bad_field", f"image image_id is negative: {image_id}")
    data = require(msg, "data", object, "image")
    if not _is_map(data) or not data:
        raise BadMessage("bad_field", f"image 'data' must be a non-empty map: {_short(data)}")
    arrays: dict[str, np.ndarray] = {}
    budget = [max_pixels]  # every array of the message shares one max_pixels budget
    for channel, value in data.items():
        if not isinstance(channel, str):
            raise BadMessage("bad_field", f"image channel name {_short(channel)} is not text")
        arrays[channel] = _spend(decode_multidim(value, f"image data[{channel!r}]", budget[0], defer=defer),
                                 budget)
    known = {"type", "series_id", "image_id", "data", "user_data", "series_unique_id",
             "real_time", "start_time", "stop_time"}  # fmt: skip
    extra = {k: plain(v) for k, v in msg.items() if k not in known and isinstance(k, str)}
    return Image(
        series_id=series_id,
        image_id=image_id,
        data=arrays,
        user_data=plain(msg.get("user_data")),
        real_time=as_seconds(msg.get("real_time"), "real_time", "image"),
        start_time=as_seconds(msg.get("start_time"), "start_time", "image"),
        stop_time=as_seconds(msg.get("stop_time"), "stop_time", "image"),
        series_unique_id=optional(msg, "series_unique_id", str, "image"),
        extra=_untag(extra, budget),
    )


GEOMETRY_FIELDS = {"beam_center_x_px": "beam_center_x", "beam_center_y_px": "beam_center_y",
                   "pixel_size_x_m": "pixel_size_x", "pixel_size_y_m": "pixel_size_y",
                   "image_size_x_px": "image_size_x", "image_size_y_px": "image_size_y"}


def _start(msg: Any, max_pixels: int) -> SeriesStart:
    series_id = _series_id(msg, "start")
    warnings: list[str] = []
    wavelength_a = optional_number(msg, "incident_wavelength", "start")
    energy_ev = optional_number(msg, "incident_energy", "start")
    if wavelength_a is not None and wavelength_a <= 0:
        raise BadMessage("bad_field", f"start incident_wavelength {wavelength_a} <= 0")
    fields = {k: v for k, v in GEOMETRY_FIELDS.items() if msg.get(v) is not None}
    if wavelength_a is not None:
        fields["wavelength_m"] = "incident_wavelength"
    elif energy_ev is not None and energy_ev > 0:
        wavelength_a = HC_EV_ANGSTROM / energy_ev
        fields["wavelength_m"] = "incident_energy"
    distance = optional_number(msg, "detector_distance", "start")
    if distance is not None:
        fields["detector_distance_m"] = "detector_distance"
    else:
        distance = _distance_from_translation(msg.get("detector_translation"), warnings)
        if distance is not None:
            fields["detector_distance_m"] = "detector_translation[2]"
    geometry = {
        "beam_center_x_px": optional_number(msg, "beam_center_x", "start"),
        "beam_center_y_px": optional_number(msg, "beam_center_y", "start"),
        "pixel_size_x_m": optional_number(msg, "pixel_size_x", "start"),
        "pixel_size_y_m": optional_number(msg, "pixel_size_y", "start"),
        "wavelength_m": None if wavelength_a is None else wavelength_a * ANGSTROM_M,
        "detector_distance_m": distance,
        "image_size_x_px": optional(msg, "image_size_x", int, "start"),
        "image_size_y_px": optional(msg, "image_size_y", int, "start"),
    }
    channels = msg.get("channels") or []
    if not isinstance(channels, (list, tuple)) or not all(isinstance(c, str) for c in channels):
        raise BadMessage("bad_field", f"start channels must be text strings: {_short(channels)}")
    per_channel = {}
    budget = [max_pixels]
    for key in ("pixel_mask", "flatfield"):
        per_channel[key] = _per_channel_arrays(msg.get(key), key, budget, warnings)
    raw = {
        k: v for k, v in msg.items() if isinstance(k, str) and k not in ("pixel_mask", "flatfield")
    }
    return SeriesStart(
        series_id=series_id,
        series_unique_id=optional(msg, "series_unique_id", str, "start"),
        geometry=geometry,
        channels=list(channels),
        image_dtype=optional(msg, "image_dtype", str, "start"),
        number_of_images=optional(msg, "number_of_images", int, "start"),
        user_data=plain(msg.get("user_data")),
        pixel_mask=per_channel["pixel_mask"],
        flatfield=per_channel["flatfield"],
        raw=_untag(plain(raw), budget),
        warnings=tuple(warnings),
        geometry_fields=fields,
    )


def _distance_from_translation(translation: Any, warnings: list[str]) -> float | None:
    """``detector_translation[2]`` (m) as the detector distance, only when it is a number > 0.

    The spec has no distance; some detectors send only their translation stage position,
    whose z can be negative (seen: -0.237): that is not a sample-detector distance, so it
    is never taken; the warning names the fix."""
    if translation is None:
        return None
    z = translation[2] if isinstance(translation, (list, tuple)) and len(translation) == 3 else None
    if isinstance(z, (int, float)) and not isinstance(z, bool) and math.isfinite(z) and z > 0:
        return float(z)
    warnings.append(f"detector_translation = {_short(plain(translation))}: its z is not a distance > 0, "
                    "so it is not used as the detector distance; set [geometry] detector_distance_m")
    return None


def _per_channel_arrays(value: Any, key: str, budget: list[int], warnings: list[str]) -> dict | None:
    """A start's pixel_mask / flatfield (map channel -> tag 40 array); a part in any other
    encoding is left out with a warning: one odd part must not lose the whole series."""
    if value is None:
        return None
    if not _is_map(value):
        kind = f"{len(value)} raw bytes" if isinstance(value, (bytes, bytearray)) else type(value).__name__
        warnings.append(f"start {key} is {kind}, not a map channel -> tagged array: {key} ignored")
        return None
    out = {}
    for ch, arr in value.items():
        try:
            out[str(ch)] = _spend(decode_multidim(arr, f"start {key}[{ch!r}]", budget[0]), budget)
        except BadMessage as exc:
            warnings.append(f"start {key}[{_short(ch)}] ignored: {exc}")
    return out or None


def _spend(array: np.ndarray, budget: list[int]) -> np.ndarray:
    """Charge ``array`` to the message's remaining element budget (a one-item list)."""
    budget[0] -= array.size
    return array


def _untag(value: Any, budget: list[int], depth: int = 0) -> Any:
    """Decode typed/multi-dim arrays left in ``raw``; other tags as {'cbor_tag', 'value'}.

    Arrays here share the message's ``budget`` of elements: without it, every extra field
    could hold its own max_pixels array (a small compressed message, gigabytes decoded).
    """
    if depth > 100:
        raise BadMessage("bad_field", "nesting deeper than 100")
    if isinstance(value, cbor2.CBORTag):
        if value.tag in (TAG_MULTIDIM_ROW, TAG_MULTIDIM_COL):
            return _spend(decode_multidim(value, "extra field", budget[0]), budget)
        if value.tag in TYPED_ARRAY_TAGS:
            return _spend(decode_typed_array(value, None, "extra field", budget[0]), budget)
        return {"cbor_tag": value.tag, "value": _untag(plain(value.value), budget, depth + 1)}
    if isinstance(value, dict):
        return {k: _untag(v, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag(v, budget, depth + 1) for v in value]
    return value


def decode_multidim(value: Any, where: str, max_pixels: int, *, defer: bool = False) -> np.ndarray | CompressedFrame:
    """Tag 40 / 1040 [dims, typed array] -> C-contiguous 2-D array, native byte order
    (``defer``: a compressed typed array becomes a :class:`CompressedFrame`)."""
    if not isinstance(value, cbor2.CBORTag) or value.tag not in (
        TAG_MULTIDIM_ROW,
        TAG_MULTIDIM_COL,
    ):
        tag = value.tag if isinstance(value, cbor2.CBORTag) else type(value).__name__
        raise BadMessage("bad_tag", f"{where}: expected tag 40 or 1040, got {_short(tag)}")
    body = value.value
    if not isinstance(body, (list, tuple)) or len(body) != 2:
        raise BadMessage("bad_tag", f"{where}: tag {value.tag} must hold [dims, typed array]")
    dims = dims_2d(body[0], where, max_pixels)
    order = "F" if value.tag == TAG_MULTIDIM_COL else "C"
    if defer:
        lazy = _deferred_typed_array(body[1], dims, order, where)
        if lazy is not None:
            return lazy
    flat = decode_typed_array(body[1], dims[0] * dims[1], where, max_pixels)
    return np.ascontiguousarray(flat.reshape(dims, order=order))


def decode_typed_array(
    value: Any, count: int | None, where: str, max_pixels: int
) -> np.ndarray:
    """RFC 8746 typed array (possibly compressed with tag 56500) -> 1-D native array."""
    if not isinstance(value, cbor2.CBORTag) or value.tag not in TYPED_ARRAY_TAGS:
        tag = value.tag if isinstance(value, cbor2.CBORTag) else type(value).__name__
        raise BadMessage("bad_dtype", f"{where}: not a supported typed array tag: {_short(tag)}")
    dtype = np.dtype(TYPED_ARRAY_TAGS[value.tag])
    payload = value.value
    if isinstance(payload, cbor2.CBORTag) and payload.tag == TAG_COMPRESSION:
        if count is None:  # a bare compressed typed array: size only from its header
            raise BadMessage("bad_tag", f"{where}: compressed typed array outside tag 40")
        payload = _decompress(payload, dtype, count * dtype.itemsize, where)
    elif isinstance(payload, cbor2.CBORTag):
        raise BadMessage("bad_tag", f"{where}: unknown tag {payload.tag} inside typed array")
    if not isinstance(payload, (bytes, bytearray)):
        raise BadMessage("bad_tag", f"{where}: typed array holds {type(payload).__name__}")
    if len(payload) % dtype.itemsize:
        raise BadMessage(
            "shape_mismatch", f"{where}: {len(payload)} bytes is not a multiple of {dtype}"
        )
    n = len(payload) // dtype.itemsize
    if count is not None and n != count:
        raise BadMessage(
            "shape_mismatch", f"{where}: {n} elements of {dtype.str}, dims need {count}"
        )
    if n > max_pixels:
        raise BadMessage("too_large", f"{where}: {n} elements exceed max_pixels={max_pixels}")
    array = np.frombuffer(payload, dtype=dtype)
    return array.astype(dtype.newbyteorder("="), copy=True)  # writable, native order


def _deferred_typed_array(value: Any, dims: tuple[int, int], order: str, where: str) -> CompressedFrame | None:
    """A compressed typed array checked like :func:`decode_typed_array` but left compressed; None
    when the payload is not compressed (then decoded at once: there is nothing to save)."""
    if not isinstance(value, cbor2.CBORTag) or value.tag not in TYPED_ARRAY_TAGS:
        return None
    payload = value.value
    if not (isinstance(payload, cbor2.CBORTag) and payload.tag == TAG_COMPRESSION):
        return None
    dtype = np.dtype(TYPED_ARRAY_TAGS[value.tag])
    algorithm, blob = _compression_parts(payload, dtype, where)
    rows, cols = dims
    return deferred(blob, algorithm, dtype, (rows, cols), where, order)


def _compression_parts(tag: cbor2.CBORTag, dtype: np.dtype, where: str) -> tuple[str, bytes]:
    """The checked (algorithm, blob) of a tag 56500 [algorithm, elem size, bytes]."""
    body = tag.value
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        raise BadMessage("bad_tag", f"{where}: tag 56500 must hold [algorithm, elem size, bytes]")
    algorithm, elem_size, blob = body
    if not isinstance(algorithm, str):
        raise BadMessage("bad_compression", f"{where}: algorithm {_short(algorithm)}")
    if not isinstance(elem_size, int) or isinstance(elem_size, bool):
        raise BadMessage("bad_compression", f"{where}: element size {_short(elem_size)}")
    if not isinstance(blob, (bytes, bytearray)):
        raise BadMessage("bad_tag", f"{where}: compressed data is {type(blob).__name__}")
    if algorithm == "bslz4" and elem_size != dtype.itemsize:
        raise BadMessage(
            "bad_dtype", f"{where}: bslz4 element size {elem_size} but typed array is {dtype.str}"
        )
    return algorithm, blob


def _decompress(tag: cbor2.CBORTag, dtype: np.dtype, nbytes: int, where: str) -> bytes:
    algorithm, blob = _compression_parts(tag, dtype, where)
    return decompress_framed(blob, algorithm, dtype.itemsize, nbytes, where)


# ---------------------------------------------------------------- encoding


def encode_multidim(
    array: np.ndarray, *, compression: str | None = "bslz4", column_major: bool = False
) -> cbor2.CBORTag:
    """2-D array -> tag 40 (or 1040) [dims, typed array], optionally compressed."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {array.shape}")
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    if array.dtype.name not in DTYPE_TO_TAG:
        raise ValueError(f"dtype {array.dtype} has no typed-array tag here")
    data = array.astype(dtype, copy=False).tobytes(order="F" if column_major else "C")
    if compression == "bslz4":
        payload: Any = cbor2.CBORTag(
            TAG_COMPRESSION, ["bslz4", dtype.itemsize, bslz4_compress(data, dtype.itemsize)]
        )
    elif compression == "lz4":
        payload = cbor2.CBORTag(TAG_COMPRESSION, ["lz4", 0, hdf5_lz4_compress(data)])
    elif compression is None:
        payload = data
    else:
        raise ValueError(f"unknown compression {compression!r}")
    typed = cbor2.CBORTag(DTYPE_TO_TAG[array.dtype.name], payload)
    tag = TAG_MULTIDIM_COL if column_major else TAG_MULTIDIM_ROW
    return cbor2.CBORTag(tag, [list(array.shape), typed])


def _dump(message: dict) -> list[bytes]:
    return [SELF_DESCRIBE + cbor2.dumps(message)]


def _rational(seconds: float | None, time_base: int) -> list[int] | None:
    if seconds is None:
        return None
    if not math.isfinite(seconds):
        raise ValueError(f"time {seconds} is not finite")
    return [round(Fraction(seconds) * time_base), time_base]


def encode_stream_v2_start(
    *,
    series_id: int,
    geometry: dict[str, Any],
    channels: list[str],
    image_dtype: str,
    number_of_images: int,
    series_unique_id: str | None = None,
    user_data: Any = None,
    pixel_mask: dict[str, np.ndarray] | None = None,
    flatfield: dict[str, np.ndarray] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[bytes]:
    """A start message; ``geometry`` uses GEOMETRY_KEYS (SI), written in spec units.

    ``detector_distance`` (m) is not in the DECTRIS spec; it is written as an extra field
    (the decoder reads it, else falls back to detector_translation[2]).
    """
    msg: dict[str, Any] = {"type": "start", "series_id": series_id}
    if series_unique_id is not None:
        msg["series_unique_id"] = series_unique_id
    spec_names = {
        "beam_center_x_px": "beam_center_x",
        "beam_center_y_px": "beam_center_y",
        "pixel_size_x_m": "pixel_size_x",
        "pixel_size_y_m": "pixel_size_y",
        "detector_distance_m": "detector_distance",
        "image_size_x_px": "image_size_x",
        "image_size_y_px": "image_size_y",
    }
    for ours, theirs in spec_names.items():
        if geometry.get(ours) is not None:
            msg[theirs] = geometry[ours]
    if geometry.get("wavelength_m") is not None:
        msg["incident_wavelength"] = geometry["wavelength_m"] / ANGSTROM_M
    msg.update(channels=list(channels), image_dtype=image_dtype, number_of_images=number_of_images)
    if user_data is not None:
        msg["user_data"] = user_data
    for key, maps in (("pixel_mask", pixel_mask), ("flatfield", flatfield)):
        if maps is not None:
            msg[key] = {ch: encode_multidim(a, compression="bslz4") for ch, a in maps.items()}
    msg.update(extra or {})
    return _dump(msg)


def encode_stream_v2_image(
    *,
    series_id: int,
    image_id: int,
    data: dict[str, np.ndarray],
    compression: str | None = "bslz4",
    column_major: bool = False,
    series_unique_id: str | None = None,
    user_data: Any = None,
    real_time: float | None = None,
    start_time: float | None = None,
    stop_time: float | None = None,
    time_base: int = 50_000_000,
) -> list[bytes]:
    """An image message; times in seconds become rationals over ``time_base``."""
    msg: dict[str, Any] = {"type": "image", "series_id": series_id, "image_id": image_id}
    if series_unique_id is not None:
        msg["series_unique_id"] = series_unique_id
    for key, seconds in (("real_time", real_time), ("start_time", start_time),
                         ("stop_time", stop_time)):  # fmt: skip
        if seconds is not None:
            msg[key] = _rational(seconds, time_base)
    if user_data is not None:
        msg["user_data"] = user_data
    msg["data"] = {
        ch: encode_multidim(a, compression=compression, column_major=column_major)
        for ch, a in data.items()
    }
    return _dump(msg)


def encode_stream_v2_end(*, series_id: int, series_unique_id: str | None = None) -> list[bytes]:
    msg: dict[str, Any] = {"type": "end", "series_id": series_id}
    if series_unique_id is not None:
        msg["series_unique_id"] = series_unique_id
    return _dump(msg)
