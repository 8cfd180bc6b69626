"""Ingest decoders: real DECTRIS captures bit-exact, roundtrips, and fuzzing."""

from __future__ import annotations

import hashlib
import json
import struct

import cbor2
import lz4.block
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xtalsym.daemon.protocols import (
    PROTOCOLS,
    REASONS,
    BadMessage,
    Image,
    SeriesEnd,
    SeriesStart,
    decode,
    decode_native,
    decode_stream_v1,
    decode_stream_v2,
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
from xtalsym.daemon.protocols.common import (
    bslz4_compress,
    bslz4_decompress_numpy,
    hdf5_lz4_decompress_numpy,
)
from xtalsym.testing import shared_dir

SHARED = shared_dir()
FIXTURES = SHARED / "fixtures" / "dectris_stream2"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"DECTRIS fixtures not found at {FIXTURES}"
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# sha256 of each decoded channel's bytes (native little-endian, C order), recorded once
# from this decoder after the independent numpy/lz4.block decoder agreed bit for bit.
FIXTURE_SHA256 = {
    "bslz4_8bit_image.cbor": {
        "threshold_1": "049233140663c642f567d4e3f57cc38278d6e162e9cb49de9e286b6a5806345a",
        "threshold_2": "1a169b8ea11c91c822f61629525cf200cce009ac678bcf49b99fab0ca42a5f17",
        "difference": "2e44c356e43e2e901a5d5f59ac765ac68fba1822bb0d61526c0594501d1685ec",
    },
    "bslz4_16bit_image.cbor": {
        "threshold_1": "33943cd37dbea68fdcf3dd6673c7cad93d7e36ac953abdc0c0bc11c65783035d",
        "threshold_2": "5f87160908688201c15bda4d5c88f49c6a81e88bbbd5750a25826032c43aac5d",
        "difference": "6a360ea896b5ecce7c54829e8b3f08c37e3abc7584986d67e6993b61ca560a0f",
    },
    "bslz4_32bit_image.cbor": {
        "threshold_1": "f1904aa97c56c42c96653e6c19e021acde469761ae28cb4e32aa9737b71a4128",
        "threshold_2": "205c05744c014f4fa8dcd09af0505a3c6f16fde426482188dd33eac90ab6898c",
        "difference": "5d62b7a53cd0ad8146d88bdb27407557399fe126a07079dbb531c4115faacf0c",
    },
    "lz4_16bit_image.cbor": {
        "threshold_1": "990afd42381fecf19eb028597b36b4102ad00e7222778ae3313a6124e736daff",
        "threshold_2": "593ff2aa8eae7cd764126b7f7a06862bc6f6d8027145cad0293d9676ac03eebc",
        "difference": "5a9a08c5cd8471f734005857ff8543516d6de8f598a252fef7bd645d26c17645",
    },
}
FIXTURE_DTYPE = {"bslz4_8bit_image.cbor": np.uint8, "bslz4_16bit_image.cbor": np.uint16,
                 "bslz4_32bit_image.cbor": np.uint32, "lz4_16bit_image.cbor": np.uint16}  # fmt: skip
FIXTURE_REAL_TIME = {"bslz4_8bit_image.cbor": 0.0099999, "bslz4_16bit_image.cbor": 0.0199999,
                     "bslz4_32bit_image.cbor": 0.0999999, "lz4_16bit_image.cbor": 0.0199999}  # fmt: skip


def _fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def _assert_bad(call, *args, **kwargs) -> BadMessage:
    """Call; anything but BadMessage with a documented reason fails the test."""
    try:
        call(*args, **kwargs)
    except BadMessage as exc:
        assert exc.reason in REASONS, exc.reason
        return exc
    return None


# ---------------------------------------------------------------- real captures


@needs_fixtures
@pytest.mark.parametrize("name", sorted(FIXTURE_SHA256))
def test_fixture_decodes_bit_exactly(name):
    raw = _fixture(name)
    assert raw[:3] == b"\xd9\xd9\xf7"  # self-describe tag 55799 first
    event = decode_stream_v2([raw])
    assert isinstance(event, Image)
    assert (event.series_id, event.image_id) == (1, 0)
    assert len(event.series_unique_id) == 26  # a ULID
    assert event.user_data == [1, "\U0001f499"]
    assert event.start_time == 0.0
    assert event.real_time == pytest.approx(FIXTURE_REAL_TIME[name])
    assert event.stop_time == pytest.approx(FIXTURE_REAL_TIME[name])
    assert list(event.data) == ["threshold_1", "threshold_2", "difference"]

    # second, independent decoding: cbor2 raw tags + numpy bit transpose + lz4.block
    message = cbor2.loads(raw)
    dtype = np.dtype(FIXTURE_DTYPE[name])
    for channel, array in event.data.items():
        assert array.shape == (514, 1030) and array.dtype == dtype
        assert array.flags.c_contiguous
        tag40 = message["data"][channel]
        assert tag40.tag == 40 and list(tag40.value[0]) == [514, 1030]
        algorithm, elem_size, blob = tag40.value[1].value.value
        assert tag40.value[1].value.tag == 56500
        if algorithm == "bslz4":
            assert elem_size == dtype.itemsize
            reference = bslz4_decompress_numpy(blob, elem_size)
        else:
            assert algorithm == "lz4"
            reference = hdf5_lz4_decompress_numpy(blob)
        expected = np.frombuffer(reference, dtype=dtype.newbyteorder("<")).reshape(514, 1030)
        np.testing.assert_array_equal(array, expected)
        assert hashlib.sha256(array.tobytes()).hexdigest() == FIXTURE_SHA256[name][channel]


@needs_fixtures
@pytest.mark.parametrize("name", sorted(FIXTURE_SHA256))
def test_fixture_physics(name):
    """Counts are small; difference = t1 - t2, NODATA (2^n - 1) exactly where negative."""
    data = decode_stream_v2([_fixture(name)]).data
    nodata = np.iinfo(FIXTURE_DTYPE[name]).max
    t1, t2, diff = (data[k].astype(np.int64) for k in ("threshold_1", "threshold_2", "difference"))
    for counts in (t1, t2):
        assert counts.min() == 0 and counts.max() <= 28 and (counts != nodata).all()
        assert 1.0 < counts.mean() < 20.0
    negative = t1 < t2
    assert np.array_equal(diff == nodata, negative)
    np.testing.assert_array_equal(diff[~negative], (t1 - t2)[~negative])
    assert 0.3 < negative.mean() < 0.5  # two independent noisy thresholds


@needs_fixtures
def test_fixture_end():
    event = decode_stream_v2([_fixture("end.cbor")])
    assert event == SeriesEnd(series_id=1, series_unique_id="01GRXWT80JSDY2FNW8SGCCDZD9")
    # it closes the 16-bit bslz4 series
    image = decode_stream_v2([_fixture("bslz4_16bit_image.cbor")])
    assert image.series_unique_id == event.series_unique_id


@needs_fixtures
def test_fixture_reencoded_roundtrip():
    """Our encoder's bslz4 and lz4 outputs decode (with dectris-compression) to the same."""
    image = decode_stream_v2([_fixture("bslz4_32bit_image.cbor")])
    for compression in ("bslz4", "lz4", None):
        frames = encode_stream_v2_image(series_id=1, image_id=0, data=image.data,
                                        compression=compression)  # fmt: skip
        again = decode_stream_v2(frames)
        for channel, array in image.data.items():
            np.testing.assert_array_equal(again.data[channel], array)


@needs_fixtures
@settings(max_examples=25, deadline=None)
@given(st.data())
def test_fixture_flipped_and_truncated(data):
    raw = _fixture("bslz4_8bit_image.cbor")
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] ^= data.draw(st.integers(1, 255))
    _assert_bad(decode_stream_v2, [bytes(buf)])
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert _assert_bad(decode_stream_v2, [raw[:cut]]) is not None


