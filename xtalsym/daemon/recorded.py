"""Recorded frames for ``xtalsym classify``: EIGER/NeXus HDF5 (master + data files) and
TIFF / CBF / PNG / .npy images.

Each input becomes a :class:`RecordedSeries` (one HDF5 master, or the images given
together, in the order given): its geometry as the file states it (keys of
:data:`~xtalsym.daemon.protocols.GEOMETRY_KEYS`, None where the file is silent; the
``[geometry]`` section of the daemon's TOML overrides key by key, as it does for a stream),
its pixel mask and flatfield, and its frames in image-id order.

HDF5 (the layout an EIGER writes): ``<name>_master.h5`` holds ``/entry/data/data_000001``,
``data_000002`` … as external links to ``<name>_data_00000N.h5`` (datasets of shape
(n, rows, cols), usually bitshuffle/LZ4-compressed: filter 32008, read via hdf5plugin) and
the NeXus geometry: ``/entry/instrument/detector/{beam_center_x, beam_center_y,
x_pixel_size, y_pixel_size, detector_distance}``, ``/entry/instrument/beam/incident_wavelength``
(each converted from its ``@units``; EIGER's defaults pixel, m and Å when absent) and
``detectorSpecific/{pixel_mask, flatfield, flatfield_correction_applied}``. A bitshuffle/LZ4
chunk of one frame is read as it is stored and decompressed by the same code as a stream's
bslz4 frame (:class:`~xtalsym.daemon.protocols.CompressedFrame`, the HDF5 filter framing is
the stream's). Image ids: the data file's ``image_nr_low`` − 1 + index (0-based like a
stream's), else a running count. Everything is checked when the series is opened (every
link resolves, every dataset is 3-D and the same frame size), so a broken file stops with
one line before anything is classified.

Images: TIFF (tifffile; multi-page = several frames), CBF (fabio), PNG (Pillow), .npy
(2-D, or 3-D = a stack; never pickles). Their geometry comes from the TOML only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xtalsym.daemon.protocols import GEOMETRY_KEYS, BadMessage, CompressedFrame
from xtalsym.daemon.protocols.common import deferred

log = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs", ".hdf")
IMAGE_SUFFIXES = (".tif", ".tiff", ".cbf", ".png", ".npy")
BITSHUFFLE_FILTER = 32008
BITSHUFFLE_LZ4 = 2  # the filter's compression option for LZ4

DETECTOR = "/entry/instrument/detector"
NEXUS_GEOMETRY = {  # our key: (NeXus path, its unit when the file gives none)
    "beam_center_x_px": (f"{DETECTOR}/beam_center_x", "pixel"),
    "beam_center_y_px": (f"{DETECTOR}/beam_center_y", "pixel"),
    "pixel_size_x_m": (f"{DETECTOR}/x_pixel_size", "m"),
    "pixel_size_y_m": (f"{DETECTOR}/y_pixel_size", "m"),
    "detector_distance_m": (f"{DETECTOR}/detector_distance", "m"),
    "wavelength_m": ("/entry/instrument/beam/incident_wavelength", "angstrom"),
}
WAVELENGTH_FALLBACK = "/entry/instrument/monochromator/wavelength"  # older EIGER firmware
# units per metre (a division keeps 0.035 Å = 3.5e-12 m exact, as a stream's value in m is)
PER_METRE = {"m": 1.0, "meter": 1.0, "metre": 1.0, "meters": 1.0, "cm": 1e2, "mm": 1e3,
             "um": 1e6, "µm": 1e6, "micron": 1e6, "microns": 1e6, "nm": 1e9,
             "angstrom": 1e10, "angstroms": 1e10, "a": 1e10, "å": 1e10}


class RecordedError(ValueError):
    """A recorded file that cannot be classified; the message names the file and the problem."""


@dataclass
class RecordedFrame:
    image_id: int
    data: np.ndarray | CompressedFrame | None  # None: unreadable (``error`` says why)
    where: str  # file[:dataset[index]]
    error: str | None = None


@dataclass
class RecordedSeries:
    name: str  # the master file, or the first image
    series_id: int
    geometry: dict[str, Any]  # GEOMETRY_KEYS -> value from the file, or None
    geometry_from: dict[str, str]  # key -> where the file gave it
    frame_shape: tuple[int, int]
    n_frames: int
    pixel_mask: np.ndarray | None = None
    flatfield: np.ndarray | None = None
    flatfield_applied: bool | None = None  # what the file says (None: silent)
    _frames: Any = field(default=None, repr=False)

    def frames(self) -> Iterator[RecordedFrame]:
        return self._frames()


def open_recorded(paths: Sequence[str | Path]) -> list[RecordedSeries]:
    """HDF5 masters one series each; consecutive images together one series (in the given order)."""
    series: list[RecordedSeries] = []
    images: list[Path] = []

    def flush_images() -> None:
        if images:
            series.append(_image_series(list(images), series_id=len(series) + 1))
            images.clear()

    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise RecordedError(f"{path}: no such file")
        suffix = path.suffix.lower()
        if suffix in HDF5_SUFFIXES:
            flush_images()
            series.append(_hdf5_series(path, series_id=len(series) + 1))
        elif suffix in IMAGE_SUFFIXES:
            images.append(path)
        else:
            raise RecordedError(f"{path}: unknown file type {path.suffix!r}; classify reads "
                                f"{', '.join(HDF5_SUFFIXES + IMAGE_SUFFIXES)}")
    flush_images()
    return series


# ---------------------------------------------------------------- HDF5 / NeXus


def _h5py():
    try:
        import h5py
        import hdf5plugin  # noqa: F401 - registers the bitshuffle/LZ4 filter with HDF5
    except ImportError as exc:
        raise RecordedError(f"reading HDF5 needs h5py and hdf5plugin ({exc.name} is missing): "
                            "pip install 'xtalsym[daemon]'") from None
    return h5py


def _scalar(f, path: str) -> tuple[float, str | None] | None:
    """(value, @units) of a scalar dataset, None if absent."""
    if path not in f:
        return None
    ds = f[path]
    try:
        value = float(np.asarray(ds[()]).ravel()[0])
    except (TypeError, ValueError, IndexError):
        raise RecordedError(f"{f.filename}: {path} is not a number ({ds[()]!r})") from None
    units = ds.attrs.get("units")
    if isinstance(units, bytes):
        units = units.decode(errors="replace")
    return value, (str(units).strip() if units is not None else None)


def _nexus_geometry(f) -> tuple[dict, dict]:
    geometry: dict[str, Any] = {k: None for k in GEOMETRY_KEYS}
    where: dict[str, str] = {}
    found = {}
    for key, (path, default_unit) in NEXUS_GEOMETRY.items():
        got = _scalar(f, path)
        if got is None and key == "wavelength_m":
            path, got = WAVELENGTH_FALLBACK, _scalar(f, WAVELENGTH_FALLBACK)
        if got is not None:
            found[key] = (path, got[0], got[1] or default_unit)
    for key, (path, value, unit) in found.items():
        unit_key = unit.lower()
        if key.startswith("beam_center"):
            if unit_key in ("pixel", "pixels", "px"):
                geometry[key] = value
            elif unit_key in PER_METRE:  # a length: in pixels of that axis
                size = found.get("pixel_size_x_m" if key.endswith("x_px") else "pixel_size_y_m")
                if size is None or size[2].lower() not in PER_METRE:
                    raise RecordedError(f"{f.filename}: {path} is in {unit} but the pixel size is not given")
                geometry[key] = (value / PER_METRE[unit_key]) / (size[1] / PER_METRE[size[2].lower()])
            else:
                raise RecordedError(f"{f.filename}: {path} has units {unit!r}, expected pixel or a length")
        else:
            if unit_key not in PER_METRE:
                raise RecordedError(f"{f.filename}: {path} has units {unit!r}, expected a length "
                                    f"({', '.join(sorted(PER_METRE))})")
            geometry[key] = value / PER_METRE[unit_key]
        where[key] = f"{path} = {value:g} {unit}"
    return geometry, where


def _data_parts(f, master: Path) -> list[tuple[str, Any]]:
    """(name, dataset) of /entry/data/data_* in name order; every link resolved now."""
    if "/entry/data" not in f:
        raise RecordedError(f"{master}: no /entry/data group (not an EIGER/NeXus master file)")
    group = f["/entry/data"]
    names = sorted(n for n in group if n.startswith("data"))
    if not names:
        raise RecordedError(f"{master}: /entry/data holds no data_* datasets or links")
    parts = []
    for name in names:
        link = group.get(name, getlink=True)
        try:
            ds = group[name]
        except (KeyError, OSError) as exc:
            target = getattr(link, "filename", None)
            detail = f"its external file {target!r} cannot be opened" if target else str(exc)
            raise RecordedError(f"{master}: /entry/data/{name}: {detail}") from None
        if not hasattr(ds, "shape") or len(ds.shape) != 3:
            raise RecordedError(f"{master}: /entry/data/{name} has shape {getattr(ds, 'shape', None)}, "
                                "expected (frames, rows, cols)")
        parts.append((name, ds))
    shapes = {ds.shape[1:] for _, ds in parts}
    if len(shapes) > 1:
        raise RecordedError(f"{master}: data files disagree on the frame size: {sorted(shapes)}")
    return parts


def _direct_chunks(ds) -> bool:
    """True when every frame is one bitshuffle/LZ4 chunk (read as stored, decompressed by our code)."""
    if ds.chunks is None or ds.chunks[0] != 1 or tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
        return False
    plist = ds.id.get_create_plist()
    if plist.get_nfilters() != 1:
        return False
    code, _flags, values, _name = plist.get_filter(0)
    return code == BITSHUFFLE_FILTER and len(values) >= 5 and values[4] == BITSHUFFLE_LZ4 \
        and ds.dtype.itemsize in (1, 2, 4, 8)


def _hdf5_series(master: Path, *, series_id: int) -> RecordedSeries:
    h5py = _h5py()
    try:
        f = h5py.File(master, "r")
    except OSError as exc:
        raise RecordedError(f"{master}: not a readable HDF5 file ({exc})") from None
    with f:
        geometry, where = _nexus_geometry(f)
        parts = _data_parts(f, master)
        rows, cols = parts[0][1].shape[1:]
        starts = []
        for _, ds in parts:
            low = ds.attrs.get("image_nr_low")
            starts.append(None if low is None else int(np.asarray(low).ravel()[0]) - 1)
        n_frames = sum(ds.shape[0] for _, ds in parts)
        specific = f"{DETECTOR}/detectorSpecific"
        mask = np.asarray(f[f"{specific}/pixel_mask"][()]) if f"{specific}/pixel_mask" in f else None
        flatfield = np.asarray(f[f"{specific}/flatfield"][()], np.float32) if f"{specific}/flatfield" in f else None
        applied = None
        if f"{specific}/flatfield_correction_applied" in f:
            applied = bool(np.asarray(f[f"{specific}/flatfield_correction_applied"][()]).ravel()[0])
    for name, array in (("pixel_mask", mask), ("flatfield", flatfield)):
        if array is not None and array.shape != (rows, cols):
            log.warning("%s: %s/%s is %s, the frames %s; ignored", master, specific, name, array.shape, (rows, cols))
    if mask is not None and mask.shape != (rows, cols):
        mask = None
    if flatfield is not None and flatfield.shape != (rows, cols):
        flatfield = None
    geometry["image_size_x_px"], geometry["image_size_y_px"] = int(cols), int(rows)
    where.setdefault("image_size_x_px", "the data's shape")
    where.setdefault("image_size_y_px", "the data's shape")

    def frames() -> Iterator[RecordedFrame]:
        with h5py.File(master, "r") as f:
            next_id = 0
            for (name, _), start in zip(parts, starts):
                ds = f["/entry/data"][name]
                direct = _direct_chunks(ds)
                first = next_id if start is None else start
                for i in range(ds.shape[0]):
                    where_i = f"{master.name}:/entry/data/{name}[{i}]"
                    yield _read_frame(ds, i, first + i, where_i, direct)
                next_id = first + ds.shape[0]

    return RecordedSeries(name=str(master), series_id=series_id, geometry=geometry, geometry_from=where,
                          frame_shape=(int(rows), int(cols)), n_frames=n_frames, pixel_mask=mask,
                          flatfield=flatfield, flatfield_applied=applied, _frames=frames)


def _read_frame(ds, i: int, image_id: int, where: str, direct: bool) -> RecordedFrame:
    try:
        if direct:
            filter_mask, blob = ds.id.read_direct_chunk((i, 0, 0))
            if filter_mask == 0:  # the filter was applied: bitshuffle/LZ4 in the HDF5 filter framing
                return RecordedFrame(image_id, deferred(blob, "bslz4", ds.dtype, ds.shape[1:], where), where)
        return RecordedFrame(image_id, np.asarray(ds[i]), where)
    except BadMessage as exc:
        return RecordedFrame(image_id, None, where, f"{exc.reason}: {exc.message}")
    except (OSError, ValueError, RuntimeError) as exc:  # a chunk HDF5 cannot read
        return RecordedFrame(image_id, None, where, f"unreadable: {exc}")


# ---------------------------------------------------------------- images


def _read_image(path: Path) -> np.ndarray:
    """(pages, rows, cols) of one image file."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        elif suffix == ".cbf":
            try:
                import fabio
            except ImportError:
                raise RecordedError(f"{path}: reading CBF needs fabio: pip install 'xtalsym[daemon]'") from None
            image = fabio.open(str(path))
            array = np.stack([image.getframe(k).data for k in range(image.nframes)]) if image.nframes > 1 \
                else image.data
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image)
        else:
            array = np.load(path, allow_pickle=False)
    except RecordedError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader's failure is one line about this file
        raise RecordedError(f"{path}: cannot be read as {suffix[1:].upper()} ({type(exc).__name__}: {exc})") from None
    array = np.asarray(array)
    if array.ndim == 3 and suffix == ".png" and array.shape[2] in (3, 4):
        raise RecordedError(f"{path}: a colour PNG ({array.shape[2]} channels); a detector frame has one")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1] < 2 or array.shape[2] < 2:
        raise RecordedError(f"{path}: shape {array.shape}, expected a 2-D frame or a (frames, rows, cols) stack")
    return array


