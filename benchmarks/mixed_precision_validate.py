"""Mixed-precision variants of a model on `local`: measured whole-model latency against the sum of its
units, each unit timed standalone at its dtype (an int8 unit takes and returns fp32, so its time holds
one quantize of its input and one dequantize of its output).

    .venv/bin/python benchmarks/mixed_precision_validate.py [--model resnet20] [--variants 12] [--repeats 3]

Variants: all fp32, all int8, and N random policies (each conv/linear int8 with probability 1/2,
seeded). Unit precisions follow `amc_mobile/precision.py` (the quantizer's rule). Every distinct unit
(fp32 and int8) in ONE batch, every variant in ONE batch, each `--repeats` runner invocations
(samples pooled). predicted = sum of unit medians + overhead, the overhead fitted on the fp32 variant
alone (measured - sum of its units), as a table's overhead term is. The question it answers: do
standalone int8 units (their q/dq included) add up to a mixed model, where q/dq only sits on the
edges between an fp32 and an int8 op? The dev box is shared: errors near the noise floor move between runs.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from device import Candidate, MeasureConfig  # noqa: E402
from device.local import LocalDevice  # noqa: E402
from device.quantize import QuantPolicy, quantize_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--variants", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    from amc_mobile.data import load_fashion_mnist
    from amc_mobile.precision import unit_dtypes, units_at
    from amc_mobile.pruning.graph import build_graph
    from amc_mobile.train import get_or_train

    model, _ = get_or_train(args.model, device="cpu", progress=False)
    model.eval()
    graph = build_graph(model)
    layers = [l.name for l in graph.layers]
    rng = random.Random(args.seed)
    policies = {"fp32": QuantPolicy("fp32"), "int8": QuantPolicy("int8")}
    for k in range(args.variants):
        policies[f"mix{k}"] = QuantPolicy("fp32", {n: rng.choice(["fp32", "int8"]) for n in layers})
    variant_units = {name: units_at(graph, unit_dtypes(model, graph, p)) for name, p in policies.items()}

    distinct = sorted({u for us in variant_units.values() for u in us})
    cfg = MeasureConfig(warmup=10, iterations=50, repeats=args.repeats)
    dev = LocalDevice()
    unit_c = []
    for i, spec in enumerate(distinct):
        module, x = spec.build()
        unit_c.append(Candidate(f"u{i}", module, x))
    unit_ms = {}
    for spec, s in zip(distinct, dev.measure(unit_c, cfg)):
        if not s.ok:
            raise SystemExit(f"{spec.key()}: {s.error}")
        unit_ms[spec] = s.median_ms

    data = load_fashion_mnist()
    x = torch.randn(1, *model.input_shape, generator=torch.Generator().manual_seed(0))
    model_c = []
    for name, p in policies.items():
        m = model if p.all_fp32 else quantize_model(model, x, data.train.images[:64], p, check_delegation=False).module
        model_c.append(Candidate(name, m, x))
    measured = {}
    for s in dev.measure(model_c, cfg):
        if not s.ok:
            raise SystemExit(f"{s.name}: {s.error}")
        measured[s.name] = s.median_ms

    raw = {name: sum(unit_ms[u] for u in us) for name, us in variant_units.items()}
    overhead = measured["fp32"] - raw["fp32"]
    print(f"{args.model} on local ({dev.fingerprint(cfg).hardware}, 1 thread), {len(distinct)} distinct units, "
          f"{len(policies)} variants, repeats {args.repeats}; overhead fitted on fp32: {overhead:.3f} ms")
    print(f"{'variant':8s} {'int8 units':>10s} {'measured':>9s} {'predicted':>9s} {'error %':>8s}")
    errs = []
    for name, us in variant_units.items():
        pred = raw[name] + overhead
        err = 100 * (pred - measured[name]) / measured[name]
        if name != "fp32":
            errs.append(err)
        n8 = sum(u.dtype == "int8" for u in us)
        print(f"{name:8s} {n8:>5d}/{len(us):<4d} {measured[name]:9.3f} {pred:9.3f} {err:8.1f}")
    within10 = sum(abs(e) <= 10 for e in errs) / len(errs)
    within5 = sum(abs(e) <= 5 for e in errs) / len(errs)
    print(f"non-fp32 variants: {100 * within10:.0f}% within +-10%, {100 * within5:.0f}% within +-5%, "
          f"median error {statistics.median(errs):+.1f}%")


if __name__ == "__main__":
    main()
