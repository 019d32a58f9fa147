"""Repeatability of `local`: N separate measurements of the default model, median-to-median spread.

Each repetition is a separate runner invocation (a fresh process loading the .pte), as a user
re-running `amc-mobile bench` would see. The bar: spread (max - min) / median of the medians <= 3%.

    .venv/bin/python benchmarks/measure_stability.py [--model mobilenet_v2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main() -> int:
    from amc_mobile.model_io import load_model
    from amc_mobile.models import DEFAULT_MODEL
    from device import Candidate, MeasureConfig, open_device
    from device.lowering import lower_to_pte

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    m = load_model(args.model)
    dev = open_device("local")
    cfg = MeasureConfig(warmup=args.warmup, iterations=args.iterations, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pte = Path(tmp) / "model.pte"
        lower_to_pte([Candidate("forward", m.module, m.example_input)], pte)  # lowered once, run N times
        medians = []
        for i in range(args.repeats):
            s = dev.measure_pte(pte, ["forward"], cfg)[0]
            medians.append(s.median_ms)
            print(f"run {i + 1}: median {s.median_ms:.4f} ms  p10 {s.p10_ms:.4f}  p90 {s.p90_ms:.4f}  n {s.n}")
    mid = statistics.median(medians)
    spread = (max(medians) - min(medians)) / mid
    fp = dev.fingerprint(cfg)
    print(f"device: {fp.hardware} | {fp.runtime} | threads {fp.threads}")
    print(f"median of medians {mid:.4f} ms; median-to-median spread {spread * 100:.2f}% "
          f"({'meets' if spread <= 0.03 else 'misses'} the 3% bar)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
