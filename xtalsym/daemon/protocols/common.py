"""Events, the bad-message error, and codecs shared by the stream decoders.

Everything here works on bytes already in memory; nothing opens a socket. Decoders
raise only :class:`BadMessage`, whose ``reason`` is one of :data:`REASONS`.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import lz4.block
import numpy as np

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
"""Default cap on the number of elements of any decoded array (64 Mi)."""

REASONS = frozenset(
    {
        "bad_frames",  # wrong number of ZeroMQ frames for the message kind
        "not_cbor",  # the bytes are not (well-formed) CBOR
        "not_json",  # a JSON part is not UTF-8 JSON or not an object
        "unknown_type",  # message type / htype we do not handle
        "missing_field",  # a required field is absent
        "bad_field",  # a field has the wrong type or an impossible value
        "bad_tag",  # a CBOR tag is missing, unknown or holds the wrong item
        "bad_dtype",  # element type not supported or inconsistent
        "bad_compression",  # unknown algorithm or the compressed stream is corrupt
        "truncated",  # fewer bytes than the framing declares
        "shape_mismatch",  # data length disagrees with dims x element size
        "too_large",  # declared size above max_pixels
    }
)


class BadMessage(ValueError):
    """A message that cannot be decoded; ``reason`` is a short key from REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:  # programming error guard, never from input
            raise AssertionError(f"undocumented reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        # which kind of message failed, when the decoder got that far ("start", "image", "end"),
        # and its series id: a rejected start is worth a WARNING of its own (the series' images follow)
        self.message_type: str | None = None
        self.series_id: int | None = None

    def __reduce__(self):  # picklable across processes (two-argument __init__)
        return type(self), (self.reason, self.message)


def failed_as(exc: BadMessage, message_type: str, series_id: Any) -> BadMessage:
    """``exc`` marked as the failure of a ``message_type`` message of ``series_id`` (when an int)."""
    exc.message_type = message_type
    if isinstance(series_id, int) and not isinstance(series_id, bool) and series_id >= 0:
        exc.series_id = series_id
    return exc


GEOMETRY_KEYS = (
    "beam_center_x_px",
    "beam_center_y_px",
    "pixel_size_x_m",
    "pixel_size_y_m",
    "wavelength_m",
    "detector_distance_m",
    "image_size_x_px",
    "image_size_y_px",
)
"""Keys of ``SeriesStart.geometry``; a value the stream did not give is None."""

ANGSTROM_M = 1e-10
HC_EV_ANGSTROM = 12398.419843320026  # h*c in eV*Angstrom (CODATA 2018)


@dataclass(frozen=True)
class SeriesStart:
    """Start of a series: geometry in SI units plus everything else the stream sent."""

    series_id: int
    series_unique_id: str | None
    geometry: dict[str, float | int | None]
    channels: list[str] = field(default_factory=list)
    image_dtype: str | None = None
    number_of_images: int | None = None
    user_data: Any = None
    pixel_mask: Any = None  # ndarray, or dict channel -> ndarray for stream V2
    flatfield: Any = None  # same layout as pixel_mask
    raw: dict = field(default_factory=dict)
    # parts of the start the decoder could not use and left out (the series is kept), one line each
    warnings: tuple[str, ...] = ()
    # geometry key -> the stream field its value came from (``detector_translation[2]``, ...)
    geometry_fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Image:
    """One exposure: ``data`` maps channel name to a 2-D array (rows = y)."""

    series_id: int
    image_id: int
    data: dict[str, np.ndarray]
    user_data: Any = None
    real_time: float | None = None
    start_time: float | None = None
    stop_time: float | None = None
    series_unique_id: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SeriesEnd:
    series_id: int
    series_unique_id: str | None = None


Event = SeriesStart | Image | SeriesEnd


# ---------------------------------------------------------------- field checks


def require(msg: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """Return ``msg[key]`` if present and of ``kind`` (bool is never an int)."""
    if key not in msg:
        raise BadMessage("missing_field", f"{where} has no {key!r}")
    return check_kind(msg[key], key, kind, where)


def optional(msg: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = msg.get(key)
    if value is None:
        return None
    return check_kind(value, key, kind, where)


def check_kind(value: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise BadMessage("bad_field", f"{where} {key!r} is a bool ({value!r})")
    if not isinstance(value, kinds):
        raise BadMessage(
            "bad_field", f"{where} {key!r} has type {type(value).__name__}: {_short(value)}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise BadMessage("bad_field", f"{where} {key!r} is not finite: {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and float in kinds:
        try:
            return float(value)
        except OverflowError:
            raise BadMessage("bad_field", f"{where} {key!r} overflows a float") from None
    return value


def optional_number(msg: dict, key: str, where: str) -> float | None:
    return optional(msg, key, (int, float), where)


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - repr of odd objects must not escape
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_seconds(value: Any, key: str, where: str) -> float | None:
    """A rational [num, den] (or Fraction, or plain number) as float seconds."""
    if value is None:
        return None
    if isinstance(value, Fraction):
        try:
            return float(value)
        except OverflowError:
            raise BadMessage("bad_field", f"{where} {key!r} overflows a float") from None
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise BadMessage("bad_field", f"{where} {key!r} is not a rational: {_short(value)}")
        num, den = value
        if den <= 0:
            raise BadMessage("bad_field", f"{where} {key!r} has denominator {den}")
        try:
            return num / den
        except OverflowError:
            raise BadMessage("bad_field", f"{where} {key!r} overflows: {_short(value)}") from None
    return check_kind(value, key, (int, float), where)


def plain(value: Any, depth: int = 0) -> Any:
    """Read-only containers from cbor2 (frozendict, tuple) as dict/list, recursively."""
    if depth > 100:
        raise BadMessage("bad_field", "nesting deeper than 100")
    if isinstance(value, dict) or (hasattr(value, "items") and hasattr(value, "keys")):
        return {_key(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    return value


def _key(key: Any) -> Any:
    if isinstance(key, (str, int, float, bytes, bool)) or key is None:
        return key
    return _short(key)


def json_object(part: bytes, where: str) -> dict:
    """Parse one JSON part that must be an object (no NaN/Infinity literals)."""
    if not isinstance(part, (bytes, bytearray, memoryview)):
        raise BadMessage("bad_frames", f"{where} frame is {type(part).__name__}, not bytes")
    try:
        obj = json.loads(bytes(part).decode("utf-8"), parse_constant=_no_constant)
    except BadMessage:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad frame
        raise BadMessage("not_json", f"{where}: {type(exc).__name__}: {_short(str(exc))}") from None
    if not isinstance(obj, dict):
        raise BadMessage("not_json", f"{where} is a JSON {type(obj).__name__}, not an object")
    return obj


def _no_constant(name: str) -> Any:
    raise BadMessage("not_json", f"JSON constant {name} is not allowed")


def dims_2d(dims: Any, where: str, max_pixels: int) -> tuple[int, int]:
    """Validate a 2-D shape of positive ints and its size against max_pixels."""
    if not isinstance(dims, (list, tuple)) or len(dims) != 2:
        raise BadMessage("shape_mismatch", f"{where} dims must be 2 integers, got {_short(dims)}")
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
            raise BadMessage(
                "shape_mismatch", f"{where} dims must be positive ints: {_short(dims)}"
            )
    if dims[0] * dims[1] > max_pixels:
        raise BadMessage(
            "too_large", f"{where} dims {dims[0]}x{dims[1]} exceed max_pixels={max_pixels}"
        )
    return int(dims[0]), int(dims[1])


# ---------------------------------------------------------------- HDF5-filter framing


LZ4_MAX_RATIO = 255
"""LZ4 expands at most ~255x (one length byte adds at most 255 output bytes)."""


def check_expansion(blob_len: int, expected_nbytes: int, where: str, algorithm: str) -> None:
    """Refuse, before allocating, an output no LZ4 stream of ``blob_len`` bytes can produce."""
    if expected_nbytes > LZ4_MAX_RATIO * blob_len + 64:
        raise BadMessage(
            "bad_compression",
            f"{where}: {algorithm}: {blob_len} compressed bytes cannot expand to {expected_nbytes} "
            f"(at most {LZ4_MAX_RATIO}x)",
        )


def framed_header(blob: bytes, expected_nbytes: int, where: str) -> int:
    """Check the 12-byte header (8-byte BE size, 4-byte BE block size) BEFORE decoding.

    Returns the block size in bytes. The declared size must equal ``expected_nbytes``
    (dims x element size), so nothing is ever allocated from an untrusted header.
    """
    if len(blob) < 12:
        raise BadMessage("truncated", f"{where}: {len(blob)} bytes, header needs 12")
    total, block = struct.unpack(">QI", bytes(blob[:12]))
    if total != expected_nbytes:
        raise BadMessage(
            "shape_mismatch",
            f"{where}: header declares {total} bytes, dims x element size is {expected_nbytes}",
        )
    if block == 0:
        raise BadMessage("bad_compression", f"{where}: block size {block} for {total} bytes")
    return block


def decompress_framed(
    blob: bytes, algorithm: str, elem_size: int, expected_nbytes: int, where: str
) -> bytes:
    """Decompress 'bslz4' or 'lz4' (HDF5-filter framing) with dectris-compression."""
    from dectris.compression import decompress  # C extension; imported lazily

    if algorithm not in ("bslz4", "lz4"):
        raise BadMessage("bad_compression", f"{where}: unknown algorithm {_short(algorithm)}")
    framed_header(blob, expected_nbytes, where)
    check_expansion(len(blob), expected_nbytes, where, algorithm)
    if algorithm == "bslz4" and elem_size not in (1, 2, 4, 8):
        raise BadMessage("bad_compression", f"{where}: bslz4 element size {elem_size}")
    try:
        if algorithm == "bslz4":
            out = decompress(bytes(blob), "bslz4", elem_size=elem_size)
        else:
            out = decompress(bytes(blob), "lz4")
    except Exception as exc:  # noqa: BLE001 - RuntimeError/ValueError from the C code
        raise BadMessage("bad_compression", f"{where}: {algorithm}: {_short(str(exc))}") from None
    if len(out) != expected_nbytes:  # dectris-compression returns b"" on a bad header
        raise BadMessage(
            "bad_compression",
            f"{where}: {algorithm} gave {len(out)} bytes, expected {expected_nbytes}",
        )
    return out


def lz4_block_decompress(blob: bytes, expected_nbytes: int, where: str) -> bytes:
    """A raw LZ4 block (no framing) of known uncompressed size."""
    check_expansion(len(blob), expected_nbytes, where, "lz4 block")
    try:
        out = lz4.block.decompress(bytes(blob), uncompressed_size=expected_nbytes)
    except Exception as exc:  # noqa: BLE001 - LZ4BlockError and friends
        raise BadMessage("bad_compression", f"{where}: lz4 block: {_short(str(exc))}") from None
    if len(out) != expected_nbytes:
        raise BadMessage(
            "bad_compression", f"{where}: lz4 gave {len(out)} bytes, expected {expected_nbytes}"
        )
    return out


SPARSE_BLOCK_BYTES = 8192  # bslz4_to_sparse decodes only bitshuffle's default block size (DECTRIS writes it)
_sparse_local = threading.local()  # per thread: the decoder releases the GIL and writes into these buffers


def _bslz4_to_sparse():
    """The bslz4 -> (indices, values) decoder of the optional ``bslz4-to-sparse`` package, or None."""
    try:
        import bslz4_to_sparse
    except ImportError:
        return None
    return bslz4_to_sparse


def bslz4_chain_ok(blob: bytes, elem_size: int, expected_nbytes: int) -> bool:
    """True when the bslz4 framing of ``blob`` (header already checked by :func:`framed_header`) is
    complete: every block's 4-byte size lies inside the blob, the blocks end where the raw tail of
    ``nelem % 8`` elements begins, and the tail ends the blob. The sparse decoder trusts these sizes
    (it would read past the buffer otherwise); a blob that fails takes the checked dense path."""
    block = SPARSE_BLOCK_BYTES
    full, rest = divmod(expected_nbytes, block)
    partial = rest - rest % (8 * elem_size)
    n_blocks = full + (1 if partial else 0)
    unpack = struct.Struct(">I").unpack_from
    end = len(blob)
    p = 12
    for _ in range(n_blocks):
        if p + 4 > end:
            return False
        p += 4 + unpack(blob, p)[0]
    return p + (rest - partial) == end


def bslz4_nonzero(blob: bytes, *, dtype: np.dtype, expected_nbytes: int, usable: np.ndarray | None,
                  where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The non-zero pixels of a bslz4 frame where ``usable`` (flat bool, or None: all), decoded
    straight to (flat indices uint32 ascending, values) without the dense frame (bslz4-to-sparse:
    each 8 KiB block is decompressed and scanned in cache; a 16M frame's 36 MB are never written).

    None when this frame cannot be decoded that way (package missing, not a native unsigned
    integer type of 1, 2 or 4 bytes, another block size, framing that does not add up): the
    caller decompresses it densely, which gives the precise error for a corrupt frame (the
    package also prints a line of its own to stdout for a corrupt LZ4 block)."""
    dtype = np.dtype(dtype)
    lib = _bslz4_to_sparse()
    decode = None if lib is None else {1: lib.bslz4_uint8_t, 2: lib.bslz4_uint16_t, 4: lib.bslz4_uint32_t}.get(
        dtype.itemsize)
    if decode is None or dtype.kind != "u" or not dtype.isnative or len(blob) < 12:
        return None
    n = expected_nbytes // dtype.itemsize
    if struct.unpack(">QI", bytes(blob[:12])) != (expected_nbytes, SPARSE_BLOCK_BYTES):
        return None
    if not bslz4_chain_ok(blob, dtype.itemsize, expected_nbytes):
        return None
    if usable is None:
        usable = getattr(_sparse_local, "all_usable", None)
        if usable is None or usable.size != n:
            usable = _sparse_local.all_usable = np.ones(n, np.uint8)
    elif usable.dtype == np.bool_:
        usable = usable.view(np.uint8)
    if usable.shape != (n,):
        raise ValueError(f"usable has shape {usable.shape}, the frame {n} pixels")
    buffers = getattr(_sparse_local, "buffers", None)
    if buffers is None or buffers[0].size != n or buffers[0].dtype != dtype:
        # reused frame after frame (a 16M frame: 108 MB reserved, only the pages written are used)
        buffers = _sparse_local.buffers = (np.empty(n, dtype), np.empty(n, np.uint32))
    values, indices = buffers
    found = decode(np.frombuffer(blob, np.uint8), usable, values, indices, 0)
    if found < 0:  # a corrupt LZ4 block: the dense decoder says what is wrong with it
        return None
    return indices[:found].copy(), values[:found].copy()


@dataclass(frozen=True, eq=False)
class CompressedFrame:
    """An image's payload checked but not yet decompressed (``decode(..., defer_decompression=True)``).

    The daemon's ingest thread decodes messages; decompressing a 16M frame there (~20 ms) and
    pickling the 36 MB result to a worker would cap the daemon at one core. Instead the
    framing, sizes and expansion bound are checked here (a message that fails them is still
    a bad message at decode time) and :meth:`decompress` runs in the worker; a corrupt
    compressed stream then raises :class:`BadMessage` (``bad_compression``) there.
    """

    blob: bytes
    algorithm: str  # "bslz4" / "lz4" (HDF5-filter framing) or "lz4_block" (raw block)
    dtype: str  # numpy dtype string of the payload, byte order included
    shape: tuple[int, int]  # (rows, cols) of the decompressed array
    order: str = "C"  # "F": column-major payload (stream V2 tag 1040)
    where: str = "image"

    ndim = 2

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def decompress(self) -> np.ndarray:
        """The C-contiguous, native-order array (read-only when no copy was needed)."""
        dtype = np.dtype(self.dtype)
        if self.algorithm == "lz4_block":
            raw = lz4_block_decompress(self.blob, self.nbytes, self.where)
        else:
            raw = decompress_framed(self.blob, self.algorithm, dtype.itemsize, self.nbytes, self.where)
        rows, cols = self.shape
        array = np.frombuffer(raw, dtype=dtype)
        array = array.reshape((rows, cols)) if self.order == "C" else array.reshape((cols, rows)).T
        if not dtype.isnative:
            array = array.astype(dtype.newbyteorder("="))
        return np.ascontiguousarray(array)

    def nonzero(self, usable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(flat C-order indices, values) of the non-zero pixels where ``usable`` (flat bool), without
        the dense array; None when only :meth:`decompress` can decode this frame (see
        :func:`bslz4_nonzero`)."""
        if self.algorithm != "bslz4" or self.order != "C":
            return None
        return bslz4_nonzero(self.blob, dtype=np.dtype(self.dtype), expected_nbytes=self.nbytes, usable=usable,
                             where=self.where)


def deferred(blob: bytes, algorithm: str, dtype: np.dtype, shape: tuple[int, int], where: str,
             order: str = "C") -> CompressedFrame:
    """Check a compressed payload as the eager decoders do, without decompressing it."""
    nbytes = shape[0] * shape[1] * dtype.itemsize
    if algorithm == "lz4_block":
        check_expansion(len(blob), nbytes, where, "lz4 block")
    else:
        if algorithm not in ("bslz4", "lz4"):
            raise BadMessage("bad_compression", f"{where}: unknown algorithm {_short(algorithm)}")
        framed_header(blob, nbytes, where)
        check_expansion(len(blob), nbytes, where, algorithm)
    return CompressedFrame(bytes(blob), algorithm, dtype.str, (int(shape[0]), int(shape[1])), order, where)


def materialise(frame: Any) -> np.ndarray:
    """An image array as decoded: a :class:`CompressedFrame` decompressed, an array as is."""
    return frame.decompress() if isinstance(frame, CompressedFrame) else frame


# Pure numpy + lz4.block implementation of the two framings. The encoders use it
# (dectris-compression only decompresses), and the tests use the decompressor as an
# independent second decoder of the real DECTRIS captures.

BSHUF_BLOCK_BYTES = 8192  # bitshuffle's target block size, as DECTRIS writes it


def _bitshuffle(buf: np.ndarray, elem_size: int) -> np.ndarray:
    """(nblocks, n*elem_size) uint8 -> bit planes, n a multiple of 8 (bitshuffle order)."""
    nb = buf.shape[0]
    n = buf.shape[1] // elem_size
    bits = np.unpackbits(buf.reshape(nb, n, elem_size, 1), axis=-1, bitorder="little")
    planes = bits.reshape(nb, n, elem_size * 8).transpose(0, 2, 1)  # (nb, bit, elem)
    return np.packbits(planes, axis=-1, bitorder="little").reshape(nb, -1)


def _bitunshuffle(buf: np.ndarray, elem_size: int) -> np.ndarray:
    """Inverse of :func:`_bitshuffle`."""
    nb = buf.shape[0]
    n = buf.shape[1] // elem_size
    planes = np.unpackbits(
        buf.reshape(nb, elem_size * 8, n // 8), axis=-1, bitorder="little"
    )  # (nb, bit, elem)
    bits = planes.transpose(0, 2, 1).reshape(nb, n, elem_size, 8)
    return np.packbits(bits, axis=-1, bitorder="little").reshape(nb, -1)


def _bs_blocks(nelem: int, block_elems: int) -> list[int]:
    """Element counts of the compressed blocks; the nelem % 8 tail is stored raw."""
    full, rest = divmod(nelem, block_elems)
    sizes = [block_elems] * full
    if rest - rest % 8:
        sizes.append(rest - rest % 8)
    return sizes


def bslz4_compress(data: bytes, elem_size: int, block_bytes: int = BSHUF_BLOCK_BYTES) -> bytes:
    """Bitshuffle + LZ4 in HDF5-filter framing (the 12-byte header, per-block sizes)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    nelem = raw.size // elem_size
    block_elems = max(8, (block_bytes // elem_size) // 8 * 8)
    out = [struct.pack(">QI", raw.size, block_elems * elem_size)]
    pos = 0
    for count in _bs_blocks(nelem, block_elems):
        chunk = raw[pos : pos + count * elem_size].reshape(1, -1)
        shuffled = _bitshuffle(chunk, elem_size).tobytes()
        comp = lz4.block.compress(shuffled, store_size=False)
        out.append(struct.pack(">I", len(comp)) + comp)
        pos += count * elem_size
    out.append(raw[pos:].tobytes())
    return b"".join(out)


def bslz4_decompress_numpy(blob: bytes, elem_size: int) -> bytes:
    """Reference decoder (numpy + lz4.block), independent of dectris-compression."""
    total, block_bytes = struct.unpack(">QI", blob[:12])
    nelem = total // elem_size
    block_elems = block_bytes // elem_size
    pos, parts = 12, []
    for count in _bs_blocks(nelem, block_elems):
        (clen,) = struct.unpack(">I", blob[pos : pos + 4])
        plane = lz4.block.decompress(
            blob[pos + 4 : pos + 4 + clen], uncompressed_size=count * elem_size
        )
        parts.append(_bitunshuffle(np.frombuffer(plane, np.uint8).reshape(1, -1), elem_size))
        pos += 4 + clen
    tail = blob[pos:]
    if len(tail) != (nelem % 8) * elem_size:
        raise ValueError(f"tail of {len(tail)} bytes")
    return b"".join(p.tobytes() for p in parts) + tail


def hdf5_lz4_compress(data: bytes, block_bytes: int = 1 << 13) -> bytes:
    """HDF5 LZ4 filter framing; a block that does not shrink is stored raw."""
    block_bytes = max(1, min(block_bytes, len(data))) if data else block_bytes
    out = [struct.pack(">QI", len(data), block_bytes)]
    for pos in range(0, len(data), block_bytes):
        chunk = data[pos : pos + block_bytes]
        comp = lz4.block.compress(chunk, store_size=False)
        if len(comp) >= len(chunk):
            comp = chunk
        out.append(struct.pack(">I", len(comp)) + comp)
    return b"".join(out)


def hdf5_lz4_decompress_numpy(blob: bytes) -> bytes:
    """Reference decoder for the HDF5 LZ4 framing (lz4.block only)."""
    total, block_bytes = struct.unpack(">QI", blob[:12])
    pos, parts, done = 12, [], 0
    while done < total:
        want = min(block_bytes, total - done)
        (clen,) = struct.unpack(">I", blob[pos : pos + 4])
        chunk = blob[pos + 4 : pos + 4 + clen]
        parts.append(chunk if clen == want else lz4.block.decompress(chunk, uncompressed_size=want))
        pos += 4 + clen
        done += want
    return b"".join(parts)
