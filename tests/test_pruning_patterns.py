"""The pruning graph on networks of the shapes users bring: squeeze-excite, hard-swish / SiLU, `mean`
heads, flatten into a linear, concatenation, split and channel shuffle, grouped convs, channels-last
LayerNorm + MLP. For each: the groups the analysis finds, and physical pruning that computes what
the masked original computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.pruning import build_graph, prune_model, require_prunable
from amc_mobile.pruning.slicing import checked_keep, input_channel_importance, top_channels
from amc_mobile.search.cost import FlopsCost, ParamsCost
from pattern_nets import PATTERN_NETS, randomise_bn

NAMES = sorted(PATTERN_NETS)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(PATTERN_NETS[name]())


def _random_keep(graph, rng) -> dict[int, torch.Tensor]:
    keep = {}
    for g in graph.groups.values():
        if g.prunable and g.size > 1:
            k = int(rng.integers(1, g.size))
            keep[g.id] = torch.from_numpy(np.sort(rng.choice(g.size, k, replace=False))).long()
    return keep


def _masked(model: nn.Module, graph, keep) -> nn.Module:
    """The original with every pruned channel's consumer weights zeroed: what the pruned model must equal."""
    import copy

    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    sizes = {g: grp.size for g, grp in graph.groups.items()}
    with torch.no_grad():
        for site in graph.sites:
            if site.role not in ("conv_in", "linear_in"):  # a grouped conv's dropped groups are dropped downstream
                continue
            pos = site.kept_positions(keep, sizes)
            if pos is None:
                continue
            drop = torch.ones(len(site.group), dtype=torch.bool)
            drop[pos] = False
            modules[site.module].weight[:, drop] = 0.0
    return masked.eval()


