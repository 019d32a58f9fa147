"""Figures of a search (or baseline) run folder, written next to its episodes.csv as PNGs that
`amc-mobile report` embeds:

- `reward.png`: reward per episode, warm-up episodes shaded, best-so-far line;
- `policy.png`: the best policy's preserve ratio per decision layer (bars) against the uniform width
  at the same predicted cost (line), AMC Fig. 3 style;
- `accuracy_vs_cost.png`: accuracy against predicted cost (latency for a latency run) of every
  explored policy, coloured by episode, with the budget line and the best policy marked.

    write_plots(run_dir)                      # reads config.json, episodes.csv, best_policy.json
    write_plots(run_dir, cost=setup.cost, graph=setup.graph)   # skip rebuilding the cost model

The uniform line needs the run's cost model; when none is given it is rebuilt from config.json
(model + graph + FLOPs, or the EXISTING latency table: nothing is measured). Where that is not
possible the figure is drawn without the line and says why.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import numpy as np

from amc_mobile.errors import AmcError
from amc_mobile.files import read_json, read_text

from .run_folder import BEST_FILE, CONFIG_FILE, LOG_FILE

REWARD_PNG = "reward.png"
POLICY_PNG = "policy.png"
SCATTER_PNG = "accuracy_vs_cost.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_run(run_dir: str | Path) -> tuple[list[dict], dict, dict]:
    """(episodes.csv rows with numbers parsed, best_policy.json, config.json) of a run folder."""
    import csv

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AmcError(f"{run_dir} does not exist or is not a folder: pass a search run folder")
    log, best = run_dir / LOG_FILE, run_dir / BEST_FILE
    if not log.exists() or not best.exists():
        raise AmcError(f"{run_dir} is not a search run folder: it has no {LOG_FILE} and {BEST_FILE}")
    fix = "rerun (or --resume) the search that wrote the folder"
    rows = list(csv.DictReader(io.StringIO(read_text(log, fix), newline="")))
    for line_no, r in enumerate(rows, start=2):
        try:
            r["episode"] = int(r["episode"])
            for k in ("reward", "accuracy", "cost", "cost_ratio"):
                r[k] = float(r[k]) if r.get(k) not in (None, "") else math.nan
            r["channels"] = {int(g): int(c) for g, c in json.loads(r["channels"]).items()} if r.get("channels") else {}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AmcError(f"{log} line {line_no}: not an episode row ({type(exc).__name__}: {exc}): {fix}") from None
    best_policy = read_json(best, dict, fix)
    config = read_json(run_dir / CONFIG_FILE, dict, fix) if (run_dir / CONFIG_FILE).exists() else {}
    return rows, best_policy, config


def plot_reward(rows: list[dict], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    ep = np.array([r["episode"] for r in rows])
    reward = np.array([r["reward"] for r in rows])
    warm = [r["episode"] for r in rows if r.get("phase") == "warmup"]
    fig, ax = plt.subplots(figsize=(8, 4))
    if warm:
        ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="0.85", label=f"warm-up ({len(warm)} random episodes)")
    ok = np.isfinite(reward)
    if ok.any():
        best = np.maximum.accumulate(np.where(ok, reward, -np.inf))
        shown = np.isfinite(best)
        ax.step(ep[shown], best[shown], where="post", color="C3", lw=1.5, label="best so far", zorder=2)
    ax.plot(ep[ok], reward[ok], "o", ms=3.5, color="C0", alpha=0.8, label="episode reward", zorder=3)
    if (~ok).any():
        ax.plot(ep[~ok], np.full((~ok).sum(), np.nanmin(reward) if ok.any() else 0), "x", color="k",
                label="discarded (NaN)")
    ax.set_xlabel("episode")
    ax.set_ylabel("reward")
    ax.set_title(title or "reward per episode")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_policy(best: dict, path: Path, uniform: dict | None = None, note: str = "") -> Path:
    """Bars: the best policy's kept/size per decision layer; line: the uniform width at the same cost.
    `uniform`: {"ratio": r, "ratios": [kept/size per layer], "cost": c} or None."""
    plt = _pyplot()
    layers = _ordered_layers(best)
    names = [n for n, _ in layers] or [str(i) for i in range(len(best.get("preserve_ratios", [])))]
    ratios = [v["ratio"] for _, v in layers] if layers else list(best.get("preserve_ratios", []))
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(names) + 2), 4.5))
    unit = best.get("cost_unit", "")
    ax.bar(x, ratios, color="C0", alpha=0.85,
           label=f"best policy (ep. {best.get('episode')}, {best.get('cost', math.nan):.4g} {unit})")
    if uniform is not None:
        ax.plot(x, uniform["ratios"], "o-", color="C3", ms=4,
                label=f"uniform width {uniform['ratio']:.3f} at the same cost ({uniform['cost']:.4g} {unit})")
    ax.set_xticks(x)
    ax.set_xticklabels([_short(n) for n in names], rotation=75, ha="right", fontsize=7)
    ax.set_ylim(0, 1.3)
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set_ylabel("preserve ratio (kept / channels)")
    ax.set_title("per-layer preserve ratios" + (f" ({note})" if note else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scatter(rows: list[dict], best: dict, path: Path, x_of=None, x_label: str | None = None,
                 budget: float | None = None) -> Path:
    """Accuracy against predicted cost per explored policy; `x_of(row) -> float` overrides the cost column."""
    plt = _pyplot()
    ok = [r for r in rows if math.isfinite(r["accuracy"])]
    xs = np.array([x_of(r) if x_of else r["cost"] for r in ok])
    ys = np.array([r["accuracy"] for r in ok])
    eps = np.array([r["episode"] for r in ok])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sc = ax.scatter(xs, ys, c=eps, cmap="viridis", s=14, alpha=0.8)
    fig.colorbar(sc, ax=ax, label="episode")
    unit = best.get("cost_unit", "")
    budget = best.get("budget") if budget is None and x_of is None else budget
    if budget is not None and math.isfinite(budget):
        ax.axvline(budget, color="C3", ls="--", lw=1.2, label=f"budget {budget:.4g}")
    b = [r for r in ok if r["episode"] == best.get("episode")]
    if b:
        bx = x_of(b[0]) if x_of else b[0]["cost"]
        ax.plot([bx], [b[0]["accuracy"]], "*", ms=16, color="C1", mec="k", label=f"best (episode {best['episode']})")
    ax.set_xlabel(x_label or f"predicted {'latency' if unit == 'ms' else 'cost'} ({unit})")
    ax.set_ylabel(f"validation {best.get('metric', 'accuracy')}")
    ax.set_title("explored policies")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ordered_layers(best: dict) -> list[tuple[str, dict]]:
    """best_policy.json's layers in forward order (the JSON is written with sorted keys; channel groups
    are numbered in forward order by the graph analysis)."""
    layers = best.get("layers") or {}
    return sorted(layers.items(), key=lambda kv: int(kv[1].get("group", 0)))


def _short(name: str) -> str:
    return name.removeprefix("features.").removesuffix(".conv")


def uniform_reference(best: dict, cost, graph, lbound: float = 0.2, rbound: float = 1.0, grid: int = 8) -> dict:
    """The uniform width whose predicted cost is the largest within the best policy's cost."""
    from .baselines import uniform_at_cost

    groups = [int(v["group"]) for _, v in _ordered_layers(best)]
    ratio, channels = uniform_at_cost(cost, graph, groups, float(best["cost"]), lbound, rbound, grid)
    return {"ratio": ratio, "ratios": [channels[g] / graph.groups[g].size for g in groups],
            "cost": cost.predict(channels), "channels": {str(g): c for g, c in channels.items()}}


