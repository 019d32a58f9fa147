"""Mixed-precision variants of models on `local`: measured whole-model latency against the sum of their units,
predicted six ways side by side from ONE measurement run (units and models in the same interleaved rounds).

    .venv/bin/python benchmarks/mixed_precision_validate.py [--models resnet20,mobilenet_v2] [--variants 20]
                                                            [--repeats 3] [--seed 0]

Variants per model: all fp32, all int8, and N random policies (each conv/linear int8 with probability 1/2,
seeded as the first version of this script was, so resnet20's first 10 are the same policies). Unit
precisions and the fp32<->int8 edges follow `amc_mobile/precision.py` (the quantizer's rule). What is
measured, lowered once into `.pte` batches of 32 methods, then timed in `--repeats` passes (each pass runs
every program once; a unit's or variant's latency is the median of its pass medians):
- every unit at fp32, at int8 taking and returning int8 (`int8`), and at int8 taking and returning fp32
  (`int8_fp32io`, its own q/dq inside: how int8 units were measured before);
- the quantize and dequantize of every edge a policy can create, and of every int8 unit's input and output;
- every variant, quantized as `amc-mobile quantize` does (64 random calibration images: the ranges change the
  values, not the kernels' speed).

Predictions (`fp32 off.`: offset fitted on the fp32 variant alone, as the first version did; `2-pt fit`:
scale and offset through the fp32 and all-int8 variants, the session calibration of the mixed tables):
- before:      layer units at int8_fp32io (adds and pools at fp32: the old unit builder left them
               unquantized), fp32 offset. What precision-search used.
- before+fit:  the same sum, 2-pt fit: does calibration alone absorb the q/dq?
- io, no edges: int8 units with int8 IO, no edge units, 2-pt fit: do the edges need units?
- io+edges:    int8 units with int8 IO plus a q/dq unit per edge, fp32 offset.
- io+edges+fit: the same, 2-pt fit. The prediction `amc_mobile.precision` / `latency_tables.mixed` make.
- sub+edges+fit: int8_fp32io units minus a quantize of their input and a dequantize of their output, plus
               the edges, 2-pt fit: the alternative to quantized IO.
Metrics over the random mixes only (fp32 and all-int8 are the fit's points).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from device import MeasureConfig  # noqa: E402
from device.local import LocalDevice  # noqa: E402
from device.quantize import QuantPolicy, quantize_model  # noqa: E402
from latency_tables.batching import BatchRunner, Job, Programs  # noqa: E402


@contextlib.contextmanager
def lock(path: str | None, exclusive: bool):
    """`--lock FILE`: lower under a shared flock, time under an exclusive one (a quiet host for the timing
    only, without holding it through minutes of lowering)."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

LAYER_KINDS = ("conv", "dwconv", "linear")


def io_units(spec):
    """The quantize of an int8 unit's input and the dequantize of its output (what int8_fp32io holds)."""
    from latency_tables.units import UnitSpec

    h, w = spec.output_hw()
    return (UnitSpec("quantize", spec.h, spec.w, spec.c_in, spec.c_in, dtype="int8"),
            UnitSpec("dequantize", h, w, spec.c_out, spec.c_out, dtype="int8"))


