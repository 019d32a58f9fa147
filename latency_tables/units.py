"""Fused units: the things a latency table is keyed by (conv+BN+activation, depthwise, grouped conv,
linear, add, pools, squeeze-excite gate, element-wise mul, standalone activation, copy, spatial
reductions written as tensor ops, channels-last LayerNorm).

A unit is what XNNPACK runs as one fused kernel; nn-Meter showed that predicting per
fused kernel is what makes a sum over layers accurate (99% within ±10% vs 91% per op).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from device.errors import AmcError

# quantize / dequantize: the q/dq on an edge between an fp32 and an int8 op (model input and output included),
# a unit of its own keyed by the edge's tensor (c_in = c_out = its channels, hw its map; a flattened tensor
# is hw 1x1). quantize takes fp32 and returns int8, dequantize the reverse; their dtype is int8 (their int8 side).
EDGE_KINDS = ("quantize", "dequantize")
UNIT_KINDS = ("conv", "dwconv", "linear", "add", "pool", "avgpool", "gate", "mul", "act", "copy", "bn", "mean", "sum",
              "amax", "layernorm") + EDGE_KINDS
ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish,
               "hardsigmoid": nn.Hardsigmoid, "silu": nn.SiLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
               "tanh": nn.Tanh}
# A reduction over H, W written as a tensor op (`x.mean((2, 3))`) is its own unit, measured as that very op:
# ExecuTorch 1.4.1's XNNPACK partitioner delegates `mean` only with keepdim=True, so without it the op runs
# on the portable kernel (96x7x7: 12.4 us vs 1.1 us for the global pool it equals, docs/BENCHMARKS.md) and
# splits the delegate. `kernel` holds keepdim: 1 keeps a 1x1 map, 0 drops H, W (the key reads `mean0x0`).
REDUCTIONS = ("mean", "sum", "amax")
# kinds whose output has the input's channels
_CHANNEL_KEEPING = ("dwconv", "add", "pool", "avgpool", "gate", "mul", "act", "copy", "bn", "layernorm") + REDUCTIONS \
    + EDGE_KINDS
# fp32, or int8 as ExecuTorch's XNNPACK quantizer makes it (device/quantize.py.quantize_unit):
# - int8: every op int8, taking and returning int8 (its input's quantize and its output's dequantize removed),
#   as the unit runs inside an int8 region; a model's q/dq sit on its fp32<->int8 edges (EDGE_KINDS units).
# - int8_fp32io: the same unit taking and returning fp32, its own quantize and dequantize included (how int8
#   units were measured before edges were units; summed, they charge a q/dq pair per unit, docs/BENCHMARKS.md).
DTYPES = ("fp32", "int8", "int8_fp32io")
# the unit kinds that have an int8 form (the XNNPACK quantizer annotates them and XNNPACK runs them in int8)
INT8_KINDS = ("conv", "dwconv", "linear", "add", "pool", "mul") + EDGE_KINDS
EDGE_SCALE = 0.05  # quantization parameters of an edge unit: its speed does not depend on them
INT8_CALIBRATION = 16  # random inputs of the unit's shape: a unit's weights are random too


@dataclass(frozen=True, order=True)
class UnitSpec:
    """One fused unit at concrete channel counts. Units are batch-1 NCHW unless `batch` says otherwise."""

    kind: str  # one of UNIT_KINDS
    h: int  # input height (1 for linear)
    w: int  # input width (1 for linear)
    c_in: int
    c_out: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    act: str = "none"  # activation fused after the op (and after BN for convs)
    dtype: str = "fp32"
    batch: int = 1

    def __post_init__(self) -> None:
        if self.kind not in UNIT_KINDS:
            raise AmcError(f"unknown unit kind {self.kind!r}: expected one of {', '.join(UNIT_KINDS)}")
        if self.dtype not in DTYPES:
            raise AmcError(f"unknown unit dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.act not in ACTIVATIONS:
            raise AmcError(f"unknown activation {self.act!r} in a {self.kind} unit: expected one of {', '.join(ACTIVATIONS)}")
        if self.kind in EDGE_KINDS and self.dtype != "int8":
            raise AmcError(f"a {self.kind} unit is an fp32<->int8 edge: its dtype is int8, not {self.dtype!r}")
        if self.dtype != "fp32" and self.kind not in INT8_KINDS:
            raise AmcError(f"a {self.kind} unit has no {self.dtype} form: int8 units are "
                           f"{', '.join(INT8_KINDS)}")
        if min(self.c_in, self.c_out, self.h, self.w, self.stride, self.batch) < 1 or self.kernel < 0:
            raise AmcError(f"unit {self.key()} has a non-positive size")

    def key(self) -> str:
        """A key a person can read, e.g. `conv3x3-s1-p1-g1-in32-out64-hw14x14-relu6-fp32-b1`."""
        return (
            f"{self.kind}{self.kernel}x{self.kernel}-s{self.stride}-p{self.padding}-g{self.groups}"
            f"-in{self.c_in}-out{self.c_out}-hw{self.h}x{self.w}-{self.act}-{self.dtype}-b{self.batch}"
        )

    def shape_key(self) -> tuple:
        """Everything but the channel counts: units that share it form one (c_in, c_out) surface."""
        return (self.kind, self.h, self.w, self.kernel, self.stride, self.padding, self.act, self.dtype, self.batch,
                self.groups == self.c_in and self.kind == "dwconv")

    def with_channels(self, c_in: int, c_out: int) -> "UnitSpec":
        if self.kind in _CHANNEL_KEEPING:
            c_out = c_in  # these keep their channel count
        if self.kind == "dwconv":
            groups = c_in
        elif self.groups > 1:  # a grouped conv is pruned by whole groups: the group width stays
            groups = max(1, c_in // (self.c_in // self.groups))
        else:
            groups = 1
        return replace(self, c_in=c_in, c_out=c_out, groups=groups)

    def output_hw(self) -> tuple[int, int]:
        if self.kind == "linear" or (self.kind == "pool" and self.kernel == 0) or self.kind in REDUCTIONS:
            return 1, 1
        if self.kind in ("add", "gate", "mul", "act", "copy", "bn", "layernorm") + EDGE_KINDS:
            return self.h, self.w
        return ((self.h + 2 * self.padding - self.kernel) // self.stride + 1,
                (self.w + 2 * self.padding - self.kernel) // self.stride + 1)

    def flops(self) -> int:
        """Multiply-accumulates, as the AMC paper counts FLOPs."""
        h_out = (self.h + 2 * self.padding - self.kernel) // self.stride + 1
        w_out = (self.w + 2 * self.padding - self.kernel) // self.stride + 1
        if self.kind in ("conv", "dwconv"):
            return self.batch * h_out * w_out * self.c_out * (self.c_in // self.groups) * self.kernel**2
        if self.kind == "linear":
            return self.batch * self.c_in * self.c_out
        return self.batch * self.h * self.w * self.c_in

    def input_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.batch, self.c_in)
        if self.kind == "layernorm":  # normalises the last dimension: channels-last
            return (self.batch, self.h, self.w, self.c_in)
        return (self.batch, self.c_in, self.h, self.w)

    def build(self, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
        """A module that runs exactly this fused unit, and an example input for it."""
        gen = torch.Generator().manual_seed(seed)
        if self.kind in EDGE_KINDS:
            return _edge_unit(self, gen)
        module = _UNIT_BUILDERS[self.kind](self)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1, generator=gen)
                    m.running_var.uniform_(0.5, 1.5, generator=gen)
        x = torch.randn(self.input_shape(), generator=gen)
        if self.dtype != "fp32":
            from device.quantize import quantize_unit

            calib = torch.randn((INT8_CALIBRATION, *self.input_shape()[1:]), generator=gen)
            # no delegation check: a unit lowered with portable int8 ops fails in the runner, with its reason
            return quantize_unit(module.eval(), x, calib, int8_io=self.dtype == "int8")
        return module.eval(), x

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UnitSpec":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise AmcError(f"unknown unit field(s) {sorted(unknown)}")
        return cls(**{k: (v if k in ("kind", "act", "dtype") else int(v)) for k, v in d.items()})


class _ConvUnit(nn.Module):
    def __init__(self, s: UnitSpec):
        super().__init__()
        self.conv = nn.Conv2d(s.c_in, s.c_out, s.kernel, s.stride, s.padding, groups=s.groups, bias=False)
        self.bn = nn.BatchNorm2d(s.c_out)
        self.act = ACTIVATIONS[s.act]()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _LinearUnit(nn.Module):
    def __init__(self, s: UnitSpec):
        super().__init__()
        self.fc = nn.Linear(s.c_in, s.c_out)
        self.act = ACTIVATIONS[s.act]()

    def forward(self, x):
        return self.act(self.fc(x))


class _AddUnit(nn.Module):
    """A residual add. Both operands are the one input, so the unit is a single add kernel."""

    def __init__(self, s: UnitSpec):
        super().__init__()
        self.act = ACTIVATIONS[s.act]()

    def forward(self, x):
        return self.act(x + x)


class _PoolUnit(nn.Module):
    """Global average pool (kernel 0) or a max pool with the unit's kernel and stride."""

    def __init__(self, s: UnitSpec):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if s.kernel == 0 else nn.MaxPool2d(s.kernel, s.stride, s.padding)

    def forward(self, x):
        return self.pool(x)


