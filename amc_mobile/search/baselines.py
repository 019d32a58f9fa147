"""Baselines for the AMC search, each writing a run folder with the same files as a search
(config.json, episodes.csv, best_policy.json, pruned/, summary.json with predicted AND measured
latency), so that `amc-mobile finetune`, `amc-mobile report` and the plots treat them alike.

    run_uniform(SearchConfig(model="mobilenet_v2", target=0.5))            # one width for every layer
    run_random(SearchConfig(model="mobilenet_v2", target=0.5, episodes=100)) # random policies, same env
    run_amc_flops(SearchConfig(model="mobilenet_v2", target=0.5))          # AMC's paper setting, measured

- **uniform**: one preserve ratio for every decision group (rounded to the channel grid like an
  action), the largest one whose predicted cost fits the budget (bisection on the ratio). With a
  latency cost it is then measured on the device next to the original; if the measured ratio misses
  the target by more than `tolerance` (3%) the predicted budget is rescaled by target/measured and
  the bisection redone (at most `max_adjust` times), so that the comparison with a search is at equal
  MEASURED latency. Every tried ratio is one row of episodes.csv.
- **random**: the AMC environment (same action wall, rounding, final walk-back, reconstruction and
  scoring) driven by U[0, 1] actions from `numpy.random.default_rng(seed)` for `episodes` episodes
  (the same stream as the search's warm-up: its first warm-up episodes are identical); best by reward.
- **amc-flops**: `run_search` with `cost="flops"` and the same ratio as the target (AMC's "50% FLOPs"),
  measured on the device at the end; the table-predicted latency of its policy is added.

Every summary.json gets a `policy` block: kept MACs (and their ratio), table-predicted latency (when a
latency table exists for the model and device) and the measured ratio, so methods compare line by line.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from amc_mobile.errors import AmcError
from amc_mobile.measure_models import measure_models
from amc_mobile.measure_models import paired_ratio as per_pass_ratio
from amc_mobile.files import write_json
from amc_mobile.pruning.graph import PruningGraph
from device import Device

from .config import SearchConfig
from .device_session import DeviceSession, open_session
from .cost import CostModel, FlopsCost
from .env import Episode, PruningEnv, round_channels
from .export import SearchResult, finish_run
from .loop import episode_bar, run_search
from .run_folder import BEST_FILE, CONFIG_FILE, LOG_FILE, SUMMARY_FILE, EpisodeLog, episode_row, policy_dict
from .setup import SearchSetup, family_of, prepare

METHODS = ("uniform", "random", "amc-flops")
TOLERANCE = 0.03  # equal measured latency means within 3%
RATIO_STEPS = 10_000  # the uniform ratio is bisected on multiples of 1/RATIO_STEPS


# ----------------------------------------------------------------------------------- uniform width


def uniform_channels(graph: PruningGraph, groups: list[int], ratio: float, grid: int = 8) -> dict[int, int]:
    """Every group in `groups` at the same preserve ratio, rounded like an action (`round_channels`)."""
    return {g: round_channels(graph.groups[g].size, ratio, grid) for g in groups}


def uniform_at_cost(cost: CostModel, graph: PruningGraph, groups: list[int], budget: float, lbound: float = 0.2,
                    rbound: float = 1.0, grid: int = 8) -> tuple[float, dict[int, int]]:
    """(ratio, channels): the largest uniform ratio in [lbound, rbound] (a multiple of 1e-4) whose
    predicted cost is within `budget`, by bisection. The cost is monotone in the ratio for every
    cost model here (more channels never cost less), which is what bisection needs."""
    lo, hi = math.ceil(lbound * RATIO_STEPS), math.floor(rbound * RATIO_STEPS)

    def fits(k: int) -> bool:
        return cost.predict(uniform_channels(graph, groups, k / RATIO_STEPS, grid)) <= budget * (1 + 1e-9)

    if fits(hi):
        return hi / RATIO_STEPS, uniform_channels(graph, groups, hi / RATIO_STEPS, grid)
    if not fits(lo):
        minimum = cost.predict(uniform_channels(graph, groups, lo / RATIO_STEPS, grid))
        raise AmcError(f"no uniform width fits the budget {budget:.4g} {cost.unit}: at the lower bound {lbound} "
                       f"it costs {minimum:.4g} {cost.unit} ({minimum / cost.full_cost:.1%} of the original); "
                       f"raise the target or lower --lbound")
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo / RATIO_STEPS, uniform_channels(graph, groups, lo / RATIO_STEPS, grid)


def _neighbour(graph: PruningGraph, groups: list[int], ratio: float, grid: int, up: bool, lbound: float,
               rbound: float) -> tuple[float, dict[int, int]] | None:
    """The next uniform ratio (up or down) whose rounded channels differ from `ratio`'s."""
    here = uniform_channels(graph, groups, ratio, grid)
    k = round(ratio * RATIO_STEPS)
    step = 1 if up else -1
    lo, hi = math.ceil(lbound * RATIO_STEPS), math.floor(rbound * RATIO_STEPS)
    while lo <= k + step <= hi:
        k += step
        ch = uniform_channels(graph, groups, k / RATIO_STEPS, grid)
        if ch != here:
            if not up:  # the largest ratio giving these channels, like the bisection's answers
                while k - 1 >= lo and uniform_channels(graph, groups, (k - 1) / RATIO_STEPS, grid) == ch:
                    k -= 1
            return k / RATIO_STEPS, ch
    return None


