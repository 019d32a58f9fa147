"""Channel selection + least-squares reconstruction (3x3 conv, 1x1 conv, linear) and the cached builder."""

import pytest
import torch
import torch.nn.functional as F

from amc_mobile.pruning import build_graph, prune_by_counts
from amc_mobile.search.reconstruct import (ChannelSelector, PrunedModelBuilder, Reconstructor, _conv_points,
                                           collect_layer_stats)

from _search_helpers import TinyNet, cached_tiny, fashion


@pytest.fixture(scope="module")
def setup(request):
    data = fashion()
    model = cached_tiny(request, data)
    graph = build_graph(model)
    layers = graph.decision_layers("all")
    assert [l.name for l in layers] == ["conv1", "conv2", "fc"]  # 3x3, 1x1, linear
    calib = data.train.images[:400]
    held_out = data.train.images[-300:]
    stats = collect_layer_stats(model, graph, [l.in_group for l in layers], calib, points=10, seed=0)
    rec = Reconstructor(stats, ChannelSelector(model, graph), dict(model.named_modules()))
    return model, graph, layers, rec, held_out, data


def _layer_io(model, name, x):
    """(input, output) of module `name` on images x, from the original model."""
    mod = dict(model.named_modules())[name]
    seen = {}
    h = mod.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), y=o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return mod, seen["x"], seen["y"]


def _apply(mod, x, w):
    if isinstance(mod, torch.nn.Conv2d):
        return F.conv2d(x, w, mod.bias, mod.stride, mod.padding)
    return F.linear(x, w, mod.bias)


def test_patch_sampling_matches_unfold():
    conv = torch.nn.Conv2d(5, 7, 3, stride=2, padding=1)
    x = torch.randn(4, 5, 9, 9)
    y = conv(x).detach()
    X, Y = _conv_points(conv, x, y, 6, torch.Generator().manual_seed(0))
    cols = F.unfold(x, 3, padding=1, stride=2)  # (4, 45, 25)
    flat = cols.permute(0, 2, 1).reshape(-1, 45)
    # every sampled row is one of the unfolded patches, and the outputs are the conv at that patch
    for i in range(X.shape[0]):
        assert (flat - X[i]).abs().sum(1).min() < 1e-5
    w = conv.weight.detach().reshape(7, -1)
    torch.testing.assert_close(X @ w.T, Y, atol=1e-5, rtol=1e-5)  # Y is the output without the bias
    assert X.shape == (24, 45)


def test_keeping_all_channels_reproduces_the_original(setup):
    model, graph, layers, rec, held_out, _ = setup
    for layer in layers:
        mod, x, y = _layer_io(model, layer.name, held_out)
        w = rec.weight(layer.name, layer.c_in)
        assert w.shape == mod.weight.shape
        err = (_apply(mod, x, w) - y).norm() / y.norm()
        assert err < 1e-4, (layer.name, float(err))


def test_reconstruction_beats_plain_slicing(setup):
    model, graph, layers, rec, held_out, _ = setup
    sel = rec.selector
    for layer in layers:
        mod, x, y = _layer_io(model, layer.name, held_out)  # images the fit never saw
        for frac in (0.25, 0.5):
            kept = max(8, int(layer.c_in * frac) // 8 * 8)
            idx = sel.indices(layer.in_group, kept)
            xk = x.index_select(1, idx)
            plain = mod.weight.detach().index_select(1, idx)
            e_plain = (_apply(mod, xk, plain) - y).norm()
            e_rec = (_apply(mod, xk, rec.weight(layer.name, kept)) - y).norm()
            assert e_rec < 0.9 * e_plain, (layer.name, kept, float(e_rec), float(e_plain))


def test_solutions_are_cached_per_layer_and_count(setup):
    model, graph, layers, rec, _, _ = setup
    before = rec.solves
    a = rec.weight("conv2", 16)
    b = rec.weight("conv2", 16)
    assert a is b and rec.solves <= before + 1
    assert rec.weight("conv2", 24) is not a


def test_builder_matches_slicing_and_leaves_the_original_alone(setup):
    model, graph, layers, rec, held_out, data = setup
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    channels = {l.in_group: 16 for l in layers}
    x = held_out[:64]
    plain = PrunedModelBuilder(model, graph).build(channels)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), prune_by_counts(model, graph, channels)(x))
        built = PrunedModelBuilder(model, graph, rec)
        pruned = built.build(channels)
        folded = built.build(channels, fast=True)
        torch.testing.assert_close(folded(x), pruned(x), atol=1e-4, rtol=1e-4)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert dict(pruned.named_modules())["conv2"].weight.shape == (16, 16, 1, 1)  # in and out pruned
        assert dict(pruned.named_modules())["fc"].weight.shape == (10, 16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # reconstruction helps the whole network, not only each layer: accuracy on held-out val images
    from amc_mobile.search.score import evaluate_split

    val = data.val.subset(1000)
    acc_plain, _ = evaluate_split(plain, val)
    acc_rec, _ = evaluate_split(pruned, val)
    assert acc_rec > acc_plain


def test_memory_budget_leaves_big_layers_to_plain_slicing():
    model = TinyNet().eval()
    graph = build_graph(model)
    groups = graph.decision_groups("all")
    stats = collect_layer_stats(model, graph, groups, torch.randn(8, 1, 28, 28), max_mb=0.7)
    # conv1 (24*9=216 columns) fits in 0.7 MB of normal equations, conv2 (48 columns) and fc (64) too; shrink further
    assert set(stats) == {"conv1", "conv2", "fc"}
    stats = collect_layer_stats(model, graph, groups, torch.randn(8, 1, 28, 28), max_mb=0.05)
    assert "conv1" not in stats and "conv2" in stats
