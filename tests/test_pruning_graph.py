"""The dependency graph and physical slicing, on every built-in family and on hand-made edge cases."""

import pytest
import torch
from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.models import build_model, model_config
from amc_mobile.pruning import (build_graph, input_channel_importance, load_pruned, prune_by_counts, prune_model,
                                require_prunable, save_pruned, top_channels)

# name -> AMC prunable layers (layers whose input channels are free to prune)
EXPECTED_PRUNABLE = {"mobilenet_v1": 14, "mobilenet_v2": 20, "resnet20": 9, "resnet56": 27, "plain20": 19, "vgg16": 13}


@pytest.mark.parametrize("name", sorted(EXPECTED_PRUNABLE))
def test_graph_counts_match_model(name):
    model = build_model(name)
    graph = build_graph(model)
    assert len(graph.prunable_layers) == EXPECTED_PRUNABLE[name]
    assert graph.params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(EXPECTED_PRUNABLE))
def test_half_width_prune_roundtrips(name, tmp_path):
    model = build_model(name).eval()
    graph = build_graph(model)
    channels = {l.in_group: max(1, graph.groups[l.in_group].size // 2) for l in graph.prunable_layers}
    pruned = prune_by_counts(model, graph, channels)
    x = torch.randn(2, *model.input_shape)
    y = pruned(x)
    assert y.shape == (2, 10)
    # The graph predicts the pruned model's cost without building it.
    assert build_graph(pruned).flops() == graph.flops(channels) < graph.flops()
    save_pruned(pruned, tmp_path, model_config(model), channels)
    loaded, spec = load_pruned(tmp_path)
    assert torch.allclose(loaded(x), y, atol=1e-5)
    assert spec["format"] == "amc-mobile-pruned/1"


def test_residual_channels_are_fixed_and_expansions_free():
    graph = build_graph(build_model("mobilenet_v2"))
    reasons = {g.fixed_reason for g in graph.groups.values()}
    assert {"network input", "network output", "tied by a residual add"} <= reasons
    names = [l.name for l in graph.prunable_layers]
    assert "blocks.2.project.conv" in names  # its input = block 2's expansion channels
    # an expansion group holds expand conv out, dw, both BNs and project conv in
    roles = sorted(r for _, r in graph.groups[graph.prunable_layers[3].in_group].members)
    assert roles == ["bn", "bn", "conv_in", "conv_out", "dw"]


def test_pruning_keeps_the_largest_magnitude_channels():
    model = build_model("vgg16").eval()
    graph = build_graph(model)
    layer = graph.prunable_layers[0]
    score = input_channel_importance(model, graph, layer.in_group)
    # AMC's criterion, computed here from the consumer's weights: |W| summed over outputs and kernel
    consumer = dict(model.named_modules())[layer.name]
    torch.testing.assert_close(score, consumer.weight.detach().abs().sum(dim=(0, 2, 3)))
    keep = top_channels(score, 8)
    largest = sorted(range(len(score)), key=lambda i: -float(score[i]))[:8]
    assert keep.tolist() == sorted(largest)  # exactly the 8 largest, in channel order
    pruned = prune_by_counts(model, graph, {layer.in_group: 8})
    torch.testing.assert_close(dict(pruned.named_modules())[layer.name].weight, consumer.weight[:, keep])


def test_pruning_a_fixed_group_is_refused():
    model = build_model("resnet20")
    graph = build_graph(model)
    fixed = next(g for g in graph.groups.values() if g.fixed_reason == "tied by a residual add")
    with pytest.raises(AmcError, match="residual"):
        prune_model(model, graph, {fixed.id: torch.arange(fixed.size - 1)})


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.input_shape = (3, 8, 8)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class _Lstm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.rnn = nn.GRU(8, 8)
        self.input_shape = (3, 8, 8)

    def forward(self, x):
        return self.rnn(self.conv(x).flatten(2).permute(2, 0, 1))[0]


class _NoPrunable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)
        self.input_shape = (12,)

    def forward(self, x):
        return self.fc(x)


def test_unfollowable_patterns_fix_their_channels_with_the_reason():
    # a concatenation straight into the output: both convs' channels are the network's output
    graph = build_graph(_Cat())
    assert [g.fixed_reason for g in graph.groups.values() if ("a", "conv_out") in g.members] == ["network output"]
    # an op never seen (a GRU) fixes the conv before it and says why; nothing is left to prune
    graph = build_graph(_Lstm())
    conv = next(g for g in graph.groups.values() if ("conv", "conv_out") in g.members)
    assert "GRU" in conv.fixed_reason and any("GRU" in u for u in graph.unfollowed)
    with pytest.raises(AmcError, match="no prunable layers"):
        require_prunable(graph)


def test_no_prunable_layers_is_a_clear_error():
    graph = build_graph(_NoPrunable())
    with pytest.raises(AmcError, match="no prunable layers"):
        require_prunable(graph)


def test_corrupt_pruned_folder_is_a_clear_error(tmp_path):
    with pytest.raises(AmcError, match="not a pruned model"):
        load_pruned(tmp_path)
    model = build_model("resnet20").eval()
    graph = build_graph(model)
    layer = graph.prunable_layers[0]
    pruned = prune_by_counts(model, graph, {layer.in_group: 8})
    save_pruned(pruned, tmp_path, model_config(model))
    torch.save(model.state_dict(), tmp_path / "model.pt")  # unpruned weights, pruned spec
    with pytest.raises(AmcError, match="does not match"):
        load_pruned(tmp_path)


def test_decoupled_scope_makes_every_unit_depend_on_one_group():
    graph = build_graph(build_model("mobilenet_v2"))
    chosen = set(graph.decision_groups("decoupled"))
    assert len(chosen) == 18  # stem, 16 expansions, head
    for u in graph.units:
        assert len({u.in_group, u.out_group} & chosen) <= 1
    assert [l.in_group for l in graph.decision_layers("decoupled")] == graph.decision_groups("decoupled")
    with pytest.raises(AmcError, match="unknown channel scope"):
        graph.decision_groups("some")
