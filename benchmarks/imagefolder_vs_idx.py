"""The `imagefolder:` search against the IDX path on the same images.

    PYTHONPATH=. .venv/bin/python benchmarks/imagefolder_vs_idx.py --out /tmp/folder-vs-idx [--episodes 20]

The shipped MobileNet-V2 (trained on Fashion-MNIST) is searched twice with the same seed and flags
(FLOPs budget 0.5, so no latency noise enters): once on the IDX files (the default data) and once on an
image folder holding the very images that search uses, written as grey PNGs: val/ = the first
`--val-images` IDX validation images, train/ = the IDX search's reconstruction (calibration) images.
The folder is read with --mean 0.2860 --std 0.3530 (Fashion-MNIST's), so the tensors should be the same.
Printed: the largest pixel difference between the two paths' tensors, the original's accuracy on
both, per-episode accuracy differences (the warm-up episodes take the same random actions), and each
search's best policy.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def write_folder(root: Path, val_images: int, calib_images: int, seed: int) -> Path:
    from PIL import Image

    from amc_mobile.data import MEAN, STD, load_fashion_mnist

    data = load_fashion_mnist()
    gen = torch.Generator().manual_seed(seed)  # the search's calibration draw (loop._calibration_images)
    idx = torch.randperm(len(data.train), generator=gen)[:calib_images].sort().values
    for split, images, labels in (("val", data.val.images[:val_images], data.val.labels[:val_images]),
                                  ("train", data.train.images[idx], data.train.labels[idx])):
        u8 = ((images[:, 0] * STD + MEAN) * 255).round().clamp(0, 255).byte().numpy()
        for i in range(len(u8)):
            d = root / split / f"class{int(labels[i])}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(u8[i], mode="L").save(d / f"{i:05d}.png")
    return root


def pixel_check(root: Path, val_images: int) -> dict:
    from amc_mobile.data import load_fashion_mnist
    from amc_mobile.data_sources import load_data

    idx = load_fashion_mnist().val.subset(val_images)
    folder = load_data(f"imagefolder:{root}", channels=1, mean="0.2860", std="0.3530").val
    # the folder's order is its own (classes mixed by a seeded shuffle): compare as sets, image by image
    a = {bytes(x.numpy().tobytes()): int(y) for x, y in zip(idx.images, idx.labels)}
    matched = sum(1 for x, y in zip(folder.images, folder.labels) if a.get(bytes(x.numpy().tobytes())) == int(y))
    key = lambda s: torch.sort(s.images.flatten(1).sum(1)).values  # noqa: E731
    return {"val_images": len(folder), "bitwise_equal_images": matched,
            "max_abs_diff_sorted_sums": float((key(idx) - key(folder)).abs().max())}


def search(out: Path, tag: str, data: list[str], args) -> dict:
    run_dir = out / f"search-{tag}"
    cmd = [sys.executable, "-m", "amc_mobile", "search", "-m", "mobilenet_v2", "--cost", "flops", "--target", "0.5",
           "--episodes", str(args.episodes), "--warmup", str(args.warmup), "--val-images", str(args.val_images),
           "--calib-images", str(args.calib_images), "--seed", str(args.seed), "--out", str(run_dir),
           "--no-progress", "--no-measure-final", "--compute", "cpu", *data]
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    s = json.loads((run_dir / "summary.json").read_text())
    rows = list(csv.DictReader(open(run_dir / "episodes.csv")))
    return {"original_accuracy": s["setup"]["original_accuracy"], "best_accuracy": s["best"]["accuracy"],
            "best_cost_ratio": s["best"]["cost_ratio"], "best_episode": s["best"]["episode"],
            "accuracies": [float(r["accuracy"]) for r in rows], "ratios": [r["ratios"] for r in rows],
            "episode_s": s.get("timing", {}).get("episode_s", {}).get("median")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--calib-images", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = args.out.resolve()
    folder = out / "images"
    if not (folder / "val").is_dir():
        write_folder(folder, args.val_images, args.calib_images, args.seed)
    check = pixel_check(folder, args.val_images)
    print("tensors:", json.dumps(check), flush=True)
    idx = search(out, "idx", [], args)
    img = search(out, "imagefolder", ["--data", f"imagefolder:{folder}", "--mean", "0.2860", "--std", "0.3530"], args)
    same_policy = [i for i, (a, b) in enumerate(zip(idx["ratios"], img["ratios"])) if a == b]
    diffs = [abs(idx["accuracies"][i] - img["accuracies"][i]) for i in same_policy]
    result = {"tensors": check, "idx": {k: v for k, v in idx.items() if k not in ("accuracies", "ratios")},
              "imagefolder": {k: v for k, v in img.items() if k not in ("accuracies", "ratios")},
              "episodes_with_the_same_policy": len(same_policy),
              "max_abs_accuracy_diff_same_policy": max(diffs) if diffs else None,
              "mean_abs_accuracy_diff_same_policy": sum(diffs) / len(diffs) if diffs else None}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
