"""Pruning only, int8 only, two-stage, joint: four ways to one latency budget, side by side (issue 15).

    .venv/bin/python benchmarks/quant_four_way.py [--model mobilenet_v2] [--device local] [--target 0.3]
        [--episodes 60] [--joint-episodes 40] [--precision-episodes 16] [--stage1-target 0.6]
        [--val-images 500] [--ft-train-images 6000] [--eval-images 2000] [--passes 3] [--out DIR]

One model with its shipped trained weights, one device, one budget: `--target` x the fp32 original's
latency MEASURED on the device at the start (what every search's budget is relative to). MobileNet-V2 by
default: pruning alone cannot bring ResNet-20 to 0.3x (its residual streams are fixed: 0.479x predicted
with every prunable layer at the lower bound, for any --lbound down to 0.05).

1. **pruning**: `amc-mobile search` (fp32, latency table, measured wall);
2. **int8**: the original, every layer int8 (PT2E, XNNPACK quantizer); no knob: its ratio is what it is;
3. **two-stage**: the seed pipeline: a pruning search at `--stage1-target`, then `precision-search` on the
   pruned model with the absolute budget (`--budget-ms`): stage 2's wall predicts all-int8 from standalone
   int8 units (pessimistic, ~0.45x fp32 for ResNet-20), so stage 1 has to leave it that room;
4. **joint**: `amc-mobile search --precision joint` at the same target (one agent, ratio and precision per
   layer; the measured wall measures the quantized candidates).

Each result is fine-tuned the same way (`finetune`: same images, recipe, seed; a quantized one is
quantized again at its policy after it), top-1 recorded before and after on the first `--eval-images`
test images (quantized models: the PT2E graph in PyTorch; the .pte's own top-1 is in each quantized/ folder).
Then the original and the four fine-tuned models as they deploy are measured in ONE batch on the device,
interleaved rounds with the original as the drift reference in every round, `--passes` times; a ratio
is the median of the per-pass ratios to the original. Sizes: the weights at their precisions
(`search.cost.model_size_mb`) and the `.pte`. Everything lands in --out: one run folder per arm,
results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--device", default="local")
    p.add_argument("--target", type=float, default=0.3, help="budget: this fraction of the fp32 original, measured")
    p.add_argument("--episodes", type=int, default=60, help="pruning search episodes (pruning arm, stage 1)")
    p.add_argument("--joint-episodes", type=int, default=40)
    p.add_argument("--precision-episodes", type=int, default=16, help="stage 2 episodes")
    p.add_argument("--stage1-target", type=float, default=0.6, help="two-stage: what stage 1 prunes to")
    p.add_argument("--val-images", type=int, default=500, help="validation images that score each episode")
    p.add_argument("--calib-images", type=int, default=300, help="reconstruction calibration images")
    p.add_argument("--quant-calib-images", type=int, default=128)
    p.add_argument("--ft-train-images", type=int, default=6000)
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--eval-images", type=int, default=2000, help="test images scored before and after fine-tuning")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/quant_four_way")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    from amc_mobile.cli import main as cli
    from amc_mobile.data import load_fashion_mnist
    from amc_mobile.measure_models import measure_models
    from amc_mobile.models import model_config
    from amc_mobile.pruning.slicing import load_pruned, save_pruned
    from amc_mobile.search import SearchConfig, run_search
    from amc_mobile.search.finetune import FinetuneConfig, finetune
    from amc_mobile.train import get_or_train
    from device import MeasureConfig, example_input, open_device
    from device.quantize import QuantPolicy, quantize_model
    from amc_mobile.quantization import calibration_images, weights_mb

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    data = load_fashion_mnist()
    original, _ = get_or_train(args.model, device="cpu")
    original = original.eval()
    common = dict(model=args.model, device=args.device, target=args.target, val_images=args.val_images,
                  calib_images=args.calib_images, seed=args.seed, progress=False, checkpoint_every=0)

    def timed(name, fn):
        t0 = time.perf_counter()
        r = fn()
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"== {name}: {seconds[name]:.0f} s", flush=True)
        return r

    def search(name, cfg):
        """A finished run folder is reused (a rerun after a late failure redoes only what is missing)."""
        summary = Path(cfg.out) / "summary.json"
        if not summary.is_file():
            timed(name, lambda: run_search(cfg, model=original, data=data))
        return Path(cfg.out), json.loads(summary.read_text())

    pruning_dir, pruning = search("pruning search", SearchConfig(**common, episodes=args.episodes,
                                                                 out=str(out / "pruning")))
    budget_ms = pruning["setup"]["original_measured_ms"] * args.target
    stage1_dir, _ = search("two-stage: stage 1", SearchConfig(**{**common, "target": args.stage1_target},
                                                              episodes=args.episodes, out=str(out / "two_stage")))
    ps_out = out / "two_stage" / "precision"
    if not (ps_out / "result.json").is_file():
        timed("two-stage: stage 2", lambda: cli([
            "precision-search", str(stage1_dir / "pruned"), "--out", str(ps_out), "--device", args.device,
            "--budget-ms", f"{budget_ms:.6f}", "--episodes", str(args.precision_episodes), "--warmup-episodes",
            str(max(1, args.precision_episodes // 4)), "--val-images", str(args.val_images), "--calib-images",
            str(args.quant_calib_images), "--seed", str(args.seed)]))
    joint_dir, _ = search("joint search", SearchConfig(**common, precision="joint", episodes=args.joint_episodes,
                                                        quant_calib_images=args.quant_calib_images,
                                                        out=str(out / "joint")))
    # int8 only: the original as a (not pruned) pruned-model folder, so the same fine-tune runs on it
    int8_dir = out / "int8"
    if not (int8_dir / "pruned").is_dir():
        save_pruned(original, int8_dir / "pruned", model_config(original), {})

    ft = FinetuneConfig(epochs=args.ft_epochs, train_images=args.ft_train_images, eval_images=args.eval_images,
                        eval_before=("test",), eval_after=("test",), seed=args.seed, progress=False,
                        device="cpu", quant_calib_images=args.quant_calib_images)
    arms = {"pruning": (pruning_dir, None), "int8": (int8_dir, "int8"),
            "two_stage": (stage1_dir, str(ps_out / "policy.json")), "joint": (joint_dir, None)}
    fts = {}
    for name, (run_dir, policy) in arms.items():
        record = run_dir / "finetune.json"
        if not record.is_file():
            cfg = replace(ft, quant_policy=policy)
            timed(f"fine-tune {name}", lambda: finetune(run_dir, cfg, data=data))
        fts[name] = json.loads(record.read_text())

    # the four as they deploy, fine-tuned: quantized at their policies
    calib = calibration_images(data.train, args.quant_calib_images)
    x = example_input(original.input_shape)
    deployed, facts = {}, {}
    for name, r in fts.items():
        model, _ = load_pruned(r["out"])
        q = r.get("quantized")
        if q is None:
            deployed[name] = model.eval()
            facts[name] = {"precision": "fp32", **weights_mb(model, [])}
            continue
        qm = quantize_model(model.eval(), x, calib, QuantPolicy.from_dict(q["policy"]))
        deployed[name] = qm.module
        facts[name] = {"precision": f"int8 {len(qm.int8_layers)}/{len(qm.layers)}", **weights_mb(model, qm.layers),
                       "pte_mb": json.loads((Path(q["dir"]) / "quantization.json").read_text())["pte_mb"]}
    config = MeasureConfig(warmup=10, iterations=40, reference="original", ci_target=0.02, max_time_ms=15000.0,
                           group=8)
    with open_device(args.device) as dev:
        batch = timed("measure", lambda: measure_models(dev, [("original", original), *deployed.items()],
                                                        original.input_shape, config, passes=args.passes))
    o = batch.timings["original"]
    rows = []
    for name in deployed:
        t = batch.timings[name]
        ratios = [a / b for a, b in zip(t.pass_median_ms, o.pass_median_ms) if a and b]
        ratio = sorted(ratios)[len(ratios) // 2] if ratios else float("nan")
        r = fts[name]
        q = r.get("quantized")
        before = q["before"]["test"] if q else r["before"]["test"]["top1"]
        after = q["after"]["test"] if q else r["after"]["test"]["top1"]
        rows.append({"arm": name, "precision": facts[name]["precision"], "median_ms": t.stats.median_ms,
                     "ratio": ratio, "ratio_per_pass": ratios, "over_budget": ratio / args.target,
                     "weights_mb": facts[name].get("weights_mb"), "pte_mb": facts[name].get("pte_mb"),
                     "top1_before": before, "top1_after": after})
    fp32_mb = weights_mb(original, [])["weights_mb"]
    result = {"model": args.model, "device": args.device, "target": args.target, "budget_ms": budget_ms,
              "original_ms": o.stats.median_ms, "original_weights_mb": fp32_mb,
              "original_top1": fts["int8"]["before"]["test"]["top1"], "rows": rows, "seconds": seconds,
              "total_s": round(time.perf_counter() - t_start, 1), "load_before": load0, "load_after": os.getloadavg(),
              "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "fingerprint": batch.fingerprint.to_dict() if batch.fingerprint else None}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{args.model} on {args.device}: budget {args.target}x the fp32 original ({o.stats.median_ms:.3f} ms "
             f"in these rounds; {fp32_mb:.3f} MB of weights; top-1 {result['original_top1']:.4f} on "
             f"{args.eval_images} test images)", "",
             "| arm | precision | measured ms | ratio to original | measured / budget | weights MB | .pte MB | "
             "top-1 before FT | top-1 after FT |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pte = f"{r['pte_mb']:.3f}" if r["pte_mb"] else "-"
        lines.append(f"| {r['arm']} | {r['precision']} | {r['median_ms']:.3f} | {r['ratio']:.3f} | "
                     f"{r['over_budget']:.3f} | {r['weights_mb']:.3f} | {pte} | {r['top1_before']:.4f} | "
                     f"{r['top1_after']:.4f} |")
    lines += ["", f"total {result['total_s']:.0f} s; " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()),
              f"load average before {load0[0]:.2f}, after {result['load_after'][0]:.2f}"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