PASSES = 5  # measurement passes of a batch: ratios are taken per pass (paired), then their median


def measure_batch(device: Device, models: list, input_shape, config=None, passes: int = PASSES) -> dict:
    """`measure_models` with `passes` passes (default MeasureConfig `MEASURE`: 20 warm-up runs, 100 timed
    runs, 3 runner invocations pooled per pass) as a summary records it: {name: LatencyStats dict of its
    median pass + `pass_median_ms`, `pass_p10_ms`, "fingerprint", "measure_config", "passes"} or
    {"error": why}; steadier than a search's final measurement (ratios are taken per pass)."""
    try:
        return measure_models(device, models, input_shape, config or MEASURE, passes=passes).to_dict(with_passes=True)
    except AmcError as exc:
        return {"error": str(exc)}


def paired_ratio(batch: dict, name: str, ref: str = "original", stat: str = "median_ms") -> float | None:
    """Latency of `name` over `ref` from a `measure_batch` result: the median over passes of the per-pass
    ratio (falls back to the ratio of the entries' `stat` when there are no per-pass figures)."""
    a, b = batch.get(name) or {}, batch.get(ref) or {}
    key = f"pass_{stat}"
    return per_pass_ratio(a.get(key, []), b.get(key, []), a.get(stat), b.get(stat))


def _measure_pair(setup: SearchSetup, device: DeviceSession, channels: dict[int, int], stat: str = "median_ms",
                  config=None) -> dict:
    """Original and pruned model measured in ONE batch (so a busy machine slows both alike); the
    ratio is taken on `stat` (median_ms; p10_ms is steadier on a loaded machine)."""
    pruned = setup.builder.build(channels)
    try:
        dev = device.device()
    except AmcError as exc:
        return {"error": str(exc)}
    m = measure_batch(dev, [("original", setup.model), ("pruned", pruned)], setup.model.input_shape, config)
    ok = "error" not in m and all(m.get(n, {}).get("error") is None for n in ("original", "pruned"))
    if ok:
        ratio = paired_ratio(m, "pruned", stat=stat)
        m["speedup"], m["measured_ratio"], m["ratio_stat"] = 1 / ratio, ratio, stat
        m["median_ratio"] = paired_ratio(m, "pruned")
    return m


