"""Per-frame cost of decode, calibrate and shape on one core, the dense path vs the fast one,
at 512², EIGER2 4M (2068 × 2162) and EIGER2 16M (4148 × 4362).

    python benchmarks/frame_stages.py [--sizes 512 4m 16m] [--repeats 5] [--cache-dir DIR]

Frames: detector-sim renders of NaCl and Si (all three zone axes), uint16, stream V2 bslz4;
4M and 16M with the EIGER2 module layout (gaps and bad pixels 2^16 − 1, in the pixel mask)
at the distances where one training-grid pixel spans ~7.5 / ~15 detector pixels, so
``calibration.method = "auto"`` picks ``area`` there (bilinear at 512²). Rendering a 16M
structure takes minutes: ``--cache-dir`` keeps the renders.

Columns, CPU seconds per frame of this process (time.process_time, one thread: OpenCV and BLAS
pinned to 1), the median over the frames × repeats:

* decode, old: ``decode()`` in the ingest thread (CBOR + bslz4 + copy to a writable array);
  dense: the ingest thread's ``decode(defer_decompression=True)`` + the worker's dense
  decompression (dectris-compression); new: the same ingest + what the worker runs now: under an
  area map ``CompressedFrame.nonzero`` (bslz4-to-sparse: straight to the non-zero usable pixels),
  else the dense decompression;
* calibrate, old: ``apply_map_remap`` (cv2.remap of the whole frame; area = s×s bilinear
  sub-samples) + ``to_uint8``; dense: ``PreparedMap.apply`` (gather / non-zero binning of the
  dense frame) + ``to_uint8``; new: ``PreparedMap.apply_nonzero`` of the decoded pixels (area)
  or ``PreparedMap.apply`` + ``to_uint8`` (checked equal to the dense result);
* shape: ``shaping.shape`` (the same code in both columns);
* map: building the sampling map, once per series geometry in each worker.
The dense and the new decode and calibrate columns are timed alternating call by call (a load
swing on a shared machine falls on both). Prints a markdown table and the machine load (the CPU-time figures are what a quiet core
would take only approximately: a loaded machine also slows a process's own CPU time through
shared caches and memory bandwidth).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAINING_DEFAULT = (3.5e-12, 0.4, 75e-6, 256)  # the shipped bundle's training grid


def _sim(size: str, cache_dir: str | None):
    from xtalsym.daemon.sim import DetectorGeometry, DetectorSim, eiger2_geometry, eiger2_layout

    structures = [ROOT / "xtalsym/data/structures/NaCl.cif", ROOT / "xtalsym/data/structures/Si.cif"]
    if size == "512":
        return DetectorSim(structures, geometry=DetectorGeometry(512, 512), cache_dir=cache_dir)
    name = {"4m": "eiger2-4m", "16m": "eiger2-16m"}[size]
    return DetectorSim(structures, geometry=eiger2_geometry(name), layout=eiger2_layout(name), cache_dir=cache_dir)


def cpu(fn, repeats: int) -> tuple[float, object]:
    out = None
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), out


def cpu_alternating(fns: dict, repeats: int) -> dict[str, tuple[float, object]]:
    """:func:`cpu` of several functions, their calls alternating, so that a load swing on a shared
    machine falls on all of them alike (the dense vs the new path)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            outs[name] = fn()
            times[name].append(time.process_time() - t0)
    return {k: (statistics.median(v), outs[k]) for k, v in times.items()}


