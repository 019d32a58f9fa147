"""The AMC search loop: `run_search(config) -> SearchResult`.

    result = run_search(SearchConfig(model="mobilenet_v2", cost="flops", target=0.5, episodes=100))
    result.best            # the best policy (JSON-safe dict, also in <run>/best_policy.json)
    result.model           # the pruned model with the reconstructed weights (not fine-tuned)
    result.run_dir         # config.json, episodes.csv, best_policy.json, pruned/, checkpoints/, summary.json

One episode: the agent emits a preserve ratio per decision layer (uniform random during warm-up,
actor + truncated-normal noise after), the env applies the action wall and the rounding, the
pruned model is built from cached reconstructed weights and scored on the held-out validation
images; every transition gets the episode's reward; after warm-up one DDPG update per transition.

Every episode is appended to episodes.csv as it ends; a checkpoint (agent, optimisers, replay
buffer, RNG states, best so far) is written every `checkpoint_every` episodes; `resume` continues
from the newest one and reproduces the uninterrupted run's log (timings aside).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.files import atomic_write, read_json, write_json
from amc_mobile.pruning.graph import Layer, PruningGraph, build_graph, default_scope, require_prunable
from latency_tables.predict import LatencyModel

from . import checkpoint as ckpt
from .agent import DDPGAgent
from .config import SearchConfig, SearchWarning
from .cost import CostModel, FlopsCost, LatencyCost, ParamsCost
from .env import ActionWall, Episode, PruningEnv
from .reconstruct import ChannelSelector, PrunedModelBuilder, Reconstructor, collect_layer_stats
from .score import EpisodeScorer, evaluate_split

log = logging.getLogger(__name__)

LOG_FILE = "episodes.csv"
CONFIG_FILE = "config.json"
BEST_FILE = "best_policy.json"
SUMMARY_FILE = "summary.json"
PRUNED_DIR = "pruned"
LOG_COLUMNS = ("episode", "phase", "sigma", "reward", "accuracy", "loss", "cost", "cost_ratio", "walked_back",
               "prune_s", "eval_s", "predict_s", "agent_s", "episode_s", "discarded", "actions", "ratios", "channels")
# Where an episode's time goes: building the pruned model (slicing + cached reconstructed weights),
# scoring it, the action wall's latency predictions (and the env's state), the agent (actions, updates),
# and the whole episode (the rest is the log and checkpoints).
TIMING_COLUMNS = ("prune_s", "eval_s", "predict_s", "agent_s", "episode_s")
# Fields that may differ between a run and its resumption; everything else must match.
RESUMABLE_OVERRIDES = ("episodes", "resume", "out", "progress", "measure_final", "checkpoint_every", "threads",
                       "compute")


@dataclass
class SearchResult:
    run_dir: Path
    config: SearchConfig
    best: dict  # the best policy, as in best_policy.json
    channels: dict[int, int]  # decision group -> kept channels of the best policy
    model: nn.Module  # the pruned model with reconstructed weights (eval mode, not fine-tuned)
    original: nn.Module
    graph: PruningGraph
    summary: dict = field(default_factory=dict)  # as in summary.json (incl. measured latency)


@dataclass
class SearchSetup:
    """Everything prepared once per run, before the first episode."""

    config: SearchConfig
    model: nn.Module
    graph: PruningGraph
    scope: str
    layers: list[Layer]
    cost: CostModel
    budget: float | None
    builder: PrunedModelBuilder
    scorer: EpisodeScorer
    data: object  # the FashionMNIST splits
    info: dict


# ----------------------------------------------------------------------------------- preparation


def load_model(ref: str, cfg: SearchConfig | None = None) -> nn.Module:
    """The model a search prunes: `model_io.load_model` with cfg's --model-kwargs, --weights and
    --input-shape, trained weights for a registry name."""
    from amc_mobile.model_io import ModelOptions, parse_input_shape, parse_kwargs
    from amc_mobile.model_io import load_model as load_reference

    options = ModelOptions(parse_kwargs(cfg.model_kwargs), cfg.weights, parse_input_shape(cfg.input_shape)) \
        if cfg is not None else None
    loaded = load_reference(ref, options=options, trained=True)
    if loaded.module is None:
        raise AmcError(f"--model {ref} is a compiled .pte: a search needs the model's layers (pass its pruned-model "
                       f"folder, checkpoint folder, FILE.py:FACTORY or a model name)")
    return loaded.module


def _check_same_model(saved_info: dict | None, reference: dict) -> None:
    before = (saved_info or {}).get("model_reference")
    if before and before.get("sha256") and before.get("sha256") != reference.get("sha256"):
        raise AmcError(f"{reference['factory'].rpartition(':')[0]} changed since this run started (sha256 "
                       f"{before['sha256'][:12]} -> {reference['sha256'][:12]}): --resume continues the same model "
                       f"only; restore the file or start a new run")


def family_of(model: nn.Module) -> str | None:
    cfg = getattr(model, "amc_config", None)
    return cfg.get("name") if isinstance(cfg, dict) else None


def _latency_model(model: nn.Module, graph: PruningGraph, scope: str, cfg: SearchConfig):
    """The tables engineer's predictor for this model, scope and device: from --table-dir when given,
    else `ensure_table` (builds whatever the device's table still lacks, then loads it)."""
    try:
        from amc_mobile.tables import ensure_table, load_latency_model
    except ImportError as exc:
        raise AmcError(f"latency tables are not available in this installation ({exc}); use --cost flops") from exc
    if cfg.table_dir:
        return load_latency_model(model, graph, scope, device_uri=cfg.device, table_dir=cfg.table_dir)
    return ensure_table(model, graph, scope, device_uri=cfg.device, progress=cfg.progress)


def make_cost(name: str, model: nn.Module, graph: PruningGraph, scope: str, cfg: SearchConfig,
              latency_model=None) -> CostModel:
    if name == "flops":
        return FlopsCost(graph)
    if name == "params":
        return ParamsCost(graph)
    if name == "latency":
        return LatencyCost(latency_model if latency_model is not None else _latency_model(model, graph, scope, cfg))
    raise AmcError(f"unknown cost {name!r}: latency, flops or params")


def measure_models(device_uri: str, models: list[tuple[str, nn.Module]], input_shape) -> dict:
    """Measure `models` on the device in ONE batch; {name: LatencyStats dict} or {"error": why}."""
    from device import Candidate, MeasureConfig, example_input, open_device

    x = example_input(input_shape)
    try:
        with open_device(device_uri) as dev:
            stats = dev.measure([Candidate(n, m.eval(), x) for n, m in models], MeasureConfig())
            fp = dev.fingerprint(MeasureConfig())
    except AmcError as exc:
        return {"error": str(exc)}
    out = {s.name: s.to_dict() for s in stats}
    out["fingerprint"] = fp.to_dict()
    return out


def _recalibrate(cfg: SearchConfig, cost: CostModel, model: nn.Module, info: dict) -> dict | None:
    """Re-time the table's calibration models on the device and refit the overhead term (see
    latency_tables.session); returns the unpruned model's timing as `measure_models` does, or
    None (with a warning) when this cost model has no table or the device fails."""
    import latency_tables as lt
    from device import open_device
    from latency_tables.session import SESSION_CONFIG
    from amc_mobile.tables import resolve_target

    lat = cost.model if isinstance(cost, LatencyCost) else None
    if not isinstance(lat, LatencyModel):
        return None
    try:
        store = lt.TableStore(lat.source) if lat.source else None
        with open_device(cfg.device) as dev:
            if store is not None and store.exists():
                if store.fingerprint.differences(dev.fingerprint(SESSION_CONFIG)):
                    store = None  # a table from another device configuration: refit for this session only
            else:
                store = None
            rec = lt.recalibrate(lat, resolve_target(model, lat.graph, lat.scope), dev, store=store)
    except AmcError as exc:
        warnings.warn(f"could not re-time the calibration models on {cfg.device} ({exc}): the table's stored "
                      f"calibration is used", SearchWarning, stacklevel=2)
        return None
    cost.refresh()
    info["recalibration"] = rec.to_dict()
    if rec.original is None:
        return None
    return {"original": rec.original}


def _budget(cfg: SearchConfig, cost: CostModel, model: nn.Module, info: dict) -> float | None:
    if cfg.cost == "latency" and cfg.recalibrate and (
            cfg.reward == "guaranteed" or (cfg.latency_reference == "predicted" and cfg.target_ms is None)):
        # Issue 19: these paths set no measured budget, but their predictions must still be on today's
        # scale: the table is re-timed as for a measured budget (a failure warns, never silently).
        measured = _recalibrate(cfg, cost, model, info)
        if measured is not None:
            info["original_measured"] = measured
    if cfg.reward == "guaranteed":
        return None
    if cfg.cost != "latency":
        return cfg.target * cost.full_cost
    if cfg.latency_reference == "predicted" and cfg.target_ms is None:
        return cfg.target * cost.full_cost
    # Latency: the target is relative to (or given in) measured milliseconds; the predictor is
    # calibrated on whole models measured end to end, so its ms compare with measured ms.
    measured = _recalibrate(cfg, cost, model, info) if cfg.recalibrate else None
    if measured is None:
        measured = measure_models(cfg.device, [("original", model)], model.input_shape)
    ms = measured.get("original", {}).get("median_ms")
    info["original_measured"] = measured
    if ms is None or not math.isfinite(ms):
        why = measured.get("error") or measured.get("original", {}).get("error")
        if cfg.target_ms is None:
            warnings.warn(f"could not measure the original model on {cfg.device} ({why}): the budget is "
                          f"{cfg.target} x its PREDICTED latency {cost.full_cost:.4g} ms", SearchWarning,
                          stacklevel=2)
            return cfg.target * cost.full_cost
        return float(cfg.target_ms)
    info["original_measured_ms"] = ms
    if abs(cost.full_cost / ms - 1) > 0.1:
        budget = f"{cfg.target_ms:.4g} ms" if cfg.target_ms is not None else f"{cfg.target} x {ms:.4g} ms measured"
        warnings.warn(f"the latency model predicts {cost.full_cost:.4g} ms for the original model but it measures "
                      f"{ms:.4g} ms on {cfg.device}; the budget ({budget}) is enforced on predictions: recalibrate "
                      f"the table, or use --latency-reference predicted if the measurement is noise",
                      SearchWarning, stacklevel=2)
    return float(cfg.target_ms) if cfg.target_ms is not None else cfg.target * ms


def _calibration_images(cfg: SearchConfig, data) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed)
    n = min(cfg.calib_images, len(data.train))
    idx = torch.randperm(len(data.train), generator=gen)[:n].sort().values
    return data.train.images[idx]


