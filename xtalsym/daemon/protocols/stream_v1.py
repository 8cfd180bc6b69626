"""DECTRIS SIMPLON stream V1 (legacy): multipart messages of JSON parts and blobs.

Series start ``dheader-1.0`` [+ detector config JSON when header_detail is basic/all]
[+ ``dflatfield-1.0``/``dpixelmask-1.0``/``dcountrate_table-1.0`` header + blob pairs
when all] [+ a header appendix part]; image: ``dimage-1.0``, ``dimage_d-1.0``, blob,
``dconfig-1.0`` [+ image appendix]; end: ``dseries_end-1.0``.
Shapes are [x, y] (width, height): numpy arrays are (y, x). Times in ns -> s.
Config units: beam_center_x/y px, x/y_pixel_size m, wavelength angstrom -> m,
photon_energy eV, detector_distance m.
"""

from __future__ import annotations

import json
from typing import Any

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
    bslz4_compress,
    decompress_framed,
    deferred,
    dims_2d,
    failed_as,
    json_object,
    lz4_block_decompress,
    optional,
    optional_number,
    require,
)

V1_TYPES = {"uint8": "|u1", "uint16": "<u2", "uint32": "<u4", "int32": "<i4", "float32": "<f4"}
BS_ENCODINGS = {"bs8-lz4<": 1, "bs16-lz4<": 2, "bs32-lz4<": 4}
ENCODINGS = ("<", "lz4<", *BS_ENCODINGS)
ARRAY_PART_HTYPES = {
    "dflatfield-1.0": "flatfield",
    "dpixelmask-1.0": "pixel_mask",
    "dcountrate_table-1.0": "countrate_table",
}


def decode_stream_v1(frames: list[bytes], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                     defer_decompression: bool = False) -> Event:
    """Decode one stream V1 multipart ZeroMQ message into an event (``defer_decompression``:
    a compressed image blob becomes a :class:`CompressedFrame`)."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise BadMessage("bad_frames", "stream V1 message has no frames")
    head = json_object(frames[0], "part 1")
    htype = head.get("htype")
    if htype == "dimage-1.0":
        return _image(head, frames, max_pixels, defer_decompression)
    if htype == "dheader-1.0":
        start, rest = _header_and_rest(head, frames, max_pixels)
        if rest:
            raise BadMessage("unknown_type", f"header part htype {_short(json_object(rest[0], 'part').get('htype'))}")
        return start
    if htype == "dseries_end-1.0":
        if len(frames) != 1:
            raise BadMessage("bad_frames", f"dseries_end-1.0 has 1 part, got {len(frames)}")
        return SeriesEnd(series_id=_series(head, "dseries_end-1.0"))
    if "htype" not in head:
        raise BadMessage("missing_field", "stream V1 part 1 has no 'htype'")
    raise BadMessage("unknown_type", f"stream V1 htype {_short(htype)}")


def _series(head: dict, where: str) -> int:
    value = require(head, "series", int, where)
    if value < 0:
        raise BadMessage("bad_field", f"{where} series is negative: {value}")
    return value


def _array(desc: dict, blob: Any, where: str, max_pixels: int, defer: bool = False) -> np.ndarray | CompressedFrame:
    """A described blob ({shape: [x, y], type, encoding}) -> (y, x) array."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise BadMessage("bad_frames", f"{where} blob is {type(blob).__name__}")
    blob = bytes(blob)
    shape = require(desc, "shape", list, where)
    x, y = dims_2d(shape, where, max_pixels)
    type_name = require(desc, "type", str, where)
    if type_name not in V1_TYPES:
        raise BadMessage("bad_dtype", f"{where} type {_short(type_name)} not in {sorted(V1_TYPES)}")
    dtype = np.dtype(V1_TYPES[type_name])
    encoding = desc.get("encoding", "<")
    if encoding not in ENCODINGS:
        raise BadMessage("bad_compression", f"{where} encoding {_short(encoding)}")
    nbytes = x * y * dtype.itemsize
    if defer and encoding != "<":
        if encoding in BS_ENCODINGS and BS_ENCODINGS[encoding] != dtype.itemsize:
            raise BadMessage("bad_dtype", f"{where} encoding {encoding} with type {type_name}")
        return deferred(blob, "lz4_block" if encoding == "lz4<" else "bslz4", dtype, (y, x), where)
    if encoding == "<":
        data = blob
    elif encoding == "lz4<":
        data = lz4_block_decompress(blob, nbytes, where)
    else:
        elem = BS_ENCODINGS[encoding]
        if elem != dtype.itemsize:
            raise BadMessage("bad_dtype", f"{where} encoding {encoding} with type {type_name}")
        data = decompress_framed(blob, "bslz4", elem, nbytes, where)
    if len(data) != nbytes:
        reason = "truncated" if len(data) < nbytes else "shape_mismatch"
        raise BadMessage(reason, f"{where}: {len(data)} bytes, shape {shape} x {dtype} = {nbytes}")
    return np.frombuffer(data, dtype=dtype).reshape(y, x).astype(dtype.newbyteorder("="))


