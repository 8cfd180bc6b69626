"""A detector simulator: streams simulated zone-axis DPs of given structures the way a
DECTRIS detector streams frames (PUSH bind; stream V2 by default, also V1 and native).

Each structure gives one sample of three frames (its x, y, z zone axes, in ``axis_order``),
rendered by :mod:`xtalsym.offline.simulate` at the *detector's* geometry (not the model's:
the daemon has to calibrate), with optional noise (:class:`Realism`), a beam centre away
from the image centre (the pattern is rendered on a larger centred grid and cropped) and
optional dead gap rows (value 2^16 − 1 and set in the pixel mask, as on an EIGER), or a
whole EIGER2 module layout (:func:`eiger2_layout`: 4M = 2068 × 2162, 16M = 4148 × 4362
pixels, 1028 × 512-pixel modules 12 / 38 pixels apart, plus a seeded share of dead and noisy
pixels; all of them 2^16 − 1 in the frames and flagged in the pixel mask).

Rendering costs ~N² (a 16M frame: ~1 min per axis on one core), so ``cache_dir`` keeps the
rendered counts on disk, keyed by the structure file, geometry and realism.

Every image carries the truth in ``user_data``: ``sample_id``, ``axis``, ``space_group``,
``symbol``, ``material_id``, ``formula``, ``sent`` (Unix time). Used by the daemon's tests,
``benchmarks/daemon.py`` and ``xtalsym detector-sim``.

On request it reproduces what real (EIGER-compatible) streams were seen to do, one option
each (:class:`DetectorSim` fields; ``xtalsym detector-sim --help``): no ``user_data``
(``user_data=False``), the distance only as a ``detector_translation`` (negative z too) or
not at all (``distance_field``), a start whose pixel mask and flatfield arrive in an
unexpected encoding (``odd_mask_encoding``: V2 raw bytes instead of tagged arrays, V1
``pixelmask-1.0`` / ``flatfield-1.0`` htypes), the start and image 0 as one two-part
message (``start_with_first_image``), a fixed ``series_unique_id`` reused across series
(``unique_id``) and every ``end`` sent twice (``duplicate_end``).
"""

from __future__ import annotations

import hashlib
import json
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
DISTANCE_FIELDS = ("distance", "translation", "negative_translation", "none")
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


# EIGER2: modules of 1028 x 512 pixels, 12 pixels between module columns, 38 between rows
EIGER2_MODULE_PX = (512, 1028)  # (rows, cols)
EIGER2_GAP_PX = (38, 12)
EIGER2_MODULES = {"eiger2-500k": (1, 1), "eiger2-1m": (2, 1), "eiger2-4m": (4, 2), "eiger2-9m": (6, 3),
                  "eiger2-16m": (8, 4)}  # (module rows, module columns)
# DECTRIS pixel-mask bits
MASK_GAP, MASK_DEAD, MASK_NOISY = 1, 2, 16


@dataclass(frozen=True)
class ModuleLayout:
    """An EIGER2-like detector face: its size and pixel mask (gaps, dead and noisy pixels)."""

    name: str
    pixels_x: int
    pixels_y: int
    mask: np.ndarray  # (pixels_y, pixels_x) uint32, DECTRIS bits


def eiger2_layout(name: str, *, dead_fraction: float = 1e-4, noisy_fraction: float = 2e-5,
                  seed: int = 0) -> ModuleLayout:
    """The module layout of an EIGER2 ``name`` (``eiger2-4m``, ``eiger2-16m``, … :data:`EIGER2_MODULES`)."""
    if name not in EIGER2_MODULES:
        raise ValueError(f"unknown detector layout {name!r}; choose from {sorted(EIGER2_MODULES)}")
    if not (0 <= dead_fraction < 1 and 0 <= noisy_fraction < 1):
        raise ValueError(f"dead/noisy pixel fractions must be in [0, 1), got {dead_fraction}, {noisy_fraction}")
    module_rows, module_cols = EIGER2_MODULES[name]
    (mr, mc), (gr, gc) = EIGER2_MODULE_PX, EIGER2_GAP_PX
    rows, cols = module_rows * mr + (module_rows - 1) * gr, module_cols * mc + (module_cols - 1) * gc
    mask = np.zeros((rows, cols), np.uint32)
    for k in range(1, module_rows):
        mask[k * (mr + gr) - gr:k * (mr + gr)] = MASK_GAP
    for k in range(1, module_cols):
        mask[:, k * (mc + gc) - gc:k * (mc + gc)] = MASK_GAP
    rng = np.random.default_rng(seed)
    for bit, fraction in ((MASK_DEAD, dead_fraction), (MASK_NOISY, noisy_fraction)):
        n = int(round(fraction * rows * cols))
        mask.ravel()[rng.choice(rows * cols, size=n, replace=False)] |= bit
    mask.setflags(write=False)
    return ModuleLayout(name, cols, rows, mask)