# ---------------------------------------------------------------- stream V2


def _geometry():
    return {"beam_center_x_px": 512.5, "beam_center_y_px": 256.25, "pixel_size_x_m": 75e-6,
            "pixel_size_y_m": 75e-6, "wavelength_m": 0.9762e-10, "detector_distance_m": 0.12,
            "image_size_x_px": 40, "image_size_y_px": 30}  # fmt: skip


def test_v2_start_roundtrip_units():
    mask = np.zeros((30, 40), np.uint32)
    mask[5, :] = 1
    frames = encode_stream_v2_start(
        series_id=7, series_unique_id="U", geometry=_geometry(), channels=["threshold_1"],
        image_dtype="uint16", number_of_images=3, user_data={"axis": "a"},
        pixel_mask={"threshold_1": mask}, extra={"incident_energy": 12700.0},
    )  # fmt: skip
    assert len(frames) == 1 and frames[0][:3] == b"\xd9\xd9\xf7"
    raw = cbor2.loads(frames[0])
    assert raw["incident_wavelength"] == pytest.approx(0.9762)  # angstrom on the wire
    event = decode_stream_v2(frames)
    assert isinstance(event, SeriesStart)
    assert event.geometry == pytest.approx(_geometry())
    assert (event.series_id, event.series_unique_id, event.channels) == (7, "U", ["threshold_1"])
    assert (event.image_dtype, event.number_of_images) == ("uint16", 3)
    assert event.user_data == {"axis": "a"}
    np.testing.assert_array_equal(event.pixel_mask["threshold_1"], mask)
    assert event.raw["incident_energy"] == 12700.0


