"""A bslz4 frame decoded straight to its non-zero usable pixels (bslz4-to-sparse) and binned from
those: the same pixels as the dense decoder, the same calibrated frame as the dense calibration
(masks, gaps, dead pixels, saturation, flatfield, dense frames, targets with no valid pixel), and
a malformed frame falls back to the dense decoder and its error."""

from __future__ import annotations

import numpy as np
import pytest

from xtalsym.daemon import calibrate as cal
from xtalsym.daemon import workers
from xtalsym.daemon.protocols import BadMessage, CompressedFrame, materialise
from xtalsym.daemon.protocols.common import bslz4_chain_ok, bslz4_compress, deferred
from xtalsym.daemon.sim import DetectorGeometry, render, to_counts
from xtalsym.offline import structures

pytest.importorskip("bslz4_to_sparse")

TRAINING = cal.TrainingGeometry(3.5e-12, 0.4, 75e-6, 256)
FINE = DetectorGeometry(pixels_x=720, pixels_y=700, pixel_size_m=25e-6, distance_m=0.45, wavelength_m=3.1e-12,
                        beam_center_x_px=371.5, beam_center_y_px=338.5)


def compressed(frame: np.ndarray, algorithm: str = "bslz4", **kwargs) -> CompressedFrame:
    blob = bslz4_compress(frame.tobytes(), frame.dtype.itemsize, **kwargs)
    return deferred(blob, algorithm, frame.dtype, frame.shape, "test image")


@pytest.fixture(scope="module")
def nacl_frame() -> np.ndarray:
    nacl = structures.load_structure(structures.shipped_structures_dir() / "NaCl.cif").structure
    frame = to_counts(render(nacl, FINE, axes=("z",))["z"], None).astype(np.uint16)
    frame[300:306] = 65535  # a gap (masked below)
    frame[:, 500:503] = 65535
    frame[40, 41] = 65535  # a dead pixel the mask does not name: excluded by its value
    frame[410, 380] = 9999  # saturated (saturation_value 9000)
    return frame


@pytest.fixture(scope="module")
def gap_mask(nacl_frame) -> np.ndarray:
    mask = np.zeros(nacl_frame.shape, np.uint32)
    mask[300:306] = 1
    mask[:, 500:503] = 1
    return mask


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_nonzero_pixels_are_the_dense_decoders(dtype):
    rng = np.random.default_rng(5)
    frame = np.zeros((97, 131), dtype)  # 12707 pixels: full blocks, a partial block and a raw tail
    frame.flat[rng.choice(frame.size, 400, replace=False)] = rng.integers(1, 200, 400)
    usable = np.ones(frame.size, bool)
    usable[3000:3500] = False
    lazy = compressed(frame)
    for mask in (None, usable):
        indices, values = lazy.nonzero(mask)
        dense = materialise(lazy).ravel()
        want = np.flatnonzero((dense != 0) & (True if mask is None else mask))
        np.testing.assert_array_equal(indices, want)
        np.testing.assert_array_equal(values, dense[want])
        assert values.dtype == dtype


def test_frames_it_cannot_decode_say_none():
    frame = np.arange(64 * 80, dtype=np.uint16).reshape(64, 80)
    assert compressed(frame, block_bytes=4096).nonzero() is None  # not the 8 KiB DECTRIS block
    assert deferred(bslz4_compress(frame.tobytes(), 2), "bslz4", frame.dtype, (80, 64), "t", order="F").nonzero() is None
    signed = frame.astype(np.int16)
    assert compressed(signed).nonzero() is None
    big = frame.astype(">u2")
    assert deferred(bslz4_compress(big.tobytes(), 2), "bslz4", big.dtype, big.shape, "t").nonzero() is None


def test_broken_framing_takes_the_dense_path_and_its_error():
    frame = np.zeros((200, 300), np.uint16)
    frame[50, 60] = 7
    good = bslz4_compress(frame.tobytes(), 2)
    assert bslz4_chain_ok(good, 2, frame.nbytes)
    # a block size pointing past the end, a truncated last block: never handed to the C decoder
    for blob in (good[:12] + (10**6).to_bytes(4, "big") + good[16:], good[:-1]):
        assert not bslz4_chain_ok(blob, 2, frame.nbytes)
        lazy = CompressedFrame(blob, "bslz4", frame.dtype.str, frame.shape)
        assert lazy.nonzero() is None
        with pytest.raises(BadMessage) as err:
            lazy.decompress()
        assert err.value.reason == "bad_compression"
    # trailing bytes: the dense decoder ignores them, so the frame is still decoded (densely)
    trailing = CompressedFrame(good + b"\0", "bslz4", frame.dtype.str, frame.shape)
    assert not bslz4_chain_ok(trailing.blob, 2, frame.nbytes) and trailing.nonzero() is None
    np.testing.assert_array_equal(trailing.decompress(), frame)


