"""Latency-AMC against its baselines at the same measured latency, before and after identical fine-tuning.

    .venv/bin/python benchmarks/search_vs_baselines.py [--model mobilenet_v2] [--device local] [--target 0.5]
        [--episodes 60] [--val-images 500] [--calib-images 500] [--seed 0] [--ft-train-images 24000]
        [--ft-epochs 1] [--ft-lr 0.005] [--ft-device cpu] [--eval-images N] [--uniform-at amc|target]
        [--flops-target R] [--table-dir DIR] [--methods amc-latency,uniform,random,amc-flops] [--out DIR]

One model, one device, one target (0.5x the MEASURED latency of the original by default), one seed, one
data split, one episode budget for every method:

1. **amc-latency**: `run_search(cost="latency")`, the budget on table-predicted latency;
2. **uniform**: one width for every layer, re-adjusted until its MEASURED latency ratio is within 3% of
   the latency-AMC policy's measured ratio (`--uniform-at amc`, the default: equal measured latency) or of
   the target (`--uniform-at target`);
3. **random**: `--episodes` random policies through the same env (action wall, rounding, reconstruction,
   scoring), best by validation accuracy;
4. **amc-flops**: `run_search(cost="flops")` at the same ratio of FLOPs (the paper's setting), or at
   `--flops-target` (e.g. lower, so that it lands at latency-AMC's measured latency).

Then the original and the four pruned models are measured in ONE batch on the device, in 5 passes (so load on a shared
machine hits them alike; ratios are medians of per-pass ratios: a pass's models alternate within
seconds), each pruned model gets the same brief fine-tune (same images, recipe and seed),
and ONE table is printed: kept MACs, table-predicted ms, measured ms and ratio, validation top-1 before
fine-tuning (full 5,000-image split), test top-1 after (full 10,000 unless --eval-images), and the
differences against uniform. Everything lands in the output folder: one run folder per method (with
figures and finetune.json), results.json, results.csv, results.md.

The latency table is loaded once (`--table-dir`, or `ensure_table` for the device) and shared by all.
Defaults take roughly 15-20 minutes on an idle 2-core CPU; a shared machine is slower.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("amc-latency", "uniform", "random", "amc-flops")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--device", default="local")
    p.add_argument("--target", type=float, default=0.5, help="fraction of the original's measured latency (and "
                   "of its FLOPs for amc-flops)")
    p.add_argument("--episodes", type=int, default=60, help="episodes of each search and of random (default 60)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up episodes of the searches (default episodes//4)")
    p.add_argument("--val-images", type=int, default=500, help="validation images scoring each episode")
    p.add_argument("--calib-images", type=int, default=500, help="calibration images of the reconstruction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ft-train-images", type=int, default=24000, help="fine-tune on the first N training images")
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--ft-lr", type=float, default=0.005)
    p.add_argument("--ft-device", default="cpu", help="where the fine-tunes train (cpu, cuda)")
    p.add_argument("--eval-images", type=int, default=None, help="test images scored after fine-tuning (all)")
    p.add_argument("--flops-target", type=float, default=None,
                   help="FLOPs-AMC's budget as a fraction of the original's FLOPs (default: --target, the "
                        "paper's setting); set it lower to bring FLOPs-AMC to latency-AMC's measured latency")
    p.add_argument("--uniform-at", choices=("amc", "target"), default="amc",
                   help="uniform's measured-latency target: latency-AMC's measured ratio, or --target")
    p.add_argument("--stat", choices=("median", "p10"), default="median",
                   help="latency statistic of the measured ratios (p10 is steadier on a loaded machine)")
    p.add_argument("--skip-finetune", action="store_true", help="stop after the measurement (no fine-tune columns)")
    p.add_argument("--table-dir", default=None, help="latency table folder (default: ensure_table for --device)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="output folder (default runs/bench-search-vs-baselines-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {', '.join(sorted(unknown))}")
    if "uniform" in args.methods and args.uniform_at == "amc" and "amc-latency" not in args.methods:
        p.error("--uniform-at amc needs amc-latency in --methods")
    return args


def _val_before(summary: dict) -> float:
    """Validation top-1 of the pruned model (not fine-tuned) on the FULL validation split."""
    if "pruned_full_val_accuracy" in summary:
        return float(summary["pruned_full_val_accuracy"])
    return float(summary["best"]["accuracy"])  # the search already scored on all of it


def _fmt(x, spec=".2f", pct=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(100 * x if pct else x, spec)


def _ident(name: str) -> str:
    return name.replace("-", "_")  # measured candidates become method names


def _load_finished(run_dir: Path):
    """A finished run folder of an earlier invocation (same --out): reused, not rerun."""
    from types import SimpleNamespace

    from amc_mobile.pruning import load_pruned

    summary = json.loads((run_dir / "summary.json").read_text())
    best = json.loads((run_dir / "best_policy.json").read_text())
    model, _ = load_pruned(run_dir / "pruned")
    print(f"   reusing the finished run in {run_dir}")
    return SimpleNamespace(run_dir=run_dir, summary=summary, best=best, model=model,
                           channels={int(g): int(c) for g, c in best["channels"].items()})


def _finished_finetune(run_dir: Path, cfg):
    """An earlier invocation's fine-tune of this run with the same recipe, or None."""
    from types import SimpleNamespace

    path = run_dir / "finetune.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    same = all(record.get("recipe", {}).get(k) == getattr(cfg, k)
               for k in ("epochs", "lr", "train_images", "seed", "eval_images", "batch_size", "weight_decay"))
    if not same or "test" not in record.get("after", {}):
        return None
    print(f"   reusing {path}")
    return SimpleNamespace(after=record["after"], before=record["before"], record=record)


