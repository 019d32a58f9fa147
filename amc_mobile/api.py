"""The Python entry points: measure a model on a device, build its latency table, compress it.

    from amc_mobile import build_table, compress, measure

    result = compress(model, train_data, val_data, device="local", target=0.5)
    result.model            # the pruned nn.Module (reconstructed weights, not fine-tuned)
    result.measured_ratio   # pruned / original latency, both measured on the device side by side

`model` is an nn.Module (with an `input_shape` attribute, or pass `input_shape=`), a registry name
or a `FILE.py:FACTORY` reference. Data is a `Split`, an `(images, labels)` pair of tensors, or any
dataset / iterable of `(image, label)` pairs. Without `val_data`, AMC's rule: the reward's images
are held out from the training data (seeded, recorded in the run folder). Every call writes the same
run folder as the CLI does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amc_mobile.data import FashionMNIST, Split
from amc_mobile.errors import AmcError

__all__ = ["compress", "build_table", "measure", "as_split", "CompressResult"]


def _module(model, input_shape=None) -> nn.Module:
    if isinstance(model, nn.Module):
        module = model
    elif isinstance(model, str):
        from amc_mobile.model_io import load_model

        module = load_model(model).module
        if module is None:
            raise AmcError(f"{model} is a compiled .pte: compress and build_table need the model's layers")
    else:
        raise AmcError(f"model must be an nn.Module, a registry name or FILE.py:FACTORY, not {type(model).__name__}")
    if input_shape is not None:
        module.input_shape = tuple(int(v) for v in input_shape)
    if not getattr(module, "input_shape", None):
        raise AmcError(f"{type(module).__name__} has no `input_shape` attribute: pass input_shape=(C, H, W)")
    return module.eval()


def as_split(data, name: str = "data") -> Split:
    """A `Split` from a Split, an (images, labels) pair of tensors, or an iterable of (image, label)."""
    if isinstance(data, Split):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
    else:
        try:
            pairs = list(data)
        except TypeError:
            raise AmcError(f"{name}: expected a Split, (images, labels) tensors or (image, label) pairs, "
                           f"not {type(data).__name__}") from None
        if not pairs:
            raise AmcError(f"{name} is empty")
        try:
            images = torch.stack([torch.as_tensor(p[0], dtype=torch.float32) for p in pairs])
            labels = torch.as_tensor([int(p[1]) for p in pairs], dtype=torch.int64)
        except Exception as exc:
            raise AmcError(f"{name}: its items are not (image, label) pairs of one image shape: {exc}") from exc
    images, labels = images.float(), labels.long().reshape(-1)
    if len(images) != len(labels) or len(labels) == 0:
        raise AmcError(f"{name}: {len(images)} images but {len(labels)} labels")
    if not torch.isfinite(images).all():
        raise AmcError(f"{name}: some images are NaN or infinite")
    return Split(images, labels)


def _dataset(train_data, val_data, val_size: int, seed: int) -> tuple[FashionMNIST, dict]:
    if train_data is None:
        from amc_mobile.data import load_fashion_mnist

        data = load_fashion_mnist()
        return data, {"data": "fashion-mnist", "source": str(data.source)}
    train = as_split(train_data, "train_data")
    if val_data is not None:
        val = as_split(val_data, "val_data")
        return FashionMNIST(train, val, val, Path("<python>")), {"data": "python", "val": "given",
                                                                 "train_images": len(train), "val_images": len(val)}
    from amc_mobile.data_sources import hold_out

    rest, val = hold_out(train, val_size, seed)
    return FashionMNIST(rest, val, val, Path("<python>")), {"data": "python", "val": f"{len(val)} held out of "
                                                             f"train_data (seed {seed})", "train_images": len(rest),
                                                             "val_images": len(val)}


def measure(model, device: str = "local", *, input_shape=None, config=None, quantize=None, calibration=None):
    """The model's latency statistics (`LatencyStats`: median_ms, p10_ms, p90_ms, ...) on `device`.

    `quantize`: "int8", a `QuantPolicy` or a policy file: the model is quantized first (PT2E, XNNPACK
    quantizer), its activation ranges calibrated on `calibration` (images, or an (images, labels) pair;
    default: the first 128 Fashion-MNIST training images)."""
    from device.base import Candidate, MeasureConfig, example_input
    from device.registry import open_device

    module = _module(model, input_shape)
    x = example_input(module.input_shape)
    if quantize is not None:
        from device.quantize import QuantPolicy, quantize_model

        policy = quantize if isinstance(quantize, QuantPolicy) else QuantPolicy.parse(str(quantize))
        if calibration is None:
            from amc_mobile.data import load_fashion_mnist

            calibration = load_fashion_mnist().train.images[:128]
        elif isinstance(calibration, (tuple, list)):
            calibration = calibration[0]
        if not policy.all_fp32:
            module = quantize_model(module, x, calibration, policy).module
    with open_device(device) as dev:
        stats = dev.measure([Candidate("model", module, x)], config or MeasureConfig())[0]
    if not stats.ok:
        raise AmcError(f"measuring on {device} failed: {stats.error}")
    return stats


def build_table(model, device: str = "local", *, input_shape=None, **options):
    """Build (or resume) the model's latency table on `device` and return it as a `LatencyModel`
    (`predict(channels)`, `full_latency_ms`); options as `latency_tables.build.build_table`."""
    from amc_mobile.tables import ensure_table

    return ensure_table(_module(model, input_shape), device_uri=device, **options)


@dataclass
class CompressResult:
    model: nn.Module  # pruned, reconstructed weights, not fine-tuned
    original: nn.Module
    channels: dict[int, int]  # group id -> kept channels
    policy: dict  # the best episode, as in best_policy.json
    accuracy: float  # validation accuracy of the pruned model (the search's images)
    original_accuracy: float
    original_ms: float | None  # measured on the device at the end, side by side
    pruned_ms: float | None
    run_dir: Path
    summary: dict = field(default_factory=dict, repr=False)

    @property
    def measured_ratio(self) -> float | None:
        """The search's final measured ratio (`summary["measured"]["measured_ratio"]`: paired per round when
        the original ran in every round, else pruned / original median)."""
        m = self.summary.get("measured") or {}
        if m.get("measured_ratio") is not None:
            return float(m["measured_ratio"])
        if self.original_ms and self.pruned_ms:
            return self.pruned_ms / self.original_ms
        return None


def compress(model, train_data=None, val_data=None, *, device: str = "local", target: float = 0.5,
             episodes: int = 100, cost: str = "latency", out: str | None = None, input_shape=None,
             val_size: int = 1000, seed: int = 0, progress: bool = True, **search_options: Any) -> CompressResult:
    """Search a pruning policy for `model` that meets `target` x its measured latency on `device`
    (AMC with a DDPG agent; `cost="flops"` for the paper's budget), and return the pruned model.
    Other options are `SearchConfig` fields (e.g. `val_images`, `calib_images`, `warmup`, `scope`)."""
    from amc_mobile.search import SearchConfig, run_search

    module = _module(model, input_shape)
    data, origin = _dataset(train_data, val_data, val_size, seed)
    shape = tuple(data.val.images.shape[1:])
    if shape != tuple(module.input_shape):
        raise AmcError(f"the data's images are {shape} but the model takes {tuple(module.input_shape)}")
    label = getattr(module, "amc_config", {}).get("name") or type(module).__name__
    options = {"val_images": min(len(data.val), 1000), "calib_images": min(len(data.train), 500), **search_options}
    cfg = SearchConfig(model=label, device=device, cost=cost, target=target, episodes=episodes, out=out,
                       progress=progress, seed=seed, **options)
    res = run_search(cfg, model=module, data=data)
    measured = res.summary.get("measured", {})
    best = res.best
    (res.run_dir / "data.json").write_text(__import__("json").dumps(origin, indent=2))
    return CompressResult(res.model, res.original, res.channels, best, float(best.get("accuracy", math.nan)),
                          float(res.summary.get("setup", {}).get("original_accuracy", math.nan)),
                          measured.get("original", {}).get("median_ms"), measured.get("pruned", {}).get("median_ms"),
                          res.run_dir, res.summary)