def _image(head: dict, frames: list, max_pixels: int, defer: bool = False) -> Image:
    if len(frames) not in (4, 5):
        raise BadMessage("bad_frames", f"dimage-1.0 message has 4 or 5 parts, got {len(frames)}")
    series = _series(head, "dimage-1.0")
    frame = require(head, "frame", int, "dimage-1.0")
    if frame < 0:
        raise BadMessage("bad_field", f"dimage-1.0 frame is negative: {frame}")
    desc = json_object(frames[1], "part 2")
    if desc.get("htype") != "dimage_d-1.0":
        raise BadMessage("unknown_type", f"part 2 htype {_short(desc.get('htype'))}")
    array = _array(desc, frames[2], "dimage_d-1.0", max_pixels, defer)
    times = json_object(frames[3], "part 4")
    if times.get("htype") != "dconfig-1.0":
        raise BadMessage("unknown_type", f"part 4 htype {_short(times.get('htype'))}")
    seconds = {}
    for key in ("real_time", "start_time", "stop_time"):
        ns = optional_number(times, key, "dconfig-1.0")
        seconds[key] = None if ns is None else ns * 1e-9
    user_data = json_object(frames[4], "part 5") if len(frames) == 5 else None
    return Image(
        series_id=series,
        image_id=frame,
        data={"image": array},
        user_data=user_data,
        extra={"hash": head.get("hash")},
        **seconds,
    )


def decode_stream_v1_parts(frames: list[bytes], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                           defer_decompression: bool = False) -> list[Event | BadMessage]:
    """One ZeroMQ message -> its events: normally one; a series header followed in the same
    multipart message by the parts of an image (``dimage-1.0`` ...) gives the start and that
    image (its BadMessage when the image's parts do not decode)."""
    if isinstance(frames, (list, tuple)) and frames:
        head = json_object(frames[0], "part 1")
        if head.get("htype") == "dheader-1.0":
            start, rest = _header_and_rest(head, frames, max_pixels)
            if not rest:
                return [start]
            try:
                return [start, decode_stream_v1(rest, max_pixels=max_pixels, defer_decompression=defer_decompression)]
            except BadMessage as exc:
                return [start, exc]
    return [decode_stream_v1(frames, max_pixels=max_pixels, defer_decompression=defer_decompression)]


def _json_or_none(part: Any) -> dict | None:
    """A part as a JSON object, or None when it is not one (a blob)."""
    if not isinstance(part, (bytes, bytearray, memoryview)) or not bytes(part[:1]) == b"{":
        return None
    try:
        return json_object(part, "part")
    except BadMessage:
        return None


def _header_and_rest(head: dict, frames: list, max_pixels: int) -> tuple[SeriesStart, list]:
    """The series start, and the parts after it when an image follows in the same message."""
    try:
        return _header(head, frames, max_pixels)
    except BadMessage as exc:
        raise failed_as(exc, "start", head.get("series")) from None


