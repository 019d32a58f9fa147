"""VGG-16 with BatchNorm, CIFAR style: 13 conv layers, global average pool, one linear classifier.

Five 2x2 max-pools need a 32x32 input; on 28x28 the last one would pool a 1x1 map
away, so a model is built with as many pools as its `input_size` allows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import AmcModel, ChannelPlan, ConvBNAct

# channels per conv, stage by stage; each stage ends with a max-pool
VGG16_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGGCifar(AmcModel):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        width_mult: float = 1.0,
        channels: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        plan = ChannelPlan(channels)
        self._record(
            "vgg16",
            (in_channels, input_size, input_size),
            num_classes=num_classes,
            in_channels=in_channels,
            input_size=int(input_size),
            width_mult=float(width_mult),
            channels=plan.to_config(),
        )
        n_pools = min(len(VGG16_STAGES), int(math.floor(math.log2(max(input_size, 1)))))
        convs = []
        pool_after = []
        cin = in_channels
        for stage, widths in enumerate(VGG16_STAGES):
            for w in widths:
                idx = len(convs)
                cout = plan(f"convs.{idx}", max(1, int(round(w * width_mult))))
                convs.append(ConvBNAct(cin, cout, 3, act="relu"))
                cin = cout
            pool_after.append(stage < n_pools)
        self.convs = nn.ModuleList(convs)
        self.stage_ends = tuple(sum(len(s) for s in VGG16_STAGES[: i + 1]) - 1 for i in range(len(VGG16_STAGES)))
        self.pool_after = tuple(pool_after)
        self.maxpool = nn.MaxPool2d(2, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        plan.check_all_used("vgg16")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stage = 0
        for idx, conv in enumerate(self.convs):
            x = conv(x)
            if idx == self.stage_ends[stage]:
                if self.pool_after[stage]:
                    x = self.maxpool(x)
                stage += 1
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


def vgg16(**kw) -> VGGCifar:
    return VGGCifar(**kw)
