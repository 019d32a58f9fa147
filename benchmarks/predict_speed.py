"""How fast a compiled LatencyModel predicts whole-model latency (the search calls it per step).

    PYTHONPATH=. python3 benchmarks/predict_speed.py [--model mobilenet_v2] [--device local] [--n 20000]

Uses the device's stored table when there is one; otherwise (or with --formula) a table built in a
temporary folder from a FLOPs formula (no device needed: only the speed matters here). Prints
predictions per second for `predict(dict)`, `predict_batch` (dicts and a count matrix),
`unit_latencies`, and the slow unit-by-unit reference, plus the compile time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from amc_mobile.errors import AmcError  # noqa: E402
from device.base import Device, Fingerprint, MeasureConfig  # noqa: E402
from device.stats import LatencyStats  # noqa: E402
from latency_tables.loading import compile_for, open_table  # noqa: E402
from latency_tables.space import random_channels  # noqa: E402
from amc_mobile.tables import resolve_target  # noqa: E402


class FlopsDevice(Device):
    """Latency = FLOPs / 1 GMAC/s: a stand-in table when no measured one is at hand."""

    uri = "flops"

    def fingerprint(self, config=None):
        return Fingerprint("flops", "formula", "none", "none", 1)

    def measure(self, candidates, config=MeasureConfig(), progress=None):
        import torch
        from torch import nn

        out = []
        for c in candidates:
            macs = [c.example_input.numel()]

            def hook(m, inp, o):
                if isinstance(m, nn.Conv2d):
                    macs[0] += o.numel() * m.weight[0].numel()
                elif isinstance(m, nn.Linear):
                    macs[0] += m.weight.numel()

            hooks = [m.register_forward_hook(hook) for m in c.module.modules()]
            with torch.no_grad():
                c.module(c.example_input)
            for h in hooks:
                h.remove()
            out.append(LatencyStats.from_samples(c.name, [0.001 + macs[0] / 1e9 * 1e3]))
        return out


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--device", default="local")
    ap.add_argument("--tables-dir", default=None)
    ap.add_argument("--formula", action="store_true", help="always use a formula table in a temporary folder")
    ap.add_argument("--n", type=int, default=20000, help="configurations per measurement")
    args = ap.parse_args(argv)

    target = resolve_target(args.model)
    tmp = None
    store = None
    if not args.formula:
        try:
            store = open_table(args.device, tables_dir=args.tables_dir)
            t0 = time.perf_counter()
            lat = compile_for(target, store, args.device)
            source = f"measured table {store.folder}"
        except AmcError as exc:
            print(f"no usable {args.device} table ({str(exc)[:120]}...): using a formula table", file=sys.stderr)
            store = None
    if store is None:
        from amc_mobile.tables import build_table

        tmp = tempfile.TemporaryDirectory()
        rep = build_table(target, FlopsDevice(), tables_dir=tmp.name, progress=False, calibrate=False,
                          config=MeasureConfig(warmup=0, iterations=1), batch_size=256, workers=1)
        store = open_table(FlopsDevice(), tables_dir=tmp.name)
        t0 = time.perf_counter()
        lat = compile_for(target, store, "flops")
        source = f"formula table ({rep.measured} units)"
    compile_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    configs = [random_channels(target.graph, target.scope, rng) for _ in range(args.n)]
    matrix = np.array([[c[g] for g in lat.groups] for c in configs])
    lat.predict(configs[0])  # warm

    results = {
        "predict(dict)": rate(lambda: [lat.predict(c) for c in configs], args.n),
        "unit_latencies(dict)": rate(lambda: [lat.unit_latencies(c) for c in configs], args.n),
        "predict_batch(dicts)": rate(lambda: lat.predict_batch(configs), args.n),
        "predict_batch(matrix)": rate(lambda: lat.predict_batch(matrix), args.n),
    }
    few = configs[:500]
    results["reference (unit by unit)"] = rate(lambda: [lat.reference_predict(c) for c in few], len(few))
    same = np.allclose([lat.predict(c) for c in few], [lat.reference_predict(c) for c in few], rtol=1e-12)

    print(f"{args.model} (scope {target.scope}): {len(lat.plans)} unit templates, {len(lat.groups)} pruned groups, "
          f"lookup array {lat.lut.size} entries; {source}; compiled in {compile_s * 1000:.0f} ms")
    print(f"{'call':28s} {'predictions/s':>14s}")
    for name, r in results.items():
        print(f"{name:28s} {r:14,.0f}")
    print(f"fast == reference on 500 configurations: {same}")
    bar = results["predict(dict)"] >= 10_000
    print(f"bar (>= 10,000 predict() per second): {'met' if bar else 'NOT met'}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
