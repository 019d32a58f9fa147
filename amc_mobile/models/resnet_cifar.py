"""CIFAR-style ResNet-20/56 (He et al. 2016, sec. 4.2) and Plain-20 (ResNet-20 without shortcuts).

Three stages of n basic blocks at 16/32/64 channels; projection shortcuts (option B:
1x1 conv + BN) where the shape changes, identity elsewhere; ReLU after the add.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import AmcModel, ChannelPlan, ConvBNAct

STAGE_CHANNELS = (16, 32, 64)
DEPTHS = {"resnet20": 3, "resnet56": 9, "plain20": 3}


class BasicBlock(nn.Module):
    def __init__(
        self, in_channels: int, mid: int, out_channels: int, stride: int, residual: bool, projection: bool
    ) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, mid, 3, stride=stride, act="relu")
        self.conv2 = ConvBNAct(mid, out_channels, 3, act="none")
        self.use_residual = residual
        if residual and projection:
            self.shortcut = ConvBNAct(in_channels, out_channels, 1, stride=stride, act="none")
        else:
            self.shortcut = None  # identity (residual) or no shortcut at all (plain)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if self.use_residual:
            out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return self.relu(out)


class ResNetCifar(AmcModel):
    def __init__(
        self,
        depth: int = 20,
        residual: bool = True,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        channels: dict[str, int] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        if name is None:
            name = f"{'resnet' if residual else 'plain'}{depth}"
        plan = ChannelPlan(channels)
        self._record(
            name,
            (in_channels, input_size, input_size),
            num_classes=num_classes,
            in_channels=in_channels,
            input_size=int(input_size),
            channels=plan.to_config(),
        )
        self.depth = depth
        cin = plan("stem", STAGE_CHANNELS[0])
        self.stem = ConvBNAct(in_channels, cin, 3, act="relu")
        blocks = []
        designed_in = STAGE_CHANNELS[0]
        for stage, planes in enumerate(STAGE_CHANNELS):
            for i in range(n):
                idx = len(blocks)
                stride = 2 if stage > 0 and i == 0 else 1
                # Shortcut type is fixed by the unpruned design so a pruned model keeps its topology.
                projection = stride != 1 or designed_in != planes
                mid = plan(f"blocks.{idx}.conv1", planes)
                cout = plan(f"blocks.{idx}.conv2", planes)
                if residual and not projection and cout != cin:
                    raise ValueError(
                        f"{name}: blocks.{idx} has an identity shortcut, so its output ({cout}) must equal its input ({cin})"
                    )
                blocks.append(BasicBlock(cin, mid, cout, stride, residual, projection))
                cin = cout
                designed_in = planes
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        plan.check_all_used(name)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


def resnet20(**kw) -> ResNetCifar:
    return ResNetCifar(depth=20, residual=True, name="resnet20", **kw)


def resnet56(**kw) -> ResNetCifar:
    return ResNetCifar(depth=56, residual=True, name="resnet56", **kw)


def plain20(**kw) -> ResNetCifar:
    return ResNetCifar(depth=20, residual=False, name="plain20", **kw)