def _cost_from_config(config: dict):
    """(cost model, graph) rebuilt from a run's config.json: the model, its graph, and FLOPs/params or the
    existing latency table (never built here)."""
    from amc_mobile.pruning.graph import build_graph, default_scope

    from .baselines import latency_cost_for
    from .config import SearchConfig
    from .cost import FlopsCost, ParamsCost
    from .setup import family_of, load_model

    cfg = SearchConfig.from_dict(config)
    model = load_model(cfg.model, cfg)
    graph = build_graph(model)
    if cfg.cost == "flops":
        return FlopsCost(graph), graph
    if cfg.cost == "params":
        return ParamsCost(graph), graph
    scope = cfg.scope or default_scope(family_of(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cost = latency_cost_for(model, graph, scope, cfg)
    if cost is None:
        raise AmcError(f"no latency table for {cfg.model} on {cfg.device}")
    return cost, graph


def write_plots(run_dir: str | Path, cost=None, graph=None, latency=None) -> list[Path]:
    """Write the three figures into `run_dir`; returns their paths. `cost`/`graph`: the run's cost model
    and graph (rebuilt from config.json when not given); `latency`: a latency cost model for the scatter's
    x-axis when the run's own cost is not latency (e.g. a FLOPs search)."""
    run_dir = Path(run_dir)
    rows, best, config = read_run(run_dir)
    if not rows:
        raise AmcError(f"{run_dir}/episodes.csv has no episodes yet")
    method = _method(run_dir)
    title = f"{method or 'search'}: {config.get('model', '')} {config.get('cost', '')} budget, target {config.get('target', '')}"
    out = [plot_reward(rows, run_dir / REWARD_PNG, title)]

    uniform, note = None, ""
    if best.get("layers") and best.get("cost") is not None and best.get("cost_unit") != "" :
        try:
            if cost is None or graph is None:
                cost, graph = _cost_from_config(config)
            uniform = uniform_reference(best, cost, graph, config.get("lbound", 0.2), config.get("rbound", 1.0),
                                        config.get("channel_round", 8))
        except Exception as exc:  # the figure is still worth having without the line
            note = f"no uniform line: {str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__}"
    out.append(plot_policy(best, run_dir / POLICY_PNG, uniform, note))

    x_of, x_label = None, None
    if latency is not None and best.get("cost_unit") != "ms":
        x_of = lambda r: latency.predict(r["channels"])  # noqa: E731
        x_label = "table-predicted latency (ms)"
    out.append(plot_scatter(rows, best, run_dir / SCATTER_PNG, x_of, x_label))
    return out


def _method(run_dir: Path) -> str | None:
    path = run_dir / "run.json"
    try:
        manifest = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return manifest.get("method") if isinstance(manifest, dict) else None
