"""Quick figure for the docs: conv stacks of growing size on `cuda:N`, fp32 vs fp16 (vs fp16 NHWC).

    PYTHONPATH=. python3 benchmarks/cuda_smoke.py [--gpu 0] [--iterations 100] [--warmup 20]

Prints a Markdown table of median and p90 latency in ms per configuration. Each stack is
`depth` x (3x3 conv, no bias -> BatchNorm -> ReLU) at constant width, eval mode. Exits 2 with
a one-line reason when there is no usable GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from amc_mobile.errors import AmcError  # noqa: E402
from device import Candidate, MeasureConfig  # noqa: E402
from device.cuda import CudaDevice  # noqa: E402

# (name, channels, resolution, batch, depth)
STACKS = [
    ("c32_r56_b1", 32, 56, 1, 4),
    ("c64_r112_b1", 64, 112, 1, 4),
    ("c128_r112_b1", 128, 112, 1, 4),
    ("c256_r56_b8", 256, 56, 8, 4),
    ("c256_r112_b8", 256, 112, 8, 4),
]

CONFIGS = [("fp32", False), ("fp16", False), ("fp16", True)]


def conv_stack(channels: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*layers)


def gflop(channels: int, res: int, batch: int, depth: int) -> float:
    return 2 * channels * channels * 9 * res * res * batch * depth / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args(argv)

    try:
        devices = {(dt, cl): CudaDevice(args.gpu, dtype=dt, channels_last=cl) for dt, cl in CONFIGS}
    except AmcError as exc:
        print(f"cuda_smoke: {exc}", file=sys.stderr)
        return 2

    fp = devices[("fp32", False)].fingerprint()
    print(f"# {fp.hardware} | {fp.runtime} | cudnn {fp.extra['cudnn']} | driver {fp.extra['driver']} "
          f"| cc {fp.extra['compute_capability']} | cudnn.allow_tf32={fp.extra['cudnn_allow_tf32']}")
    print(f"# warmup {args.warmup}, iterations {args.iterations}, CUDA events, eager PyTorch, eval mode")

    torch.manual_seed(0)
    cands = [
        Candidate(name, conv_stack(c, d), torch.randn(b, c, r, r)) for name, c, r, b, d in STACKS
    ]
    cfg = MeasureConfig(warmup=args.warmup, iterations=args.iterations)
    results = {key: dev.measure(cands, cfg) for key, dev in devices.items()}

    labels = [dt + ("+NHWC" if cl else "") for dt, cl in CONFIGS]
    head = "| stack | GFLOP | " + " | ".join(f"{lab} median | {lab} p90" for lab in labels) + " |"
    print(head)
    print("|" + "---|" * (2 + 2 * len(CONFIGS)))
    for i, (name, c, r, b, d) in enumerate(STACKS):
        cells = []
        for key in CONFIGS:
            s = results[key][i]
            cells += [f"{s.median_ms:.3f}", f"{s.p90_ms:.3f}"] if s.ok else ["failed", (s.error or "")[:40]]
        print(f"| {name} | {gflop(c, r, b, d):.2f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