def _next_uniform(setup: SearchSetup, groups: list[int], trials: list[dict], target: float, budget: float,
                  cfg: SearchConfig) -> tuple[float, dict[int, int]] | None:
    """The next width to measure, or None when no untried width can get closer.

    Once some measured width is below the target and some above, interpolate between the closest pair
    (the measured latency is noisy and step-wise, so the predictor's correction alone can wander);
    before that, rescale the predicted budget by target/measured and bisect again."""
    g, grid = setup.graph, cfg.channel_round
    measured = [t for t in trials if "measured_ratio" in (t.get("measured") or {})]
    tried = [t["channels"] for t in trials]
    below = [t for t in measured if t["measured"]["measured_ratio"] < target]
    above = [t for t in measured if t["measured"]["measured_ratio"] >= target]
    if below and above:
        lo, hi = max(below, key=lambda t: t["ratio"]), min(above, key=lambda t: t["ratio"])
        a, b = sorted((lo["ratio"], hi["ratio"]))
        ml, mh = lo["measured"]["measured_ratio"], hi["measured"]["measured_ratio"]
        r = lo["ratio"] + (target - ml) / (mh - ml) * (hi["ratio"] - lo["ratio"]) if mh > ml else (a + b) / 2
        ks = range(math.ceil(a * RATIO_STEPS) + 1, math.floor(b * RATIO_STEPS))
        options = {}
        for k in ks:  # every distinct untried width strictly between the two
            ch = uniform_channels(g, groups, k / RATIO_STEPS, grid)
            key = tuple(sorted(ch.items()))
            if ch not in tried and key not in options:
                options[key] = (k / RATIO_STEPS, ch)
        if not options:
            return None
        return min(options.values(), key=lambda o: abs(o[0] - r))
    try:
        ratio, channels = uniform_at_cost(setup.cost, g, groups, budget, cfg.lbound, cfg.rbound, grid)
    except AmcError:
        ratio, channels = cfg.lbound, uniform_channels(g, groups, cfg.lbound, grid)
    if channels in tried:
        last = measured[-1] if measured else trials[-1]
        up = (last.get("measured") or {}).get("measured_ratio", target) < target
        nb = _neighbour(g, groups, last["ratio"], grid, up=up, lbound=cfg.lbound, rbound=cfg.rbound)
        if nb is None or nb[1] in tried:
            return None
        ratio, channels = nb
    return ratio, channels


def _episode(setup: SearchSetup, env: PruningEnv, actions: list[float], channels: dict[int, int]) -> Episode:
    """Score a fixed policy the way the env scores an episode (same scorer, same reward)."""
    sizes = [setup.graph.groups[l.in_group].size for l in setup.layers]
    ratios = [channels[l.in_group] / c for l, c in zip(setup.layers, sizes)]
    ep = Episode(list(actions), ratios, dict(channels), setup.cost.predict(channels))
    ep.score = setup.scorer(channels)
    if ep.score.finite:
        ep.reward = env.reward(ep.score.accuracy, ep.cost)
    return ep


def target_ratio(cfg: SearchConfig, setup: SearchSetup) -> float | None:
    """The latency target as a fraction of the MEASURED original (None when it was not measured)."""
    original = setup.info.get("original_measured_ms")
    if cfg.target_ms is not None:
        return cfg.target_ms / original if original else None
    return cfg.target


