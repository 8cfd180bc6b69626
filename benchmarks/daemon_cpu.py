"""The daemon's CPU per frame by stage and by thread, no wall clock: bundles side by side on the
same frames (e.g. a fusion that weighs the evidence of partial predictions against one that
does not, issue 15).

    python benchmarks/daemon_cpu.py --bundle reference_index --bundle runs/other_bundle [--pixels 512] [--repeat 3]

Each bundle serves in this process (``xtalsym.testing.InProcessDaemon``, one shaping worker,
lossless); detector-sim streams the shipped structures (``--repeat`` times each) after a warm-up
series. Per frame of the measured series it reports the stages' thread CPU (the daemon's own
accounting, ``Metrics.cpu``: workers' calibrate_shape and evidence, infer, match, fuse, combine,
publish) and the serve threads' CPU by role (/proc: inference, combine, ONNX Runtime's other
threads, ingest), and per sample the combines made and their CPU. CPU seconds stay meaningful
on a shared machine where frames/s do not: this is not a throughput benchmark
(benchmarks/daemon.py is, on an idle machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("calibrate_shape", "evidence", "infer", "match", "fuse", "combine", "publish")
ROLES = ("inference", "combine", "native", "ingest")


def measure(bundle: str, structures: list[Path], *, pixels: int, repeat: int) -> dict:
    from xtalsym.daemon.metrics import thread_cpu_by_role
    from xtalsym.daemon.sim import DetectorGeometry, DetectorSim
    from xtalsym.testing import InProcessDaemon

    geometry = DetectorGeometry(pixels, pixels)
    warm = DetectorSim(structures[:1], geometry=geometry, series_id=1)
    sim = DetectorSim(structures, geometry=geometry, repeat=repeat, series_id=2)
    messages = list(sim.messages())  # rendered before the measurement
    n_samples = sim.number_of_images() // 3
    with InProcessDaemon(bundle=bundle) as run:
        warm.send(run.push)
        run.wait_final(1, timeout=300)
        stages0, roles0 = dict(run.pipeline.metrics.cpu), thread_cpu_by_role()
        seen = len(run.summary_messages())
        run.send_messages(messages)
        run.wait_final(1 + n_samples, timeout=1800)
        time.sleep(0.5)  # the last batch's publish stage is accounted after its send
        stages1, roles1 = dict(run.pipeline.metrics.cpu), thread_cpu_by_role()
        measured = run.summary_messages()[seen:]
    frames = sim.number_of_images()
    combined = [m for m in measured if isinstance((m.get("evidence") or {}).get("group_loglik"), list)]
    return {
        "bundle": bundle, "frames": frames, "samples": n_samples, "predictions": len(measured),
        "combines": len(combined), "partial_combines": sum(not m["final"] for m in combined),
        "partial_evidence_used": sum(bool((m.get("fusion") or {}).get("evidence_used")) for m in measured
                                     if not m["final"]),
        "stage_ms": {s: 1e3 * (stages1.get(s, 0.0) - stages0.get(s, 0.0)) / frames for s in STAGES},
        "role_ms": {r: 1e3 * (roles1.get(r, 0.0) - roles0.get(r, 0.0)) / frames for r in ROLES},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", required=True, help="a bundle to serve (repeat to compare)")
    parser.add_argument("--pixels", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="times each shipped structure is streamed")
    args = parser.parse_args(argv)
    structures = sorted((ROOT / "xtalsym/data/structures").glob("*.cif"))
    runs = [measure(b, structures, pixels=args.pixels, repeat=args.repeat) for b in args.bundle]
    print(f"\nCPU-ms per frame ({args.pixels}² frames, {runs[0]['frames']} frames, {runs[0]['samples']} samples; "
          f"load {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())})\n")
    print("| | " + " | ".join(r["bundle"] for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for s in STAGES:
        print(f"| stage {s} | " + " | ".join(f"{r['stage_ms'][s]:.2f}" for r in runs) + " |")
    print("| **stages, sum** | " + " | ".join(f"**{sum(r['stage_ms'].values()):.2f}**" for r in runs) + " |")
    for role in ROLES:
        print(f"| thread {role} | " + " | ".join(f"{r['role_ms'][role]:.2f}" for r in runs) + " |")
    print("| combines per sample (of them partial) | "
          + " | ".join(f"{r['combines'] / r['samples']:.2f} ({r['partial_combines'] / r['samples']:.2f})" for r in runs)
          + " |")
    print("| combine CPU-ms per sample | " + " | ".join(f"{3 * r['stage_ms']['combine']:.2f}" for r in runs) + " |")
    print("| partial predictions fused with evidence | "
          + " | ".join(f"{r['partial_evidence_used']} of {r['predictions'] - r['samples']}" for r in runs) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
