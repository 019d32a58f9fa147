"""Cost models: FLOPs/params from fused units (fast path vs unit-by-unit definition vs the built model),
and the latency adapter over a table of real unit keys."""

import numpy as np
import pytest
import torch

from amc_mobile.models import build_model
from amc_mobile.pruning import build_graph, prune_by_counts
from amc_mobile.search.cost import CostModel, FlopsCost, LatencyCost, ParamsCost, layer_costs
from amc_mobile.search.env import grid_counts

from _search_helpers import TableLatency, TinyNet


def _random_channels(graph, groups, rng):
    return {g: int(rng.choice(grid_counts(graph.groups[g].size, 0.2))) for g in groups}


@pytest.mark.parametrize("name,scope", [("mobilenet_v2", "decoupled"), ("mobilenet_v2", "all"), ("resnet20", "all"),
                                        ("vgg16", "all")])
def test_flops_and_params_match_definition_and_built_model(name, scope):
    model = build_model(name).eval()
    graph = build_graph(model)
    groups = graph.decision_groups(scope)
    flops, params = FlopsCost(graph), ParamsCost(graph)
    assert isinstance(flops, CostModel) and isinstance(params, CostModel)
    assert flops.full_cost == pytest.approx(graph.flops() / 1e6)
    assert params.full_cost == pytest.approx(graph.params() / 1e6)
    rng = np.random.default_rng(0)
    for _ in range(5):
        ch = _random_channels(graph, groups, rng)
        np.testing.assert_allclose(flops.unit_costs(ch), flops.reference_unit_costs(ch), rtol=1e-12)
        np.testing.assert_allclose(params.unit_costs(ch), params.reference_unit_costs(ch), rtol=1e-12)
        assert flops.predict(ch) == pytest.approx(graph.flops(ch) / 1e6)
    pruned = prune_by_counts(model, graph, ch)
    assert params.predict(ch) * 1e6 == pytest.approx(sum(p.numel() for p in pruned.parameters()))
    assert flops.predict(ch) * 1e6 == pytest.approx(build_graph(pruned).flops())
    assert flops.predict(ch) < flops.full_cost


def test_latency_adapter_uses_the_table():
    model = TinyNet().eval()
    graph = build_graph(model)
    groups = graph.decision_groups("all")
    table = TableLatency(graph, groups)
    cost = LatencyCost(table)
    assert cost.unit == "ms" and cost.full_cost == pytest.approx(table.predict({}))
    ch = {g: grid_counts(graph.groups[g].size, 0.2)[1] for g in groups}
    units = cost.unit_costs(ch)
    assert len(units) == len(graph.units)
    assert units.sum() == pytest.approx(cost.predict(ch)) and cost.predict(ch) < cost.full_cost
    # a configuration the table does not hold is a lookup miss, not a guess
    with pytest.raises(KeyError):
        cost.predict({groups[0]: 3})
    with pytest.raises(TypeError, match="not a latency model"):
        LatencyCost(object())


def test_layer_costs_sum_the_units_touching_each_group():
    model = TinyNet().eval()
    graph = build_graph(model)
    groups = graph.decision_groups("all")
    flops = FlopsCost(graph)
    per = layer_costs(flops, graph, groups)
    units = flops.unit_costs({})
    for g, c in zip(groups, per):
        assert c == pytest.approx(sum(units[i] for i in graph.units_touching(g)))
        assert c > 0
