"""Measured / target of a latency search's result, before and after the measured final wall (issue 19).

    PYTHONPATH=. .venv/bin/python benchmarks/search_measured_budget.py --targets 0.5,0.3 --episodes 30 \
        --out /tmp/search_budget.json

One search per target (the demo's model and settings, fewer episodes). Its final wall measures the best
`--final-candidates` policies with the original in one interleaved batch, so one run gives both figures
side by side: *before* = the best-predicted policy (what the search exported until now) as measured
there, *after* = the policy the wall picked (or walked back to). Each divided by the target; the bar
is <= 1.00 within the measured CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amc_mobile.search.config import SearchConfig  # noqa: E402
from amc_mobile.search.loop import run_search  # noqa: E402
from device.local import cpu_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--targets", default="0.5,0.3")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--val-images", type=int, default=300)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = {"machine": f"{cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start", "runs": []}
    print(out["machine"], flush=True)
    for target in [float(t) for t in args.targets.split(",")]:
        t0 = time.perf_counter()
        cfg = SearchConfig(model=args.model, device="local", target=target, episodes=args.episodes,
                           warmup=args.warmup, val_images=args.val_images, calib_images=200, channel_round=8,
                           final_candidates=args.candidates, progress=False, seed=0)
        res = run_search(cfg)
        mb = res.summary.get("measured_budget", {})
        row = {"target": target, "seconds": time.perf_counter() - t0, "run_dir": str(res.run_dir)}
        if "candidates" in mb:
            by = {c["label"]: c for c in mb["candidates"]}
            before, picked = by.get(mb.get("best_predicted")), by.get(mb["picked"])
            row["before_over_target"] = None if before is None else before["ratio"] / mb["target_ratio"]
            row["before_ci"] = None if before is None else before["ci"]
            row["after_over_target"] = None if picked is None else picked["ratio"] / mb["target_ratio"]
            row["after_ci"] = None if picked is None else picked["ci"]
            row["walked_back"] = mb["walked_back"]
            row["noise"] = mb["noise"]
            row["candidates_over_target"] = [(c["label"], round(c["ratio"] / mb["target_ratio"], 4),
                                              round(c["ci"], 4), c["accuracy"]) for c in mb["candidates"]]
        else:
            row["error"] = mb.get("error")
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