# Distances at which the model's training grid (256 px of 75 µm at 0.4 m, λ = 3.5 pm) spans
# the detector face: one training pixel is ~7.5 (4M) and ~15 (16M) detector pixels wide,
# so these are the frames that need ``calibration.method = "area"``.
EIGER2_DEFAULT_DISTANCE_M = {"eiger2-500k": 0.8, "eiger2-1m": 1.6, "eiger2-4m": 3.0, "eiger2-9m": 4.5,
                             "eiger2-16m": 6.0}


def eiger2_geometry(name: str, *, distance_m: float | None = None, wavelength_m: float = 3.5e-12,
                    beam_offset_px: tuple[float, float] = (12.0, -20.0)) -> DetectorGeometry:
    """A DetectorGeometry of the EIGER2 ``name`` (75 µm pixels), the beam ``beam_offset_px``
    (x, y: whole pixels) from the face's centre, so that it is not on a pixel grid line of the
    training grid."""
    if name not in EIGER2_MODULES:
        raise ValueError(f"unknown detector layout {name!r}; choose from {sorted(EIGER2_MODULES)}")
    layout_rows, layout_cols = EIGER2_MODULES[name]
    (mr, mc), (gr, gc) = EIGER2_MODULE_PX, EIGER2_GAP_PX
    rows, cols = layout_rows * mr + (layout_rows - 1) * gr, layout_cols * mc + (layout_cols - 1) * gc
    return DetectorGeometry(pixels_x=cols, pixels_y=rows, pixel_size_m=75e-6,
                            distance_m=EIGER2_DEFAULT_DISTANCE_M[name] if distance_m is None else distance_m,
                            wavelength_m=wavelength_m, beam_center_x_px=(cols - 1) / 2 + beam_offset_px[0],
                            beam_center_y_px=(rows - 1) / 2 + beam_offset_px[1])


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
    layout: ModuleLayout | None = None  # EIGER2 module gaps and bad pixels (sizes must match geometry)
    cache_dir: str | Path | None = None  # rendered counts kept here (see the module docstring)
    bad_every: int = 0  # after every N images, one undecodable message
    compression: str = "bslz4"
    skip_axes: dict[str, str] = field(default_factory=dict)  # sample_id prefix -> axes not sent
    # behaviours seen from real streams, reproduced on request (module docstring)
    user_data: bool = True  # False: images carry no user_data (no axis, no sample id, no truth)
    distance_field: str = "distance"  # "distance" | "translation" | "negative_translation" | "none"
    odd_mask_encoding: bool = False  # the start's mask + flatfield in an encoding the spec does not use
    start_with_first_image: bool = False  # start and image 0 in one ZeroMQ message (two parts)
    unique_id: str | None = None  # series_unique_id to send (None: a fresh one); reuse it across series
    duplicate_end: bool = False  # send every end message twice

    def __post_init__(self) -> None:
        if sorted(self.axis_order) != ["x", "y", "z"]:
            raise ValueError(f"axis_order must be a permutation of xyz, got {self.axis_order!r}")
        if self.protocol not in proto.PROTOCOLS:
            raise ValueError(f"protocol must be one of {proto.PROTOCOLS}, got {self.protocol!r}")
        if self.distance_field not in DISTANCE_FIELDS:
            raise ValueError(f"distance_field must be one of {DISTANCE_FIELDS}, got {self.distance_field!r}")
        if self.layout is not None and (self.layout.pixels_x, self.layout.pixels_y) != (
                self.geometry.pixels_x, self.geometry.pixels_y):
            raise ValueError(f"layout {self.layout.name} is {self.layout.pixels_x} x {self.layout.pixels_y} pixels, "
                             f"the geometry {self.geometry.pixels_x} x {self.geometry.pixels_y}")
        self.series_unique_id = self.unique_id or uuid.uuid4().hex
        self.samples: list[SimSample] = []
        for source in self.sources:
            for path in _structure_files(Path(source)):
                labelled = structures.load_structure(path)
                counts = self._counts(path, labelled.structure)
                if self.gap_rows:
                    for c in counts.values():
                        c[self.gap_rows[0]:self.gap_rows[1]] = 65535
                if self.layout is not None:
                    dead = self.layout.mask != 0
                    for c in counts.values():
                        c[dead] = 65535  # as an EIGER that applies its pixel mask on board
                self.samples.append(SimSample(labelled.material_id, counts, {
                    "space_group": labelled.space_group, "symbol": labelled.symbol,
                    "material_id": labelled.material_id, "formula": labelled.formula}))
        if not self.samples:
            raise ValueError(f"no structures found in {list(map(str, self.sources))}")
        self.expected_images = 0

    def _counts(self, path: Path, structure) -> dict[str, np.ndarray]:
        """uint16 counts per axis, rendered or read from ``cache_dir``."""
        cache = None
        if self.cache_dir is not None:
            key = json.dumps([hashlib.sha256(path.read_bytes()).hexdigest(), self.geometry.__dict__,
                              None if self.realism is None else self.realism.__dict__], sort_keys=True, default=str)
            cache = Path(self.cache_dir) / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
            if cache.exists():
                with np.load(cache, allow_pickle=False) as saved:
                    return {a: saved[a].copy() for a in simulate.AXES}
        t0 = time.perf_counter()
        frames = render(structure, self.geometry, realism=self.realism)
        counts = {a: to_counts(f, self.realism) for a, f in frames.items()}
        log.info("detector-sim: rendered %s at %d x %d in %.1f s", path.name, self.geometry.pixels_x,
                 self.geometry.pixels_y, time.perf_counter() - t0)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, **counts)
            tmp.replace(cache)
        return counts

    def pixel_mask(self) -> np.ndarray | None:
        if not self.gap_rows and self.layout is None and not self.odd_mask_encoding:
            return None
        mask = np.zeros((self.geometry.pixels_y, self.geometry.pixels_x), np.uint32)
        if self.layout is not None:
            mask |= self.layout.mask
        if self.gap_rows:
            mask[self.gap_rows[0]:self.gap_rows[1]] |= MASK_GAP
        return mask

    def flatfield(self) -> np.ndarray | None:
        """A flat flatfield, sent only with ``odd_mask_encoding`` (to be ignored by the daemon)."""
        if not self.odd_mask_encoding:
            return None
        return np.ones((self.geometry.pixels_y, self.geometry.pixels_x), np.float32)

    def number_of_images(self) -> int:
        n = 0
        for _ in range(self.repeat):
            for s in self.samples:
                n += sum(1 for a in self.axis_order if a not in self.skip_axes.get(s.sample_id, ""))
        return n

    # ---- messages

    def start_message(self) -> list[bytes]:
        geo = self.geometry.stream_geometry()
        if self.distance_field != "distance":  # the distance only as a translation, or not at all
            geo["detector_distance_m"] = None
        ud = {"source": "xtalsym detector-sim", "samples": len(self.samples) * self.repeat}
        mask, flatfield = self.pixel_mask(), self.flatfield()
        if self.protocol == "stream_v2":
            extra = {}
            if self.distance_field in ("translation", "negative_translation"):
                z = self.geometry.distance_m * (-1 if self.distance_field == "negative_translation" else 1)
                extra["detector_translation"] = [0.0, 0.0, z]
            if self.odd_mask_encoding:  # raw bytes where the spec has a tagged array
                extra["pixel_mask"] = {"threshold_1": mask.tobytes()}
                extra["flatfield"] = {"threshold_1": flatfield.tobytes()}
            return proto.encode_stream_v2_start(
                series_id=self.series_id, series_unique_id=self.series_unique_id, geometry=geo,
                channels=["threshold_1"], image_dtype="uint16", number_of_images=self.number_of_images(),
                user_data=ud, pixel_mask=None if mask is None else {"threshold_1": mask}, extra=extra)
        if self.protocol == "stream_v1":
            config = {"beam_center_x": geo["beam_center_x_px"], "beam_center_y": geo["beam_center_y_px"],
                      "x_pixel_size": geo["pixel_size_x_m"], "y_pixel_size": geo["pixel_size_y_m"],
                      "wavelength": geo["wavelength_m"] * 1e10,
                      "x_pixels_in_detector": geo["image_size_x_px"], "y_pixels_in_detector": geo["image_size_y_px"],
                      "nimages": self.number_of_images(), "ntrigger": 1, "bit_depth_image": 16}
            if geo["detector_distance_m"] is not None:
                config["detector_distance"] = geo["detector_distance_m"]
            parts = proto.encode_stream_v1_header(series_id=self.series_id, config=config,
                                                  header_detail="all" if mask is not None else "basic",
                                                  pixel_mask=mask, flatfield=flatfield, appendix=ud)
            if self.odd_mask_encoding:  # the V1 htypes without their "d" (seen: flatfield-1.0)
                parts = [p.replace(b'"htype": "dflatfield-1.0"', b'"htype": "flatfield-1.0"')
                          .replace(b'"htype": "dpixelmask-1.0"', b'"htype": "pixelmask-1.0"') if p[:1] == b"{" else p
                         for p in parts]
            return parts
        return proto.encode_native_start(series_id=self.series_id, series_unique_id=self.series_unique_id,
                                         geometry=geo, channels=["image"], dtype="<u2",
                                         number_of_images=self.number_of_images(), user_data=ud)

    def image_message(self, image_id: int, array: np.ndarray, user_data: dict | None) -> list[bytes]:
        if not self.user_data:
            user_data = None
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
        start = self.start_message()
        for n, (image_id, array, ud) in enumerate(self.images(), 1):
            image = self.image_message(image_id, array, {**ud, "sent": time.time()})
            if start is not None and self.start_with_first_image:
                image, start = [*start, *image], None
            elif start is not None:
                yield start
                start = None
            yield image
            if self.bad_every and n % self.bad_every == 0:
                yield [b"\xd9\xd9\xf7this is not a frame"]
        if start is not None:
            yield start
        yield self.end_message()
        if self.duplicate_end:
            yield self.end_message()

    def write_hdf5(self, prefix: str | Path, *, frames_per_file: int = 100, omit: Sequence[str] = ()) -> Path:
        """The series as an EIGER records it (:func:`write_eiger_hdf5`), image ids in order; no user_data."""
        if self.skip_axes:
            raise ValueError("write_hdf5: skip_axes leaves holes in the image ids; a recorded series has none")
        frames = [array for _, array, _ in self.images()]
        return write_eiger_hdf5(prefix, frames, geometry=self.geometry, pixel_mask=self.pixel_mask(),
                                frames_per_file=frames_per_file, omit=omit)

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


