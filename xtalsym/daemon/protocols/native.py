"""The xtalsym native stream format: a JSON header frame [+ one raw array frame].

See docs/PROTOCOLS.md for the schema. Images are little-endian C-order arrays, shape
[rows, cols], optionally compressed as one raw LZ4 block ("compression": "lz4").
"""

from __future__ import annotations

import json
from typing import Any

import lz4.block
import numpy as np

from .common import (
    DEFAULT_MAX_PIXELS,
    GEOMETRY_KEYS,
    BadMessage,
    CompressedFrame,
    Event,
    Image,
    SeriesEnd,
    SeriesStart,
    _short,
    deferred,
    dims_2d,
    failed_as,
    json_object,
    lz4_block_decompress,
    optional,
    optional_number,
    require,
)

VERSION = 1
DTYPES = ("|u1", "<u2", "<u4", "|i1", "<i2", "<i4", "<f4", "<f8")
INT_GEOMETRY = ("image_size_x_px", "image_size_y_px")


def decode_native(frames: list[bytes], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                  defer_decompression: bool = False) -> Event:
    """Decode a native message: [header] for start/end, [header, payload] for image
    (``defer_decompression``: an lz4 payload becomes a :class:`CompressedFrame`)."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise BadMessage("bad_frames", "native message has no frames")
    head = json_object(frames[0], "native header")
    if "xtalsym" not in head:
        raise BadMessage("missing_field", "native header has no 'xtalsym' version")
    if head["xtalsym"] != VERSION or isinstance(head["xtalsym"], bool):
        raise BadMessage("bad_field", f"native version {_short(head['xtalsym'])}, expected 1")
    kind = require(head, "type", str, "native header")
    expected = 2 if kind == "image" else 1
    if kind not in ("start", "image", "end"):
        raise BadMessage("unknown_type", f"native type {_short(kind)}")
    if len(frames) != expected:
        raise BadMessage("bad_frames", f"native {kind} has {expected} frame(s), got {len(frames)}")
    series_id = require(head, "series_id", int, kind)
    if series_id < 0:
        raise BadMessage("bad_field", f"{kind} series_id is negative: {series_id}")
    unique = optional(head, "series_unique_id", str, kind)
    if kind == "end":
        return SeriesEnd(series_id=series_id, series_unique_id=unique)
    if kind == "start":
        try:
            return _start(head, series_id, unique)
        except BadMessage as exc:
            raise failed_as(exc, "start", series_id) from None
    return _image(head, frames[1], series_id, unique, max_pixels, defer_decompression)


def _start(head: dict, series_id: int, unique: str | None) -> SeriesStart:
    geometry: dict[str, Any] = {}
    for key in GEOMETRY_KEYS:
        if key in INT_GEOMETRY:
            geometry[key] = optional(head, key, int, "start")
        else:
            geometry[key] = optional_number(head, key, "start")
    square = optional_number(head, "pixel_size_m", "start")
    for key in ("pixel_size_x_m", "pixel_size_y_m"):
        if geometry[key] is None:
            geometry[key] = square
    channels = head.get("channels", ["image"])
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise BadMessage("bad_field", f"start channels {_short(channels)}")
    return SeriesStart(
        series_id=series_id,
        series_unique_id=unique,
        geometry=geometry,
        channels=channels,
        image_dtype=optional(head, "dtype", str, "start"),
        number_of_images=optional(head, "number_of_images", int, "start"),
        user_data=head.get("user_data"),
        raw=head,
        geometry_fields={k: (k if head.get(k) is not None else "pixel_size_m") for k in GEOMETRY_KEYS
                         if geometry[k] is not None},
    )


def _image(
    head: dict, payload: Any, series_id: int, unique: str | None, max_pixels: int, defer: bool = False
) -> Image:
    image_id = require(head, "image_id", int, "image")
    if image_id < 0:
        raise BadMessage("bad_field", f"image image_id is negative: {image_id}")
    dtype_name = require(head, "dtype", str, "image")
    if dtype_name not in DTYPES:
        raise BadMessage("bad_dtype", f"image dtype {_short(dtype_name)} not in {DTYPES}")
    dtype = np.dtype(dtype_name)
    rows, cols = dims_2d(require(head, "shape", list, "image"), "image shape", max_pixels)
    nbytes = rows * cols * dtype.itemsize
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise BadMessage("bad_frames", f"image payload is {type(payload).__name__}")
    payload = bytes(payload)
    compression = head.get("compression")
    lazy: CompressedFrame | None = None
    if compression == "lz4" and defer:
        lazy = deferred(payload, "lz4_block", dtype, (rows, cols), "image payload")
    elif compression == "lz4":
        payload = lz4_block_decompress(payload, nbytes, "image payload")
    elif compression is not None:
        raise BadMessage("bad_compression", f"image compression {_short(compression)}")
    if lazy is None and len(payload) != nbytes:
        reason = "truncated" if len(payload) < nbytes else "shape_mismatch"
        raise BadMessage(
            reason, f"image payload {len(payload)} bytes, shape {[rows, cols]} x {dtype} = {nbytes}"
        )
    array = lazy if lazy is not None else np.frombuffer(payload, dtype=dtype).reshape(rows, cols)
    channel = head.get("channel", "image")
    if not isinstance(channel, str):
        raise BadMessage("bad_field", f"image channel {_short(channel)}")
    return Image(
        series_id=series_id,
        image_id=image_id,
        data={channel: lazy if lazy is not None else array.astype(dtype.newbyteorder("="))},
        user_data=head.get("user_data"),
        real_time=optional_number(head, "real_time_s", "image"),
        start_time=optional_number(head, "start_time_s", "image"),
        stop_time=optional_number(head, "stop_time_s", "image"),
        series_unique_id=unique,
    )


def _j(obj: dict) -> bytes:
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()


def encode_native_start(
    *,
    series_id: int,
    geometry: dict[str, Any],
    series_unique_id: str | None = None,
    channels: list[str] | None = None,
    dtype: str | None = None,
    number_of_images: int | None = None,
    user_data: Any = None,
) -> list[bytes]:
    """Start message; ``geometry`` keys are GEOMETRY_KEYS (SI units, None = unknown)."""
    head: dict[str, Any] = {"xtalsym": VERSION, "type": "start", "series_id": series_id}
    if series_unique_id is not None:
        head["series_unique_id"] = series_unique_id
    head.update({k: geometry[k] for k in GEOMETRY_KEYS if geometry.get(k) is not None})
    optional_keys = (("channels", channels), ("dtype", dtype),
                     ("number_of_images", number_of_images), ("user_data", user_data))  # fmt: skip
    for key, value in optional_keys:
        if value is not None:
            head[key] = value
    return [_j(head)]


def encode_native_image(
    *,
    series_id: int,
    image_id: int,
    array: np.ndarray,
    compression: str | None = None,
    series_unique_id: str | None = None,
    user_data: Any = None,
    channel: str = "image",
    real_time: float | None = None,
    start_time: float | None = None,
    stop_time: float | None = None,
) -> list[bytes]:
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    if dtype.str not in DTYPES or array.ndim != 2:
        raise ValueError(f"cannot encode {array.dtype} {array.shape} in the native format")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    if compression == "lz4":
        data = lz4.block.compress(data, store_size=False)
    elif compression is not None:
        raise ValueError(f"unknown compression {compression!r}")
    head: dict[str, Any] = {
        "xtalsym": VERSION, "type": "image", "series_id": series_id, "image_id": image_id,
        "dtype": dtype.str, "shape": list(array.shape),
    }  # fmt: skip
    optional_keys = (("series_unique_id", series_unique_id), ("compression", compression),
                     ("user_data", user_data), ("real_time_s", real_time),
                     ("start_time_s", start_time), ("stop_time_s", stop_time))  # fmt: skip
    head.update({k: v for k, v in optional_keys if v is not None})
    if channel != "image":
        head["channel"] = channel
    return [_j(head), data]


def encode_native_end(*, series_id: int, series_unique_id: str | None = None) -> list[bytes]:
    head: dict[str, Any] = {"xtalsym": VERSION, "type": "end", "series_id": series_id}
    if series_unique_id is not None:
        head["series_unique_id"] = series_unique_id
    return [_j(head)]