def test_v2_wavelength_from_energy_and_distance_from_translation():
    msg = {"type": "start", "series_id": 1, "incident_energy": 12398.419843320026,
           "detector_translation": [0.0, 0.0, 0.2]}  # fmt: skip
    event = decode_stream_v2([b"\xd9\xd9\xf7" + cbor2.dumps(msg)])
    assert event.geometry["wavelength_m"] == pytest.approx(1e-10)
    assert event.geometry["detector_distance_m"] == 0.2
    assert event.geometry["beam_center_x_px"] is None


ARRAYS = {
    "uint8": np.arange(12, dtype=np.uint8).reshape(3, 4) * 21,
    "uint16": (np.arange(35, dtype=np.uint16).reshape(5, 7) * 1871),
    "uint32": (np.arange(63, dtype=np.uint32).reshape(7, 9) * 68_000_001),
    "float32": np.linspace(-3, 3, 66, dtype=np.float32).reshape(6, 11),
}


@pytest.mark.parametrize("dtype", sorted(ARRAYS))
@pytest.mark.parametrize("compression", ["bslz4", "lz4", None])
@pytest.mark.parametrize("column_major", [False, True])
def test_v2_image_roundtrip(dtype, compression, column_major):
    array = ARRAYS[dtype]
    frames = encode_stream_v2_image(
        series_id=3, image_id=9, data={"a": array, "b": array[::-1].copy()},
        compression=compression, column_major=column_major, series_unique_id="S",
        user_data={"k": [1, 2]}, real_time=0.01, start_time=1.5, stop_time=1.51,
    )  # fmt: skip
    tag = cbor2.loads(frames[0])["data"]["a"].tag
    assert tag == (1040 if column_major else 40)
    event = decode_stream_v2(frames)
    assert (event.series_id, event.image_id, event.series_unique_id) == (3, 9, "S")
    assert event.user_data == {"k": [1, 2]}
    assert (event.real_time, event.start_time, event.stop_time) == pytest.approx((0.01, 1.5, 1.51))
    np.testing.assert_array_equal(event.data["a"], array)
    np.testing.assert_array_equal(event.data["b"], array[::-1])
    assert event.data["a"].dtype == array.dtype and event.data["a"].flags.c_contiguous


@given(
    st.sampled_from([np.uint8, np.uint16, np.uint32]),
    st.integers(1, 40), st.integers(1, 40), st.sampled_from(["bslz4", "lz4", None]),
    st.integers(0, 2**31),
)  # fmt: skip
@FUZZ
def test_v2_roundtrip_property(dtype, rows, cols, compression, seed):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, np.iinfo(dtype).max, size=(rows, cols), dtype=dtype, endpoint=True)
    event = decode_stream_v2(encode_stream_v2_image(series_id=0, image_id=0, data={"c": array},
                                                    compression=compression))  # fmt: skip
    np.testing.assert_array_equal(event.data["c"], array)


