"""Our channel groups against an independent reference: Torch-Pruning's dependency graph (a dev-only
dependency). For every output channel of every conv (not depthwise or grouped) and linear, the set of
conv/linear output channels pruned with it must be the same in both, except where we prune differently
by design (docs/ARCHITECTURE.md, "Channel groups against Torch-Pruning"):

- a grouped conv's input channels: we tie each conv group into one unit (whole groups are pruned, the
  group width stays); Torch-Pruning couples channel i of the producer to channel i alone;
- ShuffleNet-V2's view-transpose-view shuffle: Torch-Pruning 1.6.1 cannot build its graph (a division by
  zero in its reshape index mapping); we follow it exactly.

Which coupled sets are *fixed* (residual adds, LayerNorm, the network input and output) is our policy, not
a coupling question, and is not compared here.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

from amc_mobile.models import build_model
from amc_mobile.pruning import build_graph
from pattern_nets import PATTERN_NETS, randomise_bn

tp = pytest.importorskip("torch_pruning")

_OUT_ROLES = ("conv_out", "linear_out", "gconv_out")


def _plain(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _ours(graph) -> dict[tuple[str, int], frozenset]:
    """(module, output channel) -> the conv/linear output channels in the same (group, index)."""
    key = {}
    for s in graph.sites:
        if s.role in _OUT_ROLES:
            for i, gk in enumerate(zip(s.group.tolist(), s.index.tolist())):
                key[(s.module, i)] = gk
    members = defaultdict(set)
    for ch, gk in key.items():
        members[gk].add(ch)
    return {ch: frozenset(members[gk]) for ch, gk in key.items()}


def _theirs(model: nn.Module, x: torch.Tensor) -> dict[tuple[str, int], frozenset]:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    names = {m: n for n, m in model.named_modules()}
    out_handlers = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
    sets = {}
    for name, m in model.named_modules():
        if not _plain(m):
            continue
        handler = tp.prune_conv_out_channels if isinstance(m, nn.Conv2d) else tp.prune_linear_out_channels
        for i in range(m.weight.shape[0]):
            coupled = set()
            for dep, idxs in dg.get_pruning_group(m, handler, idxs=[i]):
                target = dep.target.module
                if dep.handler in out_handlers and _plain(target):
                    coupled |= {(names[target], int(j)) for j in idxs}
            sets[(name, i)] = frozenset(coupled)
    return sets


def _differences(model: nn.Module) -> dict[tuple[str, int], tuple[frozenset, frozenset]]:
    model.eval()
    graph = build_graph(model)
    theirs = _theirs(model, torch.randn(1, *graph.input_shape))
    ours = _ours(graph)
    diff = {}
    for ch, t in theirs.items():
        o = frozenset(c for c in ours[ch] if c in theirs)  # both restricted to plain convs and linears
        if o != t:
            diff[ch] = (o, t)
    return diff


@pytest.mark.parametrize("name", sorted(set(PATTERN_NETS) - {"shufflenet_v2", "resnext_block"}))
def test_pattern_network_groups_agree_with_torch_pruning(name):
    torch.manual_seed(0)
    assert _differences(randomise_bn(PATTERN_NETS[name](in_ch=1, size=28))) == {}


def test_a_grouped_conv_input_is_the_one_explained_difference():
    torch.manual_seed(0)
    model = PATTERN_NETS["resnext_block"](in_ch=1)
    diff = _differences(model)
    assert {m for m, _ in diff} == {"reduce.0"}  # the producer of the grouped conv's input, nothing else
    width = model.grouped[0].in_channels // model.grouped[0].groups
    for (m, i), (ours, theirs) in diff.items():
        assert theirs == {(m, i)}  # Torch-Pruning: the channel alone
        assert ours == {(m, j) for j in range(i // width * width, (i // width + 1) * width)}  # we: its conv group


def test_torch_pruning_cannot_build_the_shufflenet_graph_we_follow():
    """If a later Torch-Pruning builds it, compare ShuffleNet too (and drop this test)."""
    model = PATTERN_NETS["shufflenet_v2"](in_ch=1, size=28).eval()
    build_graph(model)
    with pytest.raises(ZeroDivisionError):
        _theirs(model, torch.randn(1, 1, 28, 28))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet20", "mobilenet_v1", "plain20", "vgg16"])
def test_builtin_family_groups_agree_with_torch_pruning(name):
    torch.manual_seed(0)
    assert _differences(build_model(name)) == {}
