"""Fuzz every ingest decoder: the only exception allowed out is BadMessage with a reason.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default, a few hundred cases per test, part of
the normal run) and ``thorough`` (thousands per test; docs/RESULTS.md "Robustness"):

    HYPOTHESIS_PROFILE=thorough pytest tests/test_fuzz_decoders.py --hypothesis-show-statistics

Every test feeds one decoder a family of hostile messages: random bytes, structurally
valid messages with a field replaced by a value of the wrong type, wrong tags, garbage or
lying compressed payloads, truncated/bit-flipped/spliced real DECTRIS captures, NaN/inf
frames and wrong dtypes. A decoded event is checked for sane arrays (2-D, within
max_pixels, native byte order); anything else that escapes fails the test.
"""

from __future__ import annotations

import json
import os
import struct

import cbor2
import lz4.block
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xtalsym.daemon.protocols import (
    REASONS,
    BadMessage,
    Image,
    SeriesEnd,
    SeriesStart,
    decode,
    encode_native_end,
    encode_native_image,
    encode_native_start,
    encode_stream_v1_end,
    encode_stream_v1_header,
    encode_stream_v1_image,
    encode_stream_v2_end,
    encode_stream_v2_image,
    encode_stream_v2_start,
)
from xtalsym.daemon.protocols.common import bslz4_compress, hdf5_lz4_compress
from xtalsym.testing import shared_path

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ = settings(settings.get_profile(PROFILE if PROFILE in ("ci", "thorough") else "ci"))

FIXTURES = shared_path("fixtures", "dectris_stream2")
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.cbor")) if FIXTURES.is_dir() else []
MAX_PIXELS = 1 << 16  # small, so "too_large" paths are reachable with small messages

GEOMETRY = {"beam_center_x_px": 3.5, "beam_center_y_px": 2.5, "pixel_size_x_m": 75e-6,
            "pixel_size_y_m": 75e-6, "wavelength_m": 1e-10, "detector_distance_m": 0.1,
            "image_size_x_px": 8, "image_size_y_px": 6}  # fmt: skip
FRAME = np.arange(48, dtype=np.uint16).reshape(6, 8)


def check(protocol: str, frames, *, max_pixels: int = MAX_PIXELS):
    """Decode; BadMessage (documented reason) or a sane event; anything else fails."""
    try:
        event = decode(protocol, frames, max_pixels=max_pixels)
    except BadMessage as exc:
        assert exc.reason in REASONS and str(exc)
        return exc
    assert isinstance(event, (SeriesStart, Image, SeriesEnd)), type(event)
    assert isinstance(event.series_id, int) and event.series_id >= 0
    if isinstance(event, Image):
        assert isinstance(event.image_id, int) and event.image_id >= 0
        assert event.data and all(isinstance(k, str) for k in event.data)
        for array in event.data.values():
            assert isinstance(array, np.ndarray) and array.ndim == 2 and array.size <= max_pixels
            assert array.dtype.isnative and array.flags.c_contiguous
    return event


# ------------------------------------------------------------------ value strategies

LEAVES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 3)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=10)
          | st.binary(max_size=24))  # fmt: skip
JSON_LEAVES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 3)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
TAGS = st.sampled_from([0, 1, 2, 3, 4, 5, 30, 40, 64, 65, 66, 69, 72, 80, 85, 86, 87, 1040,
                        56500, 55799, 258, 9999])
CBOR_VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers(-2, 2), inner, max_size=4)
    | st.builds(cbor2.CBORTag, TAGS, inner),
    max_leaves=12,
)
DIMS = st.one_of(st.lists(st.integers(-2, 70), min_size=0, max_size=3),
                 st.tuples(st.integers(2**20, 2**40), st.integers(2**20, 2**40)).map(list),
                 CBOR_VALUES)  # fmt: skip
GARBAGE = st.binary(max_size=64)


def cbor(msg, self_describe: bool = True) -> list[bytes]:
    return [(b"\xd9\xd9\xf7" if self_describe else b"") + cbor2.dumps(msg)]


def lying_header(total: int, block: int, body: bytes) -> bytes:
    return struct.pack(">QI", total % 2**64, block % 2**32) + body


# ------------------------------------------------------------------ all decoders


