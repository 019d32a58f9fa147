"""Table validation with and without the noise injector, before and after issue 19, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/validate_under_noise.py --models resnet20 --samples 30 \
        --passes 3 --duties 0,0.25,0.5 --out /tmp/validate_noise.json

Against the shipped table of this host. Per model and condition (no injector; the injector at each duty
cycle, on every CPU the runner may use), two validations of the same seeded variants:

- before: the old path (no drift reference, each program's methods timed back to back): raw medians.
- after: the original model in every round of every program; both the raw medians of that run and the
  drift-normalised ones (ratio to the original x its median over the session), with the noise figure
  and the verdict line that `table validate` prints.

Each validation's wall time is the device-time cost. Results are appended to --out as they come.
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

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device.local import cpu_model  # noqa: E402
from device.noise import noise_sentence  # noqa: E402
from device.noise_injector import NoiseInjector  # noqa: E402
from latency_tables.build import MODEL_CONFIG  # noqa: E402
from amc_mobile.table_validation import validate_table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--duties", default="0,0.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from dataclasses import replace

    out = {"machine": f"{cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start",
           "samples": args.samples, "passes": args.passes, "runs": []}
    print(out["machine"], flush=True)
    for model in args.models.split(","):
        for duty in [float(d) for d in args.duties.split(",")]:
            for mode in ("before", "after"):
                cfg = replace(MODEL_CONFIG, reference="" if mode == "before" else None)
                inj = NoiseInjector(duty=duty, period_ms=50, memory_mb=64) if duty > 0 else None
                with tempfile.TemporaryDirectory() as tmp:
                    if inj:
                        inj.start()
                    t0 = time.perf_counter()
                    try:
                        res = validate_table(model, "local", samples=args.samples, seed=args.seed,
                                             out_dir=Path(tmp) / "v", config=cfg, progress=False, plot=False,
                                             passes=args.passes)
                    finally:
                        if inj:
                            inj.stop()
                    dt = time.perf_counter() - t0
                m = res.metrics
                row = {"model": model, "duty": duty, "mode": mode, "seconds": dt,
                       "raw": {k: m[k] for k in ("within_10pct", "within_5pct", "spearman", "mean_error_pct")},
                       "raw_session": None if not m.get("session_calibration") else
                       {k: m["session_calibration"]["metrics"][k] for k in ("within_10pct", "spearman")}}
                if "drift_normalised" in m:
                    n = m["drift_normalised"]
                    row["normalised"] = {k: n["metrics"][k] for k in ("within_10pct", "within_5pct", "spearman",
                                                                       "mean_error_pct")}
                    if n.get("session_calibration"):
                        row["normalised_session"] = {k: n["session_calibration"]["metrics"][k]
                                                     for k in ("within_10pct", "spearman")}
                    row["noise"] = m["noise"]
                    row["verdict"] = noise_sentence(m["noise"]["figure"], 0.10)
                out["runs"].append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
