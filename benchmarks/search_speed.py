"""How fast is an AMC search episode, and where does its time go?

    .venv/bin/python benchmarks/search_speed.py [--model mobilenet_v2] [--episodes 40] [--warmup 10]
        [--val-images 1000] [--calib-images 500] [--cost flops] [--untrained] [--threads 2]

Runs a short real search (`run_search`, FLOPs budget by default so that no latency table is needed;
the cost model's predictions take microseconds either way) and prints:

- set-up time (calibration features for the reconstruction, original model's evaluation)
- episodes per minute (wall clock, and per CPU-second of this process, which is what a busy shared
  machine does not distort)
- the split of an episode: prune + reconstruct (build the pruned model from the cached lstsq
  solutions) vs evaluation on the validation images vs the rest (agent, action wall, log)
- the same once the reconstruction cache is warm (episodes after the first quarter)

`--untrained` uses freshly initialised weights (same speed, no training or checkpoint needed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (registry models)")
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--calib-images", type=int, default=500)
    p.add_argument("--cost", default="flops", choices=("flops", "params", "latency"))
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--device", default="local")
    p.add_argument("--no-reconstruct", action="store_true")
    p.add_argument("--untrained", action="store_true", help="random weights instead of get_or_train")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    import torch

    from amc_mobile.models import build_model
    from amc_mobile.search import SearchConfig, read_log, run_search

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.untrained:
        torch.manual_seed(0)
        model = build_model(args.model, width_mult=args.width)
    else:
        from amc_mobile.train import get_or_train

        model, _ = get_or_train(args.model, {"width_mult": args.width} if args.width != 1.0 else None, device="cpu")
    marks: list[tuple[float, float]] = []

    def on_episode(_row) -> None:
        marks.append((time.perf_counter(), time.process_time()))

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SearchConfig(model=args.model, cost=args.cost, target=args.target, device=args.device,
                           episodes=args.episodes, warmup=args.warmup, val_images=args.val_images,
                           calib_images=args.calib_images, reconstruct=not args.no_reconstruct,
                           out=str(Path(tmp) / "run"), checkpoint_every=0, measure_final=False, progress=False)
        t0, c0 = time.perf_counter(), time.process_time()
        result = run_search(cfg, model=model, on_episode=on_episode)
        rows = read_log(result.run_dir / "episodes.csv", with_timings=True)
        setup = result.summary["setup"]
    load1 = os.getloadavg()[0]

    # Episode i's wall/CPU time = between the ends of episodes i-1 and i (episode 0 is left out).
    walls = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpus = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    prune = [float(r["prune_s"] or 0) for r in rows][1:]
    evals = [float(r["eval_s"] or 0) for r in rows][1:]

    def report(label: str, sl: slice) -> None:
        w, c, pr, ev = walls[sl], cpus[sl], prune[sl], evals[sl]
        if not w:
            return
        mw, mc, mp, me = (statistics.mean(x) for x in (w, c, pr, ev))
        rest = max(0.0, mw - mp - me)
        print(f"{label}: {len(w)} episodes, {mw:.3f} s/episode wall = {60 / mw:.1f} episodes/min "
              f"({mc:.3f} CPU-s/episode)")
        print(f"    prune+reconstruct {mp:.3f} s ({mp / mw:.0%}) | evaluation {me:.3f} s ({me / mw:.0%}) | "
              f"agent+wall+log {rest:.3f} s ({rest / mw:.0%})")

    n = len(walls)
    print(f"model {args.model} x{args.width}, {len(result.graph.decision_layers(setup['scope']))} decision layers "
          f"(scope {setup['scope']}), cost {args.cost}, {setup['val_images']} val images, "
          f"{args.calib_images} calibration images, reconstruction {'off' if args.no_reconstruct else 'on'}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"set-up: calibration features {setup['calibration_s']:.1f} s, original evaluation "
          f"{setup['original_eval_s']:.2f} s (accuracy {setup['original_accuracy']:.4f})")
    report("all episodes", slice(0, n))
    report("warm cache (after the first quarter)", slice(n // 4, n))
    print(f"total {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} CPU-s; "
          f"1-min load average {load0:.2f} -> {load1:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