class _ReduceUnit(nn.Module):
    """`x.mean((2, 3))` / `sum` / `amax` exactly as the model writes it (keepdim = kernel)."""

    def __init__(self, s: UnitSpec):
        super().__init__()
        self.op, self.keepdim = s.kind, bool(s.kernel)

    def forward(self, x):
        return getattr(x, self.op)((2, 3), keepdim=self.keepdim)


class _LayerNormUnit(nn.Module):
    """A LayerNorm over the channels of a channels-last [N, H, W, C] map (with its scale and shift)."""

    def __init__(self, s: UnitSpec):
        super().__init__()
        self.norm = nn.LayerNorm(s.c_in)

    def forward(self, x):
        return self.norm(x)


class _AvgPoolUnit(nn.Module):
    def __init__(self, s: UnitSpec):
        super().__init__()
        self.pool = nn.AvgPool2d(s.kernel, s.stride, s.padding)

    def forward(self, x):
        return self.pool(x)


class _GateUnit(nn.Module):
    """Squeeze-excite's gate: the map times a per-channel [1, C, 1, 1] factor."""

    def __init__(self, s: UnitSpec):
        super().__init__()
        self.gate = nn.Parameter(torch.ones(1, s.c_in, 1, 1))

    def forward(self, x):
        return x * self.gate


