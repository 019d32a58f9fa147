"""The environment: rounding, the action wall (linear and table latency), the final walk-back,
unreachable budgets, rewards, NaN episodes, state normalisation."""

import math

import numpy as np
import pytest

from amc_mobile.errors import AmcError
from amc_mobile.models import build_model
from amc_mobile.pruning import build_graph
from amc_mobile.search.cost import FlopsCost, LatencyCost
from amc_mobile.search.env import ActionWall, PruningEnv, Score, grid_counts, round_channels

from _search_helpers import TableLatency, TinyNet


@pytest.mark.parametrize("c,a,expected", [
    (64, 0.5, 32),  # exact
    (64, 0.3, 24),  # round(19.2)=19 -> up to 24
    (64, 0.01, 8),  # max(round(0.64), 1) = 1 -> up to 8
    (64, 1.0, 64),
    (60, 1.0, 56),  # 60 -> up to 64 > 60 -> down to 56 (AMC's rule)
    (60, 0.95, 56),  # round(57)=57 -> 64 > 60 -> 56
    (6, 0.5, 6),  # smaller than the grid: up to 8 > 6, down to 0 -> the whole group
    (100, 0.2, 24),  # round(20) = 20 -> 24
    (13, 0.2, 8),
])
def test_rounding_rules(c, a, expected):
    assert round_channels(c, a, 8) == expected


def test_rounding_without_grid_and_grid_counts():
    assert round_channels(10, 0.26, 1) == 3
    assert round_channels(10, 0.0, 1) == 1
    assert grid_counts(64, 0.2) == [16, 24, 32, 40, 48, 56, 64]
    assert grid_counts(60, 0.2) == [16, 24, 32, 40, 48, 56]
    assert grid_counts(6, 0.2) == [6]
    # every ratio lands on the grid
    for c in (6, 13, 60, 64, 96, 1280):
        counts = set(grid_counts(c, 0.2))
        assert {round_channels(c, a) for a in np.linspace(0.2, 1.0, 200)} <= counts


def _mnv2():
    model = build_model("mobilenet_v2").eval()
    graph = build_graph(model)
    layers = graph.decision_layers("decoupled")
    return graph, layers


def _const_score(channels):
    return Score(0.5, 1.0)


def _episode(env, actions):
    env.reset()
    for a in actions:
        _, done, ep = env.step(a)
    assert done
    return ep


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_action_wall_keeps_every_policy_within_a_flops_budget(target):
    graph, layers = _mnv2()
    cost = FlopsCost(graph)
    budget = target * cost.full_cost
    env = PruningEnv(graph, layers, cost, budget, _const_score)
    rng = np.random.default_rng(1)
    tight = 0
    for i in range(150):
        # uniform actions, plus episodes that ask for everything (the wall must bind)
        actions = np.ones(len(layers)) if i % 5 == 0 else rng.uniform(0, 1, len(layers))
        ep = _episode(env, actions)
        assert ep.cost <= budget * (1 + 1e-9)
        assert ep.cost == pytest.approx(cost.predict(ep.channels))
        for l, r in zip(layers, ep.ratios):
            size = graph.groups[l.in_group].size
            kept = ep.channels[l.in_group]
            assert kept in grid_counts(size, 0.2) and r == kept / size
        tight += ep.cost > 0.97 * budget
    assert tight >= 20  # all-ones episodes use the budget up to the last grid step


def test_action_wall_with_table_latency_and_walk_back():
    model = TinyNet().eval()
    graph = build_graph(model)
    layers = graph.decision_layers("all")
    groups = [l.in_group for l in layers]
    cost = LatencyCost(TableLatency(graph, groups))
    wall = ActionWall(graph, groups, cost, 0.55 * cost.full_cost)
    env = PruningEnv(graph, layers, cost, wall.budget, _const_score)
    rng = np.random.default_rng(0)
    for _ in range(300):
        ep = _episode(env, rng.uniform(0, 1, len(layers)))
        assert ep.cost <= wall.budget * (1 + 1e-9)
    # the final wall on arbitrary over-budget policies: fits, stays on the grid, only ever removes channels
    over = 0
    for _ in range(200):
        ch = {g: int(rng.choice(gc)) for g, gc in zip(groups, wall.grids)}
        fixed, steps = wall.fit_budget(ch)
        assert cost.predict(fixed) <= wall.budget * (1 + 1e-9)
        assert all(fixed[g] <= ch[g] and fixed[g] in gc for g, gc in zip(groups, wall.grids))
        if cost.predict(ch) > wall.budget:
            over += 1
            assert steps >= 1
        else:
            assert steps == 0 and fixed == ch
    assert over > 20