def _header(head: dict, frames: list, max_pixels: int) -> tuple[SeriesStart, list]:
    series = _series(head, "dheader-1.0")
    detail = head.get("header_detail", "basic")
    if detail not in ("all", "basic", "none"):
        raise BadMessage("bad_field", f"dheader-1.0 header_detail {_short(detail)}")
    config: dict = {}
    rest = list(frames[1:])
    if detail != "none":
        if not rest:
            raise BadMessage("bad_frames", f"header_detail {detail} needs a config part")
        config = json_object(rest.pop(0), "config part")
    arrays: dict[str, np.ndarray] = {}
    user_data = None
    warnings: list[str] = []
    while rest:
        if (_json_or_none(rest[0]) or {}).get("htype") == "dimage-1.0":
            break  # an image in the same message: the caller decodes it
        part = json_object(rest.pop(0), "header part")
        htype = part.get("htype")
        kind = ARRAY_PART_HTYPES.get(htype) if isinstance(htype, str) else None  # a list is unhashable
        if kind is None:
            following = _json_or_none(rest[0]) if rest else None
            if not rest or (following or {}).get("htype") == "dimage-1.0":
                user_data = part  # header appendix, always the header's last part
                break
            if following is None:
                # an array part under a name we do not know (seen: "flatfield-1.0" for
                # "dflatfield-1.0"); its blob follows: leave both out, keep the series
                rest.pop(0)
                warnings.append(f"header part htype {_short(htype)} is not one of {sorted(ARRAY_PART_HTYPES)}: "
                                "ignored with its data part")
                continue
            raise BadMessage("unknown_type", f"header part htype {_short(htype)}")
        if not rest:
            raise BadMessage("bad_frames", f"{part['htype']} has no data part")
        used = sum(a.size for a in arrays.values())  # the header's arrays share max_pixels
        blob = rest.pop(0)
        try:
            arrays[kind] = _array(part, blob, part["htype"], max_pixels - used)
        except BadMessage as exc:  # one odd mask or flatfield must not lose the series
            warnings.append(f"{part['htype']} ignored: {exc}")
    geometry = _geometry(config)
    start = SeriesStart(
        series_id=series,
        series_unique_id=None,
        geometry=geometry,
        channels=["image"],
        image_dtype=_image_dtype(config),
        number_of_images=_n_images(config),
        user_data=user_data,
        pixel_mask=arrays.get("pixel_mask"),
        flatfield=arrays.get("flatfield"),
        raw={"header": head, "config": config,
             **({"countrate_table": arrays["countrate_table"]}
                if "countrate_table" in arrays else {})},
        warnings=tuple(warnings),
        geometry_fields=_geometry_fields(config, geometry),
    )  # fmt: skip
    return start, rest


_CONFIG_FIELDS = {"beam_center_x_px": "beam_center_x", "beam_center_y_px": "beam_center_y",
                  "pixel_size_x_m": "x_pixel_size", "pixel_size_y_m": "y_pixel_size", "wavelength_m": "wavelength",
                  "detector_distance_m": "detector_distance", "image_size_x_px": "x_pixels_in_detector",
                  "image_size_y_px": "y_pixels_in_detector"}


def _geometry_fields(config: dict, geometry: dict) -> dict[str, str]:
    """geometry key -> the config field it came from."""
    fields = {k: f"config {v}" for k, v in _CONFIG_FIELDS.items() if config.get(v) is not None}
    if geometry["wavelength_m"] is not None and "wavelength_m" not in fields:
        fields["wavelength_m"] = "config photon_energy"
    return fields


def _geometry(config: dict) -> dict:
    where = "config"
    wavelength_a = optional_number(config, "wavelength", where)
    energy = optional_number(config, "photon_energy", where)
    if wavelength_a is None and energy is not None and energy > 0:
        wavelength_a = HC_EV_ANGSTROM / energy
    return {
        "beam_center_x_px": optional_number(config, "beam_center_x", where),
        "beam_center_y_px": optional_number(config, "beam_center_y", where),
        "pixel_size_x_m": optional_number(config, "x_pixel_size", where),
        "pixel_size_y_m": optional_number(config, "y_pixel_size", where),
        "wavelength_m": None if wavelength_a is None else wavelength_a * ANGSTROM_M,
        "detector_distance_m": optional_number(config, "detector_distance", where),
        "image_size_x_px": optional(config, "x_pixels_in_detector", int, where),
        "image_size_y_px": optional(config, "y_pixels_in_detector", int, where),
    }


