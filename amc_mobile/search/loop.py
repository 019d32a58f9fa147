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

import logging
import random
import sys
import time
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.files import write_json

from . import checkpoint as ckpt
from .agent import DDPGAgent
from .config import SearchConfig, SearchWarning
from .device_session import DeviceSession, open_session
from .env import Episode, PruningEnv
from .export import SearchResult, finish_run
from .joint import make_joint_env
from .run_folder import (BEST_FILE, CONFIG_FILE, LOG_FILE, SETUP_FILE, EpisodeLog, episode_row, open_run_dir,
                         policy_dict, read_saved_setup)
from .setup import SearchSetup, prepare

log = logging.getLogger(__name__)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_search(config: SearchConfig, model: nn.Module | None = None, data=None,
               on_episode: Callable[[dict], None] | None = None, latency_model=None,
               device: DeviceSession | None = None, int8_latency_model=None) -> SearchResult:
    """Run (or resume) an AMC search; see the module doc. `model`/`data` override config.model/data_dir
    (the config still names them for the record); `latency_model` (anything LatencyModel-like) replaces
    the table lookup of the latency cost; `on_episode(row)` is called after each episode; `device`: a
    session on cfg.device shared with the caller (else the search opens cfg.device once, at its first use);
    `int8_latency_model`: with --precision joint, replaces the int8 table lookup as `latency_model` does the fp32 one."""
    from amc_mobile.runs import write_manifest

    from amc_mobile.compute import resolve_compute

    cfg = config.validate()
    resolve_compute(cfg.compute)  # a --compute this host lacks fails before a run folder is made
    run_dir, cfg, resuming = open_run_dir(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    write_json(run_dir / CONFIG_FILE, {k: v for k, v in cfg.to_dict().items() if k != "resume"} | {"resume": None})
    write_manifest(run_dir, "search")
    with open_session(cfg.device, device) as session:
        saved = read_saved_setup(run_dir) if resuming else None
        setup = prepare(cfg, model, data, latency_model, saved_info=saved, device=session,
                        int8_latency_model=int8_latency_model)
        write_json(run_dir / SETUP_FILE, setup.info)

        _seed_everything(cfg.seed)
        if setup.joint is not None:
            env = make_joint_env(setup)
        else:
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
                row = episode_row(e, phase, sigma, ep, setup.cost.full_cost,
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
            raise AmcError("no episode produced a finite accuracy (all were discarded as NaN): check the model's "
                           "weights")
        return finish_run(setup, session, run_dir, best, top)


def _keep_top(top: list[dict], setup: SearchSetup, ep: Episode, episode: int, k: int) -> list[dict]:
    """The k best policies by reward, one per channel (and precision) choice (the measured wall's candidates)."""
    if k <= 0:
        return top
    key = {str(g): int(c) for g, c in ep.channels.items()}
    if any(t["channels"] == key and t.get("precisions") == ep.precisions for t in top):
        return top
    if len(top) >= k and ep.reward <= min(t["reward"] for t in top):
        return top
    return sorted([*top, policy_dict(setup, ep, episode)], key=lambda t: -t["reward"])[:k]


def episode_bar(cfg: SearchConfig, desc: str = "search", start: int = 0):
    """The episodes' progress bar (tqdm.auto: a widget in a notebook), None when cfg.progress is off."""
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.episodes, initial=start, desc=desc, unit="ep", dynamic_ncols=True)
