"""What `--min_time_ms` as the span of interleaved rounds buys: one table, built with two runners, paired.

    .venv/bin/python benchmarks/min_time_span.py --before OLD_ET_BENCH [--after build/host/et_bench]
        [--rounds 2] [--out DIR]

Until session 8 a method in interleaved rounds stayed in them until its *own* timed runs added up to
`--min_time_ms`; the drift reference runs in every round, so a 0.3 µs unit needing 30 ms ran ~100,000
rounds, the ~40 µs reference in each. Now the rounds' wall time counts. This builds the README's example
network's table (the default unit protocol: interleaved, referenced, 3 repeats of 30 ms) from an empty
folder with each runner, alternating (A B A B ...), each build in its own process, and prints per build
the wall time, the measuring and lowering seconds, and per unit the ratio of the two runners' medians
(same rows, keyed), so the speed-up and what it does to the table are read side by side.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

NET = '''
from torch import nn


class Net(nn.Module):
    input_shape = (1, 28, 28)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.Hardswish(),
            nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.Hardswish())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def build():
    return Net()
'''


def build_once(runner: Path, net: Path, folder: Path) -> dict:
    env = dict(os.environ, AMC_ET_BENCH=str(runner), PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "amc_mobile", "table", "build", "-m", f"{net}:build",
                           "--table-dir", str(folder), "--quiet"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"table build with {runner} failed: {proc.stderr.strip().splitlines()[-1:]}")
    build = json.loads((folder / "meta.json").read_text())["builds"][-1]
    with open(folder / "units.csv", newline="") as f:
        units = {r["key"]: (float(r["median_ms"]), int(r["n"])) for r in csv.DictReader(f)}
    return {"wall_s": wall, "measure_s": build["measure_s"], "lower_s": build["lower_s"],
            "measured": build["measured"], "noise": build.get("noise"), "units": units}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="et_bench built before the change")
    ap.add_argument("--after", type=Path, default=REPO / "build" / "host" / "et_bench")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="min-time-span-"))
    out.mkdir(parents=True, exist_ok=True)
    net = out / "net.py"
    net.write_text(NET)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for kind in (("before", "after") if r % 2 == 0 else ("after", "before")):
            res = build_once(getattr(args, kind), net, out / f"{kind}-{r}")
            runs[kind].append(res)
            print(f"round {r} {kind:6s}: {res['wall_s']:6.1f} s wall, measuring {res['measure_s']:6.1f} s, "
                  f"lowering {res['lower_s']:5.1f} s, {res['measured']} configs, noise {res['noise']:.3f}",
                  flush=True)
    med = {k: statistics.median(x["measure_s"] for x in v) for k, v in runs.items()}
    wall = {k: statistics.median(x["wall_s"] for x in v) for k, v in runs.items()}
    print(f"median measuring: before {med['before']:.1f} s, after {med['after']:.1f} s "
          f"({med['before'] / med['after']:.2f}x); median wall {wall['before']:.1f} -> {wall['after']:.1f} s")
    # the tables themselves: per unit, after's median over before's, each round's pair
    ratios = []
    for b, a in zip(runs["before"], runs["after"]):
        ratios += [a["units"][k][0] / b["units"][k][0] for k in b["units"] if k in a["units"]]
    ratios.sort()
    q = lambda p: ratios[min(len(ratios) - 1, int(p * len(ratios)))]  # noqa: E731
    print(f"unit medians, after / before ({len(ratios)} pairs): p10 {q(0.1):.3f}, median {q(0.5):.3f}, "
          f"p90 {q(0.9):.3f}")
    n_b = statistics.median(n for x in runs["before"] for _, n in x["units"].values())
    n_a = statistics.median(n for x in runs["after"] for _, n in x["units"].values())
    print(f"samples per unit row (median): before {n_b:.0f}, after {n_a:.0f}")
    (out / "results.json").write_text(json.dumps({k: [{kk: vv for kk, vv in x.items() if kk != "units"} for x in v]
                                                  for k, v in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