def _restore_budget(cost: CostModel, saved: dict, info: dict) -> float | None:
    """On resume: the interrupted run's budget and session overhead fit, not new measurements (a
    resumed search continues exactly; a fresh measurement would move the budget)."""
    rec = saved.get("recalibration")
    if rec and isinstance(cost, LatencyCost):
        cost.model.set_calibration(float(rec["fit"]["scale"]), float(rec["fit"]["offset"]))
        cost.refresh()
    for k in ("recalibration", "original_measured", "original_measured_ms"):
        if k in saved:
            info[k] = saved[k]
    return saved["budget"]


def prepare(cfg: SearchConfig, model: nn.Module | None = None, data=None, latency_model=None,
            saved_info: dict | None = None) -> SearchSetup:
    """Load the model and data, analyse the graph, build the cost model, the reconstruction cache and the
    scorer. `saved_info` (a resumed run's setup.json) restores the budget instead of measuring again."""
    from amc_mobile.compute import describe, resolve_compute

    compute = resolve_compute(cfg.compute)  # before loading anything: a wrong --compute fails at once
    info: dict = {"compute": describe(compute)}
    # the original and the pruning machinery stay on the CPU; scoring and feature collection run on `compute`
    model = (model if model is not None else load_model(cfg.model, cfg)).cpu().eval()
    if getattr(model, "amc_reference", None):
        info["model_reference"] = model.amc_reference  # file + sha256: a resume refuses a changed file
        _check_same_model(saved_info, model.amc_reference)
    graph = build_graph(model)
    require_prunable(graph)
    scope = cfg.scope or default_scope(family_of(model))
    layers = graph.decision_layers(scope)
    if not layers:
        raise AmcError(f"no prunable layers in scope {scope!r}: try --scope all")
    if data is None:
        from amc_mobile.data_sources import load_data

        data = load_data(cfg.data, data_dir=cfg.data_dir, input_size=cfg.input_size, mean=cfg.mean, std=cfg.std,
                         channels=int(model.input_shape[0]), split_seed=cfg.seed)
    if tuple(data.val.images.shape[1:]) != tuple(model.input_shape):
        raise AmcError(f"the data's images are {tuple(data.val.images.shape[1:])} but the model takes "
                       f"{tuple(model.input_shape)}: pass --input-size (and matching channels) or another model")
    info["data"] = data.note or str(data.source)
    val = data.val.subset(cfg.val_images)
    cost = make_cost(cfg.cost, model, graph, scope, cfg, latency_model)
    budget = (_restore_budget(cost, saved_info, info) if saved_info and "budget" in saved_info
              else _budget(cfg, cost, model, info))
    groups = [l.in_group for l in layers]
    # an unreachable budget is an error now, before minutes of calibration
    ActionWall(graph, groups, cost, budget, cfg.lbound, cfg.rbound, cfg.channel_round, info.get("original_measured_ms"))
    selector = ChannelSelector(model, graph)
    reconstructor = None
    t0 = time.perf_counter()
    if cfg.reconstruct:
        stats = collect_layer_stats(model, graph, groups, _calibration_images(cfg, data), cfg.calib_points, cfg.seed,
                                    compute=compute)
        reconstructor = Reconstructor(stats, selector, dict(model.named_modules()))
    info["calibration_s"] = round(time.perf_counter() - t0, 3)
    builder = PrunedModelBuilder(model, graph, reconstructor, selector)
    scorer = EpisodeScorer(builder, val, cfg.score_metric, cfg.eval_batch, compute=compute)
    original = scorer({})
    info.update(original_accuracy=original.accuracy, original_loss=original.loss, original_eval_s=round(original.eval_s, 3),
                scope=scope, val_images=len(val), full_cost=cost.full_cost, cost_unit=cost.unit, budget=budget,
                decision_layers=[l.name for l in layers])
    return SearchSetup(cfg, model, graph, scope, layers, cost, budget, builder, scorer, data, info)


