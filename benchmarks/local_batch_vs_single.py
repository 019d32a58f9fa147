"""`local`: one multi-method .pte + one et_bench run for a batch, against one .pte + one run per candidate.

    .venv/bin/python benchmarks/local_batch_vs_single.py [--rounds 3] [--n 20]

20 conv-bn-relu units (3x3, C->C channels at 14x14, C = 8, 16, ..., 160), MeasureConfig defaults
(warmup 10, iterations 50, threads 1). Each round times both ways back to back (the order alternates
between rounds) after one untimed warm-up round that pays the one-off import and tracing costs;
figures are medians over the rounds. The dev box is shared, so besides wall time the script
reports the median of the per-round single/batch ratios (each pair ran back to back) and CPU
time (this process + the runner processes), which other users' load barely moves.

  batch:  lower_to_pte(all 20) -> one .pte; LocalDevice.measure_pte(all 20) -> one runner process
          (the two calls LocalDevice.measure makes; timed separately for the split)
  single: for each candidate: lower_to_pte([it]) -> its own .pte; measure_pte([it]) -> its own process
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from device import Candidate, MeasureConfig  # noqa: E402
from device.local import LocalDevice  # noqa: E402
from device.lowering import lower_to_pte  # noqa: E402


class ConvUnit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def candidates(n: int) -> list[Candidate]:
    torch.manual_seed(0)
    return [Candidate(f"unit_c{8 * (i + 1)}", ConvUnit(8 * (i + 1)), torch.randn(1, 8 * (i + 1), 14, 14)) for i in range(n)]


def cpu_self() -> float:
    return time.process_time()


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_batch(dev: LocalDevice, cands: list[Candidate], cfg: MeasureConfig, tmp: Path) -> dict:
    t0, c0 = time.perf_counter(), cpu_self()
    failed = lower_to_pte(cands, tmp / "batch.pte")
    t1, c1, k1 = time.perf_counter(), cpu_self(), cpu_children()
    assert not failed, failed
    stats = dev.measure_pte(tmp / "batch.pte", [c.name for c in cands], cfg)
    t2, k2 = time.perf_counter(), cpu_children()
    assert all(s.ok for s in stats), [s.error for s in stats if not s.ok]
    return {
        "lower": t1 - t0, "run": t2 - t1, "total": t2 - t0,
        "cpu_lower": c1 - c0, "cpu_run": k2 - k1,
        "medians": {s.name: s.median_ms for s in stats},
    }


def run_single(dev: LocalDevice, cands: list[Candidate], cfg: MeasureConfig, tmp: Path) -> dict:
    lower = run = cpu_lower = cpu_run = 0.0
    medians = {}
    for c in cands:
        t0, c0 = time.perf_counter(), cpu_self()
        failed = lower_to_pte([c], tmp / f"{c.name}.pte")
        t1, c1, k1 = time.perf_counter(), cpu_self(), cpu_children()
        assert not failed, failed
        (s,) = dev.measure_pte(tmp / f"{c.name}.pte", [c.name], cfg)
        t2, k2 = time.perf_counter(), cpu_children()
        assert s.ok, s.error
        lower += t1 - t0
        run += t2 - t1
        cpu_lower += c1 - c0
        cpu_run += k2 - k1
        medians[c.name] = s.median_ms
    return {"lower": lower, "run": run, "total": lower + run, "cpu_lower": cpu_lower, "cpu_run": cpu_run,
            "medians": medians}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    dev = LocalDevice()
    cfg = MeasureConfig()
    cands = candidates(args.n)
    print(f"{args.n} candidates, {dev.fingerprint(cfg).hardware}, threads {cfg.threads or 1}, "
          f"warmup {cfg.warmup}, iterations {cfg.iterations}, {args.rounds} rounds (+1 untimed warm-up)")
    results: dict[str, list[dict]] = {"batch": [], "single": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run_batch(dev, cands[:2], cfg, tmp)  # warm-up: imports, first trace
        run_single(dev, cands[:2], cfg, tmp)
        for r in range(args.rounds):
            order = ["batch", "single"] if r % 2 == 0 else ["single", "batch"]
            for mode in order:
                fn = run_batch if mode == "batch" else run_single
                res = fn(dev, cands, cfg, tmp)
                results[mode].append(res)
                print(f"  round {r + 1} {mode:6s}: total {res['total']:6.1f} s  "
                      f"(lowering {res['lower']:6.1f} s, running {res['run']:5.1f} s)", flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in results[mode])

    print()
    print(f"{'':8s} {'total s':>8s} {'lowering s':>11s} {'running s':>10s} {'lowering %':>11s}")
    for mode in ("batch", "single"):
        t, lo, ru = med(mode, "total"), med(mode, "lower"), med(mode, "run")
        print(f"{mode:8s} {t:8.1f} {lo:11.1f} {ru:10.2f} {100 * lo / t:10.0f}%")
    print(f"single / batch wall time: {med('single', 'total') / med('batch', 'total'):.2f}x "
          f"(lowering {med('single', 'lower') / med('batch', 'lower'):.2f}x, "
          f"running {med('single', 'run') / med('batch', 'run'):.2f}x)")
    paired = [s["total"] / b["total"] for s, b in zip(results["single"], results["batch"])]
    print(f"single / batch, per round (back to back): {', '.join(f'{x:.2f}' for x in paired)}; "
          f"median {statistics.median(paired):.2f}x")
    print(f"{'CPU s':8s} {'lowering':>11s} {'running':>10s}   (this process for lowering, runner processes for running)")
    for mode in ("batch", "single"):
        print(f"{mode:8s} {med(mode, 'cpu_lower'):11.1f} {med(mode, 'cpu_run'):10.2f}")
    cpu_b = med("batch", "cpu_lower") + med("batch", "cpu_run")
    cpu_s = med("single", "cpu_lower") + med("single", "cpu_run")
    print(f"single / batch CPU time: {cpu_s / cpu_b:.2f}x ({cpu_s:.1f} s vs {cpu_b:.1f} s)")
    # Do the two ways measure the same thing? per-candidate median latency, batch vs single
    names = [c.name for c in cands]
    ratios = []
    for name in names:
        b = statistics.median(x["medians"][name] for x in results["batch"])
        s = statistics.median(x["medians"][name] for x in results["single"])
        ratios.append(b / s)
    print(f"per-candidate latency, batch / single: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f} .. {max(ratios):.3f}  "
          f"(c8 {statistics.median(x['medians'][names[0]] for x in results['batch']):.4f} ms, "
          f"c{8 * args.n} {statistics.median(x['medians'][names[-1]] for x in results['batch']):.3f} ms)")


if __name__ == "__main__":
    main()
