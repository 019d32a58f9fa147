"""Scoring an episode's policy: build the pruned model (cached reconstruction), evaluate it on the
held-out validation images. Results are cached per channel configuration (evaluation is
deterministic), so a policy the agent repeats costs nothing the second time."""

from __future__ import annotations

import time

import torch
from torch import nn

from amc_mobile.compute import copy_to
from amc_mobile.data import Split

from .env import Score
from .reconstruct import PrunedModelBuilder


def evaluate_split(model: nn.Module, split: Split, metric: str = "top1", batch_size: int | None = None,
                   compute: torch.device | str = "cpu") -> tuple[float, float]:
    """(accuracy for `metric`, mean cross-entropy) of `model` on `split`, on `compute` (the model and the
    split already there, or copied batch by batch). `metric` is top1, top5, or FILE.py:FUNCTION /
    package.module:FUNCTION: fn(model, loader) -> float, higher is better (the loader yields (images,
    labels) batches on the split's device); its loss is NaN."""
    from amc_mobile.compute import copy_to
    from amc_mobile.train import evaluate

    compute = torch.device(compute)
    model = copy_to(model, compute) if next(model.parameters(), torch.empty(0)).device != compute else model
    if metric not in ("top1", "top5"):
        if split.images.device != compute:
            split = split.to(compute)
        return _user_metric(model, split, metric, batch_size), float("nan")
    k = int(metric.removeprefix("top"))
    res = evaluate(model, split, device=compute, topk=(k,), batch_size=batch_size)
    return float(res[f"top{k}"]), float(res["loss"])


def channels_last_copy(model: nn.Module) -> nn.Module:
    """`model` with NHWC copies of its 4-D weights. Not `model.to(memory_format=...)`: that rewrites the
    parameters in place, and a built model shares its unpruned weights (and the reconstruction cache's)
    with the original, which would then no longer lower to XNNPACK."""
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 4:
                setattr(mod, name, nn.Parameter(p.detach().contiguous(memory_format=torch.channels_last),
                                                requires_grad=False))
    return model


_METRIC_FNS: dict = {}


def _user_metric(model: nn.Module, split: Split, ref: str, batch_size: int | None) -> float:
    import math

    from amc_mobile.errors import AmcError
    from amc_mobile.model_io import import_ref

    fn = _METRIC_FNS.get(ref) or _METRIC_FNS.setdefault(ref, import_ref(ref))
    model.eval()
    try:
        with torch.no_grad():
            value = fn(model, split.loader(batch_size or 256))
        value = float(value)
    except AmcError:
        raise
    except Exception as exc:
        raise AmcError(f"metric {ref} raised {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}") \
            from exc
    if not math.isfinite(value):
        raise AmcError(f"metric {ref} returned {value}: it must return a finite number (higher is better)")
    return value


class EpisodeScorer:
    """channels -> Score, with the prune (+reconstruct) and evaluation times split. The scored model
    has its BNs folded and NHWC weights; `builder.build(channels)` gives the exportable one."""

    def __init__(self, builder: PrunedModelBuilder, val: Split, metric: str = "top1", batch_size: int | None = None,
                 channels_last: bool = True, compute: torch.device | str = "cpu"):
        self.builder, self.metric, self.batch_size = builder, metric, batch_size
        self.compute = torch.device(compute)
        # BN folded into the convs and NHWC memory: the same outputs, about 2x faster on CPU (oneDNN).
        self.channels_last = channels_last and val.images.dim() == 4
        if self.channels_last:
            val = Split(val.images.contiguous(memory_format=torch.channels_last), val.labels)
        # the validation images go to the compute device once; each pruned model is built on the CPU
        # (it shares the original's tensors) and copied there
        self.val = val.to(self.compute) if self.compute.type != "cpu" else val
        self._cache: dict[tuple, tuple[float, float]] = {}

    def __call__(self, channels: dict[int, int]) -> Score:
        key = tuple(sorted((int(g), int(c)) for g, c in channels.items()))
        if key in self._cache:
            return Score(*self._cache[key], prune_s=0.0, eval_s=0.0)
        t0 = time.perf_counter()
        with torch.no_grad():
            model = self.builder.build(channels, fast=True)
            if self.channels_last:
                model = channels_last_copy(model)
            model = copy_to(model, self.compute)
        t1 = time.perf_counter()
        acc, loss = evaluate_split(model, self.val, self.metric, self.batch_size, self.compute)
        if self.compute.type == "cuda":
            torch.cuda.synchronize(self.compute)  # the evaluation's time, not its launch's
        t2 = time.perf_counter()
        self._cache[key] = (acc, loss)
        return Score(acc, loss, prune_s=t1 - t0, eval_s=t2 - t1)
