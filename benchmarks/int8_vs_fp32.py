"""int8 vs fp32 on `local` (ExecuTorch + XNNPACK, et_bench, 1 thread): whole models and every fused unit.

    .venv/bin/python benchmarks/int8_vs_fp32.py [--rounds 7] [--calib-images 128] [--eval-images 1000]
                                                [--models mobilenet_v2 resnet20] [--no-units]

Whole models: each model with its shipped weights, fp32 and int8 (PT2E, XNNPACK quantizer, per-channel
weights, static activations calibrated on the first N training images), all lowered into ONE .pte;
each round runs et_bench once over every method (order reversed every other round: no method always
runs first), warmup 20, 100 iterations. Per model: the median over rounds of the per-round medians and
of the per-round int8/fp32 ratios (both methods ran in the same runner process, back to back), the
.pte sizes, and top-1 of both .pte programs (ExecuTorch's runtime) on the first M validation images.

Units: the fused units of the models at full width (device-independent keys, deduplicated), each as
fp32 and as int8 (calibrated on 32 random inputs; a unit the quantizer leaves without int8 ops is
reported as such, not timed twice), all in one .pte, timed the same way; the distribution of the
per-unit int8/fp32 ratio (median over rounds) by unit kind.

The dev box is shared with other users: only ratios measured side by side mean anything.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from device import Candidate, MeasureConfig  # noqa: E402
from device.local import LocalDevice  # noqa: E402
from device.lowering import lower_to_pte  # noqa: E402
from device.quantize import QuantPolicy, quantize_model  # noqa: E402

CFG = MeasureConfig(warmup=20, iterations=100)


def rounds_of(dev, pte: Path, methods: list[str], rounds: int) -> dict[str, list[float]]:
    """{method: [median ms of each round]}; every other round runs the methods in reverse order."""
    out: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        order = methods if r % 2 == 0 else methods[::-1]
        for s in dev.measure_pte(pte, order, CFG):
            if not s.ok:
                raise SystemExit(f"{s.name}: {s.error}")
            out[s.name].append(s.median_ms)
    return out


def whole_models(args, dev, tmp: Path) -> None:
    from amc_mobile.data import load_fashion_mnist
    from amc_mobile.quantization import pte_accuracy
    from amc_mobile.train import get_or_train

    data = load_fashion_mnist()
    cands, quantized = [], {}
    for name in args.models:
        model, _ = get_or_train(name, device="cpu", progress=False)
        model.eval()
        x = torch.randn(1, *model.input_shape, generator=torch.Generator().manual_seed(0))
        qm = quantize_model(model, x, data.train.images[:args.calib_images], QuantPolicy("int8"))
        quantized[name] = qm
        cands += [Candidate(f"{name}_fp32", model, x), Candidate(f"{name}_int8", qm.module, x)]
    sizes = {}
    for c in cands:  # one program per method for the sizes and the accuracies
        p = tmp / f"{c.name}.pte"
        assert lower_to_pte([c], p, shared=False) == {}
        sizes[c.name] = p.stat().st_size / 1e6
    pte = tmp / "models.pte"
    assert lower_to_pte(cands, pte, shared=False) == {}
    times = rounds_of(dev, pte, [c.name for c in cands], args.rounds)
    print(f"\nwhole models, {args.rounds} rounds (median of per-round medians; ratio = median of per-round ratios)")
    print(f"{'model':14s} {'fp32 ms':>8s} {'int8 ms':>8s} {'int8/fp32':>9s} {'range':>13s} {'fp32 MB':>8s} "
          f"{'int8 MB':>8s} {'top-1 fp32':>10s} {'top-1 int8':>10s} int8 layers")
    for name in args.models:
        f, q = times[f"{name}_fp32"], times[f"{name}_int8"]
        ratios = [b / a for a, b in zip(f, q)]
        acc = {k: pte_accuracy(tmp / f"{name}_{k}.pte", data.val, args.eval_images, method=f"{name}_{k}")["top1"]
               for k in ("fp32", "int8")}
        qm = quantized[name]
        print(f"{name:14s} {statistics.median(f):8.3f} {statistics.median(q):8.3f} {statistics.median(ratios):9.3f} "
              f"{min(ratios):6.3f}-{max(ratios):.3f} {sizes[name + '_fp32']:8.3f} {sizes[name + '_int8']:8.3f} "
              f"{acc['fp32']:10.4f} {acc['int8']:10.4f} {len(qm.int8_layers)}/{len(qm.layers)}")


def _has_int8(qm) -> bool:
    gm = getattr(qm.module, "graph_module", None)
    return gm is not None and any("quantize_per" in str(n.target) for n in gm.graph.nodes)


def units(args, dev, tmp: Path) -> None:
    from amc_mobile.models import build_model
    from amc_mobile.pruning.graph import build_graph

    specs = {}
    for name in args.models:
        for u in build_graph(build_model(name)).units:
            specs.setdefault(u.spec.key(), u.spec)
    cands, unquantized = [], []
    for i, (key, spec) in enumerate(sorted(specs.items())):
        module, x = spec.build()
        calib = torch.randn(32, *x.shape[1:], generator=torch.Generator().manual_seed(i))
        qm = quantize_model(module, x, calib, QuantPolicy("int8"), check_delegation=False)
        if not _has_int8(qm):
            unquantized.append(key)
            continue
        cands += [Candidate(f"u{i}_fp32", module, x), Candidate(f"u{i}_int8", qm.module, x)]
        specs[key] = (i, spec)
    pte = tmp / "units.pte"
    failed = lower_to_pte(cands, pte, shared=False)
    times = rounds_of(dev, pte, [c.name for c in cands if c.name not in failed], args.rounds)
    by_kind: dict[str, list[tuple[float, str]]] = {}
    for key, val in specs.items():
        if not isinstance(val, tuple):
            continue
        i, spec = val
        if f"u{i}_fp32" not in times or f"u{i}_int8" not in times:
            continue
        ratio = statistics.median(b / a for a, b in zip(times[f"u{i}_fp32"], times[f"u{i}_int8"]))
        kind = spec.kind + (f"{spec.kernel}x{spec.kernel}" if spec.kind in ("conv", "dwconv") else "")
        by_kind.setdefault(kind, []).append((ratio, key))
    print(f"\nunits, {args.rounds} rounds: per-unit int8/fp32 ratio (median over rounds), by kind")
    print(f"{'kind':10s} {'units':>5s} {'min':>6s} {'p25':>6s} {'median':>6s} {'p75':>6s} {'max':>6s}")
    for kind, vals in sorted(by_kind.items()):
        r = sorted(v for v, _ in vals)
        q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
        print(f"{kind:10s} {len(r):5d} {r[0]:6.2f} {q[0]:6.2f} {q[1]:6.2f} {q[2]:6.2f} {r[-1]:6.2f}")
    if failed:
        print(f"did not lower: {failed}")
    print(f"no int8 form (the XNNPACK quantizer annotates nothing in them; they stay fp32): {len(unquantized)} units: "
          + ", ".join(sorted({k.split('-')[0] + '-' + k.split('-')[-3] for k in unquantized})))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet20"])
    ap.add_argument("--no-units", action="store_true")
    ap.add_argument("--no-models", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    dev = LocalDevice()
    print(f"device local: {dev.fingerprint(CFG).hardware}, threads 1, {CFG}")
    with tempfile.TemporaryDirectory() as d:
        if not args.no_models:
            whole_models(args, dev, Path(d))
        if not args.no_units:
            units(args, dev, Path(d))


if __name__ == "__main__":
    main()