def run_uniform(config: SearchConfig, model=None, data=None, setup: SearchSetup | None = None,
                tolerance: float = TOLERANCE, max_adjust: int = 4, latency_model=None,
                stat: str = "median_ms", measure_config=None, device: DeviceSession | None = None) -> SearchResult:
    """The uniform-width baseline (see module doc). `setup` (from `prepare`) may be shared with other
    baselines of the same model and config (its config is replaced by `config`, its budget kept);
    `latency_model` replaces the table lookup as in `run_search`; `stat`: the latency statistic the
    measured ratio is taken on (median_ms, or p10_ms on a loaded machine); `measure_config`: a device
    MeasureConfig for those measurements (default `MEASURE`); `device`: a session on cfg.device shared with
    the caller (else the baseline opens cfg.device once, at its first use)."""
    if stat not in ("median_ms", "p10_ms", "mean_ms", "p90_ms"):
        raise AmcError(f"unknown latency statistic {stat!r}: median_ms, p10_ms, mean_ms or p90_ms")
    cfg = config.validate()
    if cfg.reward != "constrained":
        raise AmcError("the uniform baseline needs a budget: use --reward constrained")
    run_dir = _start(cfg, "uniform")
    with open_session(cfg.device, device) as session:
        setup = _setup(cfg, model, data, setup, latency_model, session)
        groups = [l.in_group for l in setup.layers]
        env = _env(setup)
        log = EpisodeLog(run_dir / LOG_FILE)
        ratio, channels = uniform_at_cost(setup.cost, setup.graph, groups, setup.budget, cfg.lbound, cfg.rbound,
                                          cfg.channel_round)
        trials: list[dict] = []  # {"ratio", "channels", "episode", "measured"}
        target = target_ratio(cfg, setup) if cfg.cost == "latency" else None
        measure = cfg.measure_final and cfg.cost == "latency" and target is not None
        budget = setup.budget
        phase = "uniform"
        for step in range(max_adjust + 1):
            ep = _episode(setup, env, [ratio] * len(groups), channels)
            trial = {"ratio": ratio, "channels": channels, "ep": ep, "step": step, "predicted_budget": budget}
            trials.append(trial)
            log.append(episode_row(step, phase, float("nan"), ep, setup.cost.full_cost))
            if not measure:
                break
            trial["measured"] = m = _measure_pair(setup, session, channels, stat, measure_config)
            if "measured_ratio" not in m:
                warnings.warn(f"uniform baseline: measuring on {cfg.device} failed ({m.get('error') or m}); "
                              f"keeping the ratio the prediction gave")
                break
            miss = m["measured_ratio"] / target - 1
            if abs(miss) <= tolerance:
                break
            budget *= target / m["measured_ratio"]  # the predictor's correction, used until a bracket exists
            phase = "adjust"
            nxt = _next_uniform(setup, groups, trials, target, budget, cfg)
            if nxt is None:
                break
            ratio, channels = nxt

        def distance(t: dict) -> float:
            m = t.get("measured") or {}
            return abs(m["measured_ratio"] / target - 1) if "measured_ratio" in m else math.inf

        chosen = min(trials, key=distance) if measure else trials[0]
        best = policy_dict(setup, chosen["ep"], chosen["step"])
        best.update(method="uniform", uniform_ratio=chosen["ratio"])
        write_json(run_dir / BEST_FILE, best)
        result = finish_run(replace(setup, config=replace(cfg, measure_final=False)), session, run_dir, best)
        extra = {
            "method": "uniform",
            "uniform_ratio": chosen["ratio"],
            "target_ratio": target,
            "tolerance": tolerance,
            "ratio_stat": stat if measure else None,
            "adjust": [{"step": t["step"], "ratio": t["ratio"], "predicted": t["ep"].cost,
                        "predicted_budget": t["predicted_budget"],
                        "measured_ratio": (t.get("measured") or {}).get("measured_ratio"),
                        "accuracy": t["ep"].score.accuracy} for t in trials],
        }
        if measure and "measured_ratio" in (chosen.get("measured") or {}):
            extra["measured"] = chosen["measured"]
            extra["equal_latency"] = distance(chosen) <= tolerance
        elif cfg.measure_final and not measure:  # FLOPs/params budget: measure once, for the record
            extra["measured"] = _measure_pair(setup, session, chosen["channels"], stat, measure_config)
        return _complete(result, setup, extra, session)


# ----------------------------------------------------------------------------------- random search


