"""Baselines: the uniform width (bisection on the predicted cost, one ratio, measured re-adjustment),
random search through the AMC env (budget in every episode, the search's warm-up stream), the files
every baseline writes, and the baseline CLI's errors."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest

from amc_mobile.cli import main
from amc_mobile.errors import AmcError
from amc_mobile.models import build_model
from amc_mobile.pruning import build_graph
from amc_mobile.search.baselines import (RATIO_STEPS, run_random, run_uniform, uniform_at_cost,
                                         uniform_channels)
from amc_mobile.search.config import SearchConfig
from amc_mobile.search.cost import FlopsCost, LatencyCost
from amc_mobile.search.env import round_channels

from _search_helpers import TableLatency, fashion


def _check_uniform(cost, graph, groups, budget, ratio, channels, lbound=0.2):
    assert channels == uniform_channels(graph, groups, ratio)
    assert cost.predict(channels) <= budget * (1 + 1e-9)
    # the largest such ratio: one step up no longer fits (or changes nothing)
    up = uniform_channels(graph, groups, ratio + 1 / RATIO_STEPS)
    assert up == channels or cost.predict(up) > budget
    assert ratio >= lbound


@pytest.mark.parametrize("target", [0.3, 0.5, 0.75])
def test_uniform_meets_a_flops_budget_by_prediction(target):
    model = build_model("mobilenet_v2").eval()
    graph = build_graph(model)
    groups = graph.decision_groups("decoupled")
    cost = FlopsCost(graph)
    budget = target * cost.full_cost
    ratio, channels = uniform_at_cost(cost, graph, groups, budget)
    _check_uniform(cost, graph, groups, budget, ratio, channels)
    assert cost.predict(channels) / cost.full_cost == pytest.approx(target, abs=0.08)
    # one ratio: every group is that ratio, rounded like an action
    assert all(channels[g] == round_channels(graph.groups[g].size, ratio) for g in groups)


def test_uniform_meets_a_table_latency_budget_and_names_unreachable_ones():
    model = build_model("mobilenet_v2").eval()
    graph = build_graph(model)
    groups = graph.decision_groups("decoupled")
    cost = LatencyCost(TableLatency(graph, groups))
    for target in (0.4, 0.6, 0.9):
        budget = target * cost.full_cost
        ratio, channels = uniform_at_cost(cost, graph, groups, budget)
        _check_uniform(cost, graph, groups, budget, ratio, channels)
    assert uniform_at_cost(cost, graph, groups, 2 * cost.full_cost)[0] == 1.0
    with pytest.raises(AmcError, match="no uniform width fits"):
        uniform_at_cost(cost, graph, groups, 0.01 * cost.full_cost)


# ------------------------------------------------------------------ end to end on ResNet-20 (shipped weights)


def _small_data():
    from amc_mobile.data import FashionMNIST

    d = fashion()
    # A 300-image val split: the runs score on all of it, so no full-split evaluation at the end.
    return FashionMNIST(d.train, d.val.subset(300), d.test.subset(300), d.source)


@pytest.fixture(scope="module")
def small():
    from amc_mobile.search.setup import prepare
    from amc_mobile.train import get_or_train

    data = _small_data()
    model, _ = get_or_train("resnet20")
    cfg = SearchConfig(model="resnet20", cost="flops", target=0.5, episodes=6, val_images=300, calib_images=60,
                       measure_final=False, progress=False, checkpoint_every=0)
    return cfg, model, data, prepare(cfg, model, data)


def _rows(run_dir):
    with open(run_dir / "episodes.csv", newline="") as f:
        return list(csv.DictReader(f))


def _same_files(run_dir):
    for name in ("config.json", "episodes.csv", "best_policy.json", "summary.json", "run.json",
                 "pruned/architecture.json", "pruned/model.pt"):
        assert (run_dir / name).exists(), name
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["kind"] == "search"


@pytest.mark.slow
def test_uniform_baseline_run_has_one_ratio_and_meets_the_budget(small, tmp_path):
    from amc_mobile.pruning import load_pruned

    cfg, model, data, setup = small
    result = run_uniform(replace(cfg, out=str(tmp_path / "u")), model, data, setup=setup)
    _same_files(result.run_dir)
    best = json.loads((result.run_dir / "best_policy.json").read_text())
    assert len(set(best["actions"])) == 1 and best["actions"][0] == best["uniform_ratio"]
    groups = [l.in_group for l in setup.layers]
    assert result.channels == uniform_channels(setup.graph, groups, best["uniform_ratio"])
    _check_uniform(setup.cost, setup.graph, groups, setup.budget, best["uniform_ratio"], result.channels)
    summary = result.summary
    assert summary["method"] == "uniform" and summary["policy"]["mmac_ratio"] <= 0.5 + 1e-9
    pruned, spec = load_pruned(result.run_dir / "pruned")
    assert {int(g): c for g, c in spec["group_channels"].items()} == result.channels


@pytest.mark.slow
def test_random_baseline_respects_the_budget_in_every_episode(small, tmp_path):
    cfg, model, data, setup = small
    result = run_random(replace(cfg, out=str(tmp_path / "r")), model, data, setup=setup)
    _same_files(result.run_dir)
    rows = _rows(result.run_dir)
    assert len(rows) == cfg.episodes
    assert all(r["phase"] == "random" for r in rows)
    for r in rows:
        assert float(r["cost"]) <= setup.budget * (1 + 1e-9)
        channels = {int(g): c for g, c in json.loads(r["channels"]).items()}
        assert setup.cost.predict(channels) == pytest.approx(float(r["cost"]), rel=1e-5)
    # the best is the highest reward, and the actions are the search's warm-up stream (seeded U[0,1])
    best = max(rows, key=lambda r: float(r["reward"]))
    assert result.best["episode"] == int(best["episode"])
    rng = np.random.default_rng(cfg.seed)
    first = [rng.uniform(0, 1) for _ in setup.layers]
    assert json.loads(rows[0]["actions"]) == pytest.approx(first, abs=1e-6)
    assert result.summary["method"] == "random"


@pytest.mark.slow
def test_uniform_is_measured_next_to_the_original(small, tmp_path):
    """With a latency cost the chosen width is measured next to the original on the local device and the
    summary says how close to the target it landed."""
    from device import MeasureConfig

    cfg, model, data, setup = small
    groups = [l.in_group for l in setup.layers]
    lat = LatencyCost(TableLatency(setup.graph, groups))
    target = 0.7  # the fake table's per-unit overhead puts 50% out of reach
    lcfg = replace(cfg, cost="latency", target=target, measure_final=True, out=str(tmp_path / "ul"))
    lsetup = replace(setup, config=lcfg, cost=lat, budget=target * lat.full_cost)
    result = run_uniform(lcfg, model, data, setup=lsetup, max_adjust=0,
                         measure_config=MeasureConfig(warmup=5, iterations=30))
    s = result.summary
    (trial,) = s["adjust"]
    m = s["measured"]
    # the ratio is paired per pass (median of per-pass ratios), not a ratio of pooled medians
    per_pass = [p / o for p, o in zip(m["pruned"]["pass_median_ms"], m["original"]["pass_median_ms"])]
    assert len(per_pass) == m["passes"] >= 2
    assert m["measured_ratio"] == pytest.approx(float(np.median(per_pass)))
    assert trial["measured_ratio"] == pytest.approx(m["measured_ratio"])
    assert s["equal_latency"] == (abs(m["measured_ratio"] / target - 1) <= 0.03)
    assert s["policy"]["measured_ratio"] == pytest.approx(m["measured_ratio"])
    assert s["policy"]["predicted_ms"] == pytest.approx(lat.predict(result.channels))


def _trial(graph, groups, ratio, measured):
    ch = uniform_channels(graph, groups, ratio)
    return {"ratio": ratio, "channels": ch, "measured": {"measured_ratio": measured}}


def test_readjustment_moves_towards_the_measured_target():
    """The next width after a measurement: rescaled predicted budget until the target is bracketed,
    then an untried width between the closest widths measured below and above it."""
    from types import SimpleNamespace

    model = build_model("mobilenet_v2").eval()
    graph = build_graph(model)
    groups = graph.decision_groups("decoupled")
    cost = FlopsCost(graph)
    setup = SimpleNamespace(graph=graph, cost=cost)
    cfg = SearchConfig()
    from amc_mobile.search.baselines import _next_uniform

    r0, ch0 = uniform_at_cost(cost, graph, groups, 0.5 * cost.full_cost)
    # measured too fast (0.40 < 0.50): the budget grows by 0.5/0.4 and the width with it
    t0 = _trial(graph, groups, r0, 0.40)
    r1, ch1 = _next_uniform(setup, groups, [t0], 0.5, 0.5 * cost.full_cost * 0.5 / 0.40, cfg)
    assert r1 > r0 and ch1 != ch0
    # measured too slow now (0.56): bracketed -> a width strictly between, nearer the interpolated one
    t1 = _trial(graph, groups, r1, 0.56)
    r2, ch2 = _next_uniform(setup, groups, [t0, t1], 0.5, 0.0, cfg)
    assert r0 < r2 < r1 and ch2 not in (ch0, ch1)
    expected = r0 + (0.5 - 0.40) / (0.56 - 0.40) * (r1 - r0)
    assert abs(r2 - expected) < 0.02
    # the rescaled budget asks for a width already tried: take the next one in the target's direction
    r3, ch3 = _next_uniform(setup, groups, [t0], 0.5, 0.5 * cost.full_cost, cfg)
    assert r3 > r0 and ch3 != ch0
    # two adjacent widths bracket the target: nothing left to try
    up = _next_uniform(setup, groups, [t0], 0.5, 0.5 * cost.full_cost, cfg)
    t_lo, t_hi = _trial(graph, groups, r0, 0.45), _trial(graph, groups, up[0], 0.55)
    assert _next_uniform(setup, groups, [t_lo, t_hi], 0.5, 0.0, cfg) is None


def test_baseline_cli_errors_are_one_line(capsys, runs_dir):
    assert main(["baseline", "amc-flops", "--cost", "latency", "--model", "resnet20"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("amc-mobile: error:") and "\n" not in err and "FLOPs" in err
    assert main(["baseline", "uniform", "--lr-actor", "0.1", "--model", "resnet20"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "amc-flops" in err
    assert main(["baseline", "uniform", "--target", "1.5", "--model", "resnet20"]) == 2
    assert "--target" in capsys.readouterr().err