# ----------------------------------------------------------------------------------- the log


class EpisodeLog:
    """episodes.csv: one row per finished episode, flushed as it is written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(LOG_COLUMNS)

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS).writerow(row)
            f.flush()

    def truncate(self, episodes: int) -> None:
        """Keep the rows of the first `episodes` episodes (rows written after the last checkpoint go)."""
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["episode"]) < episodes]
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, LOG_COLUMNS)
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.path, text.getvalue())


def read_log(path: Path, with_timings: bool = False) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not with_timings:
        for r in rows:
            for c in TIMING_COLUMNS:
                r.pop(c, None)
    return rows


# ----------------------------------------------------------------------------------- policies


def policy_dict(setup: SearchSetup, ep: Episode, episode: int) -> dict:
    """The JSON form of a policy: per group and per layer name, with its predicted cost and accuracy."""
    cost = setup.cost
    layers = {}
    for l, r in zip(setup.layers, ep.ratios):
        size = setup.graph.groups[l.in_group].size
        layers[l.name] = {"group": l.in_group, "kept": ep.channels[l.in_group], "size": size, "ratio": round(r, 6)}
    return {
        "episode": episode,
        "reward": ep.reward,
        "accuracy": ep.score.accuracy if ep.score else None,
        "metric": setup.config.score_metric,
        "cost": ep.cost,
        "cost_unit": cost.unit,
        "cost_ratio": ep.cost / cost.full_cost,
        "budget": setup.budget,
        "full_cost": cost.full_cost,
        "preserve_ratios": [round(r, 6) for r in ep.ratios],
        "channels": {str(g): int(c) for g, c in ep.channels.items()},
        "layers": layers,
        "actions": [round(a, 6) for a in ep.actions],
    }


def _row(episode: int, phase: str, sigma: float, ep: Episode, full_cost: float, timing: dict | None = None) -> dict:
    sc = ep.score
    timing = timing or {}
    return {
        "episode": episode, "phase": phase, "sigma": "" if math.isnan(sigma) else f"{sigma:.6g}",
        "reward": "" if ep.reward is None else f"{ep.reward:.6f}",
        "accuracy": f"{sc.accuracy:.6f}" if sc else "", "loss": f"{sc.loss:.6f}" if sc else "",
        "cost": f"{ep.cost:.6g}", "cost_ratio": f"{ep.cost / full_cost:.6f}", "walked_back": ep.walked_back,
        "prune_s": f"{sc.prune_s:.4f}" if sc else "", "eval_s": f"{sc.eval_s:.4f}" if sc else "",
        **{k: f"{timing[k]:.4f}" for k in ("predict_s", "agent_s", "episode_s") if k in timing},
        "discarded": int(ep.discarded),
        "actions": json.dumps([round(a, 6) for a in ep.actions]),
        "ratios": json.dumps([round(r, 6) for r in ep.ratios]),
        "channels": json.dumps({str(g): int(c) for g, c in ep.channels.items()}),
    }


# ----------------------------------------------------------------------------------- the run


def _run_dir(cfg: SearchConfig) -> tuple[Path, SearchConfig, bool]:
    """(run folder, the config to use, resuming?)."""
    from amc_mobile.runs import new_run_dir

    if cfg.resume:
        run_dir = Path(cfg.resume)
        path = run_dir / CONFIG_FILE
        if not path.exists():
            raise AmcError(f"--resume {run_dir}: no {CONFIG_FILE} there, so it is not a search run folder")
        try:
            saved = SearchConfig.from_dict(read_json(path, dict, "it is not a search run folder's config"))
        except (ValueError, TypeError) as exc:
            raise AmcError(f"{path} is not a valid search config ({exc})") from exc
        a, b = saved.to_dict(), cfg.to_dict()
        diffs = [k for k in a if k not in RESUMABLE_OVERRIDES and a[k] != b[k]]
        if diffs:
            raise AmcError(f"--resume {run_dir}: the config differs from the saved one in {', '.join(diffs)}; "
                           f"use resume_config() / pass only --resume (and --episodes) to continue it")
        return run_dir, cfg, True
    run_dir = new_run_dir("search", cfg.out)
    if (run_dir / LOG_FILE).exists():
        raise AmcError(f"{run_dir} already holds a search: pass --resume {run_dir} to continue it or another --out")
    return run_dir, cfg, False


def resume_config(run_dir: str | Path, **overrides) -> SearchConfig:
    """The saved config of a run folder, set to resume it (overrides: e.g. episodes, progress)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise AmcError(f"--resume {run_dir}: no {CONFIG_FILE} there, so it is not a search run folder")
    d = read_json(path, dict, "it is not a search run folder's config")
    bad = set(overrides) - set(RESUMABLE_OVERRIDES)
    if bad:
        raise AmcError(f"cannot change {', '.join(sorted(bad))} when resuming {run_dir}")
    d.update(overrides, resume=str(run_dir))
    return SearchConfig.from_dict(d)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_search(config: SearchConfig, model: nn.Module | None = None, data=None,
               on_episode: Callable[[dict], None] | None = None, latency_model=None) -> SearchResult:
    """Run (or resume) an AMC search; see the module doc. `model`/`data` override config.model/data_dir
    (the config still names them for the record); `latency_model` (anything LatencyModel-like) replaces
    the table lookup of the latency cost; `on_episode(row)` is called after each episode."""
    from amc_mobile.runs import write_manifest

    from amc_mobile.compute import resolve_compute

    cfg = config.validate()
    resolve_compute(cfg.compute)  # a --compute this host lacks fails before a run folder is made
    run_dir, cfg, resuming = _run_dir(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    write_json(run_dir / CONFIG_FILE, {k: v for k, v in cfg.to_dict().items() if k != "resume"} | {"resume": None})
    write_manifest(run_dir, "search")
    saved = None
    if resuming and (run_dir / "setup.json").is_file():
        try:
            saved = json.loads((run_dir / "setup.json").read_text())
        except (OSError, ValueError):
            saved = None  # unreadable: measure again (the budget may move slightly)
    setup = prepare(cfg, model, data, latency_model, saved_info=saved)
    write_json(run_dir / "setup.json", setup.info)

    _seed_everything(cfg.seed)
    env = PruningEnv(setup.graph, setup.layers, setup.cost, setup.budget, setup.scorer, cfg.reward,
                     cfg.lbound, cfg.rbound, cfg.channel_round, reference=setup.info.get("original_measured_ms"))
    agent = DDPGAgent(env.state_dim, env.n_layers, cfg.agent, cfg.seed)
    episode_log = EpisodeLog(run_dir / LOG_FILE)
    start, best, top = 0, None, []
    if resuming:
        state = ckpt.load_latest(run_dir, agent)
        start = int(state["episode"])
        best = state["loop"].get("best")
        top = state["loop"].get("top") or ([best] if best else [])
        episode_log.truncate(start)
        if best is not None:
            write_json(run_dir / BEST_FILE, best)
        log.info("resuming %s from episode %d", run_dir, start)

    warmup = cfg.warmup_episodes
    bar = episode_bar(cfg, start=start)
    try:
        for e in range(start, cfg.episodes):
            phase = "warmup" if e < warmup else "explore"
            sigma = agent.sigma(e, warmup) if phase == "explore" else float("nan")
            t_start = time.perf_counter()
            agent_s = 0.0
            s = env.reset()
            transitions = []
            while True:
                t0 = time.perf_counter()
                a = agent.random_action() if phase == "warmup" else agent.select_action(s, sigma)
                agent_s += time.perf_counter() - t0
                s2, done, ep = env.step(a)
                transitions.append((s, a, s2, done))
                s = s2
                if done:
                    break
            t_env = time.perf_counter() - t_start - agent_s
            if ep.discarded:
                warnings.warn(f"episode {e}: accuracy/loss is NaN for channels {ep.channels}; episode discarded",
                              SearchWarning, stacklevel=2)
            else:
                t0 = time.perf_counter()
                for s_, a_, s2_, d_ in transitions:
                    agent.observe(s_, a_, ep.reward, s2_, d_)
                    if e >= warmup:
                        agent.update()
                agent_s += time.perf_counter() - t0
                if best is None or ep.reward > best["reward"]:
                    best = policy_dict(setup, ep, e)
                    write_json(run_dir / BEST_FILE, best)
                top = _keep_top(top, setup, ep, e, cfg.final_candidates)
            scored = (ep.score.prune_s + ep.score.eval_s) if ep.score else 0.0
            row = _row(e, phase, sigma, ep, setup.cost.full_cost,
                       {"predict_s": max(t_env - scored, 0.0), "agent_s": agent_s,
                        "episode_s": time.perf_counter() - t_start})
            episode_log.append(row)
            done_count = e + 1
            if cfg.checkpoint_every and done_count % cfg.checkpoint_every == 0 and done_count < cfg.episodes:
                ckpt.save(run_dir, done_count, agent, {"best": best, "top": top})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=row["reward"] or "nan", best_acc=f"{best['accuracy']:.4f}" if best else "-",
                                cost=f"{ep.cost:.3g}{setup.cost.unit}")
            if on_episode is not None:
                on_episode(row)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        saved = ckpt.checkpoints(run_dir)
        where = (f"the newest checkpoint is at episode {saved[-1][0]}: `amc-mobile search --resume {run_dir}` "
                 f"continues from it") if saved else "no checkpoint was written yet: start again"
        print(f"search interrupted; {where}", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
    if start < cfg.episodes or not ckpt.checkpoints(run_dir):
        ckpt.save(run_dir, cfg.episodes, agent, {"best": best, "top": top})
    if best is None:
        raise AmcError("no episode produced a finite accuracy (all were discarded as NaN): check the model's weights")
    return _finish(setup, run_dir, best, top)


def _keep_top(top: list[dict], setup: SearchSetup, ep: Episode, episode: int, k: int) -> list[dict]:
    """The k best policies by reward, one per channel choice (the candidates of the measured wall)."""
    if k <= 0:
        return top
    key = {str(g): int(c) for g, c in ep.channels.items()}
    if any(t["channels"] == key for t in top):
        return top
    if len(top) >= k and ep.reward <= min(t["reward"] for t in top):
        return top
    return sorted([*top, policy_dict(setup, ep, episode)], key=lambda t: -t["reward"])[:k]


def _measured_pick(setup: SearchSetup, best: dict, top: list[dict]) -> tuple[dict, dict]:
    """Item 6 of issue 19 (see measured_wall.py): (the policy to export, summary entry)."""
    from .env import ActionWall
    from .measured_wall import pick_measured

    cfg = setup.config
    groups = [l.in_group for l in setup.layers]

    def refit(channels: dict[int, int], budget: float) -> dict[int, int]:
        try:
            wall = ActionWall(setup.graph, groups, setup.cost, budget, cfg.lbound, cfg.rbound, cfg.channel_round)
            return wall.fit_budget(channels)[0]
        except AmcError:
            return channels  # the budget is below what the lower bounds allow: nothing to walk back

    pool = top or [best]
    try:
        pick = pick_measured(pool, device_uri=cfg.device, original=setup.model, input_shape=setup.model.input_shape,
                             build=setup.builder.build, score=lambda ch: setup.scorer(ch).accuracy, refit=refit,
                             predict=setup.cost.predict, target_ratio=cfg.target, target_ms=cfg.target_ms)
    except AmcError as exc:
        warnings.warn(f"the measured final wall could not run on {cfg.device} ({exc}): the best predicted policy is "
                      f"kept, its budget unchecked", SearchWarning, stacklevel=2)
        return best, {"error": str(exc)}
    entry = pick.to_dict()
    # which candidate the search would have exported without this wall (the best by predicted reward)
    entry["best_predicted"] = next((c["label"] for c in entry["candidates"] if c["channels"] == best["channels"]),
                                   None)
    log.info(pick.line())
    if pick.picked is None:
        warnings.warn(pick.line(), SearchWarning, stacklevel=2)
        return best, entry
    p = pick.picked
    chosen = next((t for t in pool if {int(g): int(c) for g, c in t["channels"].items()} == p.channels), None)
    if chosen is None:  # a walked-back policy: the best one's record with the new channels
        chosen = {**best, "channels": {str(g): int(c) for g, c in p.channels.items()}, "accuracy": p.accuracy,
                  "cost": p.predicted, "cost_ratio": p.predicted / setup.cost.full_cost, "walked_back_measured":
                  pick.walked_back}
        for name, layer in chosen.get("layers", {}).items():
            layer = dict(layer)
            layer["kept"] = p.channels.get(layer["group"], layer["kept"])
            layer["ratio"] = round(layer["kept"] / layer["size"], 6)
            chosen["layers"][name] = layer
    chosen = {**chosen, "measured_ratio": p.ratio, "measured_over_target": pick.measured_over_target}
    return chosen, entry


def episode_bar(cfg: SearchConfig, desc: str = "search", start: int = 0):
    """The episodes' progress bar (tqdm.auto: a widget in a notebook), None when cfg.progress is off."""
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.episodes, initial=start, desc=desc, unit="ep", dynamic_ncols=True)


