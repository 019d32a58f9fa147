"""The reconstruction at 224x224, old code against new, side by side in one process.

    PYTHONPATH=. .venv/bin/python benchmarks/reconstruct_224.py [--before 4a68813] [--images 32] [--repeats 2]

For MobileNet-V2 1.0 and ResNet-18 (3x224x224, 1000 classes, random weights, the searches' default
scopes), the two costs of an episode's "build + reconstruct" phase that grow at ImageNet sizes:
1. the feature pass over the calibration images (`collect_layer_stats`), and
2. the least-squares solves for new (layer, kept count) pairs: here 3 seeded random counts per decision
   layer, solved from scratch by each implementation (the old one at revision `--before`, loaded from
   `git show`, the current one from the checkout) from the same normal equations, with the largest
   relative difference of the weights. Use enough images that every layer has more sampled rows
   (10 per image) than columns, or the solves are under-determined (the search warns about it).
Old and new alternate (old, new, old, new, ...); wall and process CPU seconds are printed for each, so a
shared host's load shows as wall >> CPU and the CPU seconds remain comparable.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "models"))


def old_module(rev: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:amc_mobile/search/reconstruct.py"], check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("from .config import", "from amc_mobile.search.config import")
    path = Path(tempfile.mkdtemp()) / "reconstruct_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("reconstruct_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reconstruct_old"] = mod
    spec.loader.exec_module(mod)
    return mod


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def models(size: int = 224):
    from amc_mobile.models import build_model
    import resnet18

    yield "mobilenet_v2", build_model("mobilenet_v2", num_classes=1000, in_channels=3, input_size=size), "decoupled"
    yield "resnet18", resnet18.resnet18(input_size=size), "all"


def main() -> int:
    from amc_mobile.pruning import build_graph
    from amc_mobile.search import reconstruct as new

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="4a68813")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", default="mobilenet_v2,resnet18")
    ap.add_argument("--solve-input", type=int, default=64,
                    help="input size of the features the solves use: the normal equations' sizes depend on the "
                         "channels only, so a smaller input gives the same solves with enough rows cheaply")
    ap.add_argument("--solve-images", type=int, default=480, help="10 rows each: ResNet-18 needs 461 for 4,608 columns")
    args = ap.parse_args()
    old = old_module(args.before)
    print(f"torch threads {torch.get_num_threads()}; {args.images} calibration images of 3x224x224; "
          f"old = {args.before}, new = the checkout")
    for name, model, scope in models():
        if name not in args.models.split(","):
            continue
        model.eval()
        graph = build_graph(model)
        layers = graph.decision_layers(scope)
        groups = [l.in_group for l in layers]
        images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        stats = {}
        for r in range(args.repeats):
            for tag, mod in (("old", old), ("new", new)):
                st, w, c = timed(lambda: mod.collect_layer_stats(model, graph, groups, images, points=10, seed=0))
                stats[tag] = st
                print(f"{name} features {tag}: wall {w:.1f} s, cpu {c:.1f} s")
        diff = max(float((stats["old"][k].gram - stats["new"][k].gram).abs().max()
                         / stats["old"][k].gram.abs().max().clamp_min(1e-30)) for k in stats["old"])
        print(f"{name} features: largest relative Gram difference old vs new {diff:.2e} (other random points "
              f"when the batches differ: the old pass took all images in one batch)")
        solve_model = dict((n, m) for n, m, _ in models(args.solve_input))[name].eval()
        solve_graph = build_graph(solve_model)
        x = torch.randn(args.solve_images, 3, args.solve_input, args.solve_input, generator=torch.Generator().manual_seed(1))
        stats = {"new": new.collect_layer_stats(solve_model, solve_graph, groups, x, points=10, seed=0)}
        model, graph = solve_model, solve_graph
        print(f"{name} solves from {args.solve_images} images of {args.solve_input}x{args.solve_input} "
              f"(same channels, so the same normal-equation sizes as at 224x224)")
        rng = random.Random(0)
        picks = [(l.name, l.in_group, rng.randrange(1, graph.groups[l.in_group].size // 8 + 1) * 8)
                 for l in layers for _ in range(3)]
        modules = dict(model.named_modules())
        for r in range(args.repeats):
            weights = {}
            for tag, mod in (("old", old), ("new", new)):
                # the same normal equations for both, so that the weights can be compared (under-determined
                # layers have no unique answer, and the two feature passes sampled different points)
                sel = mod.ChannelSelector(model, graph)
                rec = mod.Reconstructor(stats["new"], sel, modules)
                keep = [(n, sel.indices(g, min(k, graph.groups[g].size))) for n, g, k in picks if n in stats["new"]]
                ws, w, c = timed(lambda: [rec.weight(n, idx) for n, idx in keep])
                weights[tag] = ws
                print(f"{name} solves {tag}: {len(keep)} (layer, kept) pairs, wall {w:.1f} s, cpu {c:.1f} s")
            rel = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
                      for a, b in zip(weights["old"], weights["new"]) if a is not None and b is not None)
            print(f"{name} solves: largest relative weight difference old vs new {rel:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
