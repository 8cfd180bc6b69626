"""Pure ingest decoders: one ZeroMQ message (a list of byte frames) -> one event.

Decoders raise only :class:`BadMessage` (``reason`` in :data:`REASONS`); they never
unpickle or evaluate anything, and refuse arrays above ``max_pixels`` elements before
allocating them. Protocol details and units: docs/PROTOCOLS.md.
"""

from __future__ import annotations

from .common import (
    DEFAULT_MAX_PIXELS,
    GEOMETRY_KEYS,
    REASONS,
    BadMessage,
    CompressedFrame,
    Event,
    Image,
    SeriesEnd,
    SeriesStart,
    materialise,
)
from .native import (
    decode_native,
    encode_native_end,
    encode_native_image,
    encode_native_start,
)
from .stream_v1 import (
    decode_stream_v1,
    decode_stream_v1_parts,
    encode_stream_v1_end,
    encode_stream_v1_header,
    encode_stream_v1_image,
)
from .stream_v2 import (
    decode_stream_v2,
    decode_stream_v2_parts,
    encode_stream_v2_end,
    encode_stream_v2_image,
    encode_stream_v2_start,
)

PROTOCOLS = ("stream_v2", "stream_v1", "native")
_DECODERS = {"stream_v2": decode_stream_v2, "stream_v1": decode_stream_v1, "native": decode_native}


def decode(protocol: str, frames: list[bytes], *, max_pixels: int = DEFAULT_MAX_PIXELS,
           defer_decompression: bool = False) -> Event:
    """Decode ``frames`` with the named protocol (one of PROTOCOLS).

    ``defer_decompression``: compressed image data come back as :class:`CompressedFrame`
    (checked; :func:`materialise` decompresses): the daemon decompresses in its workers."""
    try:
        decoder = _DECODERS[protocol]
    except (KeyError, TypeError):
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}") from None
    return decoder(frames, max_pixels=max_pixels, defer_decompression=defer_decompression)


_PART_DECODERS = {"stream_v2": decode_stream_v2_parts, "stream_v1": decode_stream_v1_parts}


def decode_parts(protocol: str, frames: list[bytes], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 defer_decompression: bool = False) -> list[Event | BadMessage]:
    """Like :func:`decode`, for a ZeroMQ message that may carry more than one detector message:
    a start and the image(s) after it sent as one multipart message (seen from an
    EIGER-compatible stream). Returns the events in order (a later part that does not decode
    is its BadMessage); raises BadMessage when the message as a whole does not decode."""
    if protocol not in _DECODERS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    split = _PART_DECODERS.get(protocol)
    if split is None:
        return [_DECODERS[protocol](frames, max_pixels=max_pixels, defer_decompression=defer_decompression)]
    return split(frames, max_pixels=max_pixels, defer_decompression=defer_decompression)


__all__ = [
    "DEFAULT_MAX_PIXELS", "GEOMETRY_KEYS", "PROTOCOLS", "REASONS", "BadMessage", "CompressedFrame", "Event",
    "Image", "SeriesEnd", "SeriesStart", "decode", "decode_native", "decode_parts", "decode_stream_v1",
    "decode_stream_v2", "encode_native_end", "encode_native_image", "encode_native_start",
    "encode_stream_v1_end", "encode_stream_v1_header", "encode_stream_v1_image",
    "encode_stream_v2_end", "encode_stream_v2_image", "encode_stream_v2_start", "materialise",
]  # fmt: skip
