"""decode(..., defer_decompression=True): image payloads checked at decode time, decompressed
later (in the daemon's workers) to exactly what the eager decoders return."""

from __future__ import annotations

import cbor2
import numpy as np
import pytest

from xtalsym.daemon import protocols as proto
from xtalsym.daemon.protocols import BadMessage, CompressedFrame, materialise


def sparse_frame(rows: int = 130, cols: int = 170, dtype=np.uint16) -> np.ndarray:
    rng = np.random.default_rng(0)
    frame = np.zeros((rows, cols), dtype)
    frame[rng.integers(0, rows, 200), rng.integers(0, cols, 200)] = rng.integers(1, 5000, 200)
    return frame


@pytest.mark.parametrize("compression", ["bslz4", "lz4"])
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.float32])
def test_stream_v2_deferred_equals_eager(compression, column_major, dtype):
    frame = sparse_frame(dtype=dtype)
    msg = proto.encode_stream_v2_image(series_id=3, image_id=7, data={"threshold_1": frame},
                                       compression=compression, column_major=column_major)
    lazy = proto.decode("stream_v2", msg, defer_decompression=True).data["threshold_1"]
    assert isinstance(lazy, CompressedFrame) and lazy.shape == frame.shape and lazy.ndim == 2
    eager = proto.decode("stream_v2", msg).data["threshold_1"]
    out = materialise(lazy)
    assert out.dtype == eager.dtype and out.flags.c_contiguous
    np.testing.assert_array_equal(out, eager)
    np.testing.assert_array_equal(out, frame)


def test_uncompressed_payloads_are_decoded_at_once():
    frame = sparse_frame()
    msg = proto.encode_stream_v2_image(series_id=1, image_id=0, data={"t": frame}, compression=None)
    out = proto.decode("stream_v2", msg, defer_decompression=True).data["t"]
    assert isinstance(out, np.ndarray) and materialise(out) is out
    v1 = proto.encode_stream_v1_image(series_id=1, frame=0, array=frame, encoding="<")
    assert isinstance(proto.decode("stream_v1", v1, defer_decompression=True).data["image"], np.ndarray)


@pytest.mark.parametrize("encoding", ["bs16-lz4<", "lz4<"])
def test_stream_v1_deferred_equals_eager(encoding):
    frame = sparse_frame()
    msg = proto.encode_stream_v1_image(series_id=2, frame=4, array=frame, encoding=encoding)
    lazy = proto.decode("stream_v1", msg, defer_decompression=True).data["image"]
    assert isinstance(lazy, CompressedFrame)
    np.testing.assert_array_equal(materialise(lazy), proto.decode("stream_v1", msg).data["image"])


def test_native_deferred_equals_eager():
    frame = sparse_frame()
    msg = proto.encode_native_image(series_id=1, series_unique_id="u", image_id=0, array=frame, compression="lz4")
    lazy = proto.decode("native", msg, defer_decompression=True).data["image"]
    assert isinstance(lazy, CompressedFrame)
    np.testing.assert_array_equal(materialise(lazy), frame)


def _v2_with_blob(frame: np.ndarray, mutate) -> list[bytes]:
    """An image message whose compressed bytes are ``mutate``d (the CBOR rebuilt around them)."""
    msg = cbor2.loads(proto.encode_stream_v2_image(series_id=1, image_id=0, data={"t": frame})[0])
    typed = msg["data"]["t"].value[1]
    algorithm, elem, blob = typed.value.value
    compressed = cbor2.CBORTag(56500, [algorithm, elem, mutate(bytes(blob))])
    data = cbor2.CBORTag(40, [list(frame.shape), cbor2.CBORTag(typed.tag, compressed)])
    rebuilt = {**{k: v for k, v in msg.items() if k != "data"}, "data": {"t": data}}
    return [cbor2.dumps(cbor2.CBORTag(55799, rebuilt))]


def test_framing_is_still_checked_at_decode_time():
    frame = sparse_frame()
    for mutate, reason in [(lambda b: b[:8], "truncated"),  # no full header
                           (lambda b: (10**9).to_bytes(8, "big") + b[8:], "shape_mismatch")]:  # wrong size
        msg = _v2_with_blob(frame, mutate)
        with pytest.raises(BadMessage) as err:
            proto.decode("stream_v2", msg, defer_decompression=True)
        assert err.value.reason == reason


def test_a_corrupt_stream_fails_when_decompressed():
    frame = sparse_frame()
    msg = _v2_with_blob(frame, lambda b: b[:12] + b"\xff" * (len(b) - 12))  # header fine, blocks garbage
    lazy = proto.decode("stream_v2", msg, defer_decompression=True).data["t"]
    with pytest.raises(BadMessage) as err:
        materialise(lazy)
    assert err.value.reason == "bad_compression"