def run_random(config: SearchConfig, model=None, data=None, setup: SearchSetup | None = None,
               on_episode=None, latency_model=None, device: DeviceSession | None = None) -> SearchResult:
    """Random search with the search's episode budget: U[0,1] actions through the AMC env; best by reward.
    `device` as in `run_uniform`."""
    cfg = config.validate()
    run_dir = _start(cfg, "random")
    with open_session(cfg.device, device) as session:
        setup = _setup(cfg, model, data, setup, latency_model, session)
        env = _env(setup)
        log = EpisodeLog(run_dir / LOG_FILE)
        rng = np.random.default_rng(cfg.seed)  # the search's warm-up stream (DDPGAgent.random_action)
        best = None
        bar = episode_bar(cfg, "random")
        try:
            for e in range(cfg.episodes):
                env.reset()
                done, ep = False, None
                while not done:
                    _, done, ep = env.step(float(rng.uniform(0.0, 1.0)))
                if ep.discarded:
                    warnings.warn(f"random episode {e}: accuracy/loss is NaN for channels {ep.channels}; discarded")
                elif best is None or ep.reward > best["reward"]:
                    best = policy_dict(setup, ep, e)
                    best["method"] = "random"
                    write_json(run_dir / BEST_FILE, best)
                row = episode_row(e, "random", float("nan"), ep, setup.cost.full_cost)
                log.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(best_acc=f"{best['accuracy']:.4f}" if best else "-")
                if on_episode is not None:
                    on_episode(row)
        finally:
            if bar is not None:
                bar.close()
        if best is None:
            raise AmcError("no random episode produced a finite accuracy: check the model's weights")
        result = finish_run(setup, session, run_dir, best)
        return _complete(result, setup, {"method": "random", "episodes": cfg.episodes}, session)


# ----------------------------------------------------------------------------------- AMC, FLOPs budget


def run_amc_flops(config: SearchConfig, model=None, data=None, on_episode=None, latency_model=None,
                  device: DeviceSession | None = None) -> SearchResult:
    """AMC as in the paper: the budget is `target` x the original FLOPs (MACs); measured at the end.
    `latency_model` (optional) gives the policy's table-predicted latency; else an existing table is used;
    `device` as in `run_uniform` (the search, its final measurement and the table lookup share it)."""
    from amc_mobile.runs import write_manifest

    if config.target_ms is not None:
        raise AmcError("amc-flops takes the budget as a FLOPs ratio: pass --target RATIO, not --target-ms")
    cfg = replace(config, cost="flops").validate()
    cfg = replace(cfg, out=cfg.out or str(_default_dir("amc-flops")))
    with open_session(cfg.device, device) as session:
        result = run_search(cfg, model=model, data=data, on_episode=on_episode, device=session)
        write_manifest(result.run_dir, "search", method="amc-flops")
        return annotate(result, {"method": "amc-flops"}, latency_model, session)


# ----------------------------------------------------------------------------------- shared pieces


def _default_dir(method: str) -> Path:
    from amc_mobile.runs import new_run_dir

    return new_run_dir(f"baseline-{method}")


