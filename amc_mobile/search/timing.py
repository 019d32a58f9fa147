"""Where a search's time went, from its episodes.csv: per phase, the median per episode, the total and
the share of the episodes' wall time; written to summary.json under "timing" and printed by the CLI.

Phases (columns of episodes.csv): `prune_s` builds the pruned model (slicing + cached reconstructed
weights; a solve the first time a (layer, kept) pair is seen), `eval_s` scores it on the validation
images, `predict_s` is the action wall's cost predictions and the env's states, `agent_s` the DDPG
actions and updates; `episode_s` is the whole episode, so "other" is the log and checkpoints.
Episodes whose policy was scored before (cached score) count with their zero build/score time.
"""

from __future__ import annotations

import statistics

PHASES = ("prune_s", "eval_s", "predict_s", "agent_s")
PHASE_NAMES = {"prune_s": "build+reconstruct", "eval_s": "evaluation", "predict_s": "prediction",
               "agent_s": "agent", "other_s": "other"}


def phase_timing(rows: list[dict], setup_info: dict | None = None) -> dict:
    """{"episodes", "episode_s": {median, total}, "<phase>": {median, total, share}, ...} over the rows
    that carry timings (a log written before these columns existed has none: {})."""
    timed = [r for r in rows if r.get("episode_s") not in (None, "")]
    if not timed:
        return {}

    def col(name: str) -> list[float]:
        return [float(r.get(name) or 0.0) for r in timed]

    wall = col("episode_s")
    total = sum(wall) or float("nan")
    out: dict = {"episodes": len(timed), "episode_s": {"median": statistics.median(wall), "total": sum(wall)}}
    accounted = [0.0] * len(timed)
    for name in PHASES:
        vals = col(name)
        accounted = [a + v for a, v in zip(accounted, vals)]
        out[name] = {"median": statistics.median(vals), "total": sum(vals), "share": sum(vals) / total}
    other = [max(w - a, 0.0) for w, a in zip(wall, accounted)]
    out["other_s"] = {"median": statistics.median(other), "total": sum(other), "share": sum(other) / total}
    for k in ("calibration_s", "original_eval_s"):
        if setup_info and k in setup_info:
            out[k] = setup_info[k]
    return out


def describe(timing: dict) -> str:
    """One line: `per episode 2.31 s median: evaluation 81%, build+reconstruct 9%, ...`."""
    if not timing:
        return "no per-phase timings in this log"
    parts = sorted(((timing[k]["share"], PHASE_NAMES[k]) for k in (*PHASES, "other_s")), reverse=True)
    line = (f"per episode {timing['episode_s']['median']:.3g} s median over {timing['episodes']}: "
            + ", ".join(f"{name} {share:.0%}" for share, name in parts))
    if "calibration_s" in timing:
        line += f"; reconstruction features {timing['calibration_s']:.3g} s once"
    return line