@FUZZ
@given(st.sampled_from(["stream_v2", "stream_v1", "native"]),
       st.lists(st.binary(max_size=128), max_size=6))
def test_random_frames(protocol, frames):
    check(protocol, frames)


@FUZZ
@given(st.sampled_from(["stream_v2", "stream_v1", "native"]),
       st.lists(JSON_VALUES.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=40), max_size=6))
def test_json_parts(protocol, frames):
    check(protocol, frames)


@FUZZ
@given(st.sampled_from(["stream_v2", "stream_v1", "native"]),
       st.lists(st.none() | st.integers() | st.text(max_size=4) | st.lists(st.binary(max_size=4), max_size=2),
                min_size=1, max_size=5))
def test_frames_not_bytes(protocol, frames):
    check(protocol, frames)


# ------------------------------------------------------------------ stream V2


def v2_messages():
    start = encode_stream_v2_start(series_id=3, geometry=GEOMETRY, channels=["c"], image_dtype="uint16",
                                   number_of_images=2, series_unique_id="u",
                                   pixel_mask={"c": np.zeros((6, 8), np.uint32)})
    images = [encode_stream_v2_image(series_id=3, image_id=1, data={"c": FRAME}, compression=c,
                                     series_unique_id="u", user_data={"axis": "x"})
              for c in ("bslz4", "lz4", None)]
    return [start, *images, encode_stream_v2_end(series_id=3, series_unique_id="u")]


V2_VALID = v2_messages()


def _paths(value, prefix=()):
    """Every (path) into nested maps/lists/tags of a decoded CBOR message."""
    yield prefix
    if isinstance(value, dict) or type(value).__name__ == "frozendict":
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))
    elif isinstance(value, cbor2.CBORTag):
        yield from _paths(value.value, (*prefix, "<tag>"))


def _thaw(value):
    if isinstance(value, dict) or type(value).__name__ == "frozendict":
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    if isinstance(value, cbor2.CBORTag):
        return cbor2.CBORTag(value.tag, _thaw(value.value))
    return value


def _replace(value, path, new):
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, cbor2.CBORTag):
        return cbor2.CBORTag(value.tag, _replace(value.value, rest, new))
    value = list(value) if isinstance(value, (list, tuple)) else dict(value)
    value[head] = _replace(value[head], rest, new)
    return value


@FUZZ
@given(st.integers(0, len(V2_VALID) - 1), st.data(), CBOR_VALUES)
def test_v2_field_replaced(which, data, value):
    """Any field (at any depth, tags included) of a valid message replaced by anything."""
    msg = _thaw(cbor2.loads(V2_VALID[which][0]))
    path = data.draw(st.sampled_from(list(_paths(msg))))
    try:
        frames = cbor(_replace(msg, path, value))
    except Exception:  # noqa: BLE001 - a value cbor2 cannot write
        return
    check("stream_v2", frames)


@FUZZ
@given(st.integers(0, len(V2_VALID) - 1), st.data(), st.sampled_from(["drop", "tag", "retag"]))
def test_v2_field_dropped_or_retagged(which, data, action):
    msg = _thaw(cbor2.loads(V2_VALID[which][0]))
    path = data.draw(st.sampled_from([p for p in _paths(msg) if p]))
    if action == "drop":
        parent = path[:-1]
        node = msg
        for p in parent:
            node = node.value if isinstance(node, cbor2.CBORTag) else node[p]
        node = node.value if isinstance(node, cbor2.CBORTag) else node
        if isinstance(node, dict) and path[-1] in node:
            del node[path[-1]]
            new = msg
        else:
            return
    else:
        node = msg
        for p in path:
            node = node.value if isinstance(node, cbor2.CBORTag) else node[p]
        tag = data.draw(TAGS | st.integers(0, 2**20))
        if action == "retag" and isinstance(node, cbor2.CBORTag):
            new = _replace(msg, path, cbor2.CBORTag(tag, node.value))
        else:
            new = _replace(msg, path, cbor2.CBORTag(tag, node))
    try:
        frames = cbor(new)
    except Exception:  # noqa: BLE001 - a mutated value cbor2 cannot write: nothing to decode
        return
    check("stream_v2", frames)


