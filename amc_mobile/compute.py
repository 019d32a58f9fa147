"""Where the search's arithmetic runs (`--compute cpu|cuda|cuda:N`), apart from where latency is measured.

Scoring episodes, collecting the reconstruction's features, fine-tuning and training run on the compute
device; latency is always measured on the target (`--device local|adb:SERIAL|...`): the set-up of a
workstation with a GPU searching against a phone on its USB port. The default is cuda when torch sees one.

What stays on the CPU whatever the compute device: the original model and the pruning machinery
(channel selection, slicing, the least-squares solves: float64 on small matrices, cached), so a pruned
model is built on the CPU and copied to the compute device to be scored.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from amc_mobile.errors import AmcError

COMPUTE_CHOICES = "cpu, cuda or cuda:N"


def resolve_compute(spec: str | torch.device | None = None, flag: str = "--compute") -> torch.device:
    """None / "auto": cuda when torch sees a GPU, else cpu. cuda without one, an index past the last GPU,
    or anything but cpu/cuda is a one-line AmcError naming `flag`."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise AmcError(f"{flag} {spec!r}: expected {COMPUTE_CHOICES}") from None
    if dev.type not in ("cpu", "cuda"):
        raise AmcError(f"{flag} {spec!r}: expected {COMPUTE_CHOICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AmcError(f"{flag} {spec}: this host's torch ({torch.__version__}) sees no CUDA GPU; "
                           f"use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AmcError(f"{flag} {spec}: torch sees {torch.cuda.device_count()} CUDA GPU(s) "
                           f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def describe(dev: torch.device) -> str:
    """`cpu (2 threads)` or `cuda:0 (NVIDIA H200)`, for run records."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def copy_to(model: nn.Module, dev: torch.device) -> nn.Module:
    """`model` on `dev` without touching `model`: the scorer's pruned models share tensors with the
    original (see reconstruct.shallow_copy), and `module.to()` would move those shared tensors in place.
    On the CPU the model itself is returned."""
    if dev.type == "cpu":
        return model
    memo: dict[int, object] = {}
    for t in model.parameters():
        memo[id(t)] = nn.Parameter(t.detach().to(dev), requires_grad=t.requires_grad)
    for t in model.buffers():
        memo[id(t)] = t.to(dev)
    return copy.deepcopy(model, memo)
