"""ImageNet-shaped work on `local`: 3x224x224, 1000-class MobileNet-V2 1.0 and ResNet-18 (random weights).

    PYTHONPATH=. .venv/bin/python benchmarks/imagenet_shaped.py --out /tmp/imagenet224 [--stages tables,search]
        [--models mv2,r18] [--episodes 6] [--val-images 32] [--calib-images 64] [--before REV]

Per model, each step is the CLI a user would type, timed, with the peak RSS of its process tree:
1. `table build --grid 16 --coarse-step 8 --no-refine` (what finishes on a shared 2-core host), its wall time;
2. `table validate --samples N` (shares within +-5% / +-10%, Spearman);
3. a short `search` on an image folder (Fashion-MNIST PNGs, resized to 224x224 by --input-size 224,
   so the decode + uint8 cache path is the one timed) against that table, with the final export and
   measurement on `local`; its summary.json gives the per-phase split of an episode.
`--before REV` runs the same search command with the package as it was at git revision REV (extracted
with `git archive` into a temp folder), interleaved with the current code, new/old/new/old, so the
fix is measured side by side on the same (shared) host.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "mv2": ["amc_mobile.models:mobilenet_v2", "--model-kwargs",
            '{"num_classes": 1000, "in_channels": 3, "input_size": 224}'],
    "r18": [str(ROOT / "benchmarks/models/resnet18.py") + ":resnet18"],
}
# what finishes on a shared 2-core host: channel counts on a grid of 16, the coarse pass only (every 8th
# grid point plus both ends); interpolation fills the rest (the validation says how well). The search
# then rounds kept channels to the same grid.
GRID = "16"
BUILD_EXTRA = ["--grid", GRID, "--coarse-step", "8", "--no-refine"]


def run(cmd: list[str], pythonpath: Path = ROOT, log: Path | None = None) -> dict:
    """Run `cmd`; wall seconds, exit code and the peak RSS (MB) of the largest process in its tree."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    # cwd is the package root too: `python -m` puts the working folder first on sys.path
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=pythonpath)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    return {"wall_s": round(time.perf_counter() - t0, 1), "rc": proc.returncode,
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "cmd": " ".join(cmd[2:])}


def write_folder(root: Path, train: int, val: int) -> Path:
    """Fashion-MNIST images from the Debian package as RGB PNG class folders (28x28: the search resizes)."""
    from PIL import Image

    from amc_mobile.data import MEAN, STD, load_fashion_mnist

    if (root / "train").is_dir():
        return root
    data = load_fashion_mnist()
    for split, images, labels, n in (("train", data.train.images, data.train.labels, train),
                                     ("val", data.val.images, data.val.labels, val)):
        u8 = ((images[:n, 0] * STD + MEAN) * 255).round().clamp(0, 255).byte().numpy()
        for i in range(n):
            d = root / split / f"class{int(labels[i])}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(u8[i]).convert("RGB").save(d / f"{i}.png")
    return root


def cli(pythonpath: Path = ROOT) -> list[str]:
    return [sys.executable, "-m", "amc_mobile"]


def tables(name: str, out: Path, validate_samples: int) -> dict:
    tdir = out / "tables"
    build = run(cli() + ["table", "build", "-m", *MODELS[name], "--tables-dir", str(tdir), "--quiet",
                         *BUILD_EXTRA], log=out / f"{name}-build.log")
    table = sorted(p for p in tdir.iterdir() if p.is_dir())[-1]
    val_dir = out / f"{name}-validate"
    validate = run(cli() + ["table", "validate", "-m", *MODELS[name], "--table-dir", str(table), "--samples",
                            str(validate_samples), "--passes", "3", "--grid", GRID, "--out", str(val_dir)],
                   log=out / f"{name}-validate.log")
    return {"build": build, "validate": validate, "table": str(table),
            "validate_tail": (out / f"{name}-validate.log").read_text().strip().splitlines()[-6:]}


def search(name: str, out: Path, tag: str, pythonpath: Path, args) -> dict:
    run_dir = out / f"{name}-search-{args.cost}-{tag}"
    if args.cost == "latency":
        table = json.loads((out / f"{name}-tables.json").read_text())["table"]
        cost = ["--table-dir", table, "--channel-round", GRID]
    else:  # the side-by-side runs: no table needed, no latency noise in the budget
        cost = ["--cost", "flops", "--no-measure-final"]
    cmd = cli(pythonpath) + ["search", "-m", *MODELS[name], "--data", f"imagefolder:{out / 'images'}",
                             "--input-size", "224", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
                             "--episodes", str(args.episodes), "--warmup", str(args.episodes // 2),
                             "--val-images", str(args.val_images), "--calib-images", str(args.calib_images),
                             *cost, "--target", "0.5", "--out", str(run_dir), "--no-progress",
                             "--compute", "cpu"]
    if tag.startswith("before"):
        cmd.remove("--compute"), cmd.remove("cpu")  # the old code has no --compute: it scored on the CPU
    res = run(cmd, pythonpath, log=out / f"{name}-search-{args.cost}-{tag}.log")
    res["tag"] = tag
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return res
    s = json.loads(summary_path.read_text())
    rows = list(__import__("csv").DictReader(open(run_dir / "episodes.csv")))
    for col in ("prune_s", "eval_s", "predict_s", "agent_s", "episode_s"):
        vals = [float(r[col]) for r in rows if r.get(col)]
        if vals:
            res[f"median_{col}"] = round(statistics.median(vals), 3)
    res.update(calibration_s=s["setup"].get("calibration_s"), original_eval_s=s["setup"].get("original_eval_s"),
               timing=s.get("timing"), best_accuracy=s["best"]["accuracy"],
               measured=({k: s["measured"].get(k, {}).get("median_ms") for k in ("original", "pruned")}
                         if s.get("measured") else None))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stages", default="tables,search")
    ap.add_argument("--models", default="mv2,r18")
    ap.add_argument("--episodes", type=int, default=6)
    ap.add_argument("--val-images", type=int, default=32)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--validate-samples", type=int, default=5)
    ap.add_argument("--cost", default="latency", choices=("latency", "flops"),
                    help="the search's budget: latency (the table built here) or flops (no table needed)")
    ap.add_argument("--before", default=None, help="git revision to run the same search with, side by side")
    ap.add_argument("--repeats", type=int, default=1, help="new/old pairs per model (with --before)")
    ap.add_argument("--tag", default="new", help="name of the current code's runs (run folders are never reused)")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_folder(out / "images", train=max(args.calib_images, 100), val=args.val_images)
    old = None
    if args.before:
        old = Path(tempfile.mkdtemp(prefix="amc-before-"))
        subprocess.run(f"git -C {ROOT} archive {args.before} amc_mobile device latency_tables | tar -x -C {old}",
                       shell=True, check=True)
        (old / "build").symlink_to(ROOT / "build")
    for name in args.models.split(","):
        if "tables" in args.stages.split(","):
            res = tables(name, out, args.validate_samples)
            (out / f"{name}-tables.json").write_text(json.dumps(res, indent=2))
            print(name, json.dumps(res, indent=1), flush=True)
        if "search" in args.stages.split(","):
            results = []
            for r in range(args.repeats):
                results.append(search(name, out, f"{args.tag}{r}", ROOT, args))
                print(name, json.dumps(results[-1]), flush=True)
                if old is not None:
                    results.append(search(name, out, f"before{r}", old, args))
                    print(name, json.dumps(results[-1]), flush=True)
            (out / f"{name}-search-{args.cost}-{args.tag}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