TYPED_TAGS = st.sampled_from([64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 77, 78, 79, 80, 81, 82, 84,
                              85, 86, 76, 83, 87])  # 76, 83, 87: reserved/unsupported


@FUZZ
@given(DIMS, TYPED_TAGS, st.sampled_from(["bslz4", "lz4", "zstd", 7, None]), st.integers(-1, 9),
       st.data(), st.booleans())
def test_v2_compressed_payloads(dims, tag, algorithm, elem, data, column_major):
    """Garbage, lying headers and mismatched element sizes inside tag 56500."""
    kind = data.draw(st.sampled_from(["garbage", "lying_header", "valid_other_size", "raw"]))
    if kind == "garbage":
        blob = data.draw(GARBAGE)
    elif kind == "lying_header":
        blob = lying_header(data.draw(st.integers(0, 2**64 - 1) | st.integers(0, 4096)),
                            data.draw(st.integers(0, 2**32 - 1) | st.integers(0, 9000)), data.draw(GARBAGE))
    elif kind == "valid_other_size":
        n = data.draw(st.integers(0, 300))
        raw = bytes(data.draw(st.binary(min_size=n, max_size=n)))
        e = data.draw(st.sampled_from([1, 2, 4, 8]))
        raw = raw[: len(raw) // e * e]
        blob = bslz4_compress(raw, e) if algorithm == "bslz4" else hdf5_lz4_compress(raw)
    else:
        blob = data.draw(st.binary(max_size=300))
    payload = blob if algorithm is None else cbor2.CBORTag(56500, [algorithm, elem, blob])
    array = cbor2.CBORTag(1040 if column_major else 40, [dims, cbor2.CBORTag(tag, payload)])
    msg = {"type": "image", "series_id": 1, "image_id": 0, "data": {"c": array}}
    check("stream_v2", cbor(msg))


@FUZZ
@given(st.sampled_from(["float32", "float64", "float16"]), st.integers(1, 12), st.integers(1, 12),
       st.sampled_from(["bslz4", "lz4", None]), st.data())
def test_v2_nan_inf_frames_decode(dtype, rows, cols, compression, data):
    """NaN/inf pixels are data, not a decoding error: they pass through bit-exactly."""
    values = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1.0, -1.0, 65504.0])
    array = np.array(data.draw(st.lists(values, min_size=rows * cols, max_size=rows * cols)),
                     dtype=dtype).reshape(rows, cols)
    event = check("stream_v2", encode_stream_v2_image(series_id=1, image_id=0, data={"c": array},
                                                      compression=compression))
    assert isinstance(event, Image)
    np.testing.assert_array_equal(event.data["c"], array)


