"""Calibrate (and check) the evidence's decision rule, xtalsym/evidence/decision.py (issue 14).

    # 1. rows with the decision features, on the VALIDATION split, every realism condition
    nice -n 10 python benchmarks/evidence.py --mp 140 --pyxtal 0 --split val --realism all --dump runs/val.jsonl
    # 2. choose the thresholds on those rows (prints the constants to freeze in decision.py)
    python benchmarks/evidence_calibration.py fit runs/val.jsonl
    # 3. the frozen rule on held-out rows (TEST split), per condition
    nice -n 10 python benchmarks/evidence.py --mp 140 --pyxtal 0 --split test --realism all --seed 3 --dump runs/test.jsonl
    python benchmarks/evidence_calibration.py check runs/test.jsonl

The fit: for each Friedel bound on a grid, each class (crystal system, Bravais lattice) gets the
smallest log-odds threshold above every wrong decision of that class on validation (pooled over
all conditions: the rule must hold under each), + ``SAFETY_NATS``; a class whose wrong decisions
reach ``NEVER_NATS``, or that keeps fewer than ``MIN_SUPPORT`` right validation decisions above
its threshold (its reliability is then not shown), is never named. The bound that lets the most validation rows be decided wins.
`check` applies decision.rule (the code combine runs) to the dumped features, so it is the frozen
rule, not the fit, that is scored.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

from xtalsym.evidence import decision

SAFETY_NATS = 1.0
NEVER_NATS = 500.0
MIN_SUPPORT = 5  # right decisions on validation a class's threshold must keep, else it is never named
FRIEDEL_GRID = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0, math.inf)


def load(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _friedel(r: dict) -> float:
    v = r["friedel_asymmetry"]
    return math.nan if v is None else float(v)


def fit_thresholds(rows: list[dict], kind: str, friedel_max: float) -> dict[str, float]:
    """Per class: just above its worst wrong decision among rows passing the Friedel bound."""
    truth, forced, marg = {"system": ("system", "forced_system", "system_margin"),
                           "bravais": ("bravais", "forced_bravais", "bravais_margin")}[kind]
    classes = {r[forced] for r in rows} | {r[truth] for r in rows}
    worst = defaultdict(lambda: -math.inf)
    for r in rows:
        if _friedel(r) > friedel_max or r[forced] == r[truth]:
            continue
        worst[r[forced]] = max(worst[r[forced]], r[marg])
    out = {}
    for c in sorted(classes):
        t = max(decision.MIN_LOG_ODDS_FLOOR, worst[c] + SAFETY_NATS)
        support = sum(1 for r in rows if r[forced] == c == r[truth] and r[marg] >= t and not _friedel(r) > friedel_max)
        if t < NEVER_NATS and support >= MIN_SUPPORT:
            out[c] = round(t, 1)
    return out


def fit(rows: list[dict]) -> None:
    best = None
    print(f"{'Friedel max':>11} {'sys decided':>11} {'brv decided':>11}")
    for fmax in FRIEDEL_GRID:
        ts, tb = fit_thresholds(rows, "system", fmax), fit_thresholds(rows, "bravais", fmax)
        verdicts = [decision.thresholded(system=r["forced_system"], system_margin=r["system_margin"],
                                         bravais=r["forced_bravais"], bravais_margin=r["bravais_margin"],
                                         friedel=_friedel(r), system_min=ts, bravais_min=tb, friedel_max=fmax)
                    for r in rows]
        ds, db = sum(v[0] for v in verdicts), sum(v[1] for v in verdicts)
        print(f"{fmax:>11g} {ds / len(rows):>10.1%} {db / len(rows):>10.1%}")
        if best is None or ds + db > best[0]:
            best = (ds + db, fmax, ts, tb)
    _, fmax, ts, tb = best
    print(f"\nfreeze in xtalsym/evidence/decision.py ({len(rows)} validation rows):")
    print(f"MAX_FRIEDEL_ASYMMETRY = {fmax}")
    print(f"SYSTEM_MIN_LOG_ODDS = {ts}")
    print(f"BRAVAIS_MIN_LOG_ODDS = {tb}")


def apply_rule(r: dict) -> tuple[bool, bool]:
    return decision.rule(system=r["forced_system"], system_margin=r["system_margin"], bravais=r["forced_bravais"],
                         bravais_margin=r["bravais_margin"], friedel=_friedel(r))


def check(rows: list[dict]) -> None:
    by = defaultdict(list)
    for r in rows:
        by[(r["set"], r["condition"])].append(r)
    print(f"{'set / condition':<40} {'n':>4} {'sys dec':>7} {'sys acc':>7} {'sys wrong':>9} "
          f"{'brv dec':>7} {'brv acc':>7} {'brv wrong':>9}")
    for (set_name, cond), rs in by.items():
        n = len(rs)
        verdicts = [apply_rule(r) for r in rs]
        ds = [r for r, (s, _) in zip(rs, verdicts) if s]
        db = [r for r, (_, b) in zip(rs, verdicts) if b]
        ws = sum(r["forced_system"] != r["system"] for r in ds)
        wb = sum(r["forced_bravais"] != r["bravais"] for r in db)
        acc = lambda w, d: "   -  " if not d else f"{1 - w / len(d):6.1%}"  # noqa: E731
        print(f"{set_name + ' / ' + cond:<40} {n:>4} {len(ds) / n:>7.1%} {acc(ws, ds):>7} {ws / n:>9.1%} "
              f"{len(db) / n:>7.1%} {acc(wb, db):>7} {wb / n:>9.1%}")
        for r in ds:
            if r["forced_system"] != r["system"]:
                print(f"    wrong system: {r['id']} SG {r['sg']} {r['system']} -> {r['forced_system']} "
                      f"(log-odds {r['system_margin']:.1f}, Friedel {_friedel(r):.2f})")
        for r in db:
            if r["forced_bravais"] != r["bravais"]:
                print(f"    wrong Bravais: {r['id']} SG {r['sg']} {r['bravais']} -> {r['forced_bravais']} "
                      f"(log-odds {r['bravais_margin']:.1f}, Friedel {_friedel(r):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("fit", "check"))
    ap.add_argument("rows", nargs="+", help="JSONL files written by benchmarks/evidence.py --dump")
    args = ap.parse_args()
    rows = [r for path in args.rows for r in load(path)]
    fit(rows) if args.mode == "fit" else check(rows)


if __name__ == "__main__":
    main()
