"""A unit must run what the model runs: the same ops, delegated to XNNPACK or left to the portable kernels
alike. A unit that the runtime executes differently from the model's op (a `mean` without keepdim, which
ExecuTorch 1.4.1 leaves to the portable kernel, measured as the global pool XNNPACK runs 11x faster) puts
a wrong number into every prediction of that model."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from amc_mobile.pruning import build_graph


def _outside_delegates(module: nn.Module, x: torch.Tensor) -> Counter:
    """The ops the lowered program runs outside the XNNPACK delegates (portable kernels)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(module.eval(), (x,), strict=False)
    graph = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).exported_program().graph
    names = (getattr(n.target, "__name__", str(n.target)) for n in graph.nodes if n.op == "call_function")
    return Counter(n for n in names if "delegate" not in n and n != "getitem")


class _Reduced(nn.Module):
    input_shape = (8, 6, 6)

    def __init__(self, op: str, keepdim: bool):
        super().__init__()
        self.op, self.keepdim = op, keepdim
        self.conv = nn.Conv2d(8, 16, 1)

    def forward(self, x):
        return getattr(self.conv(x), self.op)((2, 3), keepdim=self.keepdim)


def _reduction_unit(model):
    (unit,) = [u for u in build_graph(model).units if u.spec.kind not in ("conv", "dwconv", "linear")]
    return unit.spec


@pytest.mark.parametrize("keepdim", [False, True])
def test_a_spatial_mean_is_keyed_by_how_it_is_written(keepdim):
    spec = _reduction_unit(_Reduced("mean", keepdim))
    assert spec.key().startswith("mean1x1-" if keepdim else "mean0x0-")
    assert (spec.c_in, spec.h, spec.w) == (16, 6, 6)
    module, x = spec.build()
    assert module(x).shape == ((1, 16, 1, 1) if keepdim else (1, 16))


@pytest.mark.slow
@pytest.mark.parametrize("keepdim", [False, True])
def test_a_mean_unit_lowers_to_the_ops_the_model_lowers_to(keepdim):
    model = _Reduced("mean", keepdim).eval()
    in_model = _outside_delegates(model, torch.randn(1, 8, 6, 6))
    assert ("aten.mean.dim" in in_model) == (not keepdim)  # the runtime fact the unit has to follow
    spec = _reduction_unit(model)
    module, x = spec.build()
    assert _outside_delegates(module, x) == in_model


class _ChannelsLastNorm(nn.Module):
    input_shape = (8, 5, 5)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 1)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 24)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x).permute(0, 2, 3, 1)))


def test_a_channels_last_layernorm_is_a_unit_at_its_channel_count_and_its_group_stays_fixed():
    graph = build_graph(_ChannelsLastNorm())
    (unit,) = [u for u in graph.units if u.spec.kind == "layernorm"]
    assert unit.spec.key() == "layernorm1x1-s1-p0-g1-in16-out16-hw5x5-none-fp32-b1"
    assert "LayerNorm" in graph.groups[unit.in_group].fixed_reason
    module, x = unit.spec.build()
    assert x.shape == (1, 5, 5, 16)
    torch.testing.assert_close(module(x), nn.functional.layer_norm(x, (16,), module.norm.weight, module.norm.bias))


@pytest.mark.slow
def test_a_layernorm_unit_lowers_to_the_ops_the_model_runs_for_it():
    model = _ChannelsLastNorm().eval()
    in_model = _outside_delegates(model, torch.randn(1, 8, 5, 5))
    (unit,) = [u for u in build_graph(model).units if u.spec.kind == "layernorm"]
    module, x = unit.spec.build()
    in_unit = _outside_delegates(module, x)
    assert not in_unit - in_model  # nothing the model delegates runs on the portable kernels in the unit
    assert any("layer_norm" in op for op in in_model) == any("layer_norm" in op for op in in_unit)