def test_bslz4_codec_against_dectris_odd_sizes():
    """Our bitshuffle writer is read by dectris-compression, tails of n % 8 included."""
    from dectris.compression import decompress

    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 2047, 2048, 4099):
        for elem in (1, 2, 4, 8):
            data = rng.integers(0, 255, n * elem, dtype=np.uint8).tobytes()
            blob = bslz4_compress(data, elem)
            assert decompress(blob, "bslz4", elem_size=elem) == data
            assert bslz4_decompress_numpy(blob, elem) == data


def test_v2_nan_inf_pass_through():
    array = np.array([[np.nan, np.inf], [-np.inf, 1.0]], np.float32)
    event = decode_stream_v2(encode_stream_v2_image(series_id=0, image_id=0, data={"c": array}))
    np.testing.assert_array_equal(event.data["c"], array)


def _v2(msg) -> list[bytes]:
    return [b"\xd9\xd9\xf7" + cbor2.dumps(msg)]


def _img(payload, dims=(2, 2)):
    return {"type": "image", "series_id": 1, "image_id": 0,
            "data": {"c": cbor2.CBORTag(40, [list(dims), payload])}}  # fmt: skip


def test_v2_frozendict_and_no_self_describe():
    frames = encode_stream_v2_end(series_id=4, series_unique_id="x")
    assert type(cbor2.loads(frames[0])).__name__ == "frozendict"
    assert decode_stream_v2(frames) == SeriesEnd(4, "x")
    assert decode_stream_v2([frames[0][3:]]) == SeriesEnd(4, "x")  # tag optional


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"\xff\x00"], "not_cbor"),
        ([], "bad_frames"),
        ([b"", b""], "bad_frames"),
        (_v2([1, 2]), "bad_field"),
        (_v2({"series_id": 1}), "missing_field"),
        (_v2({"type": "calibration", "series_id": 1}), "unknown_type"),
        (_v2({"type": "end"}), "missing_field"),
        (_v2({"type": "end", "series_id": "1"}), "bad_field"),
        (_v2({"type": "end", "series_id": True}), "bad_field"),
        (_v2(_img(cbor2.CBORTag(69, b"\0" * 6))), "shape_mismatch"),
        (_v2(_img(cbor2.CBORTag(999, b"\0" * 8))), "bad_dtype"),
        (_v2(_img(b"\0" * 8)), "bad_dtype"),
        (_v2(_img(cbor2.CBORTag(69, b"\0" * 8), dims=(2, 2, 2))), "shape_mismatch"),
        (_v2(_img(cbor2.CBORTag(69, b"\0" * 8), dims=(2**40, 2**40))), "too_large"),
        (_v2(_img(cbor2.CBORTag(69, b"\0" * 8), dims=(-2, -2))), "shape_mismatch"),
        (_v2({**_img(None), "data": {}}), "bad_field"),
        (_v2({**_img(cbor2.CBORTag(69, b"\0" * 8)), "real_time": [1, 0]}), "bad_field"),
        # compression: unknown algorithm, element size mismatch, header lies about size
        (_v2(_img(cbor2.CBORTag(69, cbor2.CBORTag(56500, ["zstd", 2, b"\0" * 20])))),
         "bad_compression"),
        (_v2(_img(cbor2.CBORTag(69, cbor2.CBORTag(56500, ["bslz4", 4, b"\0" * 20])))), "bad_dtype"),
        (_v2(_img(cbor2.CBORTag(69, cbor2.CBORTag(
            56500, ["bslz4", 2, struct.pack(">QI", 2**62, 8192) + b"\0" * 8])))),
         "shape_mismatch"),
        (_v2(_img(cbor2.CBORTag(69, cbor2.CBORTag(56500, ["bslz4", 2, b"\0" * 5])))), "truncated"),
    ],
)  # fmt: skip
def test_v2_bad_messages(frames, reason):
    exc = _assert_bad(decode_stream_v2, frames)
    assert exc is not None and exc.reason == reason, exc