def run_model(name: str, args, dev) -> list[dict]:
    from amc_mobile.precision import PrecisionMap, mixed_units, units_at
    from amc_mobile.pruning.graph import build_graph
    from amc_mobile.table_validation import accuracy_metrics
    from amc_mobile.train import get_or_train
    from latency_tables.calibrate import fit_overhead

    model, _ = get_or_train(name, device="cpu", progress=False)
    model.eval()
    graph = build_graph(model)
    pmap = PrecisionMap(model, graph)
    layers = [l.name for l in graph.layers]
    rng = random.Random(args.seed)
    policies = {"fp32": QuantPolicy("fp32"), "int8": QuantPolicy("int8")}
    for k in range(args.variants):
        policies[f"mix{k}"] = QuantPolicy("fp32", {n: rng.choice(["fp32", "int8"]) for n in layers})
    # two mixed calibration models with many edges (every other layer int8): the points a per-edge fit needs
    for k in range(2):
        policies[f"alt{k}"] = QuantPolicy("fp32", {n: ("int8" if i % 2 == k else "fp32") for i, n in enumerate(layers)})

    # every unit each prediction needs, measured once
    plain = {p: units_at(graph, pmap.unit_dtypes(pol)) for p, pol in policies.items()}
    io = {p: mixed_units(pmap, graph, pol) for p, pol in policies.items()}
    need = {s for us in io.values() for s in us}
    for us in plain.values():
        for s in us:
            need.add(replace(s, dtype="fp32"))
            if s.dtype == "int8":
                need.add(replace(s, dtype="int8_fp32io"))
                need.update(io_units(s))
    distinct = sorted(need)
    x = torch.randn(1, *model.input_shape, generator=torch.Generator().manual_seed(0))
    calib = torch.randn(64, *model.input_shape, generator=torch.Generator().manual_seed(1))
    jobs = [Job(f"u{i}", spec=s) for i, s in enumerate(distinct)]
    cfg = MeasureConfig(warmup=10, iterations=50, repeats=1)
    t0 = time.time()
    with BatchRunner(dev, cfg, batch_size=32, workers=1) as runner:
        with lock(args.lock, exclusive=False):
            for p, pol in policies.items():
                m = model if pol.all_fp32 else quantize_model(model, x, calib, pol, check_delegation=False).module
                jobs.append(Job(f"m_{p}", module=m, example_input=x))
            random.Random(1).shuffle(jobs)  # units and variants share programs: drift between them is shared
            programs = Programs(runner, jobs, cfg)
        medians: dict[str, list[float]] = {j.name: [] for j in jobs}
        built = time.time() - t0
        with programs, lock(args.lock, exclusive=True):  # only the timing needs the quiet host
            t1 = time.time()
            for _ in range(args.repeats):
                for job, r in programs.measure_pass():
                    if not r.ok:
                        raise SystemExit(f"{name}: {job.name} failed: {r.error}")
                    medians[job.name].append(r.median_ms)
            timed = time.time() - t1
    ms = {s: statistics.median(medians[f"u{i}"]) for i, s in enumerate(distinct)}
    measured = {p: statistics.median(medians[f"m_{p}"]) for p in policies}

    if args.dump:
        import json

        dump = {"units": {s.key(): ms[s] for s in distinct}, "measured": measured,
                "plain": {p: [s.key() for s in us] for p, us in plain.items()},
                "io": {p: [s.key() for s in us] for p, us in io.items()},
                "passes": {j.name: medians[j.name] for j in jobs}}
        Path(args.dump.replace("MODEL", name)).write_text(json.dumps(dump))

    def before(p):  # old unit builder: layer units int8 with fp32 IO, other "int8" units unquantized
        return sum(ms[replace(s, dtype="int8_fp32io")] if s.dtype == "int8" and s.kind in LAYER_KINDS
                   else ms[replace(s, dtype="fp32")] for s in plain[p])

    def io_no_edges(p):
        return sum(ms[s] for s in plain[p])

    def io_edges(p):
        return sum(ms[s] for s in io[p])

    def sub_edges(p):
        total = sum(ms[s] for s in io[p] if s.kind in ("quantize", "dequantize"))
        for s in plain[p]:
            if s.dtype == "int8":
                q, dq = io_units(s)
                total += ms[replace(s, dtype="int8_fp32io")] - ms[q] - ms[dq]
            else:
                total += ms[s]
        return total

    def offset_fp32(sumf):
        return lambda p: sumf(p) + measured["fp32"] - sumf("fp32")

    def fit2(sumf):
        f = fit_overhead(np.array([sumf("fp32"), sumf("int8")]), np.array([measured["fp32"], measured["int8"]]))
        return lambda p: f.scale * sumf(p) + f.offset

    methods = {"before": offset_fp32(before), "before+fit": fit2(before), "io, no edges": fit2(io_no_edges),
               "io+edges": offset_fp32(io_edges), "io+edges+fit": fit2(io_edges), "sub+edges+fit": fit2(sub_edges)}
    mixes = [p for p in policies if p.startswith("mix")]
    print(f"\n{name} on local ({dev.fingerprint(cfg).hardware}, 1 thread): {len(distinct)} distinct units, "
          f"{len(policies)} variants, {len(pmap.edges)} possible edges; lowered in {built:.0f} s, {args.repeats} "
          f"passes timed in {timed:.0f} s (load average at the end {os.getloadavg()[0]:.2f})")
    print(f"{'variant':8s} {'int8 u.':>8s} {'edges':>5s} {'measured':>9s} " +
          " ".join(f"{m:>14s}" for m in methods))
    for p in policies:
        n8 = sum(s.dtype == "int8" for s in plain[p])
        ne = len(pmap.active_edges(policies[p]))
        errs = [100 * (f(p) - measured[p]) / measured[p] for f in methods.values()]
        print(f"{p:8s} {n8:>3d}/{len(plain[p]):<4d} {ne:>5d} {measured[p]:9.3f} " +
              " ".join(f"{e:>+13.1f}%" for e in errs))
    rows = []
    for m, f in methods.items():
        met = accuracy_metrics([f(p) for p in mixes], [measured[p] for p in mixes])
        int8_err = 100 * (f("int8") - measured["int8"]) / measured["int8"]
        rows.append({"model": name, "method": m, "int8_err": int8_err, **met})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,mobilenet_v2")
    ap.add_argument("--variants", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump", default=None, help="write every unit's and variant's medians to this JSON (MODEL "
                                                 "in the name is replaced by the model)")
    ap.add_argument("--lock", default=None, help="flock FILE: shared while lowering, exclusive while timing")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    dev = LocalDevice()
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args, dev)
    print("\nover the random mixes (fp32 and all-int8 are the fits' points):")
    print(f"{'model':13s} {'method':14s} {'±5 %':>6s} {'±10 %':>6s} {'RMSPE':>6s} {'mean':>7s} {'under>5%':>8s} "
          f"{'Spearman':>8s} {'all-int8':>8s}")
    for r in rows:
        print(f"{r['model']:13s} {r['method']:14s} {r['within_5pct']:6.0%} {r['within_10pct']:6.0%} "
              f"{r['rmspe_pct']:5.1f}% {r['mean_error_pct']:+6.1f}% {r['under_predicted_5pct']:8.0%} "
              f"{r['spearman']:8.3f} {r['int8_err']:+7.1f}%")
    print(f"median of per-method RMSPE: {statistics.median(r['rmspe_pct'] for r in rows):.1f}%")


if __name__ == "__main__":
    main()
