"""Small networks of the shapes users bring (one per pattern family), for the pruning-graph tests.

Each is a few ms on the CPU at its input size; none is a built-in family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout, k=1, s=1, groups=1, act=None):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, c, hidden, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.reduce = nn.Conv2d(c, hidden, 1)
        self.act = act()
        self.expand = nn.Conv2d(hidden, c, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class MobileNetV3Block(nn.Module):
    def __init__(self, cin, exp, cout, k, s, se=True):
        super().__init__()
        self.expand = conv_bn(cin, exp, 1, act=nn.Hardswish)
        self.dw = conv_bn(exp, exp, k, s, groups=exp, act=nn.Hardswish)
        self.se = SqueezeExcite(exp, max(8, exp // 4)) if se else nn.Identity()
        self.project = conv_bn(exp, cout, 1)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Small(nn.Module):
    """Squeeze-excite with hard-sigmoid gates, hard-swish, a `mean` head and a hard-swish classifier."""

    def __init__(self, num_classes=10, in_ch=3, size=32):
        super().__init__()
        self.input_shape = (in_ch, size, size)
        self.stem = conv_bn(in_ch, 16, 3, 2, act=nn.Hardswish)
        self.blocks = nn.Sequential(MobileNetV3Block(16, 32, 16, 3, 1), MobileNetV3Block(16, 48, 24, 3, 2),
                                    MobileNetV3Block(24, 64, 24, 5, 1))
        self.head = conv_bn(24, 96, 1, act=nn.Hardswish)
        self.fc1 = nn.Linear(96, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        x = x.mean((2, 3))
        return self.fc2(F.hardswish(self.fc1(x)))


def channel_shuffle(x, groups=2):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride == 2:
            self.left = nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin), conv_bn(cin, half, 1, act=nn.ReLU))
            bin_ = cin
        else:
            self.left = None
            bin_ = half
        self.right = nn.Sequential(conv_bn(bin_, half, 1, act=nn.ReLU), conv_bn(half, half, 3, stride, groups=half),
                                   conv_bn(half, half, 1, act=nn.ReLU))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.right(b)], dim=1)
        else:
            out = torch.cat([self.left(x), self.right(x)], dim=1)
        return channel_shuffle(out)


class ShuffleNetV2(nn.Module):
    """Channel split, concatenation and channel shuffle (view-transpose-view)."""

    def __init__(self, num_classes=10, in_ch=3, size=32):
        super().__init__()
        self.input_shape = (in_ch, size, size)
        self.stem = conv_bn(in_ch, 24, 3, 2, act=nn.ReLU)
        self.stage = nn.Sequential(ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1), ShuffleUnit(48, 48, 1))
        self.head = conv_bn(48, 128, 1, act=nn.ReLU)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.head(self.stage(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn(x))))))
        return torch.cat([x, y], 1)


class DenseNet(nn.Module):
    """Dense blocks: every layer reads the concatenation of all earlier outputs."""

    def __init__(self, num_classes=10, in_ch=3, growth=12, size=32):
        super().__init__()
        self.input_shape = (in_ch, size, size)
        self.stem = nn.Conv2d(in_ch, 24, 3, padding=1, bias=False)
        c = 24
        layers = []
        for _ in range(3):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block = nn.Sequential(*layers)
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2))
        self.fc = nn.Linear(c // 2, num_classes)

    def forward(self, x):
        x = self.trans(self.block(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, k, s):
        super().__init__()
        exp = cin * expand
        self.expand = conv_bn(cin, exp, 1, act=nn.SiLU) if expand != 1 else nn.Identity()
        self.dw = conv_bn(exp, exp, k, s, groups=exp)
        self.se = SqueezeExcite(exp, max(4, cin // 4), act=nn.SiLU, gate=nn.Sigmoid)
        self.project = conv_bn(exp, cout, 1)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.dw(self.expand(x))
        y = y * torch.sigmoid(y)  # SiLU written out
        y = self.project(self.se(y))
        return x + y if self.residual else y


class EfficientNetB0(nn.Module):
    """MBConv blocks with SiLU (module and written out) and sigmoid-gated squeeze-excite."""

    def __init__(self, num_classes=10, in_ch=3, size=32):
        super().__init__()
        self.input_shape = (in_ch, size, size)
        self.stem = conv_bn(in_ch, 16, 3, 2, act=nn.SiLU)
        self.blocks = nn.Sequential(MBConv(16, 16, 1, 3, 1), MBConv(16, 24, 4, 3, 2), MBConv(24, 24, 4, 5, 1))
        self.head = conv_bn(24, 96, 1, act=nn.SiLU)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.drop(x.mean((2, 3))))


class ResNetMeanHead(nn.Module):
    """Basic residual blocks, a `mean` head and a second head that flattens a 4x4 map into a linear."""

    def __init__(self, num_classes=10, in_ch=3, size=16):
        super().__init__()
        self.input_shape = (in_ch, size, size)
        self.stem = conv_bn(in_ch, 16, 3, act=nn.ReLU)
        self.a1 = conv_bn(16, 24, 3, act=nn.ReLU)
        self.a2 = conv_bn(24, 16, 3)
        self.down = conv_bn(16, 32, 3, 2, act=nn.ReLU)
        self.b1 = conv_bn(32, 40, 3, 2, act=nn.ReLU)
        self.fc = nn.Linear(40, num_classes)
        side = (size + 3) // 4  # two stride-2 convs
        self.aux = nn.Linear(40 * side * side, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a2(self.a1(x)))
        x = self.b1(self.down(x))
        return self.fc(x.mean(dim=(2, 3))) + self.aux(x.flatten(1))


class ResNeXtBlockNet(nn.Module):
    """A ResNeXt bottleneck: 1x1 -> grouped 3x3 (cardinality 4) -> 1x1, with a projection shortcut."""

    def __init__(self, num_classes=10, in_ch=3, size=16):
        super().__init__()
        self.input_shape = (in_ch, size, size)
        self.stem = conv_bn(in_ch, 32, 3, act=nn.ReLU)
        self.reduce = conv_bn(32, 64, 1, act=nn.ReLU)
        self.grouped = conv_bn(64, 64, 3, groups=4, act=nn.ReLU)
        self.expand = conv_bn(64, 64, 1)
        self.shortcut = conv_bn(32, 64, 1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.expand(self.grouped(self.reduce(x)))
        x = F.relu(y + self.shortcut(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ChannelsLastMLP(nn.Module):
    """A ConvNeXt-style block: depthwise conv, permute to channels-last, LayerNorm, Linear-GELU-Linear."""

    def __init__(self, num_classes=10, in_ch=3, size=16):
        super().__init__()
        self.input_shape = (in_ch, size, size)
        self.stem = nn.Conv2d(in_ch, 32, 4, 4)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.norm = nn.LayerNorm(32)
        self.pw1 = nn.Linear(32, 96)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(96, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(self.act(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + y
        return self.fc(x.mean((2, 3)))


PATTERN_NETS = {
    "mobilenet_v3_small": MobileNetV3Small,
    "shufflenet_v2": ShuffleNetV2,
    "densenet": DenseNet,
    "efficientnet_b0": EfficientNetB0,
    "resnet_mean_head": ResNetMeanHead,
    "resnext_block": ResNeXtBlockNet,
    "channels_last_mlp": ChannelsLastMLP,
}


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so that equivalence tests see real shifts and scales."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
    return model.eval()