NEXUS_FIELDS = {  # stream geometry key -> (NeXus field under /entry/instrument, units, scale from our SI value)
    "beam_center_x_px": ("detector/beam_center_x", "pixel", 1.0),
    "beam_center_y_px": ("detector/beam_center_y", "pixel", 1.0),
    "pixel_size_x_m": ("detector/x_pixel_size", "m", 1.0),
    "pixel_size_y_m": ("detector/y_pixel_size", "m", 1.0),
    "detector_distance_m": ("detector/detector_distance", "m", 1.0),
    "wavelength_m": ("beam/incident_wavelength", "angstrom", 1e10),
}


def write_eiger_hdf5(prefix: str | Path, frames: Sequence[np.ndarray], *, geometry: DetectorGeometry,
                     pixel_mask: np.ndarray | None = None, frames_per_file: int = 100,
                     omit: Sequence[str] = ()) -> Path:
    """Write ``frames`` as an EIGER does: ``<prefix>_master.h5`` (NeXus geometry, pixel mask, and
    /entry/data/data_00000N external links) and ``<prefix>_data_00000N.h5`` files of at most
    ``frames_per_file`` bitshuffle/LZ4-compressed frames (chunk = one frame, ``image_nr_low`` /
    ``image_nr_high`` 1-based). ``omit``: geometry keys (NEXUS_FIELDS) left out of the master."""
    import h5py
    import hdf5plugin

    prefix = Path(prefix)
    if not frames:
        raise ValueError("write_eiger_hdf5: no frames")
    if frames_per_file < 1:
        raise ValueError(f"frames_per_file must be >= 1, got {frames_per_file}")
    rows, cols = frames[0].shape
    links = []
    for k, lo in enumerate(range(0, len(frames), frames_per_file), start=1):
        stack = np.stack(frames[lo:lo + frames_per_file])
        name = f"data_{k:06d}"
        data_file = f"{prefix.name}_{name}.h5"
        with h5py.File(prefix.parent / data_file, "w") as f:
            entry = f.create_group("entry")
            entry.attrs["NX_class"] = "NXentry"
            ds = entry.create_group("data").create_dataset(
                "data", data=stack, chunks=(1, rows, cols), **hdf5plugin.Bitshuffle(cname="lz4"))
            ds.attrs["image_nr_low"] = np.int64(lo + 1)
            ds.attrs["image_nr_high"] = np.int64(lo + len(stack))
        links.append((name, data_file))
    master = prefix.parent / f"{prefix.name}_master.h5"
    values = geometry.stream_geometry()
    with h5py.File(master, "w") as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        for name, data_file in links:
            data[name] = h5py.ExternalLink(data_file, "/entry/data/data")
        instrument = entry.create_group("instrument")
        instrument.attrs["NX_class"] = "NXinstrument"
        detector = instrument.create_group("detector")
        detector.attrs["NX_class"] = "NXdetector"
        instrument.create_group("beam").attrs["NX_class"] = "NXbeam"
        for key, (path, units, scale) in NEXUS_FIELDS.items():
            if key in omit:
                continue
            ds = instrument.create_dataset(path, data=np.float64(f"{values[key] * scale:.15g}"))  # 0.035, not 0.035000000000000003
            ds.attrs["units"] = units
        specific = detector.create_group("detectorSpecific")
        specific["x_pixels_in_detector"] = np.uint32(cols)
        specific["y_pixels_in_detector"] = np.uint32(rows)
        specific["nimages"] = np.uint32(len(frames))
        if pixel_mask is not None:
            specific.create_dataset("pixel_mask", data=pixel_mask.astype(np.uint32), **hdf5plugin.Bitshuffle(cname="lz4"))
    return master