def _image_series(paths: list[Path], *, series_id: int) -> RecordedSeries:
    first = _read_image(paths[0])
    shape = first.shape[1:]
    counts = [first.shape[0]]
    for p in paths[1:]:  # check sizes now, read the pixels again when classifying (bounded memory)
        a = _read_image(p)
        if a.shape[1:] != shape:
            raise RecordedError(f"{p}: frame size {a.shape[1:]} differs from {paths[0]}'s {shape}")
        counts.append(a.shape[0])
    geometry = {k: None for k in GEOMETRY_KEYS}
    geometry["image_size_x_px"], geometry["image_size_y_px"] = int(shape[1]), int(shape[0])

    def frames() -> Iterator[RecordedFrame]:
        image_id = 0
        for p in paths:
            stack = _read_image(p)
            for k in range(stack.shape[0]):
                where = p.name if stack.shape[0] == 1 else f"{p.name}[{k}]"
                yield RecordedFrame(image_id, stack[k], where)
                image_id += 1

    return RecordedSeries(name=str(paths[0]), series_id=series_id, geometry=geometry,
                          geometry_from={"image_size_x_px": "the image's shape", "image_size_y_px": "the image's shape"},
                          frame_shape=(int(shape[0]), int(shape[1])), n_frames=sum(counts), _frames=frames)