@pytest.mark.skipif(not FIXTURE_NAMES, reason=f"DECTRIS captures not found at {FIXTURES}")
@FUZZ
@given(st.data())
def test_v2_real_captures_mutated(data):
    """Real DECTRIS captures: bit flips, truncation, splices, duplicated and inserted bytes."""
    raw = bytearray((FIXTURES / data.draw(st.sampled_from(FIXTURE_NAMES))).read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "dup", "delete"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "dup":
            end = data.draw(st.integers(pos, min(len(raw), pos + 64)))
            raw[pos:pos] = raw[pos:end]
        elif op == "delete":
            del raw[pos:pos + data.draw(st.integers(1, 64))]
    check("stream_v2", [bytes(raw)], max_pixels=64 * 1024 * 1024)


# ------------------------------------------------------------------ stream V1


V1_CONFIG = {"beam_center_x": 3.5, "beam_center_y": 2.5, "x_pixel_size": 7.5e-05, "y_pixel_size": 7.5e-05,
             "wavelength": 1.0, "detector_distance": 0.15, "x_pixels_in_detector": 8,
             "y_pixels_in_detector": 6, "nimages": 2, "ntrigger": 1, "bit_depth_image": 16}  # fmt: skip
V1_VALID = [
    encode_stream_v1_header(series_id=2, config=V1_CONFIG, header_detail="all",
                            pixel_mask=np.zeros((6, 8), np.uint32), flatfield=np.ones((6, 8), np.float32),
                            appendix={"a": 1}),
    *[encode_stream_v1_image(series_id=2, frame=0, array=FRAME, encoding=e, appendix={"axis": "y"})
      for e in ("<", "lz4<", "bs16-lz4<")],
    encode_stream_v1_end(series_id=2),
]


def _mutate_json_part(part: bytes, data) -> bytes:
    obj = json.loads(part)
    paths = [p for p in _paths(obj)]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(JSON_VALUES)
    if data.draw(st.booleans()) and path:
        parent = obj
        for p in path[:-1]:
            parent = parent[p]
        if isinstance(parent, dict):
            del parent[path[-1]]
            return json.dumps(obj).encode()
    return json.dumps(_replace(obj, path, value)).encode()


@FUZZ
@given(st.integers(0, len(V1_VALID) - 1), st.data())
def test_v1_parts_mutated(which, data):
    """A JSON part with any field replaced or dropped; a blob replaced, cut or extended;
    parts dropped, duplicated or reordered."""
    frames = list(V1_VALID[which])
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(frames) - 1))
        op = data.draw(st.sampled_from(["json", "blob", "drop", "dup", "swap"]))
        try:
            json.loads(frames[i])
            is_json = True
        except (ValueError, UnicodeDecodeError):
            is_json = False
        if op == "json" and is_json:
            frames[i] = _mutate_json_part(frames[i], data)
        elif op == "blob":
            frames[i] = data.draw(st.sampled_from([frames[i][:-1], frames[i] + b"\0", frames[i][: len(frames[i]) // 2]])
                                  | GARBAGE)
        elif op == "drop" and len(frames) > 1:
            frames.pop(i)
        elif op == "dup":
            frames.insert(i, frames[i])
        elif op == "swap":
            j = data.draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
    check("stream_v1", frames)


@FUZZ
@given(JSON_VALUES, JSON_VALUES, st.sampled_from(["uint8", "uint16", "uint32", "int32", "float32", "float64",
                                                  "int8", 5, None]),
       st.sampled_from(["<", "lz4<", "bs8-lz4<", "bs16-lz4<", "bs32-lz4<", "bs64-lz4<", ">", None]),
       st.binary(max_size=200), st.booleans())
def test_v1_image_descriptor(shape, size, type_name, encoding, blob, lying):
    """dimage_d-1.0 with any shape/type/encoding and a blob that may not match it."""
    if lying:
        blob = lying_header(len(blob) * 7, 8192, blob)
    desc = {"htype": "dimage_d-1.0", "shape": shape, "type": type_name, "encoding": encoding, "size": size}
    frames = [json.dumps({"htype": "dimage-1.0", "series": 1, "frame": 0, "hash": ""}).encode(),
              json.dumps(desc).encode(), blob,
              json.dumps({"htype": "dconfig-1.0", "start_time": 0, "stop_time": 1, "real_time": 1}).encode()]
    check("stream_v1", frames)


@FUZZ
@given(st.lists(JSON_VALUES.map(lambda v: {"htype": v}) | st.sampled_from([
    {"htype": "dpixelmask-1.0", "shape": [8, 6], "type": "uint32"},
    {"htype": "dflatfield-1.0", "shape": [8, 6], "type": "float32"},
    {"htype": "dcountrate_table-1.0", "shape": [2, 2], "type": "uint32"}]), max_size=4),
    st.lists(st.binary(max_size=200), max_size=4), st.sampled_from(["all", "basic", "none", 3, None]))
def test_v1_header_parts(parts, blobs, detail):
    frames = [json.dumps({"htype": "dheader-1.0", "series": 1, "header_detail": detail}).encode(),
              json.dumps(V1_CONFIG).encode()]
    for i, part in enumerate(parts):
        frames.append(json.dumps(part).encode())
        if i < len(blobs):
            frames.append(blobs[i])
    check("stream_v1", frames)


# ------------------------------------------------------------------ native


NATIVE_VALID = [
    encode_native_start(series_id=4, geometry=GEOMETRY, series_unique_id="n", channels=["image"], dtype="<u2",
                        number_of_images=3, user_data={"k": [1, 2]}),
    encode_native_image(series_id=4, image_id=0, array=FRAME, compression="lz4", user_data={"axis": "z"},
                        series_unique_id="n"),
    encode_native_image(series_id=4, image_id=1, array=FRAME.astype(np.float32), real_time=0.1),
    encode_native_end(series_id=4, series_unique_id="n"),
]


@FUZZ
@given(st.integers(0, len(NATIVE_VALID) - 1), st.data())
def test_native_header_mutated(which, data):
    frames = list(NATIVE_VALID[which])
    frames[0] = _mutate_json_part(frames[0], data)
    check("native", frames)


@FUZZ
@given(JSON_VALUES, st.sampled_from(["|u1", "<u2", "<u4", "|i1", "<i2", "<i4", "<f4", "<f8", ">u2", "O", "V8",
                                     "<U4", 3]),
       st.sampled_from(["lz4", None, "bslz4", 1]), st.binary(max_size=400), st.booleans())
def test_native_payload(shape, dtype, compression, payload, compress_it):
    if compress_it:
        payload = lz4.block.compress(payload, store_size=False)
    head = {"xtalsym": 1, "type": "image", "series_id": 1, "image_id": 0, "dtype": dtype, "shape": shape,
            "compression": compression}
    check("native", [json.dumps(head).encode(), payload])


@FUZZ
@given(st.sampled_from(["<f4", "<f8"]), st.integers(1, 10), st.integers(1, 10), st.data())
def test_native_nan_inf_frames_decode(dtype, rows, cols, data):
    values = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 3.0, -1e30])
    array = np.array(data.draw(st.lists(values, min_size=rows * cols, max_size=rows * cols)),
                     dtype=dtype).reshape(rows, cols)
    event = check("native", encode_native_image(series_id=1, image_id=0, array=array))
    np.testing.assert_array_equal(event.data["image"], array)


# ------------------------------------------------------------------ size limits and bombs


@pytest.mark.parametrize("protocol", ["stream_v2", "stream_v1", "native"])
def test_compression_bomb_refused_before_allocating(protocol):
    """A tiny compressed payload declaring 2 Gi elements of zeros is refused without
    allocating the declared size (the LZ4 expansion bound, not max_pixels, stops it)."""
    import resource

    rows = cols = 16384  # 256 Mi elements x 8 bytes = 2 GiB if it were allocated
    nbytes = rows * cols * 8
    blob_v1 = lying_header(nbytes, 8192, b"\0" * 40)
    if protocol == "stream_v2":
        payload = cbor2.CBORTag(86, cbor2.CBORTag(56500, ["bslz4", 8, blob_v1]))
        frames = cbor({"type": "image", "series_id": 1, "image_id": 0,
                       "data": {"c": cbor2.CBORTag(40, [[rows, cols], payload])}})
    elif protocol == "stream_v1":
        frames = [json.dumps({"htype": "dimage-1.0", "series": 1, "frame": 0}).encode(),
                  json.dumps({"htype": "dimage_d-1.0", "shape": [cols, rows], "type": "uint32",
                              "encoding": "lz4<"}).encode(), b"\x1f\0" + b"\0" * 30,
                  json.dumps({"htype": "dconfig-1.0"}).encode()]
    else:
        frames = [json.dumps({"xtalsym": 1, "type": "image", "series_id": 1, "image_id": 0, "dtype": "<f8",
                              "shape": [rows, cols], "compression": "lz4"}).encode(), b"\x1f\0" + b"\0" * 30]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exc = check(protocol, frames, max_pixels=rows * cols)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert isinstance(exc, BadMessage) and exc.reason == "bad_compression", exc
    assert "cannot expand" in str(exc), exc  # refused from the sizes, before decompressing
    assert grown_kib < 256 * 1024, f"peak RSS grew by {grown_kib} KiB on a {len(frames[-1])}-byte message"


def test_v2_extra_arrays_share_the_pixel_budget():
    """Arrays in unknown image fields count against the same max_pixels as the data."""
    small = encode_stream_v2_image(series_id=1, image_id=0, data={"c": FRAME}, compression=None)
    msg = _thaw(cbor2.loads(small[0]))
    for i in range(4):
        msg[f"extra_{i}"] = msg["data"]["c"]
    assert check("stream_v2", cbor(msg), max_pixels=4 * FRAME.size).reason == "too_large"
    assert isinstance(check("stream_v2", cbor(msg), max_pixels=5 * FRAME.size), Image)
