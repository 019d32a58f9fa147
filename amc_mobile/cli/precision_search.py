"""`amc-mobile precision-search`: stage two of the two-stage pipeline (AMC prunes, then a second DDPG agent
picks each layer's precision under a measured latency budget)."""

from __future__ import annotations

import argparse
import csv
import sys

from amc_mobile.cli.common import add_measure_options, measure_config
from amc_mobile.cli.model_options import MODEL_HELP, add_model_options, model_options
from amc_mobile.cli.quantize import add_calibration_options


def register(sub) -> None:
    p = sub.add_parser(
        "precision-search", help="a DDPG agent picks int8/fp32 per layer under a latency and/or size budget "
                                 "(two-stage stage 2)",
        description="Stage two of the two-stage pipeline: MODEL (e.g. a search run's pruned/ folder) gets a "
        "precision per conv/linear layer, int8 or fp32, from a second DDPG agent (AMC's agent, HAQ's state), "
        "reward -error after post-training quantization, the budget enforced by an action wall: on the "
        "predicted latency (every fused unit measured on DEVICE at both precisions, int8 ones taking and returning "
        "int8, plus the quantize or dequantize on each fp32<->int8 edge, scale and offset fitted on the fp32 and the "
        "all-int8 models; the default budget), on the model size (--size-mb: the weights as the .pte stores them, "
        "exact), or on both (--size-mb with --target/--budget-ms). The chosen model is then quantized, lowered "
        "and MEASURED next to the fp32 one. OUT: unit_costs.csv, episodes.csv, policy.json (a --policy for "
        "`amc-mobile quantize`), quantized/ (model.pte + quantization.json, what `compare` takes), result.json.")
    p.add_argument("model", metavar="MODEL", help=f"{MODEL_HELP}; a registry name gets its trained weights")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", "-d", default="local", help="device URI (default: local)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target", type=float, default=None,
                   help="budget as a fraction of MODEL's measured fp32 latency (default 0.5)")
    g.add_argument("--budget-ms", type=float, default=None, help="budget in ms (e.g. 0.3x the unpruned original)")
    p.add_argument("--size-mb", type=float, default=None,
                   help="model-size budget in MB (1e6 bytes) of weights: int8 1 byte + an fp32 scale per channel, "
                        "fp32 4 bytes, biases 4; alone it is the only budget, with --target/--budget-ms both hold")
    p.add_argument("--episodes", type=int, default=20, help="default %(default)s")
    p.add_argument("--warmup-episodes", type=int, default=5, help="random episodes first (default %(default)s)")
    p.add_argument("--val-images", type=int, default=500, help="reward on the first N validation images "
                                                               "(default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    add_calibration_options(p, 128)
    add_model_options(p)
    add_measure_options(p, iterations=50, warmup=10)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from amc_mobile.cli.quantize import load_trained
    from amc_mobile.data_sources import load_data
    from amc_mobile.errors import AmcError
    from amc_mobile.pruning.graph import build_graph
    from amc_mobile.quantization import QUANTIZED_DIR, calibration_images, quantize_to_folder
    from amc_mobile.search.precision_search import (make_env, measure_unit_costs, policy_of, policy_size_mb,
                                                    search_precision, write_json)
    from amc_mobile.train import evaluate
    from device import Candidate, open_device
    from device.quantize import QuantPolicy, check_calibration, quantize_model

    config = measure_config(args)
    if args.target is not None and not 0 < args.target <= 1:
        raise AmcError(f"--target must be in (0, 1], got {args.target:g}")
    if args.budget_ms is not None and not args.budget_ms > 0:
        raise AmcError(f"--budget-ms must be positive, got {args.budget_ms:g}")
    if args.size_mb is not None and not args.size_mb > 0:
        raise AmcError(f"--size-mb must be positive, got {args.size_mb:g}")
    if args.val_images < 1:
        raise AmcError(f"--val-images must be >= 1, got {args.val_images}")
    latency = args.size_mb is None or args.target is not None or args.budget_ms is not None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    module, x, label = load_trained(args.model, model_options(args))
    data = load_data(args.data, data_dir=args.data_dir)
    calib = check_calibration(calibration_images(data.train, args.calib_images), x)
    val = data.val.subset(args.val_images)
    graph = build_graph(module)
    fp32_size = policy_size_mb(module, graph, QuantPolicy("fp32"))
    with open_device(args.device) as dev:
        costs = budget = None
        if latency:
            costs = measure_unit_costs(module, graph, dev, config, out / "unit_costs.csv")
            budget = args.budget_ms if args.budget_ms is not None else (args.target or 0.5) * costs.ms["model-fp32"]
        cache: dict[tuple, float] = {}

        def score(choice: dict[str, str]) -> float:
            key = tuple(sorted(choice.items()))
            if key not in cache:
                qm = quantize_model(module, x, calib, policy_of(list(choice), list(choice.values())),
                                    check_delegation=False)
                cache[key] = evaluate(qm.module, val, topk=(1,))["top1"]
            return cache[key]

        env = make_env(module, graph, costs, budget, score, args.size_mb)
        log = open(out / "episodes.csv", "w", newline="")
        w = csv.writer(log)
        w.writerow(["episode", "int8_layers", "predicted_ms", "size_mb", "top1", "reward", "precisions"])

        def on_episode(e, ep):
            w.writerow([e, ep.precisions.count("int8"), f"{ep.predicted_ms:.4f}", f"{ep.size_mb:.6f}",
                        f"{ep.accuracy:.4f}", f"{ep.reward:.4f}", " ".join(ep.precisions)])
            log.flush()
            print(f"episode {e}: {ep.precisions.count('int8')}/{len(ep.precisions)} int8, predicted "
                  f"{ep.predicted_ms:.3f} ms, {ep.size_mb:.4f} MB, top-1 {ep.accuracy:.4f}", file=sys.stderr)

        try:
            best = search_precision(env, args.episodes, args.warmup_episodes, args.seed, on_episode=on_episode)
        finally:
            log.close()
        policy = policy_of(env.layers, best.precisions)
        write_json(out / "policy.json", policy.to_dict())
        qm = quantize_model(module, x, calib, policy)
        fp, q = dev.measure([Candidate("fp32", module, x), Candidate("chosen", qm.module, x)], config)
    if not (fp.ok and q.ok):
        raise AmcError(f"measuring the result failed: {fp.error or q.error}")
    size = policy_size_mb(module, graph, QuantPolicy("fp32", {l.layer: l.actual for l in qm.layers}))
    result = {"model": label, "device": args.device, "budget_ms": budget, "size_budget_mb": args.size_mb,
              "fp32_measured_ms": fp.median_ms, "measured_ms": q.median_ms, "predicted_ms": best.predicted_ms,
              "measured_over_budget": q.median_ms / budget if budget else None, "size_mb": size,
              "fp32_size_mb": fp32_size, "top1_fp32": evaluate(module, val, topk=(1,))["top1"],
              "top1": best.accuracy, "val_images": len(val), "int8_layers": qm.int8_layers,
              "fallbacks": [f.to_dict() for f in qm.fallbacks], "episodes": args.episodes}
    write_json(out / "result.json", result)
    folder = quantize_to_folder(module, x, data.train, val, policy, out / QUANTIZED_DIR,
                                calib_images=args.calib_images, eval_images=len(val), label=f"{label} [{policy.label()}]",
                                quantized=qm)
    result["pte_mb"] = folder.report["pte_mb"]
    result["top1_pte"] = folder.report.get("accuracy", {}).get("quantized_pte")
    write_json(out / "result.json", result)
    walls = ([f"budget {budget:.3f} ms, predicted {best.predicted_ms:.3f} ms"] if budget else []) + \
        ([f"size {size:.4f} MB for a {args.size_mb:.4f} MB budget (fp32 {fp32_size:.4f} MB)"] if args.size_mb else [])
    print(f"{label}: {len(qm.int8_layers)}/{len(qm.layers)} layers int8; measured {q.median_ms:.3f} ms "
          f"(fp32 {fp.median_ms:.3f} ms; {'; '.join(walls)}); top-1 {best.accuracy:.4f} (fp32 "
          f"{result['top1_fp32']:.4f}) on {len(val)} validation images; policy {out / 'policy.json'}, "
          f"program {folder.pte} ({result['pte_mb']:.4f} MB)")
    return 0
