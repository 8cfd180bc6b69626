"""Per-request cost of the fusion posterior (what the daemon pays per prediction), this checkout's
xtalsym.fusion with a fusion.json beside xtalsym.fusion of an earlier commit with its fusion.json.

    python benchmarks/fusion_posterior_cost.py --params reference_index/fusion.json \
        --against-rev 282be02 --against-params OLD_BUNDLE/fusion.json

One request: 3 views, the MSDN's summed logits, 230 evidence log-likelihoods, an off-axis score
(the earlier code takes none). Random inputs: the arithmetic does not depend on the values.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xtalsym import fusion  # noqa: E402


def module_at(rev: str):
    """xtalsym.fusion as it was at ``rev`` (git show), importable beside today's."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:xtalsym/fusion.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"fusion_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def per_call_ms(call, repeats: int) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="reference_index/fusion.json")
    parser.add_argument("--against-rev", required=True)
    parser.add_argument("--against-params", required=True)
    parser.add_argument("--repeats", type=int, default=3000)
    args = parser.parse_args(argv)
    old = module_at(args.against_rev)
    engine_new = fusion.Fusion(fusion.FusionParams.load(args.params))
    engine_old = old.Fusion(old.FusionParams.load(args.against_params))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, len(engine_new.params.classes)))
    evidence = rng.normal(size=(1, fusion.N_GROUPS)) * 10
    print("| round | earlier code, earlier fusion.json | this code, this fusion.json |")
    print("|---|---|---|")
    for i in range(3):
        a = per_call_ms(lambda: engine_old.posterior_summed(logits, 3, evidence), args.repeats)
        b = per_call_ms(lambda: engine_new.posterior_summed(logits, 3, evidence, np.array([0.3])), args.repeats)
        print(f"| {i + 1} | {a:.3f} ms | {b:.3f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
