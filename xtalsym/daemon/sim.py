"""A detector simulator: streams simulated zone-axis DPs of given structures the way a
DECTRIS detector streams frames (PUSH bind; stream V2 by default, also V1 and native).

Each structure gives one sample of three frames (its x, y, z zone axes, in ``axis_order``),
rendered by :mod:`xtalsym.offline.simulate` at the *detector's* geometry (not the model's:
the daemon has to calibrate), with optional noise (:class:`Realism`), a beam centre away
from the image centre (the pattern is rendered on a larger centred grid and cropped) and
optional dead gap rows (value 2^16 − 1 and set in the pixel mask, as on an EIGER).

Every image carries the truth in ``user_data``: ``sample_id``, ``axis``, ``space_group``,
``symbol``, ``material_id``, ``formula``, ``sent`` (Unix time). Used by the daemon's tests,
``benchmarks/daemon.py`` and ``xtalsym detector-sim``.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xtalsym.daemon import protocols as proto
from xtalsym.offline import simulate, structures

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:31001"
COUNTS_PEAK = 10000  # brightest pixel without noise (uint16 frames)


@dataclass(frozen=True)
class DetectorGeometry:
    """The simulated detector: flat, normal to the beam; beam centre in pixel-centre coordinates."""

    pixels_x: int = 512
    pixels_y: int = 512
    pixel_size_m: float = 75e-6
    distance_m: float = 0.3
    wavelength_m: float = 3.5e-12
    beam_center_x_px: float | None = None  # None = image centre ((N-1)/2)
    beam_center_y_px: float | None = None

    @property
    def beam(self) -> tuple[float, float]:
        bx = (self.pixels_x - 1) / 2 if self.beam_center_x_px is None else self.beam_center_x_px
        by = (self.pixels_y - 1) / 2 if self.beam_center_y_px is None else self.beam_center_y_px
        return float(bx), float(by)

    def stream_geometry(self) -> dict:
        bx, by = self.beam
        return {"beam_center_x_px": bx, "beam_center_y_px": by, "pixel_size_x_m": self.pixel_size_m,
                "pixel_size_y_m": self.pixel_size_m, "wavelength_m": self.wavelength_m,
                "detector_distance_m": self.distance_m, "image_size_x_px": self.pixels_x,
                "image_size_y_px": self.pixels_y}


def render(structure, geometry: DetectorGeometry, *, realism: simulate.Realism | None = None,
           axes: Sequence[str] = simulate.AXES) -> dict[str, np.ndarray]:
    """{axis: float64 (pixels_y, pixels_x)} at the detector geometry (beam anywhere, via a crop)."""
    bx, by = geometry.beam
    fx, fy = bx % 1.0, by % 1.0
    if not (math.isclose(fx, fy, abs_tol=1e-6) and (math.isclose(fx, 0.5, abs_tol=1e-6) or min(fx, 1 - fx) < 1e-6)):
        raise ValueError(f"beam centre ({bx}, {by}): both must be whole pixels or both half pixels")
    # a centred square grid whose centre is the beam and that covers the whole detector
    half = max(bx + 0.5, geometry.pixels_x - 0.5 - bx, by + 0.5, geometry.pixels_y - 0.5 - by)
    n = int(math.ceil(2 * half))
    if (n % 2 == 0) != math.isclose(fx, 0.5, abs_tol=1e-6):
        n += 1  # even grids centre between pixels, odd ones on a pixel
    grid = simulate.Geometry(wavelength_m=geometry.wavelength_m, distance_m=geometry.distance_m,
                             pixel_size_m=geometry.pixel_size_m, pixels=n)
    patterns = simulate.simulate_axes(structure, axes=axes, geometry=grid, realism=realism,
                                      **simulate.DATASET_OPTIONS)
    centre = (n - 1) / 2
    c0, r0 = int(round(centre - bx)), int(round(centre - by))
    return {a: p[r0:r0 + geometry.pixels_y, c0:c0 + geometry.pixels_x] for a, p in patterns.items()}


def to_counts(pattern: np.ndarray, realism: simulate.Realism | None) -> np.ndarray:
    """uint16 counts: as simulated with a dose (Poisson), else scaled to COUNTS_PEAK."""
    if realism is not None and realism.dose is not None:
        return np.clip(np.rint(pattern), 0, 65534).astype(np.uint16)
    peak = float(pattern.max()) or 1.0
    return np.rint(pattern / peak * COUNTS_PEAK).astype(np.uint16)


@dataclass
class SimSample:
    sample_id: str
    axis_frames: dict[str, np.ndarray]
    truth: dict


@dataclass
class DetectorSim:
    """Messages of one series: start, 3 images per structure per repeat, end."""

    sources: Sequence[str | Path]
    geometry: DetectorGeometry = field(default_factory=DetectorGeometry)
    realism: simulate.Realism | None = None
    protocol: str = "stream_v2"
    axis_order: str = "xyz"
    repeat: int = 1
    series_id: int = 1
    gap_rows: tuple[int, int] | None = None  # [start, stop) rows dead (2^16-1) and masked
    bad_every: int = 0  # after every N images, one undecodable message
    compression: str = "bslz4"
    skip_axes: dict[str, str] = field(default_factory=dict)  # sample_id prefix -> axes not sent

    def __post_init__(self) -> None:
        if sorted(self.axis_order) != ["x", "y", "z"]:
            raise ValueError(f"axis_order must be a permutation of xyz, got {self.axis_order!r}")
        if self.protocol not in proto.PROTOCOLS:
            raise ValueError(f"protocol must be one of {proto.PROTOCOLS}, got {self.protocol!r}")
        self.series_unique_id = uuid.uuid4().hex
        self.samples: list[SimSample] = []
        for source in self.sources:
            for path in _structure_files(Path(source)):
                labelled = structures.load_structure(path)
                frames = render(labelled.structure, self.geometry, realism=self.realism)
                counts = {a: to_counts(f, self.realism) for a, f in frames.items()}
                if self.gap_rows:
                    for c in counts.values():
                        c[self.gap_rows[0]:self.gap_rows[1]] = 65535
                self.samples.append(SimSample(labelled.material_id, counts, {
                    "space_group": labelled.space_group, "symbol": labelled.symbol,
                    "material_id": labelled.material_id, "formula": labelled.formula}))
        if not self.samples:
            raise ValueError(f"no structures found in {list(map(str, self.sources))}")
        self.expected_images = 0

    def pixel_mask(self) -> np.ndarray | None:
        if not self.gap_rows:
            return None
        mask = np.zeros((self.geometry.pixels_y, self.geometry.pixels_x), np.uint32)
        mask[self.gap_rows[0]:self.gap_rows[1]] = 1  # DECTRIS bit 0: gap
        return mask

    def number_of_images(self) -> int:
        n = 0
        for _ in range(self.repeat):
            for s in self.samples:
                n += sum(1 for a in self.axis_order if a not in self.skip_axes.get(s.sample_id, ""))
        return n

    # ---- messages

    def start_message(self) -> list[bytes]:
        geo = self.geometry.stream_geometry()
        ud = {"source": "xtalsym detector-sim", "samples": len(self.samples) * self.repeat}
        mask = self.pixel_mask()
        if self.protocol == "stream_v2":
            return proto.encode_stream_v2_start(
                series_id=self.series_id, series_unique_id=self.series_unique_id, geometry=geo,
                channels=["threshold_1"], image_dtype="uint16", number_of_images=self.number_of_images(),
                user_data=ud, pixel_mask=None if mask is None else {"threshold_1": mask})
        if self.protocol == "stream_v1":
            config = {"beam_center_x": geo["beam_center_x_px"], "beam_center_y": geo["beam_center_y_px"],
                      "x_pixel_size": geo["pixel_size_x_m"], "y_pixel_size": geo["pixel_size_y_m"],
                      "wavelength": geo["wavelength_m"] * 1e10, "detector_distance": geo["detector_distance_m"],
                      "x_pixels_in_detector": geo["image_size_x_px"], "y_pixels_in_detector": geo["image_size_y_px"],
                      "nimages": self.number_of_images(), "ntrigger": 1, "bit_depth_image": 16}
            return proto.encode_stream_v1_header(series_id=self.series_id, config=config,
                                                 header_detail="all" if mask is not None else "basic",
                                                 pixel_mask=mask, appendix=ud)
        return proto.encode_native_start(series_id=self.series_id, series_unique_id=self.series_unique_id,
                                         geometry=geo, channels=["image"], dtype="<u2",
                                         number_of_images=self.number_of_images(), user_data=ud)

    def image_message(self, image_id: int, array: np.ndarray, user_data: dict) -> list[bytes]:
        if self.protocol == "stream_v2":
            return proto.encode_stream_v2_image(series_id=self.series_id, series_unique_id=self.series_unique_id,
                                                image_id=image_id, data={"threshold_1": array},
                                                compression=self.compression, user_data=user_data)
        if self.protocol == "stream_v1":
            return proto.encode_stream_v1_image(series_id=self.series_id, frame=image_id, array=array,
                                                encoding="bs16-lz4<", appendix=user_data)
        return proto.encode_native_image(series_id=self.series_id, series_unique_id=self.series_unique_id,
                                         image_id=image_id, array=array, compression="lz4", user_data=user_data)

    def end_message(self) -> list[bytes]:
        if self.protocol == "stream_v2":
            return proto.encode_stream_v2_end(series_id=self.series_id, series_unique_id=self.series_unique_id)
        if self.protocol == "stream_v1":
            return proto.encode_stream_v1_end(series_id=self.series_id)
        return proto.encode_native_end(series_id=self.series_id, series_unique_id=self.series_unique_id)

    def images(self) -> Iterator[tuple[int, np.ndarray, dict]]:
        image_id = 0
        for rep in range(self.repeat):
            for s in self.samples:
                sample_id = f"{s.sample_id}#{rep}" if self.repeat > 1 else s.sample_id
                for axis in self.axis_order:
                    if axis in self.skip_axes.get(s.sample_id, ""):
                        image_id += 1  # keeps image_id // 3 grouping intact
                        continue
                    yield image_id, s.axis_frames[axis], {"sample_id": sample_id, "axis": axis, **s.truth}
                    image_id += 1

    def messages(self) -> Iterator[list[bytes]]:
        """start, images (with bad messages interleaved when bad_every), end."""
        yield self.start_message()
        for n, (image_id, array, ud) in enumerate(self.images(), 1):
            yield self.image_message(image_id, array, {**ud, "sent": time.time()})
            if self.bad_every and n % self.bad_every == 0:
                yield [b"\xd9\xd9\xf7this is not a frame"]
        yield self.end_message()

    # ---- transport

    def send(self, sock, *, rate_hz: float = 0.0) -> int:
        """Send the whole series on ``sock`` (blocking while no peer), ``rate_hz`` images/s (0 = max)."""
        period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        t0 = time.perf_counter()
        n = 0
        for message in self.messages():
            if period:
                delay = t0 + n * period - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            sock.send_multipart(message)
            n += 1
        log.info("detector-sim: sent %d messages in %.2f s", n, time.perf_counter() - t0)
        return n


def _structure_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in (".cif", ".json", ".vasp") or
                      p.name.startswith("POSCAR"))
    if not path.exists():
        raise FileNotFoundError(f"structure not found: {path}")
    return [path]


def push_socket(context, address: str = DEFAULT_ADDRESS, *, bind: bool = True, hwm: int = 1000):
    """A PUSH socket like a DECTRIS detector's (bound), or connected to a daemon that binds."""
    import zmq

    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, 5000)
    if bind:
        sock.bind(address)
    else:
        sock.connect(address)
    return sock
