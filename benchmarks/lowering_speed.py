"""Lowering cost per method: this project's lowering against ExecuTorch's as shipped, side by side.

    .venv/bin/python benchmarks/lowering_speed.py [--units 20] [--pairs 3] [--kinds stock,per-method,shared-per-partition,shared]

Each round runs one fresh process per kind, the order rotating from round to round:
- `stock`: ExecuTorch's multi-method lowering as shipped (one program per method, torch's own
  `py_impl`, the cyclic GC left running), as before session 3;
- `per-method`: one program per method with session 3's speed-ups (`lower_to_pte(shared=False)`);
- `shared-per-partition`: the batch lowered once, split into methods, but XNNPACK's delegate passes
  run once per unit (session 4's lowering);
- `shared`: `device.lowering` as it is (the batch lowered once, XNNPACK's passes run once per
  chunk: device/merged_preprocess.py, then split into methods).
Each process lowers one warm-up unit, then the same --units random MobileNet-V2 unit configurations
(seed = round index) into one multi-method `.pte`, and prints seconds per method.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("stock", "per-method", "shared-per-partition", "shared")


def child(kind: str, units: int, seed: int) -> float:
    import tempfile
    import time
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np

    import device.lowering as lowering
    from device.base import Candidate
    from latency_tables.batching import _quiet
    from latency_tables.space import all_specs, unit_plans
    from amc_mobile.tables import resolve_target

    _quiet()
    if kind == "stock":
        lowering.speedups_apply = lambda: False  # stock torch: neither exporter speed-up
        lowering._collector_paused = contextlib.nullcontext
    if kind == "shared-per-partition":
        import device.shared_lowering as shared_lowering

        shared_lowering.merged_passes = contextlib.nullcontext
    target = resolve_target("mobilenet_v2")
    specs = list(all_specs(unit_plans(target.graph, target.scope, 8)).values())
    rng = np.random.default_rng(seed)
    picks = [specs[i] for i in rng.choice(len(specs), size=units + 1, replace=False)]
    cands = [Candidate(f"u{i:03d}", *s.build()) for i, s in enumerate(picks)]
    with tempfile.TemporaryDirectory() as tmp:
        lowering.lower_to_pte(cands[:1], Path(tmp) / "warm.pte")
        t = time.perf_counter()
        failed = lowering.lower_to_pte(cands[1:], Path(tmp) / "batch.pte", shared=kind.startswith("shared"))
        assert not failed, failed
        return (time.perf_counter() - t) / units


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=3, help="rounds (each runs every kind once)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(f"RESULT {child(args.child, args.units, args.seed):.4f}")
        return 0
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        ap.error(f"--kinds: choose from {', '.join(KINDS)}")
    res: dict[str, list[float]] = {k: [] for k in kinds}
    for rnd in range(args.pairs):
        order = kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]
        for kind in order:
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--units", str(args.units),
                                  "--seed", str(rnd)], cwd=ROOT, capture_output=True, text=True, check=True)
            res[kind].append(float(out.stdout.rsplit("RESULT", 1)[1]))
        row = ", ".join(f"{k} {res[k][-1]:.3f}" for k in kinds)
        print(f"round {rnd + 1} (seed {rnd}, order {'/'.join(order)}): {row} s/method", flush=True)
    last = kinds[-1]
    print("median s/method: " + ", ".join(f"{k} {statistics.median(res[k]):.3f}" for k in kinds))
    for k in kinds[:-1]:
        ratios = [a / b for a, b in zip(res[k], res[last])]
        print(f"paired {k}/{last}: median {statistics.median(ratios):.2f}x (rounds: "
              + ", ".join(f"{r:.2f}" for r in ratios) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
