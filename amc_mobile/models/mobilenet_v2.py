"""MobileNet-V2 (Sandler et al. 2018), sized for small inputs by default.

On 28x28 (or CIFAR's 32x32) inputs the stem and the second stage run at stride 1, as in the
usual CIFAR MobileNet-V2: the resolutions are 28,28,28,14,7,7,4,4, about 73 MMACs at width 1.0,
which measures ~1.8 ms single-threaded with XNNPACK on a server core (compute-bound enough for a
0.5x latency target to mean something; with ImageNet strides it would be ~0.6 ms, mostly overhead).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import AmcModel, ChannelPlan, ConvBNAct, make_divisible

# (expansion t, output channels c, repeats n, first stride s)
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def default_stem_stride(input_size: int) -> int:
    """Stride 1 for MNIST/CIFAR-sized inputs (<64 px), 2 for larger (ImageNet-style)."""
    return 1 if input_size < 64 else 2


def default_stage2_stride(input_size: int) -> int:
    """The second stage (24 channels) keeps the resolution on small inputs (CIFAR-style)."""
    return 1 if input_size < 64 else 2


class InvertedResidual(nn.Module):
    """1x1 expand (absent when t=1) -> 3x3 depthwise -> 1x1 linear project; residual when shapes allow."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, stride: int, expand: bool, residual: bool):
        super().__init__()
        self.stride = stride
        if expand:
            self.expand = ConvBNAct(in_channels, hidden, 1, act="relu6")
        else:
            self.expand = None
            hidden = in_channels
        self.depthwise = ConvBNAct(hidden, hidden, 3, stride=stride, groups=hidden, act="relu6")
        self.project = ConvBNAct(hidden, out_channels, 1, act="none")
        self.use_residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand is not None:
            out = self.expand(out)
        out = self.project(self.depthwise(out))
        if self.use_residual:
            out = out + x
        return out


class MobileNetV2(AmcModel):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width_mult: float = 1.0,
        stem_stride: int | None = None,
        stage2_stride: int | None = None,
        input_size: int = 28,
        dropout: float = 0.2,
        channels: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if stem_stride is None:
            stem_stride = default_stem_stride(input_size)
        if stage2_stride is None:
            stage2_stride = default_stage2_stride(input_size)
        plan = ChannelPlan(channels)
        self._record(
            "mobilenet_v2",
            (in_channels, input_size, input_size),
            num_classes=num_classes,
            in_channels=in_channels,
            width_mult=float(width_mult),
            stem_stride=int(stem_stride),
            stage2_stride=int(stage2_stride),
            input_size=int(input_size),
            dropout=float(dropout),
            channels=plan.to_config(),
        )
        stem_ch = plan("stem", make_divisible(32 * width_mult))
        self.stem = ConvBNAct(in_channels, stem_ch, 3, stride=stem_stride, act="relu6")
        blocks = []
        cin = stem_ch
        for stage, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
            if stage == 1:
                s = stage2_stride
            designed_out = make_divisible(c * width_mult)
            for i in range(n):
                idx = len(blocks)
                stride = s if i == 0 else 1
                # The residual is part of the design (fixed by the unpruned widths), not of the
                # pruned widths: pruning keeps tied channels equal, it never adds or drops a skip.
                residual = stride == 1 and i > 0
                hidden = plan(f"blocks.{idx}.expand", int(round(cin * t))) if t != 1 else cin
                cout = plan(f"blocks.{idx}.project", designed_out)
                if residual and cout != cin:
                    raise ValueError(
                        f"mobilenet_v2: blocks.{idx} has a residual, so its output ({cout}) must equal its input ({cin})"
                    )
                blocks.append(InvertedResidual(cin, hidden, cout, stride, expand=t != 1, residual=residual))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        head_ch = plan("head", make_divisible(1280 * max(1.0, width_mult)))
        self.head = ConvBNAct(cin, head_ch, 1, act="relu6")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(head_ch, num_classes)
        plan.check_all_used("mobilenet_v2")
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.head(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.dropout(x))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def mobilenet_v2(**kw) -> MobileNetV2:
    return MobileNetV2(**kw)