def _finish(setup: SearchSetup, run_dir: Path, best: dict, top: list[dict] | None = None) -> SearchResult:
    """Export the best policy: pruned model (reconstructed weights), its accuracy, measured latency.
    With a latency budget, the policy is the one whose measured ratio meets it (`_measured_pick`)."""
    from amc_mobile.models import model_config
    from amc_mobile.pruning.slicing import save_pruned

    cfg = setup.config
    measured_budget = None
    if cfg.cost == "latency" and setup.budget is not None and cfg.measure_final and cfg.final_candidates > 0:
        best, measured_budget = _measured_pick(setup, best, top or [])
        write_json(run_dir / BEST_FILE, best)
    channels = {int(g): int(c) for g, c in best["channels"].items()}
    pruned = setup.builder.build(channels)
    for p in pruned.parameters():
        p.requires_grad_(True)
    from .timing import phase_timing

    summary = {"best": best, "setup": setup.info,
               "timing": phase_timing(read_log(run_dir / LOG_FILE, with_timings=True), setup.info)}
    if measured_budget is not None:
        summary["measured_budget"] = measured_budget
    full_val = setup.data.val
    if len(full_val) > len(setup.scorer.val):  # the search scored on a prefix: report the whole split too
        compute = setup.scorer.compute
        summary["pruned_full_val_accuracy"], _ = evaluate_split(pruned, full_val, cfg.score_metric, cfg.eval_batch,
                                                                compute)
        summary["original_full_val_accuracy"], _ = evaluate_split(setup.model, full_val, cfg.score_metric,
                                                                  cfg.eval_batch, compute)
        summary["full_val_images"] = len(full_val)
    try:
        base_config = model_config(setup.model)
    except ValueError:
        base_config = None
        warnings.warn("the model was built neither by amc_mobile.models.build_model nor from a FILE.py:FACTORY "
                      "reference: the pruned model is returned but not saved", SearchWarning, stacklevel=2)
    if base_config is not None:
        save_pruned(pruned, run_dir / PRUNED_DIR, base_config, channels,
                    extra={"policy": best, "reconstructed": bool(cfg.reconstruct), "fine_tuned": False})
        summary["pruned_dir"] = str(run_dir / PRUNED_DIR)
    if cfg.measure_final:
        measured = measure_models(cfg.device, [("original", setup.model), ("pruned", pruned)], setup.model.input_shape)
        if "error" in measured or not all(measured.get(n, {}).get("error") is None for n in ("original", "pruned")):
            warnings.warn(f"final measurement on {cfg.device} failed: "
                          f"{measured.get('error') or [measured[n].get('error') for n in ('original', 'pruned')]}",
                          SearchWarning, stacklevel=2)
        else:
            o, p = measured["original"]["median_ms"], measured["pruned"]["median_ms"]
            measured["speedup"] = o / p
            measured["measured_ratio"] = p / o
        summary["measured"] = measured
    write_json(run_dir / SUMMARY_FILE, summary)
    return SearchResult(run_dir, cfg, best, channels, pruned.eval(), setup.model, setup.graph, summary)