class _MulUnit(nn.Module):
    """An element-wise product of two maps of one shape (x * sigmoid(x) and the like): one mul kernel."""

    def __init__(self, s: UnitSpec):
        super().__init__()

    def forward(self, x):
        return x * x


class _ActUnit(nn.Module):
    """An activation that no conv, linear or add absorbs."""

    def __init__(self, s: UnitSpec):
        super().__init__()
        self.act = ACTIVATIONS[s.act]()

    def forward(self, x):
        return self.act(x)


class _CopyUnit(nn.Module):
    """Data movement of every element (a concatenation, a channel shuffle's transpose): measured as the
    transpose of a map's two spatial axes, a copy of the same size the runtime cannot elide."""

    def __init__(self, s: UnitSpec):
        super().__init__()

    def forward(self, x):
        return x.transpose(2, 3).contiguous()


class _BatchNormUnit(nn.Module):
    """A batch norm that follows no conv (e.g. after a concatenation): scale and shift per channel."""

    def __init__(self, s: UnitSpec):
        super().__init__()
        self.bn = nn.BatchNorm2d(s.c_in)

    def forward(self, x):
        return self.bn(x)


class _EdgeUnit(nn.Module):
    """The q or dq on an fp32<->int8 edge: fp32 -> int8 (quantize) or int8 -> fp32 (dequantize), per tensor,
    with the quantizer's int8 range; XNNPACK runs either as one convert kernel."""

    def __init__(self, s: UnitSpec):
        super().__init__()
        self.kind = s.kind

    def forward(self, x):
        op = torch.ops.quantized_decomposed.quantize_per_tensor if self.kind == "quantize" else \
            torch.ops.quantized_decomposed.dequantize_per_tensor
        return op(x, EDGE_SCALE, 0, -128, 127, torch.int8)


def _edge_unit(s: UnitSpec, gen: torch.Generator) -> tuple[nn.Module, torch.Tensor]:
    import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

    x = torch.randn(s.input_shape(), generator=gen)
    if s.kind == "dequantize":
        x = torch.randint(-128, 128, s.input_shape(), generator=gen, dtype=torch.int8)
    return _EdgeUnit(s).eval(), x


_UNIT_BUILDERS = {"conv": _ConvUnit, "dwconv": _ConvUnit, "linear": _LinearUnit, "add": _AddUnit, "pool": _PoolUnit,
                  "avgpool": _AvgPoolUnit, "gate": _GateUnit, "mul": _MulUnit, "act": _ActUnit, "copy": _CopyUnit,
                  "bn": _BatchNormUnit, "layernorm": _LayerNormUnit, **{k: _ReduceUnit for k in REDUCTIONS}}