def test_v2_dectris_empty_output_on_bad_header_is_refused():
    """A zero-size header makes dectris-compression return b''; we refuse it."""
    from dectris.compression import decompress

    assert decompress(b"\0" * 12, "bslz4", elem_size=2) == b""
    blob = struct.pack(">QI", 8, 8192) + b"\0" * 4  # right size, corrupt body
    exc = _assert_bad(decode_stream_v2, _v2(_img(cbor2.CBORTag(69, cbor2.CBORTag(
        56500, ["bslz4", 2, blob])))))  # fmt: skip
    assert exc.reason == "bad_compression"


def test_v2_too_large_checked_before_decompressing():
    blob = bslz4_compress(b"\0" * 8, 2)
    frames = _v2(_img(cbor2.CBORTag(69, cbor2.CBORTag(56500, ["bslz4", 2, blob]))))
    assert decode_stream_v2(frames, max_pixels=4).data["c"].shape == (2, 2)
    assert _assert_bad(decode_stream_v2, frames, max_pixels=3).reason == "too_large"


CBOR_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    | st.builds(cbor2.CBORTag, st.sampled_from([1, 30, 40, 64, 69, 85, 1040, 56500, 55799, 5]),
                inner),
    max_leaves=12,
)  # fmt: skip


@FUZZ
@given(st.binary(max_size=200))
def test_v2_fuzz_random_bytes(blob):
    _assert_bad(decode_stream_v2, [blob])
    _assert_bad(decode_stream_v2, [b"\xd9\xd9\xf7" + blob])


@FUZZ
@given(CBOR_VALUES, st.sampled_from(["start", "image", "end", "x"]), st.text(max_size=12))
def test_v2_fuzz_structured(value, kind, key):
    for msg in ({"type": kind, "series_id": 1, "image_id": 0, key: value},
                {"type": kind, "series_id": 1, "image_id": 0, "data": {"c": value}},
                {"type": "image", "series_id": 1, "image_id": 0,
                 "data": {"c": cbor2.CBORTag(40, [[2, 2], value])}}):  # fmt: skip
        try:
            raw = cbor2.dumps(msg)
        except Exception:  # noqa: BLE001 - hypothesis made something cbor2 cannot write
            continue
        _assert_bad(decode_stream_v2, [b"\xd9\xd9\xf7" + raw])


@FUZZ
@given(st.data())
def test_v2_fuzz_mutated_valid(data):
    array = np.arange(64, dtype=np.uint16).reshape(8, 8)
    comp = data.draw(st.sampled_from(["bslz4", "lz4", None]))
    raw = bytearray(encode_stream_v2_image(series_id=1, image_id=2, data={"c": array},
                                           compression=comp)[0])  # fmt: skip
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = data.draw(st.integers(0, 255))
    _assert_bad(decode_stream_v2, [bytes(raw)])
    _assert_bad(decode_stream_v2, [bytes(raw[: data.draw(st.integers(0, len(raw)))])])


# ---------------------------------------------------------------- stream V1


V1_CONFIG = {"beam_center_x": 20.5, "beam_center_y": 15.0, "x_pixel_size": 7.5e-05,
             "y_pixel_size": 7.5e-05, "wavelength": 1.0, "detector_distance": 0.15,
             "x_pixels_in_detector": 40, "y_pixels_in_detector": 30, "nimages": 2,
             "ntrigger": 3, "bit_depth_image": 16}  # fmt: skip