def test_a_corrupt_lz4_block_falls_back_to_the_dense_error(capfd):
    frame = np.zeros((200, 300), np.uint16)
    good = bytearray(bslz4_compress(frame.tobytes(), 2))
    size = int.from_bytes(good[12:16], "big")
    good[16:16 + size] = b"\xff" * size  # the framing adds up, the first block's LZ4 does not
    lazy = CompressedFrame(bytes(good), "bslz4", frame.dtype.str, frame.shape)
    assert lazy.nonzero() is None
    with pytest.raises(BadMessage) as err:
        lazy.decompress()
    assert err.value.reason == "bad_compression"


@pytest.mark.parametrize("flat", [False, True])
def test_binning_the_nonzero_pixels_equals_the_dense_calibration(nacl_frame, gap_mask, flat):
    sampling = cal.build_map(cal.FrameGeometry(**FINE.stream_geometry()), TRAINING, "area")
    flatfield = None
    if flat:
        flatfield = np.full(nacl_frame.shape, 1.0, np.float32)
        flatfield[:, :200] = 1.5
        flatfield[10, 10] = np.nan  # excluded
    prepared = cal.prepare(sampling, pixel_mask=gap_mask, flatfield=flatfield)
    assert prepared.takes_nonzero
    lazy = compressed(nacl_frame)
    indices, values = lazy.nonzero(prepared.usable)
    sparse = prepared.apply_nonzero(indices, values, saturation_value=9000)
    dense = prepared.apply(nacl_frame, saturation_value=9000)
    assert dense.max() > 0
    np.testing.assert_allclose(sparse, dense, rtol=1e-6, atol=0)


def test_a_dense_frame_and_targets_with_no_valid_pixel(nacl_frame):
    """Background everywhere (every pixel non-zero) and a masked block wider than a target pixel
    (its targets take the bilinear fallback, which reads the frame at arbitrary pixels)."""
    frame = (nacl_frame.astype(np.int64) + np.random.default_rng(2).poisson(20, nacl_frame.shape)).clip(
        0, 65535).astype(np.uint16)
    mask = np.zeros(frame.shape, np.uint8)
    mask[100:160, 100:160] = 1  # ~20 x 20 target pixels' worth of frame: some targets lose every pixel
    sampling = cal.build_map(cal.FrameGeometry(**FINE.stream_geometry()), TRAINING, "area")
    prepared = cal.prepare(sampling, pixel_mask=mask)
    indices, values = compressed(frame).nonzero(prepared.usable)
    assert indices.size > cal.DENSE_FRACTION * frame.size
    dense = prepared.apply(frame)
    np.testing.assert_allclose(prepared.apply_nonzero(indices, values), dense, rtol=1e-6, atol=0)
    # a frame with no non-zero pixel at all: the empty grid, as densely
    empty = np.zeros(frame.shape, np.uint16)
    none = compressed(empty).nonzero(prepared.usable)
    assert none[0].size == 0
    np.testing.assert_array_equal(prepared.apply_nonzero(*none), prepared.apply(empty))


def test_the_worker_bins_a_compressed_frame_without_decompressing_it(nacl_frame, gap_mask, tmp_path, monkeypatch):
    mask_path = tmp_path / "mask.npy"
    np.save(mask_path, gap_mask.astype(np.uint8))
    job = workers.FrameJob(frame=compressed(nacl_frame), frame_geometry=cal.FrameGeometry(**FINE.stream_geometry()),
                           training=TRAINING, method="area", mask_path=str(mask_path), saturation_value=9000,
                           axis="z", shaping_method="fast", size=224)
    dense_job = workers.FrameJob(**{**job.__dict__, "frame": nacl_frame})
    want = workers.process_frame(dense_job)

    def no_dense(self):
        raise AssertionError("the sparse path decompressed the dense frame")

    monkeypatch.setattr(CompressedFrame, "decompress", no_dense)
    np.testing.assert_array_equal(workers.process_frame(job), want)
    shaped, *_ = workers.shape_timed(job)
    np.testing.assert_array_equal(shaped, want)


def test_threads_decoding_at_once_get_their_own_pixels():
    """The C decoder releases the GIL and writes into reused buffers: one set per thread."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(9)
    frames = []
    for k in range(4):
        frame = np.zeros((300, 400), np.uint16)
        frame.flat[rng.choice(frame.size, 2000 + 500 * k, replace=False)] = k + 1
        frames.append(frame)
    lazies = [compressed(f) for f in frames]

    def check(k: int) -> bool:
        indices, values = lazies[k % 4].nonzero()
        want = np.flatnonzero(frames[k % 4])
        return np.array_equal(indices, want) and bool((values == k % 4 + 1).all())

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, range(200)))
