"""MobileNet-V1 (Howard et al. 2017): stem + 13 depthwise-separable blocks."""

from __future__ import annotations

import torch
from torch import nn

from .layers import AmcModel, ChannelPlan, ConvBNAct, make_divisible
from .mobilenet_v2 import _init_weights, default_stem_stride

# (pointwise output channels, depthwise stride) for the 13 blocks
DEPTHWISE_SEPARABLE_SETTING: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


class DepthwiseSeparable(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.depthwise = ConvBNAct(in_channels, in_channels, 3, stride=stride, groups=in_channels, act="relu")
        self.pointwise = ConvBNAct(in_channels, out_channels, 1, act="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetV1(AmcModel):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width_mult: float = 1.0,
        stem_stride: int | None = None,
        input_size: int = 28,
        dropout: float = 0.0,
        channels: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if stem_stride is None:
            stem_stride = default_stem_stride(input_size)
        plan = ChannelPlan(channels)
        self._record(
            "mobilenet_v1",
            (in_channels, input_size, input_size),
            num_classes=num_classes,
            in_channels=in_channels,
            width_mult=float(width_mult),
            stem_stride=int(stem_stride),
            input_size=int(input_size),
            dropout=float(dropout),
            channels=plan.to_config(),
        )
        cin = plan("stem", make_divisible(32 * width_mult))
        self.stem = ConvBNAct(in_channels, cin, 3, stride=stem_stride, act="relu")
        blocks = []
        for idx, (c, s) in enumerate(DEPTHWISE_SEPARABLE_SETTING):
            cout = plan(f"blocks.{idx}.pointwise", make_divisible(c * width_mult))
            blocks.append(DepthwiseSeparable(cin, cout, s))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(cin, num_classes)
        plan.check_all_used("mobilenet_v1")
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.dropout(x))


def mobilenet_v1(**kw) -> MobileNetV1:
    return MobileNetV1(**kw)