def _image_dtype(config: dict) -> str | None:
    bits = optional(config, "bit_depth_image", int, "config")
    return None if bits is None else f"uint{bits}"


def _n_images(config: dict) -> int | None:
    nimages = optional(config, "nimages", int, "config")
    ntrigger = optional(config, "ntrigger", int, "config")
    if nimages is None:
        return None
    return nimages * (ntrigger or 1)


# ---------------------------------------------------------------- encoding


def _j(obj: dict) -> bytes:
    return json.dumps(obj, allow_nan=False).encode()


def _encode_array(array: np.ndarray, encoding: str) -> tuple[dict, bytes]:
    array = np.asarray(array)
    names = {np.dtype(v).newbyteorder("="): k for k, v in V1_TYPES.items()}
    type_name = names.get(array.dtype.newbyteorder("="))
    if array.ndim != 2 or type_name is None:
        raise ValueError(f"cannot encode {array.dtype} {array.shape} for stream V1")
    data = array.astype(np.dtype(V1_TYPES[type_name])).tobytes()
    if encoding == "<":
        blob = data
    elif encoding == "lz4<":
        import lz4.block

        blob = lz4.block.compress(data, store_size=False)
    elif encoding in BS_ENCODINGS and BS_ENCODINGS[encoding] == array.dtype.itemsize:
        blob = bslz4_compress(data, array.dtype.itemsize)
    else:
        raise ValueError(f"encoding {encoding!r} does not fit {array.dtype}")
    desc = {"shape": [array.shape[1], array.shape[0]], "type": type_name,
            "encoding": encoding, "size": len(blob)}  # fmt: skip
    return desc, blob


def encode_stream_v1_header(
    *,
    series_id: int,
    config: dict | None = None,
    header_detail: str = "basic",
    pixel_mask: np.ndarray | None = None,
    flatfield: np.ndarray | None = None,
    appendix: dict | None = None,
) -> list[bytes]:
    """The series-start message; ``config`` uses SIMPLON names and units (see module doc)."""
    parts = [_j({"htype": "dheader-1.0", "series": series_id, "header_detail": header_detail})]
    if header_detail != "none":
        parts.append(_j(config or {}))
    if header_detail == "all":
        for htype, array in (("dflatfield-1.0", flatfield), ("dpixelmask-1.0", pixel_mask)):
            if array is not None:
                desc, blob = _encode_array(array, "<")
                parts += [_j({"htype": htype, **desc}), blob]
    if appendix is not None:
        parts.append(_j(appendix))
    return parts


def encode_stream_v1_image(
    *,
    series_id: int,
    frame: int,
    array: np.ndarray,
    encoding: str = "bs16-lz4<",
    start_time_ns: int = 0,
    stop_time_ns: int = 0,
    real_time_ns: int = 0,
    appendix: dict | None = None,
) -> list[bytes]:
    """The 4 (or 5, with an image appendix) parts of one frame."""
    import hashlib

    desc, blob = _encode_array(array, encoding)
    parts = [
        _j({"htype": "dimage-1.0", "series": series_id, "frame": frame,
            "hash": hashlib.md5(blob).hexdigest()}),  # fmt: skip
        _j({"htype": "dimage_d-1.0", **desc}),
        blob,
        _j({"htype": "dconfig-1.0", "start_time": start_time_ns,
            "stop_time": stop_time_ns, "real_time": real_time_ns}),  # fmt: skip
    ]
    if appendix is not None:
        parts.append(_j(appendix))
    return parts


def encode_stream_v1_end(*, series_id: int) -> list[bytes]:
    return [_j({"htype": "dseries_end-1.0", "series": series_id})]
