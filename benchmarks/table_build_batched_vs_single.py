"""Table-build throughput: batched multi-method `.pte` (lowered by a process pool) vs one `.pte` per
configuration, on the same random sample of MobileNet-V2 unit configurations, side by side in one run.

    PYTHONPATH=. python3 benchmarks/table_build_batched_vs_single.py [--configs 40] [--batch 32] [--device local]

Modes (each measures every configuration of the sample once, nothing is written to a table):
- single:  one `.pte` per configuration, lowered in this process, one runner invocation each.
- batched-1: all configurations in multi-method `.pte`s of --batch methods, lowered in this process.
- batched-pool: the same batches, lowered by --workers processes in parallel, then timed one after
  the other (the table build's default). Its figure includes starting and warming up the workers.

Prints configurations per minute per mode with lowering vs timing seconds where separable, the load
average (the machine may be shared), and how well the modes' medians agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from device.base import Candidate, MeasureConfig  # noqa: E402
from latency_tables.batching import DEFAULT_BATCH, BatchRunner, Job  # noqa: E402
from latency_tables.build import UNIT_CONFIG  # noqa: E402
from latency_tables.space import all_specs, unit_plans  # noqa: E402
from amc_mobile.tables import resolve_target  # noqa: E402


def run_mode(dev, config, jobs, batch, workers):
    results = {}

    def on_batch(rs):
        for j, s in rs:
            results[j.name] = s.median_ms if s.ok else float("nan")

    t0 = time.perf_counter()
    with BatchRunner(dev, config, batch, workers) as runner:
        runner.run(jobs, on_batch)
        stats = runner.stats
    return time.perf_counter() - t0, results, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--device", default="local")
    ap.add_argument("--configs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="methods per .pte in the batched modes "
                    "(default: the table build's, %(default)s)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="batched-pool,single,batched-1")
    args = ap.parse_args(argv)

    from device.lowering import lower_to_pte
    from device.registry import open_device
    from latency_tables.batching import _quiet

    _quiet()
    target = resolve_target(args.model)
    specs = list(all_specs(unit_plans(target.graph, target.scope, 8)).values())
    rng = np.random.default_rng(args.seed)
    sample = [specs[i] for i in rng.choice(len(specs), size=min(args.configs, len(specs)), replace=False)]
    jobs = [Job(f"u{i:04d}", spec=s) for i, s in enumerate(sample)]
    config: MeasureConfig = UNIT_CONFIG
    modes = {"single": (1, 1), "batched-1": (args.batch, 1), "batched-pool": (args.batch, args.workers)}
    order = [m.strip() for m in args.modes.split(",") if m.strip()]

    with open_device(args.device) as dev:
        # warm this process's exporter once (the pool's workers warm themselves, inside their figure)
        import tempfile

        m, x = sample[0].build()
        with tempfile.TemporaryDirectory() as tmp:
            lower_to_pte([Candidate("warm", m, x)], Path(tmp) / "w.pte")
        print(f"{args.model} scope {target.scope}: {len(sample)} random unit configurations of {len(specs)}; "
              f"measure config {config}; load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        out, rates = {}, {}
        for mode in order:
            batch, workers = modes[mode]
            la0 = os.getloadavg()[0]
            secs, res, st = run_mode(dev, config, jobs, batch, workers)
            out[mode] = res
            per_min = len(jobs) / (secs / 60)
            rates[mode] = per_min
            split = (f"lowering {st.lower_s:.0f} s + timing {st.measure_s:.0f} s" if st.lower_s else
                     "lowering and timing inside device.measure")
            print(f"{mode:13s} batch {batch:3d} workers {workers}: {secs:7.1f} s  {per_min:6.1f} configs/min  "
                  f"({split}; load avg {la0:.1f} -> {os.getloadavg()[0]:.1f})")
        if "single" in rates:
            for mode, r in rates.items():
                if mode != "single":
                    print(f"{mode} vs single: {r / rates['single']:.2f}x the configurations per minute")
        if len(out) >= 2:
            names = list(out)
            base = out[names[0]]
            for other in names[1:]:
                d = np.array([(out[other][k] - base[k]) / base[k] for k in base if k in out[other]])
                print(f"medians {other} vs {names[0]}: median |diff| {np.nanmedian(np.abs(d)) * 100:.1f}%, "
                      f"90th pct {np.nanpercentile(np.abs(d), 90) * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