@pytest.mark.parametrize("detail", ["all", "basic", "none"])
def test_v1_header_roundtrip(detail):
    mask = (np.arange(1200).reshape(30, 40) % 7 == 0).astype(np.uint32)
    flat = np.full((30, 40), 1.25, np.float32)
    frames = encode_stream_v1_header(series_id=5, config=V1_CONFIG, header_detail=detail,
                                     pixel_mask=mask, flatfield=flat, appendix={"axis": "b"})  # fmt: skip
    event = decode_stream_v1(frames)
    assert isinstance(event, SeriesStart) and event.series_id == 5
    assert event.user_data == {"axis": "b"}
    if detail == "none":
        assert set(event.geometry.values()) == {None}
        return
    assert event.geometry == pytest.approx({
        "beam_center_x_px": 20.5, "beam_center_y_px": 15.0, "pixel_size_x_m": 7.5e-05,
        "pixel_size_y_m": 7.5e-05, "wavelength_m": 1e-10, "detector_distance_m": 0.15,
        "image_size_x_px": 40, "image_size_y_px": 30})  # fmt: skip
    assert (event.number_of_images, event.image_dtype) == (6, "uint16")
    if detail == "all":
        np.testing.assert_array_equal(event.pixel_mask, mask)
        np.testing.assert_array_equal(event.flatfield, flat)
    else:
        assert event.pixel_mask is None


@pytest.mark.parametrize(
    ("dtype", "encoding"),
    [(np.uint16, "bs16-lz4<"), (np.uint32, "bs32-lz4<"), (np.uint8, "bs8-lz4<"),
     (np.uint16, "lz4<"), (np.uint32, "<"), (np.float32, "<")],
)  # fmt: skip
def test_v1_image_roundtrip_and_shape_order(dtype, encoding):
    array = (np.arange(30 * 40).reshape(30, 40) % 251).astype(dtype)  # 30 rows (y), 40 cols (x)
    frames = encode_stream_v1_image(series_id=5, frame=3, array=array, encoding=encoding,
                                    start_time_ns=1_000_000, stop_time_ns=2_000_000,
                                    real_time_ns=1_000_000)  # fmt: skip
    assert json.loads(frames[1])["shape"] == [40, 30]  # [x, y] on the wire
    event = decode_stream_v1(frames)
    assert (event.series_id, event.image_id) == (5, 3)
    np.testing.assert_array_equal(event.data["image"], array)
    assert (event.start_time, event.stop_time, event.real_time) == pytest.approx((1e-3, 2e-3, 1e-3))
    assert decode_stream_v1(encode_stream_v1_end(series_id=5)) == SeriesEnd(5)


def test_v1_bad_messages():
    array = np.ones((4, 6), np.uint16)
    good = encode_stream_v1_image(series_id=1, frame=0, array=array, encoding="bs16-lz4<")
    desc = json.loads(good[1])
    cases = {
        "bad_frames": good[:3],
        "not_json": [b"{nope"] + good[1:],
        "unknown_type": [json.dumps({"htype": "dfoo-1.0"}).encode()],
        "bad_dtype": [good[0], json.dumps({**desc, "type": "complex64"}).encode(), *good[2:]],
        "bad_compression": [good[0], json.dumps({**desc, "encoding": "gzip"}).encode(), *good[2:]],
        "shape_mismatch": [good[0], json.dumps({**desc, "shape": [5, 6]}).encode(), *good[2:]],
        "too_large": [good[0], json.dumps({**desc, "shape": [2**31, 2**31]}).encode(), *good[2:]],
    }
    for reason, frames in cases.items():
        exc = _assert_bad(decode_stream_v1, frames)
        assert exc is not None and exc.reason == reason, (reason, exc)
    raw = encode_stream_v1_image(series_id=1, frame=0, array=array, encoding="<")
    assert _assert_bad(decode_stream_v1, [*raw[:2], raw[2][:-2], raw[3]]).reason == "truncated"
    bs32 = [good[0], json.dumps({**desc, "type": "uint32"}).encode(), *good[2:]]
    assert _assert_bad(decode_stream_v1, bs32).reason == "bad_dtype"


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_v1_fuzz_random_frames(frames):
    _assert_bad(decode_stream_v1, frames)


