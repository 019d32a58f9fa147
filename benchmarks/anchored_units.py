"""Raw medians vs drift-anchored unit values (issue 19 items 2-3): which predicts a quiet measurement best
when the table was built on a noisy device.

    PYTHONPATH=. .venv/bin/python benchmarks/anchored_units.py --models resnet20,mobilenet_v2 \
        --build-duties 0,0.5 --samples 30 --out /tmp/anchored.json

Per model and build condition (no injector; the injector at each duty cycle on every CPU the runner may
use, for the whole build), a table is built from an empty folder with the default protocol (every batch
timed in interleaved rounds with the drift reference). Then, with the injector stopped, `table validate`
times the same seeded random pruned variants and predicts each of them two ways from that one table:

- raw: each unit row's median (what predictions used until now);
- anchored: each row's ratio to the drift reference in the same rounds x the reference's median level over
  the build (`latency_tables.reference.anchored_rows`), so a slow stretch of the build that landed on a run
  of rows cancels out.

Both with the table's calibration and with this session's (the calibration models re-timed next to the
variants, what a search uses). Results are appended to --out as each validation ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amc_mobile.table_validation import validate_table  # noqa: E402
from amc_mobile.tables import build_table  # noqa: E402
from device.local import cpu_model  # noqa: E402
from device.noise_injector import NoiseInjector  # noqa: E402

KEYS = ("within_5pct", "within_10pct", "rmspe_pct", "mean_error_pct", "under_predicted_5pct", "spearman")


def pick(m: dict | None) -> dict | None:
    return None if not m else {k: m[k] for k in KEYS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet20,mobilenet_v2")
    ap.add_argument("--build-duties", default="0,0.5", help="injector duty cycles during the build (0: none)")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = {"machine": f"{cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start",
           "samples": args.samples, "passes": args.passes, "runs": []}
    print(out["machine"], flush=True)
    for model in args.models.split(","):
        for duty in [float(d) for d in args.build_duties.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                noisy = NoiseInjector(duty=duty, period_ms=50, memory_mb=64) if duty > 0 else contextlib.nullcontext()
                t0 = time.perf_counter()
                with noisy:
                    rep = build_table(model, "local", tables_dir=Path(tmp) / "tables", progress=False)
                build_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                res = validate_table(model, "local", samples=args.samples, seed=args.seed,
                                     tables_dir=Path(tmp) / "tables", out_dir=Path(tmp) / "v", progress=False,
                                     plot=False, passes=args.passes)
                m = res.metrics
                a = m["anchored_units"]
                row = {"model": model, "build_duty": duty, "build_s": round(build_s, 1),
                       "validate_s": round(time.perf_counter() - t0, 1),
                       "build_noise": rep.table_status, "build_rows_noisy": rep.noisy,
                       "raw": {"table": pick(m), "session": pick((m.get("session_calibration") or {}).get("metrics"))},
                       "anchored": {"table": pick(a["metrics"]),
                                    "session": pick((a.get("session_calibration") or {}).get("metrics"))},
                       "validation_noise": m.get("noise")}
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
