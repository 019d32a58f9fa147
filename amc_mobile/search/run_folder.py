"""The files of a search (or baseline) run folder: their names, the episode log's columns, and the
writers and readers of each; the report, fine-tuning and the plots read the folder by these names.

    config.json       the SearchConfig                 episodes.csv   one row per episode (EpisodeLog)
    setup.json        SearchSetup.info (budget, ...)   best_policy.json  the best policy (policy_dict)
    pruned/           the exported pruned model        summary.json   the result, measured latency
    checkpoints/      the agent's state (checkpoint.py)
    --precision joint adds quant_policy.json (a QuantPolicy) and quantized/ (model.pte + quantization.json)
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from amc_mobile.errors import AmcError
from amc_mobile.files import atomic_write, read_json

from .config import SearchConfig

if TYPE_CHECKING:
    from .env import Episode
    from .setup import SearchSetup

LOG_FILE = "episodes.csv"
CONFIG_FILE = "config.json"
BEST_FILE = "best_policy.json"
SUMMARY_FILE = "summary.json"
SETUP_FILE = "setup.json"
PRUNED_DIR = "pruned"
QUANT_POLICY_FILE = "quant_policy.json"  # --precision joint: the chosen precisions, a QuantPolicy
LOG_COLUMNS = ("episode", "phase", "sigma", "reward", "accuracy", "loss", "cost", "cost_ratio", "walked_back",
               "prune_s", "eval_s", "predict_s", "agent_s", "episode_s", "discarded", "actions", "ratios", "channels",
               "precisions")
# Where an episode's time goes: building the pruned model (slicing + cached reconstructed weights),
# scoring it, the action wall's latency predictions (and the env's state), the agent (actions, updates),
# and the whole episode (the rest is the log and checkpoints).
TIMING_COLUMNS = ("prune_s", "eval_s", "predict_s", "agent_s", "episode_s")
# Fields that may differ between a run and its resumption; everything else must match.
RESUMABLE_OVERRIDES = ("episodes", "resume", "out", "progress", "measure_final", "checkpoint_every", "threads",
                       "compute")



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
        **({"precisions": dict(ep.precisions), "int8_layers": sum(p == "int8" for p in ep.precisions.values())}
           if ep.precisions is not None else {}),
        **({"size_mb": ep.info["size_mb"]} if "size_mb" in ep.info else {}),
    }


def episode_row(episode: int, phase: str, sigma: float, ep: Episode, full_cost: float,
                timing: dict | None = None) -> dict:
    """One episodes.csv row (LOG_COLUMNS)."""
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
        "precisions": "" if ep.precisions is None else " ".join(ep.precisions.values()),
    }


# ----------------------------------------------------------------------------------- the folder


def open_run_dir(cfg: SearchConfig) -> tuple[Path, SearchConfig, bool]:
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


def read_saved_setup(run_dir: Path) -> dict | None:
    """A resumed run's setup.json (its budget and session fit), None when absent or unreadable (then the
    budget is measured again and may move slightly)."""
    path = run_dir / SETUP_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.exists():
        raise AmcError(f"{run_dir}: no {SUMMARY_FILE} (the run did not finish)")
    return read_json(path, dict, "rerun the baseline")