def main(argv=None) -> int:
    args = parse(argv)
    import warnings

    import torch

    from amc_mobile.data import load_fashion_mnist
    from amc_mobile.pruning.graph import build_graph, default_scope
    from amc_mobile.runs import new_run_dir, write_manifest
    from amc_mobile.search.baselines import (annotate, measure_batch, paired_ratio, run_amc_flops, run_random,
                                             run_uniform)
    from amc_mobile.search.config import SearchConfig
    from amc_mobile.search.cost import LatencyCost
    from amc_mobile.search.finetune import FinetuneConfig, finetune
    from amc_mobile.search.loop import run_search
    from amc_mobile.search.setup import family_of, prepare
    from device import open_device
    from amc_mobile.search.plots import write_plots
    from amc_mobile.train import get_or_train

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    out = new_run_dir("bench-search-vs-baselines", args.out)
    write_manifest(out, "benchmark", benchmark="search_vs_baselines", args=vars(args))
    data = load_fashion_mnist(args.data_dir)
    model, meta = get_or_train(args.model, data=data)
    graph = build_graph(model)
    scope = default_scope(family_of(model))
    from amc_mobile.tables import ensure_table, load_latency_model

    t = time.perf_counter()
    if args.table_dir:
        latency = load_latency_model(model, graph, scope, device_uri=args.device, table_dir=args.table_dir)
    else:
        latency = ensure_table(model, graph, scope, device_uri=args.device, progress=not args.quiet)
    lat_cost = LatencyCost(latency)
    print(f"latency table: {getattr(latency, 'source', args.table_dir)} (predicted original {lat_cost.full_cost:.3f} ms, "
          f"{time.perf_counter() - t:.0f} s)", flush=True)
    base = SearchConfig(model=args.model, device=args.device, cost="latency", target=args.target,
                        episodes=args.episodes, warmup=args.warmup, val_images=args.val_images,
                        calib_images=args.calib_images, seed=args.seed, table_dir=args.table_dir,
                        data_dir=args.data_dir, checkpoint_every=0, progress=not args.quiet, threads=args.threads)
    results, seconds = {}, {}

    def search_cfg(name):
        """An interrupted search of an earlier invocation (config saved, no summary) is resumed."""
        run_dir = out / name
        resume = str(run_dir) if (run_dir / "config.json").exists() else None
        if resume:
            print(f"   resuming the interrupted search in {run_dir}", flush=True)
        return replace(base, out=str(run_dir), resume=resume)

    def timed(name, fn):
        t0 = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        done = out / name / "summary.json"
        results[name] = _load_finished(out / name) if done.exists() else fn()
        seconds[name] = round(time.perf_counter() - t0, 1)
        s = results[name].summary
        m = s.get("measured", {})
        print(f"   {name}: val {results[name].best['accuracy']:.4f} on {args.val_images} images, measured ratio "
              f"{_fmt(m.get('measured_ratio'), '.3f')} ({seconds[name]:.0f} s)", flush=True)

    if "amc-latency" in args.methods:
        timed("amc-latency", lambda: annotate(run_search(search_cfg("amc-latency"), model=model,
                                                         data=data, latency_model=latency),
                                              {"method": "amc-latency"}, lat_cost))
    setup = None
    if any(m in args.methods and not (out / m / "summary.json").exists() for m in ("uniform", "random")):
        t0 = time.perf_counter()
        setup = prepare(base, model, data, latency)
        print(f"\nshared set-up for uniform/random: {time.perf_counter() - t0:.0f} s", flush=True)
    if "uniform" in args.methods:
        ratio = args.target
        if args.uniform_at == "amc":  # latency-AMC's ratio, measured like uniform's trials (not the search's own)
            with open_device(args.device) as dev:
                m = measure_batch(dev, [("original", model), ("pruned", results["amc-latency"].model)],
                                  model.input_shape)
            if "error" in m or m["original"].get("error") or m["pruned"].get("error"):
                print(f"   measuring amc-latency failed ({m.get('error') or m}); uniform aims at --target")
            else:
                ratio = paired_ratio(m, "pruned", stat=f"{args.stat}_ms")
                print(f"   amc-latency measured at {ratio:.3f} of the original ({args.stat}): uniform's target")
        original_ms = setup.info.get("original_measured_ms") if setup else None
        usetup = replace(setup, budget=ratio * original_ms) if original_ms else setup
        timed("uniform", lambda: run_uniform(replace(base, target=ratio, out=str(out / "uniform")), model, data,
                                             setup=usetup, stat=f"{args.stat}_ms"))
    if "random" in args.methods:
        timed("random", lambda: run_random(replace(base, out=str(out / "random")), model, data, setup=setup))
    if "amc-flops" in args.methods:
        timed("amc-flops", lambda: run_amc_flops(replace(search_cfg("amc-flops"), target=args.flops_target or args.target),
                                                 model, data, latency_model=latency))

    # One measurement batch for every model: the fair comparison on a machine whose load drifts.
    print("\n== measuring the original and every pruned model in one batch ==", flush=True)
    with open_device(args.device) as dev:
        batch = measure_batch(dev, [("original", model)] + [(_ident(k), r.model) for k, r in results.items()],
                              model.input_shape)
    batch = {k.replace("_", "-") if k != "measure_config" else k: v for k, v in batch.items()}
    if "error" in batch:
        print(f"   measurement failed: {batch['error']}")

    ft_cfg = FinetuneConfig(epochs=args.ft_epochs, lr=args.ft_lr, train_images=args.ft_train_images or None,
                            seed=args.seed, eval_images=args.eval_images, device=args.ft_device,
                            eval_before=(), eval_after=("test",), progress=not args.quiet)
    fts = {}
    for name, r in ([] if args.skip_finetune else results.items()):
        t0 = time.perf_counter()
        print(f"\n== fine-tune {name} ==", flush=True)
        fts[name] = _finished_finetune(r.run_dir, ft_cfg) or finetune(r.run_dir, ft_cfg, data=data)
        seconds[f"finetune {name}"] = round(time.perf_counter() - t0, 1)
        print(f"   test top-1 after: {fts[name].after['test']['top1']:.4f} ({seconds[f'finetune {name}']:.0f} s)")
        try:
            write_plots(r.run_dir, cost=lat_cost if name != "amc-flops" else None, graph=graph,
                        latency=lat_cost if name == "amc-flops" else None)
        except Exception as exc:
            print(f"   figures not drawn: {exc}")

    stat = f"{args.stat}_ms"
    orig_ms = (batch.get("original") or {}).get(stat)
    rows = []
    for name, r in results.items():
        pol = r.summary["policy"]
        ms = (batch.get(name) or {}).get(stat)
        rows.append({
            "method": name, "kept_mmac": pol["kept_mmac"], "mmac_ratio": pol["mmac_ratio"],
            "predicted_ms": lat_cost.predict(r.channels), "measured_ms": ms,
            "measured_ratio": paired_ratio(batch, name, stat=stat),  # median of per-pass ratios
            "p10_ratio": paired_ratio(batch, name, stat="p10_ms"),
            "own_measured_ratio": (r.summary.get("measured") or {}).get("measured_ratio"),
            "val_top1_before": _val_before(r.summary),
            "test_top1_after": fts[name].after["test"]["top1"] if name in fts else None,
            "episodes": len(list(open(r.run_dir / "episodes.csv"))) - 1, "run_dir": str(r.run_dir),
        })
    ref = next((row for row in rows if row["method"] == "uniform"), None)
    for row in rows:
        row["d_val_vs_uniform"] = row["val_top1_before"] - ref["val_top1_before"] if ref else None
        row["d_test_vs_uniform"] = (row["test_top1_after"] - ref["test_top1_after"]
                                    if ref and row["test_top1_after"] is not None else None)

    head = (f"{'method':12s} {'kept MMAC':>9s} {'pred ms':>8s} {'meas ms':>8s} {'meas ratio':>10s} {'p10 ratio':>9s} "
            f"{'val top-1 (pre-FT)':>18s} {'test top-1 (FT)':>15s} {'Δval vs unif':>12s} {'Δtest vs unif':>13s}")
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(f"{row['method']:12s} {row['kept_mmac']:>9.2f} {row['predicted_ms']:>8.3f} "
                     f"{_fmt(row['measured_ms'], '.3f'):>8s} {_fmt(row['measured_ratio'], '.3f'):>10s} "
                     f"{_fmt(row['p10_ratio'], '.3f'):>9s} "
                     f"{_fmt(row['val_top1_before'], '.2f', True):>17s}% {_fmt(row['test_top1_after'], '.2f', True):>14s}% "
                     f"{_fmt(row['d_val_vs_uniform'], '+.2f', True):>12s} {_fmt(row['d_test_vs_uniform'], '+.2f', True):>13s}")
    n_test = fts[next(iter(fts))].after["test"]["images"] if fts else 0
    ft_devices = sorted({str(f.record.get("recipe", {}).get("device_used", args.ft_device)) for f in fts.values()})
    notes = [
        f"{args.model} on {args.device}, target {args.target}x measured latency (amc-flops: {args.flops_target or args.target}x FLOPs); "
        f"original {_fmt(orig_ms, '.3f')} ms measured, {lat_cost.full_cost:.3f} ms predicted; "
        f"{args.episodes} episodes, {args.val_images} val images per episode, seed {args.seed}",
        f"measured: one batch with the original, {batch.get('passes', 1)} passes; ratios are medians of per-pass ratios ({args.stat} ms; 'p10 ratio' on the 10th percentiles); val top-1 on all {len(data.val)} val images before "
        f"fine-tuning; test top-1 on {n_test} test images after fine-tuning "
        f"({args.ft_epochs} epoch x {args.ft_train_images} images, lr {args.ft_lr}, SGD+cosine, wd 4e-5, on "
        f"{', '.join(ft_devices) or '-'})",
    ]
    byname = {row["method"]: row for row in rows}
    if "amc-latency" in byname:
        a = byname["amc-latency"]
        for other in ("uniform", "amc-flops"):
            if other not in byname:
                continue
            o = byname[other]
            rel = (a["measured_ratio"] / o["measured_ratio"] - 1
                   if a["measured_ratio"] and o["measured_ratio"] else None)
            # Equal within 3%, or faster: a policy that is both faster and at least as accurate
            # dominates, which is what "at equal latency" asks for and more.
            eq = rel is not None and abs(rel) <= 0.03
            faster = rel is not None and rel < -0.03
            where = ("EQUAL within 3%" if eq else f"amc-latency FASTER by {-rel * 100:.1f}%" if faster
                     else "amc-latency SLOWER by more than 3%" if rel is not None else "not measured")
            after = (a["test_top1_after"] - o["test_top1_after"]
                     if a["test_top1_after"] is not None and o["test_top1_after"] is not None else None)
            met = (eq or faster) and a["val_top1_before"] >= o["val_top1_before"] and (after or 0) >= 0
            notes.append(f"amc-latency vs {other}: measured latency {where} "
                         f"({_fmt(a['measured_ratio'], '.3f')} vs {_fmt(o['measured_ratio'], '.3f')}); val before FT "
                         f"{_fmt(a['val_top1_before'] - o['val_top1_before'], '+.2f', True)} pt, test after FT "
                         f"{_fmt(after, '+.2f', True)} pt -> bar "
                         f"{('MET' + (' (faster and at least as accurate: dominates)' if faster else '')) if met else 'NOT met'}"
                         + (" (no fine-tune)" if after is None else ""))
    total = round(time.perf_counter() - t_all, 1)
    notes.append(f"total {total / 60:.1f} min; " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + "\n".join(notes))

    (out / "results.json").write_text(json.dumps({"rows": rows, "notes": notes, "measured": batch,
                                                  "seconds": seconds, "args": vars(args)}, indent=2, default=str))
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text("```\n" + table + "\n```\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    write_manifest(out, "benchmark", seconds=total)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