def _start(cfg: SearchConfig, method: str) -> Path:
    from amc_mobile.runs import new_run_dir, write_manifest

    run_dir = new_run_dir(f"baseline-{method}", cfg.out)
    if (run_dir / LOG_FILE).exists():
        raise AmcError(f"{run_dir} already holds a run: pass another --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    write_json(run_dir / CONFIG_FILE, cfg.to_dict())
    # kind "search": the report renders it like a search (best policy, episodes, summary)
    write_manifest(run_dir, "search", method=method)
    return run_dir


def _setup(cfg: SearchConfig, model, data, setup: SearchSetup | None, latency_model, device: DeviceSession
           ) -> SearchSetup:
    if setup is None:
        return prepare(cfg, model, data, latency_model, device=device)
    if setup.config.cost != cfg.cost or setup.config.model != cfg.model:
        raise AmcError(f"a shared setup for {setup.config.model}/{setup.config.cost} cannot serve "
                       f"{cfg.model}/{cfg.cost}")
    return replace(setup, config=cfg)


def _env(setup: SearchSetup) -> PruningEnv:
    cfg = setup.config
    return PruningEnv(setup.graph, setup.layers, setup.cost, setup.budget, setup.scorer, cfg.reward,
                      cfg.lbound, cfg.rbound, cfg.channel_round)


def latency_cost_for(model, graph: PruningGraph, scope: str, cfg: SearchConfig,
                     device: DeviceSession | None = None) -> CostModel | None:
    """The table-latency cost model for (model, scope, cfg.device) from an EXISTING table (nothing is
    built or measured: a FLOPs run must not start a table build), or None with a warning. `device`: the
    run's session on cfg.device (else the URI is opened for the table's fingerprint)."""
    from .cost import LatencyCost

    try:
        from amc_mobile.tables import load_latency_model

        where = device.device() if device is not None else cfg.device
        return LatencyCost(load_latency_model(model, graph, scope, device_uri=where, table_dir=cfg.table_dir,
                                              unit_values=cfg.unit_values))
    except Exception as exc:  # no table, a table without this model's layers, no executorch...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"no table-predicted latency for the policy on {cfg.device}: {first}")
        return None


def policy_facts(graph: PruningGraph, channels: dict[int, int], latency: CostModel | None = None,
                 measured: dict | None = None) -> dict:
    """Kept MACs, table-predicted latency and the measured ratio of one policy (JSON-safe)."""
    flops = FlopsCost(graph)
    facts = {"kept_mmac": flops.predict(channels), "full_mmac": flops.full_cost,
             "mmac_ratio": flops.predict(channels) / flops.full_cost}
    if latency is not None:
        p = latency.predict(channels)
        facts.update(predicted_ms=p, predicted_full_ms=latency.full_cost, predicted_ratio=p / latency.full_cost)
    if measured and "measured_ratio" in measured:
        facts.update(measured_ms=measured["pruned"]["median_ms"], measured_original_ms=measured["original"]["median_ms"],
                     measured_ratio=measured["measured_ratio"])
    return facts


def _complete(result: SearchResult, setup: SearchSetup, extra: dict, device: DeviceSession) -> SearchResult:
    return annotate(result, extra, setup.cost if getattr(setup.cost, "unit", None) == "ms" else None, device)


def annotate(result: SearchResult, extra: dict | None = None, latency=None, device: DeviceSession | None = None
             ) -> SearchResult:
    """Add `extra` and the `policy` block (kept MACs, table-predicted latency, measured ratio) to the run's
    summary.json and to `result.summary`. `latency`: a latency CostModel or LatencyModel-like predictor;
    None: the search's own cost when it is latency, else an EXISTING table for the run's device (or none)."""
    from amc_mobile.pruning.graph import default_scope

    from .cost import LatencyCost

    summary = dict(result.summary)
    summary.update(extra or {})
    cfg = result.config
    if latency is not None and not hasattr(latency, "unit"):
        latency = LatencyCost(latency)
    if latency is None and cfg.cost != "latency":
        scope = (summary.get("setup") or {}).get("scope") or cfg.scope or default_scope(
            family_of(result.original))
        latency = latency_cost_for(result.original, result.graph, scope, cfg, device)
    if latency is None and cfg.cost == "latency":
        best = summary.get("best") or result.best
        summary["policy"] = policy_facts(result.graph, result.channels, None, summary.get("measured"))
        summary["policy"].update(predicted_ms=best["cost"], predicted_full_ms=best["full_cost"],
                                 predicted_ratio=best["cost"] / best["full_cost"])
    else:
        summary["policy"] = policy_facts(result.graph, result.channels, latency, summary.get("measured"))
    write_json(result.run_dir / SUMMARY_FILE, summary)
    result.summary = summary
    return result


def _measure_config():
    from device import MeasureConfig

    return MeasureConfig(warmup=20, iterations=100, repeats=3)


MEASURE = _measure_config()


def run_baseline(method: str, config: SearchConfig, model=None, data=None) -> SearchResult:
    if method == "uniform":
        return run_uniform(config, model, data)
    if method == "random":
        return run_random(config, model, data)
    if method == "amc-flops":
        return run_amc_flops(config, model, data)
    raise AmcError(f"unknown baseline {method!r}: expected one of {', '.join(METHODS)}")
