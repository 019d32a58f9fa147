"""Model registry: `build_model(name, **kw)`, and `model_config(model)` to rebuild it from JSON.

    model = build_model("mobilenet_v2", width_mult=0.5)
    cfg = model_config(model)          # {"name": "mobilenet_v2", "num_classes": 10, ...}, JSON-safe
    same = build_model(**cfg)          # identical architecture

Every model takes `num_classes=10, in_channels=1, input_size=28` (Fashion-MNIST), has
`model.input_shape = (C, H, W)` for the example input, and accepts
`channels={"<ConvBNAct path>": n}` overrides so a pruned model can be rebuilt.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from amc_mobile.errors import AmcError
from device.files import config_hash

from .layers import AmcModel, ConvBNAct, make_divisible
from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .mobilenet_v2 import InvertedResidual, MobileNetV2, mobilenet_v2
from .resnet_cifar import BasicBlock, ResNetCifar, plain20, resnet20, resnet56
from .vgg_cifar import VGGCifar, vgg16

DEFAULT_MODEL = "mobilenet_v2"

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v1": mobilenet_v1,
    "mobilenet_v2": mobilenet_v2,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "plain20": plain20,
    "vgg16": vgg16,
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
TORCHVISION_PREFIX = "torchvision:"


@dataclass
class ModelSpec:
    """A model name plus the kwargs that build it; JSON round-trips through `to_dict`/`from_dict`."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return build_model(self.name, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **copy.deepcopy(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        name = d.pop("name")
        return cls(name, d)

    @classmethod
    def of(cls, model: nn.Module) -> "ModelSpec":
        return cls.from_dict(model_config(model))


def build_model(name: str, **kw) -> nn.Module:
    """Build a registered model (or "torchvision:<arch>", needs torchvision) with fresh weights."""
    if name.startswith(TORCHVISION_PREFIX):
        from .torchvision_adapter import torchvision_model

        return torchvision_model(name[len(TORCHVISION_PREFIX) :], **kw)
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise AmcError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}") from None
    try:
        return builder(**kw)
    except TypeError as exc:
        raise AmcError(f"bad options for model {name!r}: {exc}") from exc


def model_config(model: nn.Module) -> dict[str, Any]:
    """The JSON-safe kwargs (with "name") that rebuild `model`'s architecture via `build_model(**cfg)`."""
    cfg = getattr(model, "amc_config", None)
    if cfg is None:
        cfg = getattr(model, "amc_reference", None)  # a user factory (FILE.py:FACTORY), see model_io
    if cfg is None:
        raise ValueError(f"{type(model).__name__} was not built by amc_mobile.models.build_model nor by a "
                         f"FILE.py:FACTORY reference")
    return copy.deepcopy(cfg)


def rebuild(config: dict[str, Any]) -> nn.Module:
    """The architecture a `model_config` names: a registry model, or a user factory (FILE.py:FACTORY)."""
    if "factory" in config:
        from amc_mobile.model_io import rebuild_reference

        return rebuild_reference(config)
    return build_model(**config)


def example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    shape = getattr(model, "input_shape", None) or (1, 28, 28)
    return torch.randn(batch, *shape)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "AmcModel",
    "BasicBlock",
    "ConvBNAct",
    "DEFAULT_MODEL",
    "InvertedResidual",
    "MODEL_NAMES",
    "MobileNetV1",
    "MobileNetV2",
    "ModelSpec",
    "ResNetCifar",
    "VGGCifar",
    "build_model",
    "config_hash",
    "count_params",
    "example_input",
    "make_divisible",
    "model_config",
]
