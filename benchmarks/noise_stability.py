"""Stability of unit measurements under a reproducible noisy neighbour, before and after issue 19.

    PYTHONPATH=. .venv/bin/python benchmarks/noise_stability.py --units 24 --passes 5 --trials 2 \
        --duties 0,0.25,0.5 --out /tmp/noise_stability.json

Units: the first --units rows of the shipped MobileNet-V2 table of this host (their specs), lowered once
into one program with the drift reference. For each trial, each condition (no injector, then the
injector at each duty cycle; the order rotates per trial so no condition always comes first) runs:

- before: `passes` runner invocations in the old sequential mode (each unit timed back to back);
  per unit, the spread of its pass medians, (max - min) / median; the median over units is the figure.
- after: `passes` invocations in interleaved rounds with the reference in every round; the same spread
  of the per-pass *ratio* to the reference (what tables now store), and of the raw medians of those runs.
- adaptive: one interleaved invocation with --ci_target 0.02 and a 5 s cap per group: its time, and
  the share of units that converged.
- estimators (item 3): per unit, median / p10 / p20 / 10 %-trimmed mean / minimum of a noisy
  condition's interleaved samples, against the quiet condition's median of the same trial; the error
  of each (median over units) says which estimator predicts a quiet measurement best; and the same
  for ratio x the quiet reference level.

Device seconds are the wall time of each runner call. The machine (shared or not) is printed; the
figures quoted in docs/BENCHMARKS.md name it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device import Candidate, MeasureConfig  # noqa: E402
from device.local import LocalDevice, cpu_model  # noqa: E402
from device.lowering import lower_to_pte  # noqa: E402
from device.noise_injector import NoiseInjector  # noqa: E402
from device.stats import robust_cv  # noqa: E402
from latency_tables.reference import REFERENCE_NAME, REFERENCE_SPEC  # noqa: E402
from latency_tables.schema import read_unit_rows  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "latency_tables"


def spread(values) -> float:
    v = np.asarray(values, dtype=float)
    return float((v.max() - v.min()) / np.median(v)) if v.size > 1 else 0.0


def estimators(samples: np.ndarray) -> dict[str, float]:
    s = np.sort(samples)
    k = int(0.1 * s.size)
    return {"median": float(np.median(s)), "p10": float(np.percentile(s, 10)), "p20": float(np.percentile(s, 20)),
            "trimmed10": float(s[k:s.size - k].mean()) if s.size > 2 * k else float(s.mean()), "min": float(s[0])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=24)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--duties", default="0,0.25,0.5")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    duties = [float(d) for d in args.duties.split(",")]
    folder = next(p for p in SHIPPED.iterdir() if (p / "units.csv").is_file())
    rows, _ = read_unit_rows(folder / "units.csv")
    specs = [r.spec for r in list(rows.values())[:: max(1, len(rows) // args.units)][: args.units]]
    dev = LocalDevice()
    results = {"machine": f"{cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start",
               "units": len(specs), "passes": args.passes, "iterations": args.iterations, "trials": []}
    print(results["machine"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pte = Path(tmp) / "units.pte"
        cands = []
        for i, spec in enumerate(specs):
            m, x = spec.build()
            cands.append(Candidate(f"u{i:03d}", m, x))
        m, x = REFERENCE_SPEC.build()
        cands.append(Candidate(REFERENCE_NAME, m, x))
        failed = lower_to_pte(cands, pte)
        names = [c.name for c in cands[:-1] if c.name not in failed]
        seq = MeasureConfig(warmup=5, iterations=args.iterations)
        inter = MeasureConfig(warmup=5, iterations=args.iterations, reference=REFERENCE_NAME)
        adapt = MeasureConfig(warmup=5, iterations=args.iterations, reference=REFERENCE_NAME, ci_target=0.02,
                              max_time_ms=5000.0)
        for trial in range(args.trials):
            order = duties[trial % len(duties):] + duties[: trial % len(duties)]
            per: dict[float, dict] = {}
            for duty in order:
                inj = NoiseInjector(duty=duty, period_ms=50, memory_mb=64) if duty > 0 else None
                if inj:
                    inj.start()
                try:
                    t0 = time.perf_counter()
                    before = [{s.name: s for s in dev.measure_pte(pte, names, seq)} for _ in range(args.passes)]
                    t1 = time.perf_counter()
                    after = [{s.name: s for s in dev.measure_pte(pte, names, inter)} for _ in range(args.passes)]
                    t2 = time.perf_counter()
                    ad = {s.name: s for s in dev.measure_pte(pte, names, adapt)}
                    t3 = time.perf_counter()
                finally:
                    if inj:
                        inj.stop()
                r = {
                    "before_spread": float(np.median([spread([p[n].median_ms for p in before]) for n in names])),
                    "after_ratio_spread": float(np.median([spread([p[n].ratio for p in after]) for n in names])),
                    "after_raw_spread": float(np.median([spread([p[n].median_ms for p in after]) for n in names])),
                    "noise": float(np.median([p[n].noise for p in after for n in names])),
                    "seq_s_per_pass": (t1 - t0) / args.passes, "inter_s_per_pass": (t2 - t1) / args.passes,
                    "adaptive_s": t3 - t2, "adaptive_converged": float(np.mean([bool(ad[n].converged) for n in names])),
                    "adaptive_rounds_median": float(np.median([ad[n].n for n in names])),
                }
                pooled = {n: np.concatenate([p[n].samples_ms for p in after]) for n in names}
                refs = {n: np.concatenate([p[n].reference_ms for p in after]) for n in names}
                r["_est"] = {n: estimators(pooled[n]) for n in names}
                r["_ratio"] = {n: float(np.median(pooled[n] / refs[n])) for n in names}
                r["_ref_level"] = float(np.median(np.concatenate(list(refs.values()))))
                per[duty] = r
                print(f"trial {trial} duty {duty:.2f}: before spread {100 * r['before_spread']:.1f} %, after ratio "
                      f"spread {100 * r['after_ratio_spread']:.1f} % (raw {100 * r['after_raw_spread']:.1f} %), noise "
                      f"{100 * r['noise']:.1f} %, s/pass {r['seq_s_per_pass']:.2f} vs {r['inter_s_per_pass']:.2f}, "
                      f"adaptive {r['adaptive_s']:.1f} s ({100 * r['adaptive_converged']:.0f} % converged)", flush=True)
            quiet = per.get(0.0)
            if quiet is not None:
                for duty, r in per.items():
                    if duty == 0.0:
                        continue
                    errs = {}
                    for est in ("median", "p10", "p20", "trimmed10", "min"):
                        errs[est] = float(np.median([abs(r["_est"][n][est] / quiet["_est"][n]["median"] - 1)
                                                     for n in names]))
                    errs["ratio_x_quiet_level"] = float(np.median([
                        abs(r["_ratio"][n] * quiet["_ref_level"] / quiet["_est"][n]["median"] - 1) for n in names]))
                    r["estimator_error_vs_quiet_median"] = errs
                    print(f"trial {trial} duty {duty:.2f} estimator error vs quiet median: "
                          + ", ".join(f"{k} {100 * v:.1f} %" for k, v in errs.items()), flush=True)
            results["trials"].append({str(d): {k: v for k, v in r.items() if not k.startswith("_")}
                                      for d, r in per.items()})
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
