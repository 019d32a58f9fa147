"""Building blocks shared by every model family.

Everything is a small module with named attributes (`conv`, `bn`, `act`): the
pruning code finds layers by name, and ExecuTorch's BN-fusion pass needs
conv -> bn pairs it can recognise (it fails on top-level Sequentials with
numeric children).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "relu6": lambda: nn.ReLU6(inplace=False),
    "none": nn.Identity,
}


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor`, never going down by more than 10%.

    The same rule as the reference MobileNet implementations (TF-slim / torchvision).
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Module):
    """conv (no bias) -> BatchNorm -> activation; `act` is nn.Identity when there is none."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: str = "relu",
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; one of {sorted(ACTIVATIONS)}")
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = ACTIVATIONS[act]()

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ChannelPlan:
    """Per-layer output-channel overrides, keyed by the ConvBNAct's module path.

    A pruned model is rebuilt from JSON by passing `channels={"blocks.3.expand": 72, ...}`
    to its constructor; layers not named keep their designed width. Keys that name
    no overridable layer are an error (a typo would otherwise silently rebuild the
    unpruned model).
    """

    def __init__(self, overrides: dict[str, int] | None) -> None:
        self.overrides = {str(k): int(v) for k, v in (overrides or {}).items()}
        for k, v in self.overrides.items():
            if v < 1:
                raise ValueError(f"channels[{k!r}] = {v}: a layer needs at least one channel")
        self.used: set[str] = set()

    def __call__(self, path: str, default: int) -> int:
        if path in self.overrides:
            self.used.add(path)
            return self.overrides[path]
        return default

    def check_all_used(self, model_name: str) -> None:
        unused = sorted(set(self.overrides) - self.used)
        if unused:
            raise ValueError(f"{model_name}: channel overrides name no prunable layer: {unused}")

    def to_config(self) -> dict[str, int] | None:
        return dict(sorted(self.overrides.items())) or None


class AmcModel(nn.Module):
    """Base class: records the kwargs that rebuild the model and the example input shape."""

    amc_config: dict
    input_shape: tuple[int, int, int]

    def _record(self, name: str, input_shape: tuple[int, int, int], **kwargs) -> None:
        cfg = {"name": name}
        for k, v in kwargs.items():
            if v is None and k == "channels":
                continue
            cfg[k] = v
        self.amc_config = cfg
        self.input_shape = tuple(int(s) for s in input_shape)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, *self.input_shape)
