"""In-process assignment throughput: NeuroWeaver's domain assignment vs the GrowthBook Python SDK.

Same units, same seed/weights/coverage, same machine, same run. Every path is checked to give the same
variant for every unit before anything is timed.

    .venv/bin/python bench/experiments/assign_bench.py [--units 20000] [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import growthbook
from growthbook import Experiment, GrowthBook
from growthbook import core as gbcore

from neuroweaver_experiments.domain.assignment import AssignmentPlan, assign

SEED = "bench-experiment"
WEIGHTS = [0.2, 0.3, 0.5]
COVERAGE = 0.9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ours_plan(units):
    plan = AssignmentPlan(SEED, WEIGHTS, COVERAGE)
    return [plan.assign(u).served_variant for u in units]


def ours_one_shot(units):
    return [assign(SEED, u, WEIGHTS, COVERAGE).served_variant for u in units]


def sdk_run(units):
    gb = GrowthBook(attributes={})
    exp = Experiment(key=SEED, variations=list(range(len(WEIGHTS))), weights=WEIGHTS, coverage=COVERAGE, hashVersion=2, seed=SEED)
    out = []
    for u in units:
        gb.set_attributes({"id": u})
        out.append(gb.run(exp).variationId)
    return out


def sdk_core(units):
    ranges = gbcore.getBucketRanges(len(WEIGHTS), COVERAGE, WEIGHTS)
    out = []
    for u in units:
        v = gbcore.chooseVariation(gbcore.gbhash(SEED, u, 2), ranges)
        out.append(0 if v < 0 else v)
    return out


CASES = [
    ("neuroweaver AssignmentPlan.assign", ours_plan),
    ("neuroweaver assign() one-shot", ours_one_shot),
    ("growthbook GrowthBook.run (public API)", sdk_run),
    ("growthbook core gbhash+chooseVariation", sdk_core),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    units = [f"user-{i:08d}" for i in range(args.units)]

    reference = sdk_run(units)
    for name, fn in CASES:
        assert fn(units) == reference, f"{name} disagrees with GrowthBook.run"

    results = []
    for name, fn in CASES:
        rates = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            fn(units)
            rates.append(len(units) / (time.perf_counter() - t0))
        results.append((name, statistics.median(rates), min(rates), max(rates)))

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} logical cores; Python {platform.python_version()}; "
        f"growthbook {getattr(growthbook, '__version__', '?')}"
    )
    print(
        f"{args.units} units x {args.runs} runs, seed={SEED!r}, weights={WEIGHTS}, coverage={COVERAGE}, "
        "hashVersion=2; all paths agree on every unit"
    )
    base = results[2][1]
    print(f"{'implementation':42} {'median ops/s':>14} {'min':>12} {'max':>12} {'vs SDK run':>11}")
    for name, med, lo, hi in results:
        print(f"{name:42} {med:14,.0f} {lo:12,.0f} {hi:12,.0f} {med / base:10.2f}x")


if __name__ == "__main__":
    main()
