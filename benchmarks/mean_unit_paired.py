"""Before/after the `mean` unit on the same measurements (issue 13): networks whose head is `x.mean((2, 3))`.

    PYTHONPATH=.:tests .venv/bin/python benchmarks/mean_unit_paired.py --nets mobilenet_v3_small,efficientnet_b0
        [--samples 20] [--passes 3] [--out DIR] [--tables DIR]

Until this change a spatial `mean` without keepdim was keyed and measured as the global average pool
(`pool0x0`, XNNPACK); ExecuTorch 1.4.1 runs it on the portable kernel instead (`mean0x0`). For each net this
builds (or resumes) its table with the current code, validates it on `--samples` random pruned variants
(each timed in `--passes` passes), then predicts the very same measured variants twice from that one table:
with the `mean` units (after) and with them mapped back to the global pool (before), each with the table's
stored calibration and with this session's (the calibration models timed in the validation's passes).
Nothing but the unit mapping differs between the two columns, so host noise cannot make one look better.
Reported for the median and for the 10th percentile of each variant's samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pattern_nets import PATTERN_NETS, randomise_bn  # noqa: E402


def as_before(graph):
    """The graph as the previous code keyed it: a spatial mean/sum is the global pool unit."""
    units = [replace(u, spec=replace(u.spec, kind="pool", kernel=0)) if u.spec.kind in ("mean", "sum") else u
             for u in graph.units]
    return replace(graph, units=units)


def predictions(graph, target, store, df, session_rows):
    """Metrics per (statistic, calibration): the median and the 10th percentile (less sensitive to a loaded
    host's preemptions), each with the table's stored fit and with this session's."""
    from latency_tables.calibrate import calibration_for, fit_overhead
    from latency_tables.loading import calibration_points
    from latency_tables.predict import LatencyModel
    from amc_mobile.table_validation import accuracy_metrics, channels_of

    out = {}
    for stat, column in (("median", "median_ms"), ("p10", "p10_ms")):
        lat = LatencyModel.compile(graph, target.scope, store.units().values(), 8, statistic=column)
        sums = np.array([lat.predict_raw(c) for c in channels_of(df)])
        measured = df[column].to_numpy(float)
        for which, rows in (("table", calibration_for(store.calibration(), target.hash)), ("session", session_rows)):
            s, m, _ = calibration_points(lat, rows)
            fit = fit_overhead(s, m)
            out[f"{stat} {which}"] = {"fit": fit.to_dict(), **accuracy_metrics(fit.scale * sums + fit.offset, measured)}
    return out


def one(name, args, out):
    from amc_mobile.pruning import build_graph
    from amc_mobile.table_validation import CALIBRATION_FILE, validate_table
    from amc_mobile.tables import build_table, resolve_target
    from latency_tables.loading import open_table
    from latency_tables.schema import read_calibration_rows

    torch.manual_seed(0)
    model = randomise_bn(PATTERN_NETS[name](in_ch=1, size=28))
    graph = build_graph(model)
    tables = Path(args.tables or out / "tables") / name
    t0 = time.perf_counter()
    if not args.no_build:
        build_table(model, "local", graph=graph, grid=8, tables_dir=tables, progress=False)
    build_s = time.perf_counter() - t0
    val = validate_table(model, "local", samples=args.samples, passes=args.passes, graph=graph, grid=8,
                         tables_dir=tables, out_dir=out / "validate" / name, progress=False, plot=False)
    target = resolve_target(model, graph)
    store = open_table("local", tables_dir=tables)
    session_rows = read_calibration_rows(val.out_dir / CALIBRATION_FILE)
    return {"net": name, "build_s": round(build_s, 1), "samples": len(val.samples),
            "after": predictions(graph, target, store, val.samples, session_rows),
            "before": predictions(as_before(graph), target, store, val.samples, session_rows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="mobilenet_v3_small,efficientnet_b0")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--tables", default=None, help="tables folder (per net a subfolder); resumed when it exists")
    p.add_argument("--out", default=None)
    p.add_argument("--no-build", action="store_true", help="use the tables as they are (a rerun that only re-analyses)")
    args = p.parse_args()
    out = Path(args.out or f"runs/mean-unit-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.nets.split(","):
        rows.append(one(name, args, out))
        (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
        for r in rows[-1:]:
            for cal in r["after"]:
                for when in ("before", "after"):
                    m = r[when][cal]
                    print(f"{r['net']:20s} {when:6s} {cal:14s} calibration: within 5% {m['within_5pct']:.0%}  "
                          f"10% {m['within_10pct']:.0%}  RMSPE {m['rmspe_pct']:.1f}%  mean {m['mean_error_pct']:+.1f}%"
                          f"  under {m['under_predicted_5pct']:.0%}  Spearman {m['spearman']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