@FUZZ
@given(st.data())
def test_v1_fuzz_mutated_valid(data):
    array = np.arange(48, dtype=np.uint32).reshape(6, 8)
    enc = data.draw(st.sampled_from(["bs32-lz4<", "lz4<", "<"]))
    frames = [bytearray(f) for f in encode_stream_v1_image(series_id=1, frame=0, array=array,
                                                           encoding=enc)]  # fmt: skip
    part = data.draw(st.integers(0, 3))
    if frames[part]:
        pos = data.draw(st.integers(0, len(frames[part]) - 1))
        frames[part][pos] = data.draw(st.integers(0, 255))
    _assert_bad(decode_stream_v1, [bytes(f) for f in frames])
    _assert_bad(decode_stream_v1, [bytes(f)[: data.draw(st.integers(0, len(f)))] for f in frames])


# ---------------------------------------------------------------- native


def test_native_roundtrip():
    geometry = _geometry()
    start = decode_native(encode_native_start(series_id=2, geometry=geometry, dtype="<u2",
                                              number_of_images=3, user_data={"x": 1}))  # fmt: skip
    assert start.geometry == pytest.approx(geometry) and start.number_of_images == 3
    for dtype in (np.uint8, np.uint16, np.uint32, np.float32, np.int32):
        array = (np.arange(30 * 40).reshape(30, 40) % 200).astype(dtype)
        for compression in (None, "lz4"):
            event = decode_native(encode_native_image(series_id=2, image_id=1, array=array,
                                                      compression=compression, user_data=[1]))  # fmt: skip
            np.testing.assert_array_equal(event.data["image"], array)
            assert event.data["image"].dtype == dtype and event.user_data == [1]
    assert decode_native(encode_native_end(series_id=2)) == SeriesEnd(2)
    nan = np.array([[np.nan, np.inf]], np.float32)
    np.testing.assert_array_equal(decode_native(
        encode_native_image(series_id=0, image_id=0, array=nan)).data["image"], nan)  # fmt: skip


def test_native_documented_example():
    header = (b'{"xtalsym":1,"type":"image","series_id":7,"image_id":0,'
              b'"dtype":"<u2","shape":[2,3]}')  # fmt: skip
    payload = bytes.fromhex("0100 0200 0300 0a00 0b00 ffff".replace(" ", ""))
    event = decode("native", [header, payload])
    np.testing.assert_array_equal(event.data["image"], [[1, 2, 3], [10, 11, 65535]])
    head = json.loads(header)
    for change, reason in (({"dtype": "<u8"}, "bad_dtype"), ({"dtype": "O"}, "bad_dtype"),
                           ({"shape": [3, 3]}, "truncated"), ({"shape": [1, 2]}, "shape_mismatch"),
                           ({"xtalsym": 2}, "bad_field"), ({"type": "pickle"}, "unknown_type"),
                           ({"compression": "zstd"}, "bad_compression")):  # fmt: skip
        frames = [json.dumps({**head, **change}).encode(), payload]
        assert _assert_bad(decode_native, frames).reason == reason, change
    assert _assert_bad(decode_native, [header]).reason == "bad_frames"
    assert _assert_bad(decode_native, [b'{"a": NaN}', payload]).reason == "not_json"


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=3), st.dictionaries(
    st.sampled_from(["xtalsym", "type", "series_id", "image_id", "dtype", "shape",
                     "compression", "user_data", "wavelength_m"]),
    st.none() | st.integers(-5, 2**40) | st.text(max_size=5)
    | st.lists(st.integers(-3, 2**33), max_size=3), max_size=9))  # fmt: skip
def test_native_fuzz(frames, head):
    _assert_bad(decode_native, frames)
    _assert_bad(decode_native, [json.dumps(head).encode(), *frames[:1]])
    _assert_bad(decode_native, [json.dumps({"xtalsym": 1, "type": "image", **head}).encode(),
                                *frames[:1]])  # fmt: skip


# ---------------------------------------------------------------- dispatcher


def test_dispatcher():
    assert PROTOCOLS == ("stream_v2", "stream_v1", "native")
    assert decode("stream_v2", encode_stream_v2_end(series_id=1)) == SeriesEnd(1)
    assert decode("stream_v1", encode_stream_v1_end(series_id=1)) == SeriesEnd(1)
    assert decode("native", encode_native_end(series_id=1)) == SeriesEnd(1)
    with pytest.raises(ValueError, match="unknown protocol"):
        decode("stream_v3", [])
    assert not issubclass(BadMessage, (KeyError, TypeError)) and issubclass(BadMessage, ValueError)