@pytest.mark.parametrize("name", NAMES)
def test_every_pattern_network_has_prunable_groups_and_a_full_unit_list(name):
    model = _model(name)
    graph = build_graph(model)
    layers = require_prunable(graph)
    assert layers, name
    assert not graph.unfollowed, graph.unfollowed
    # the graph's FLOPs are the convs' and linears' MACs of the model at full width
    macs = 0
    hooks = []

    def count(mod, inp, out):
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            macs += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            macs += out.numel() * mod.in_features

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(count))
    model(torch.zeros(1, *model.input_shape))
    for h in hooks:
        h.remove()
    unit_macs = sum(u.spec.flops() for u in graph.units if u.spec.kind in ("conv", "dwconv", "linear"))
    assert unit_macs == macs
    # every unit's channel counts follow its groups exactly at full width
    full = graph.full_channels()
    for u in graph.units:
        assert u.at(full) == u.spec


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_model_computes_what_the_masked_original_computes(name, seed):
    model = _model(name)
    graph = build_graph(model)
    rng = np.random.default_rng(seed)
    keep = _random_keep(graph, rng)
    assert keep, "nothing to prune"
    pruned = prune_model(model, graph, keep).eval()
    x = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = _masked(model, graph, keep)(x)
        got = pruned(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and the pruned model is smaller exactly as the graph's cost model says
    channels = {g: len(idx) for g, idx in keep.items()}
    n_params = sum(p.numel() for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                   for p in [m.weight])
    assert n_params < sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    flops = FlopsCost(graph)
    assert flops.predict(channels) == pytest.approx(
        float(np.sum(flops.reference_unit_costs(channels))), rel=1e-9)
    assert ParamsCost(graph).predict(channels) < ParamsCost(graph).full_cost


def test_squeeze_excite_ties_the_gate_to_the_gated_channels():
    graph = build_graph(_model("mobilenet_v3_small"))
    exp = next(g for g in graph.groups.values() if ("blocks.0.dw.0", "dw") in g.members)
    assert exp.prunable and exp.size == 32
    roles = {(m, r) for m, r in exp.members}
    assert ("blocks.0.se.reduce", "conv_in") in roles and ("blocks.0.se.expand", "conv_out") in roles
    hidden = next(g for g in graph.groups.values() if ("blocks.0.se.reduce", "conv_out") in g.members)
    assert hidden.prunable and hidden.id != exp.id and hidden.size == 8
    kinds = [u.spec.kind for u in graph.units]
    assert "gate" in kinds and "pool" in kinds
    assert {u.spec.act for u in graph.units} >= {"hardswish", "hardsigmoid"}


def test_grouped_conv_prunes_whole_groups():
    model = _model("resnext_block")
    graph = build_graph(model)
    g = next(g for g in graph.groups.values() if ("grouped.0", "gconv_in") in g.members)
    assert g.prunable and g.size == 4  # cardinality 4: a whole group of 16 channels per atom
    unit = next(u for u in graph.units if u.name == "grouped.0")
    assert (unit.in_coef, unit.out_coef) == (16, 16)
    pruned = prune_model(model, graph, {g.id: torch.tensor([0, 2])})
    conv = dict(pruned.named_modules())["grouped.0"]
    assert (conv.in_channels, conv.out_channels, conv.groups) == (32, 32, 2)
    assert unit.at({g.id: 2}).groups == 2 and unit.at({g.id: 2}).c_in == 32


def test_flatten_into_a_linear_follows_each_channel_over_its_map():
    model = _model("resnet_mean_head")
    graph = build_graph(model)
    aux = next(u for u in graph.units if u.name == "aux")
    assert aux.in_coef == 16 and graph.groups[aux.in_group].prunable
    pruned = prune_model(model, graph, {aux.in_group: torch.arange(10)})
    assert dict(pruned.named_modules())["aux"].in_features == 160


def test_layernorm_over_channels_fixes_them_but_the_mlp_hidden_width_is_prunable():
    graph = build_graph(_model("channels_last_mlp"))
    reasons = [g.fixed_reason or "" for g in graph.groups.values()]
    assert any("LayerNorm" in r for r in reasons)
    hidden = next(g for g in graph.groups.values() if ("pw1", "linear_out") in g.members)
    assert hidden.prunable and hidden.size == 96
    assert next(u for u in graph.units if u.name == "pw1").spec.batch == 16  # 4x4 positions


def test_shuffle_split_and_cat_are_followed_exactly():
    model = _model("shufflenet_v2")
    graph = build_graph(model)
    kinds = [u.spec.kind for u in graph.units]
    assert kinds.count("copy") == 6  # three cats and three shuffles
    # the branch widths are free; what crosses a shuffle is tied exactly, never guessed
    branch = [g for g in graph.groups.values() if g.prunable and any(m.endswith("right.1.0") for m, _ in g.members)]
    assert len(branch) == 3


def test_importance_is_per_channel_of_the_group():
    model = _model("densenet")
    graph = build_graph(model)
    for g in graph.groups.values():
        if g.prunable:
            s = input_channel_importance(model, graph, g.id)
            assert s.shape == (g.size,) and bool((s > 0).all())
            assert len(top_channels(s, max(1, g.size // 2))) == max(1, g.size // 2)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.input_shape = (3, 8, 8)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


class _Unknown(nn.Module):
    """An op the graph has never seen (a GRU) after a conv, and a prunable part before it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.rnn = nn.GRU(8, 8)
        self.input_shape = (3, 8, 8)

    def forward(self, x):
        return self.rnn(self.b(self.a(x)).flatten(2).permute(2, 0, 1))[0]


class _AllFixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.input_shape = (3, 8, 8)

    def forward(self, x):
        return self.conv(x).softmax(1)


def test_untraceable_model_is_a_one_line_error():
    with pytest.raises(AmcError, match="cannot be traced.*control flow"):
        build_graph(_DataDependent())


def test_unknown_op_fixes_what_it_touches_and_says_why():
    graph = build_graph(_Unknown())
    assert any("GRU" in u for u in graph.unfollowed)
    a = next(g for g in graph.groups.values() if ("a", "conv_out") in g.members)
    b = next(g for g in graph.groups.values() if ("b", "conv_out") in g.members)
    assert a.prunable
    assert not b.prunable and "GRU" in b.fixed_reason
    with pytest.raises(AmcError, match="may not be pruned.*GRU"):
        checked_keep(graph, {b.id: torch.arange(4)})


def test_a_model_with_every_group_fixed_says_so():
    graph = build_graph(_AllFixed())
    with pytest.raises(AmcError, match="no prunable layers"):
        require_prunable(graph)


def test_inspect_cli_on_a_user_model_file(tmp_path, capsys):
    import json
    import shutil
    from pathlib import Path

    from amc_mobile.cli import main

    src = tmp_path / "my_nets.py"  # a file outside the package, as a user has it
    shutil.copy(Path(__file__).with_name("pattern_nets.py"), src)
    assert main(["inspect", f"{src}:MobileNetV3Small"]) == 0
    out = capsys.readouterr().out
    assert "prunable channel groups (8;" in out and "tied by a residual add" in out
    assert "gate1x1-s1-p0-g1-in32-out32-hw16x16-none-fp32-b1" in out
    assert main(["inspect", f"{src}:ResNeXtBlockNet", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    grouped = next(u for u in rep["units"] if u["unit"] == "grouped.0")
    assert grouped["c_in"] == "16*g2"
    assert main(["inspect", f"{src}:Missing"]) == 2
    assert "has no callable 'Missing'" in capsys.readouterr().err
    assert main(["inspect", f"{tmp_path / 'nope.py'}:f"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.py").write_text("def f():\n    return 3\n\ndef g():\n    raise ValueError('no weights here')\n")
    assert main(["inspect", f"{tmp_path / 'bad.py'}:f"]) == 2
    assert "returned a int, not an nn.Module" in capsys.readouterr().err
    assert main(["inspect", f"{tmp_path / 'bad.py'}:g"]) == 2
    assert "raised ValueError: no weights here" in capsys.readouterr().err


def test_pruned_user_model_is_saved_and_rebuilt_without_pickle(tmp_path):
    import shutil
    from pathlib import Path

    from amc_mobile.model_io import load_factory
    from amc_mobile.models import model_config
    from amc_mobile.pruning import load_pruned, prune_by_counts, save_pruned

    src = tmp_path / "user_nets.py"
    shutil.copy(Path(__file__).with_name("pattern_nets.py"), src)
    model = randomise_bn(load_factory(f"{src}:ResNeXtBlockNet"))
    graph = build_graph(model)
    channels = {g.id: max(1, g.size // 2) for g in graph.groups.values() if g.prunable}
    pruned = prune_by_counts(model, graph, channels).eval()
    save_pruned(pruned, tmp_path / "pruned", model_config(model), channels)
    assert "factory" in (tmp_path / "pruned" / "architecture.json").read_text()
    again, spec = load_pruned(tmp_path / "pruned")
    x = torch.randn(2, *model.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned(x))
    src.write_text(src.read_text() + "\n# edited\n")
    with pytest.raises(AmcError, match="changed since this model was saved"):
        load_pruned(tmp_path / "pruned")


def test_model_options_weights_kwargs_and_input_shape(tmp_path, capsys):
    from amc_mobile.cli import main
    from amc_mobile.model_io import ModelOptions, load_model

    src = tmp_path / "nets.py"
    src.write_text("from torch import nn\n"
                   "class Net(nn.Module):\n"
                   "    def __init__(self, width=8):\n"
                   "        super().__init__()\n"
                   "        self.a = nn.Conv2d(3, width, 3)\n"
                   "        self.b = nn.Conv2d(width, 4, 1)\n"
                   "    def forward(self, x):\n"
                   "        return self.b(self.a(x)).mean((2, 3))\n")
    ref = f"{src}:Net"
    m = load_model(ref, options=ModelOptions({"width": 6}, None, (3, 8, 8))).module
    assert m.a.out_channels == 6 and m.input_shape == (3, 8, 8)
    good = tmp_path / "w.pt"
    torch.save(m.state_dict(), good)
    again = load_model(ref, options=ModelOptions({"width": 6}, str(good), (3, 8, 8))).module
    torch.testing.assert_close(again.a.weight, m.a.weight)
    assert main(["inspect", ref, "--input-shape", "3,8,8", "--model-kwargs", '{"width": 6}', "--weights",
                 str(good)]) == 0
    capsys.readouterr()
    # weights of another width: every mismatch named, in one line
    assert main(["inspect", ref, "--input-shape", "3,8,8", "--weights", str(good)]) == 2
    err = capsys.readouterr().err
    assert "mis-shaped" in err and "a.weight (6, 3, 3, 3) vs (8, 3, 3, 3)" in err and err.count("\n") == 1
    torch.save({"state_dict": {"a.weight": m.a.weight}}, tmp_path / "partial.pt")
    assert main(["inspect", ref, "--input-shape", "3,8,8", "--model-kwargs", '{"width": 6}', "--weights",
                 str(tmp_path / "partial.pt")]) == 2
    assert "3 missing: a.bias, b.weight, b.bias" in capsys.readouterr().err
    assert main(["inspect", ref]) == 2
    assert "no `input_shape`" in capsys.readouterr().err
    for bad, msg in ((["--input-shape", "3,x"], "positive integers"), (["--model-kwargs", "[1]"], "JSON object"),
                     (["--model-kwargs", "{"], "is not JSON"), (["--weights", str(tmp_path / "none.pt")], "no such file")):
        assert main(["inspect", ref, "--input-shape", "3,8,8", *bad] if bad[0] != "--input-shape" else
                    ["inspect", ref, *bad]) == 2
        assert msg in capsys.readouterr().err
    (tmp_path / "pickled.pt").write_bytes(b"\x80\x04junk")
    assert main(["inspect", ref, "--input-shape", "3,8,8", "--weights", str(tmp_path / "pickled.pt")]) == 2
    assert "without pickle" in capsys.readouterr().err


@pytest.mark.parametrize("name", NAMES)
def test_reconstruction_builds_every_pattern_network(name):
    """The search's path: normal equations from the original's features, least-squares weights per kept
    set, pruned models built from the cache (not from prune_model)."""
    from amc_mobile.search.reconstruct import ChannelSelector, PrunedModelBuilder, Reconstructor, collect_layer_stats

    model = _model(name)
    graph = build_graph(model)
    groups = [l.in_group for l in graph.decision_layers("all")]
    images = torch.randn(6, *model.input_shape, generator=torch.Generator().manual_seed(0))
    stats = collect_layer_stats(model, graph, groups, images, points=4)
    assert stats, "no layer to reconstruct"
    selector = ChannelSelector(model, graph)
    builder = PrunedModelBuilder(model, graph, Reconstructor(stats, selector, dict(model.named_modules())), selector)
    rng = np.random.default_rng(0)
    channels = {g: int(rng.integers(1, graph.groups[g].size + 1)) for g in groups}
    for fast in (False, True):
        pruned = builder.build(channels, fast=fast)
        with torch.no_grad():
            out = pruned(images)
        assert out.shape == model(images).shape and bool(torch.isfinite(out).all())
    # with every group full, reconstruction reproduces the original (same kept set, exact solve)
    with torch.no_grad():
        torch.testing.assert_close(builder.build({}, fast=False)(images), model(images))


def test_torch_export_program_is_measured_and_not_pruned(tmp_path, capsys):
    from amc_mobile.cli import main

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
    path = tmp_path / "prog.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 8, 8),)), path)
    assert main(["bench", "-m", str(path), "--iterations", "5", "--warmup", "1"]) == 0
    assert "prog.pt2" in capsys.readouterr().out
    assert main(["inspect", str(path)]) == 2
    assert "no layers to slice" in capsys.readouterr().err
    (tmp_path / "bad.pt2").write_bytes(b"junk")
    assert main(["inspect", str(tmp_path / "bad.pt2")]) == 2
    assert "not a torch.export program" in capsys.readouterr().err


def test_scoring_leaves_the_original_and_the_cache_untouched():
    """Episodes are scored on NHWC copies; the original's weights (shared with every built model) must keep
    their layout, or the original no longer lowers to XNNPACK at the end of a search."""
    from amc_mobile.data import Split
    from amc_mobile.search.reconstruct import PrunedModelBuilder
    from amc_mobile.search.score import EpisodeScorer

    model = _model("densenet")
    graph = build_graph(model)
    before = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
    val = Split(torch.randn(8, *model.input_shape), torch.arange(8) % 10)
    scorer = EpisodeScorer(PrunedModelBuilder(model, graph), val)
    g = graph.decision_layers("all")[0].in_group
    scorer({g: max(1, graph.groups[g].size // 2)})
    scorer({})
    for k, v in model.state_dict().items():
        assert v.stride() == before[k][1], k
        torch.testing.assert_close(v, before[k][0])


@pytest.mark.slow
def test_a_model_class_pickle_cannot_name_is_lowered_in_process(tmp_path):
    """A model defined inside a function (or in a notebook cell run with exec) cannot go to the lowering
    workers: its table is still built, lowering it where it lives."""
    from device.base import MeasureConfig
    from amc_mobile.tables import build_table

    def make():
        class Local(nn.Module):
            def __init__(self):
                super().__init__()
                self.input_shape = (1, 8, 8)
                self.a = nn.Conv2d(1, 8, 3, padding=1)
                self.b = nn.Conv2d(8, 4, 1)

            def forward(self, x):
                return self.b(torch.relu(self.a(x))).mean((2, 3))

        return Local().eval()

    quick = MeasureConfig(warmup=2, iterations=5, min_time_ms=1.0, repeats=1)
    rep = build_table(make(), "local", grid=4, config=quick, model_config=quick, tables_dir=tmp_path,
                      calibration_count=2, workers=2, progress=False)
    assert rep.failed == 0 and rep.measured > 0 and rep.calibration > 0
