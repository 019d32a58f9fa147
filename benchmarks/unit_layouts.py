"""Units as XNNPACK runs them: NCHW vs channels-last (NHWC) input, and a spatial mean with and without keepdim.

    PYTHONPATH=. .venv/bin/python benchmarks/unit_layouts.py [REPEATS]

Every candidate is timed in one multi-method `.pte` per repeat (the table's unit protocol, UNIT_CONFIG),
side by side; prints the median over REPEATS (default 3) and each repeat's value, in microseconds.
- `nchw_*` / `nhwc_*`: the same unit with an NCHW input (how tables time units: XNNPACK converts to NHWC and
  back inside the unit) and with a channels-last input and module (no conversion, as inside a model).
- `mean_nokeep`, `mean_keep`, `mean_nokeep_cl`: `x.mean((2, 3))` (ExecuTorch 1.4.1 leaves it to the portable
  kernel), with keepdim=True (XNNPACK's global pool), and without keepdim on a channels-last input.
A channels-last `gate` unit fails in XNNPACK (a [1, C, 1, 1] parameter against an NHWC map): listed as failed.
"""
import sys, numpy as np, torch
from torch import nn
from device.registry import open_device
from device.base import Candidate
from latency_tables.build import UNIT_CONFIG
from latency_tables.units import UnitSpec
torch.manual_seed(0)
CL = torch.channels_last
def cl(mod, x):
    return mod.to(memory_format=CL), x.contiguous(memory_format=CL)
class Mean(nn.Module):
    def forward(self, x): return x.mean((2, 3))
class MeanK(nn.Module):
    def forward(self, x): return x.mean((2, 3), keepdim=True)
cands = []
for s in [UnitSpec("conv", 14, 14, 16, 32, act="hardswish"), UnitSpec("conv", 14, 14, 32, 16),
          UnitSpec("dwconv", 14, 14, 32, 32, 3, 1, 1, 32, act="hardswish"), UnitSpec("conv", 7, 7, 24, 96, act="hardswish"),
          UnitSpec("pool", 7, 7, 96, 96, 0), UnitSpec("gate", 14, 14, 32, 32), UnitSpec("add", 14, 14, 16, 16)]:
    mod, x = s.build()
    n = s.key().split("-fp32")[0].replace("-", "_")
    cands.append(Candidate("nchw_" + n, mod, x))
    mod2, x2 = s.build(); mod2, x2 = cl(mod2, x2)
    cands.append(Candidate("nhwc_" + n, mod2, x2))
x = torch.randn(1, 96, 7, 7)
cands += [Candidate("mean_nokeep", Mean(), x), Candidate("mean_keep", MeanK(), x),
          Candidate("mean_nokeep_cl", Mean(), x.contiguous(memory_format=CL))]
res = {c.name: [] for c in cands}
with open_device("local") as dev:
    for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        for c, s in zip(cands, dev.measure(cands, UNIT_CONFIG)):
            res[c.name].append(s.median_ms * 1000 if s.ok else float("nan"))
            if not s.ok and r == 0: print(c.name, s.error)
for k, v in res.items():
    print(f"{np.median(v):7.2f}  {k}   {np.round(v,2)}")
