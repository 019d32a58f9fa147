"""Lowering cost per method: this project's lowering against ExecuTorch's as shipped, side by side.

    .venv/bin/python benchmarks/lowering_speed.py [--units 20] [--pairs 3]

Each pair runs two fresh processes, in alternating order of kind: `stock` (torch's own `py_impl` and
the cyclic GC left running, as before session 3) and `ours` (`device.lowering` as it is). Each
process lowers one warm-up unit, then the same --units random MobileNet-V2 unit configurations
(seed = pair index) as one multi-method `.pte`, and prints seconds per method.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    from latency_tables.target import resolve_target

    _quiet()
    if kind == "stock":
        lowering._speed_up_py_impl = lambda: None
        lowering._collector_paused = contextlib.nullcontext
    target = resolve_target("mobilenet_v2")
    specs = list(all_specs(unit_plans(target.graph, target.scope, 8)).values())
    rng = np.random.default_rng(seed)
    picks = [specs[i] for i in rng.choice(len(specs), size=units + 1, replace=False)]
    cands = [Candidate(f"u{i:03d}", *s.build()) for i, s in enumerate(picks)]
    with tempfile.TemporaryDirectory() as tmp:
        lowering.lower_to_pte(cands[:1], Path(tmp) / "warm.pte")
        t = time.perf_counter()
        failed = lowering.lower_to_pte(cands[1:], Path(tmp) / "batch.pte")
        assert not failed, failed
        return (time.perf_counter() - t) / units


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--child", choices=("stock", "ours"), help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(f"RESULT {child(args.child, args.units, args.seed):.4f}")
        return 0
    res: dict[str, list[float]] = {"stock": [], "ours": []}
    for pair in range(args.pairs):
        order = ("stock", "ours") if pair % 2 == 0 else ("ours", "stock")
        row = {}
        for kind in order:
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--units", str(args.units),
                                  "--seed", str(pair)], cwd=ROOT, capture_output=True, text=True, check=True)
            row[kind] = float(out.stdout.rsplit("RESULT", 1)[1])
            res[kind].append(row[kind])
        print(f"pair {pair + 1} (seed {pair}): stock {row['stock']:.3f} s/method, ours {row['ours']:.3f} s/method, "
              f"stock/ours {row['stock'] / row['ours']:.2f}x", flush=True)
    ratios = [s / o for s, o in zip(res["stock"], res["ours"])]
    print(f"median: stock {statistics.median(res['stock']):.3f} s/method, ours {statistics.median(res['ours']):.3f} "
          f"s/method; paired stock/ours median {statistics.median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