def measure(size: str, repeats: int, cache_dir: str | None) -> dict:
    import numpy as np

    from xtalsym import shaping
    from xtalsym.daemon import calibrate as cal
    from xtalsym.daemon.protocols import decode, materialise

    sim = _sim(size, cache_dir)
    training = cal.TrainingGeometry(*TRAINING_DEFAULT)
    geometry = cal.FrameGeometry(**sim.geometry.stream_geometry())
    method = cal.auto_method(geometry, training) if hasattr(cal, "auto_method") else (
        "area" if size != "512" else "bilinear")
    mask = sim.pixel_mask()
    t0 = time.process_time()
    cal.build_map.cache_clear()
    sampling = cal.build_map(geometry, training, method)
    prepared = cal.prepare(sampling, pixel_mask=mask)
    t_map = time.process_time() - t0
    rows: dict[str, list[float]] = {k: [] for k in ("decode_old", "ingest_new", "decompress_dense", "cal_old",
                                                     "cal_dense", "decompress_new", "cal_new", "shape", "bytes")}
    sparse = prepared.takes_nonzero
    nonzero = []
    for image_id, array, ud in sim.images():
        msg = sim.image_message(image_id, array, ud)
        rows["bytes"].append(len(msg[0]))
        t, eager = cpu(lambda: decode("stream_v2", msg).data["threshold_1"], repeats)
        rows["decode_old"].append(t)
        t, lazy = cpu(lambda: decode("stream_v2", msg, defer_decompression=True).data["threshold_1"], repeats)
        rows["ingest_new"].append(t)
        t, frame = cpu(lambda: materialise(lazy), repeats)
        rows["decompress_dense"].append(t)
        assert np.array_equal(frame, eager)
        nonzero.append(float(np.count_nonzero((frame > 0) & (frame < 65535))) / frame.size)
        t, old = cpu(lambda: cal.to_uint8(cal.apply_map_remap(frame, sampling, pixel_mask=mask)), repeats)
        rows["cal_old"].append(t)
        pixels = lazy.nonzero(prepared.usable) if sparse else None
        if pixels is not None:  # the worker's path for a bslz4 frame under an area map, alternating with the dense
            got = cpu_alternating({"decompress_dense": lambda: materialise(lazy),
                                   "decompress_new": lambda: lazy.nonzero(prepared.usable),
                                   "cal_dense": lambda: cal.to_uint8(prepared.apply(frame)),
                                   "cal_new": lambda: cal.to_uint8(prepared.apply_nonzero(*pixels))}, repeats)
            rows["decompress_dense"][-1] = got["decompress_dense"][0]
            for key in ("decompress_new", "cal_dense", "cal_new"):
                rows[key].append(got[key][0])
            dense, new = got["cal_dense"][1], got["cal_new"][1]
            assert np.array_equal(new, dense), "the non-zero binning differs from the dense calibration"
        else:
            t, dense = cpu(lambda: cal.to_uint8(prepared.apply(frame)), repeats)
            rows["cal_dense"].append(t)
            rows["decompress_new"].append(rows["decompress_dense"][-1])
            rows["cal_new"].append(rows["cal_dense"][-1])
            new = dense
        t, _ = cpu(lambda: shaping.shape(new, ud["axis"]), repeats)
        rows["shape"].append(t)
    med = {k: statistics.median(v) for k, v in rows.items()}
    med.update(map=t_map, method=method, path="non-zero pixels" if sparse else "dense",
               nonzero=statistics.median(nonzero), frames=len(nonzero),
               shape_px=f"{sim.geometry.pixels_x} × {sim.geometry.pixels_y}")
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["512", "4m", "16m"], choices=["512", "4m", "16m"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache/xtalsym/detector-sim"))
    args = ap.parse_args()
    import cv2
    from threadpoolctl import threadpool_limits

    cv2.setNumThreads(1)
    threadpool_limits(1)
    load0 = os.getloadavg()
    results = {s: measure(s, args.repeats, args.cache_dir) for s in args.sizes}
    load1 = os.getloadavg()
    print(f"\nper-frame CPU ms on one core (median of frames x {args.repeats} repeats); load average "
          f"{load0[0]:.1f} at start, {load1[0]:.1f} at end, on {os.cpu_count()} cores (shared machine)\n")
    print("| frame | method | worker path | non-zero | message | decode old | decode dense (ingest + worker) | "
          "decode new (ingest + worker) | calibrate old | calibrate dense | calibrate new | shape | total old | "
          "total dense | total new | map (once per series) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, r in results.items():
        ms = {k: v * 1000 for k, v in r.items() if isinstance(v, float)}
        dec_dense = ms["ingest_new"] + ms["decompress_dense"]
        dec_new = ms["ingest_new"] + ms["decompress_new"]
        old = ms["decode_old"] + ms["cal_old"] + ms["shape"]
        dense = dec_dense + ms["cal_dense"] + ms["shape"]
        new = dec_new + ms["cal_new"] + ms["shape"]
        print(f"| {r['shape_px']} ({r['frames']} frames) | {r['method']} | {r['path']} | {r['nonzero'] * 100:.1f} % | "
              f"{r['bytes'] / 1e6:.2f} MB | {ms['decode_old']:.1f} | {dec_dense:.1f} ({ms['ingest_new']:.2f} + "
              f"{ms['decompress_dense']:.1f}) | {dec_new:.1f} ({ms['ingest_new']:.2f} + {ms['decompress_new']:.1f}) | "
              f"{ms['cal_old']:.1f} | {ms['cal_dense']:.1f} | {ms['cal_new']:.1f} | {ms['shape']:.1f} | "
              f"{old:.1f} | {dense:.1f} | {new:.1f} | {r['map'] * 1000:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