def test_lz4_block_is_raw_for_v1_and_native():
    """V1 'lz4<' and native lz4 are raw LZ4 blocks with no size prefix."""
    data = bytes(range(256)) * 4
    assert lz4.block.decompress(lz4.block.compress(data, store_size=False),
                                uncompressed_size=len(data)) == data  # fmt: skip


# ------------------------------------------------------------------ what real streams were seen to send


def test_decode_parts_start_and_image_in_one_message():
    """A start and image 0 as one ZeroMQ message (V2: two CBOR parts; V1: header parts then
    image parts): decode_parts gives both; decode stays strict; two images are still bad."""
    from xtalsym.daemon.protocols import decode_parts

    frame = np.arange(12, dtype=np.uint16).reshape(3, 4)
    geo = {"beam_center_x_px": 1.5, "beam_center_y_px": 1.0, "pixel_size_x_m": 75e-6, "pixel_size_y_m": 75e-6,
           "wavelength_m": 1e-10, "detector_distance_m": 0.2, "image_size_x_px": 4, "image_size_y_px": 3}
    start = encode_stream_v2_start(series_id=3, geometry=geo, channels=["c"], image_dtype="uint16",
                                   number_of_images=1)
    image = encode_stream_v2_image(series_id=3, image_id=0, data={"c": frame})
    events = decode_parts("stream_v2", [*start, *image])
    assert [type(e).__name__ for e in events] == ["SeriesStart", "Image"]
    np.testing.assert_array_equal(events[1].data["c"], frame)
    assert [type(e).__name__ for e in decode_parts("stream_v2", [*start, b"junk"])] == ["SeriesStart", "BadMessage"]
    with pytest.raises(BadMessage, match="bad_frames"):
        decode_parts("stream_v2", [*image, *image])
    with pytest.raises(BadMessage, match="bad_frames"):
        decode("stream_v2", [*start, *image])
    header = encode_stream_v1_header(series_id=4, config={"detector_distance": 0.2}, appendix={"user": 1})
    v1 = decode_parts("stream_v1", [*header, *encode_stream_v1_image(series_id=4, frame=0, array=frame)])
    assert [type(e).__name__ for e in v1] == ["SeriesStart", "Image"] and v1[0].user_data == {"user": 1}
    with pytest.raises(BadMessage, match="unknown_type"):
        decode("stream_v1", [*header, *encode_stream_v1_image(series_id=4, frame=0, array=frame)])


def test_odd_start_parts_are_left_out_with_a_warning():
    """A start's mask/flatfield in an unexpected encoding keeps the start (the series)."""
    mask = np.zeros((3, 4), np.uint32)
    start = decode("stream_v2", encode_stream_v2_start(
        series_id=1, geometry={}, channels=["c"], image_dtype="uint16", number_of_images=1,
        extra={"pixel_mask": {"c": mask.tobytes()}, "flatfield": b"\0" * 48}))
    assert start.pixel_mask is None and start.flatfield is None and len(start.warnings) == 2
    assert "48 raw bytes" in start.warnings[1]
    parts = encode_stream_v1_header(series_id=1, config={}, header_detail="all", pixel_mask=mask,
                                    flatfield=np.ones((3, 4), np.float32))
    parts = [p.replace(b'"dflatfield-1.0"', b'"flatfield-1.0"') for p in parts]
    v1 = decode("stream_v1", parts)
    assert v1.flatfield is None and v1.pixel_mask is not None
    assert len(v1.warnings) == 1 and "flatfield-1.0" in v1.warnings[0]
    with pytest.raises(BadMessage) as rejected:
        decode("stream_v2", encode_stream_v2_start(series_id=6, geometry={}, channels=["c"], image_dtype="uint16",
                                                   number_of_images=1, extra={"incident_wavelength": -1.0}))
    assert rejected.value.message_type == "start" and rejected.value.series_id == 6
