"""Table accuracy on a device: random pruned variants predicted from the table vs measured end to end.

    PYTHONPATH=. python3 benchmarks/table_accuracy.py [--models mobilenet_v2,resnet20] [--samples 50]
                                                      [--device local] [--no-build]

For each model: builds (or resumes) its table with the defaults of `amc-mobile table build` unless
--no-build, then runs `amc-mobile table validate`'s procedure and prints the figures with the bars:
at least 95% of the variants within ±10%, Spearman >= 0.95, under-prediction beyond 5% in at most 5%.
Outputs (samples.csv, scatter.png, summary.json) go to runs/table-accuracy-<model>-<timestamp>/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amc_mobile.tables import build_table  # noqa: E402
from amc_mobile.table_validation import validate_table  # noqa: E402

BARS = (("within_10pct", ">=", 0.95), ("spearman", ">=", 0.95), ("under_predicted_5pct", "<=", 0.05))


def coarse_only_unit_error(model: str, device: str, tables_dir, coarse_step: int = 4, grid: int = 8):
    """Unit level: how far linear interpolation between the coarse points alone lands from the measured
    non-coarse points of the same line (what a build without refinement would have predicted)."""
    import numpy as np

    from latency_tables.loading import open_table
    from latency_tables.predict import index_by_shape, plan_points, reference_latency
    from latency_tables.space import coarse_indices, unit_plans
    from amc_mobile.tables import resolve_target

    target = resolve_target(model)
    by_shape = index_by_shape(open_table(device, tables_dir=tables_dir).units().values())
    errs, seen = [], set()
    for plan in unit_plans(target.graph, target.scope, grid):
        if len(plan.axes) != 1:
            continue
        pts = plan_points(plan, by_shape)
        choices = plan.axes[0].choices
        coarse = {(choices[i],): pts[(choices[i],)] for i in coarse_indices(len(choices), coarse_step)
                  if (choices[i],) in pts}
        if len(coarse) < 2:
            continue
        for k, v in pts.items():
            key = plan.spec_at(k).key()
            if k in coarse or key in seen:
                continue
            seen.add(key)
            errs.append((reference_latency(coarse, k)[0] - v) / v)
    e = np.abs(np.array(errs))
    return len(e), float(np.median(e)) if len(e) else float("nan"), float(np.percentile(e, 90)) if len(e) else \
        float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet_v2,resnet20")
    ap.add_argument("--device", default="local")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tables-dir", default=None)
    ap.add_argument("--no-build", action="store_true", help="use the tables as they are")
    ap.add_argument("--out-root", default="runs")
    args = ap.parse_args(argv)

    from latency_tables.batching import _quiet

    _quiet()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    ok = True
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        if not args.no_build:
            t0 = time.perf_counter()
            rep = build_table(model, args.device, tables_dir=args.tables_dir, progress=True)
            print(rep.summary())
            print(f"(build step {time.perf_counter() - t0:.0f} s)")
        n, med, p90 = coarse_only_unit_error(model, args.device, args.tables_dir)
        print(f"units: interpolating between coarse points only (every 4th grid point) misses the {n} other "
              f"measured points by {med * 100:.1f}% (median), {p90 * 100:.1f}% (90th percentile)")
        out = Path(args.out_root) / f"table-accuracy-{model}-{stamp}"
        t0 = time.perf_counter()
        res = validate_table(model, args.device, samples=args.samples, seed=args.seed, out_dir=out,
                             tables_dir=args.tables_dir, progress=True)
        m = res.metrics
        print(f"\n{model} on {args.device}: {len(res.samples)} variants, "
              f"{m['interpolated_units_mean']:.1f} of {len(res.samples) and m.get('units', 0) or 'the'} units "
              f"interpolated per variant on average; validation {time.perf_counter() - t0:.0f} s; load average "
              f"now {os.getloadavg()[0]:.1f}")
        print(res.summary())
        variants = [("median, table calibration", m)]
        if m.get("session_calibration"):
            variants.append(("median, session calibration", m["session_calibration"]["metrics"]))
        variants.append(("p10, table calibration", m["p10"]["metrics"]))
        if m["p10"].get("session_calibration"):
            variants.append(("p10, session calibration", m["p10"]["session_calibration"]["metrics"]))
        for name, mm in variants:
            marks = []
            for key, op, bar in BARS:
                met = mm[key] >= bar if op == ">=" else mm[key] <= bar
                marks.append(f"{key} {mm[key]:.3f} {'met' if met else 'NOT met'}")
                if name == variants[0][0]:
                    ok &= met
            print(f"  bars [{name}]: " + "; ".join(marks))
        print(f"  outputs: {res.out_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