def test_walk_back_removes_the_best_cost_per_channel_first():
    graph, layers = _mnv2()
    groups = [l.in_group for l in layers]
    cost = FlopsCost(graph)
    full = {g: graph.groups[g].size for g in groups}
    # just one grid step over: the first step taken must be the best saving per channel
    wall = ActionWall(graph, groups, cost, cost.full_cost - 1e-6)
    fixed, steps = wall.fit_budget(full)
    assert steps == 1
    (g_changed,) = [g for g in groups if fixed[g] != full[g]]
    saving = {}
    for g, gc in zip(groups, wall.grids):
        trial = {**full, g: gc[-2]} if len(gc) > 1 else None
        if trial:
            saving[g] = (cost.full_cost - cost.predict(trial)) / (full[g] - gc[-2])
    assert saving[g_changed] == max(saving.values())


def test_unreachable_budget_names_the_minimum():
    graph, layers = _mnv2()
    cost = FlopsCost(graph)
    lower = {l.in_group: grid_counts(graph.groups[l.in_group].size, 0.2)[0] for l in layers}
    minimum = cost.predict(lower)
    with pytest.raises(AmcError, match=r"minimum reachable cost is %.4g MMAC" % minimum):
        PruningEnv(graph, layers, cost, 0.05 * cost.full_cost, _const_score)
    # just reachable works, and every layer is then forced to its lower bound
    env = PruningEnv(graph, layers, cost, minimum, _const_score)
    assert _episode(env, np.ones(len(layers))).channels == lower


def test_rewards_and_nan_episode():
    graph, layers = _mnv2()
    cost = FlopsCost(graph)
    scores = iter([Score(0.9, 0.3), Score(float("nan"), float("nan")), Score(0.8, float("nan"))])
    env = PruningEnv(graph, layers, cost, 0.5 * cost.full_cost, lambda ch: next(scores))
    ep = _episode(env, np.full(len(layers), 0.5))
    assert ep.reward == pytest.approx(-0.1) and not ep.discarded
    assert _episode(env, np.full(len(layers), 0.5)).discarded
    assert _episode(env, np.full(len(layers), 0.5)).reward is None  # NaN loss alone discards too
    env_g = PruningEnv(graph, layers, cost, None, lambda ch: Score(0.9, 0.3), reward="guaranteed")
    ep = _episode(env_g, np.ones(len(layers)))
    assert ep.channels == {l.in_group: graph.groups[l.in_group].size for l in layers}  # no wall
    assert ep.reward == pytest.approx(-0.1 * math.log(cost.full_cost * 1e6))


def test_state_columns_are_normalised_and_dynamic():
    graph, layers = _mnv2()
    cost = FlopsCost(graph)
    env = PruningEnv(graph, layers, cost, 0.5 * cost.full_cost, _const_score)
    s = env.reset()
    states = [s]
    for t in range(len(layers) - 1):
        s, done, _ = env.step(0.3)
        states.append(s)
    S = np.stack(states)
    assert S.shape == (len(layers), env.state_dim) and S.dtype == np.float32
    assert S.min() >= 0 and S[:, :9].max() <= 1
    assert S[0, 0] == 0 and S[-1, 0] == 1  # index column
    assert S[0, 9] == 0 and S[-1, 9] > 0  # reduced grows
    assert (np.diff(S[:, 10]) <= 0).all() and S[-1, 10] == 0  # rest shrinks to 0
    assert S[0, 11] == 1.0 and S[1, 11] == pytest.approx(env.ratios[0])


def test_rest_and_reduced_share_one_scale_untouched_by_calibration():
    """Issue 19: the state's `rest` (raw unit sums) and `reduced` are fractions of one total, so a
    latency table's calibration (the shipped table's scale is ~0.42) does not change what the agent sees."""
    from amc_mobile.search.cost import LatencyCost

    graph, layers = _mnv2()
    flops = FlopsCost(graph)

    class Calibrated:  # a table-like latency model: whole model = scale * sum(units) + offset
        def __init__(self, scale, offset):
            self.scale, self.offset = scale, offset

        def unit_latencies(self, channels):
            return flops.unit_costs(channels) * 1e-9

        def predict(self, channels):
            return float(self.unit_latencies(channels).sum()) * self.scale + self.offset

        @property
        def full_latency_ms(self):
            return self.predict({})

    def states(model):
        env = PruningEnv(graph, layers, LatencyCost(model), None, _const_score, reward="guaranteed")
        out = [env.reset()]
        for _ in range(len(layers) - 1):
            out.append(env.step(0.4)[0])
        return np.stack(out)

    plain, calibrated = states(Calibrated(1.0, 0.0)), states(Calibrated(0.42, 0.05))
    assert np.allclose(plain[:, 9:11], calibrated[:, 9:11])
    # raw later-layer costs over the calibrated total were ~2.4x this: above 1 at the first layer
    assert 0.5 < calibrated[0, 10] <= 1.0
