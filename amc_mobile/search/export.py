"""The end of a search or baseline: export the chosen policy as a pruned model (reconstructed weights,
not fine-tuned), with its accuracy on the whole validation split and its latency measured on the
device; with a latency budget the policy is first checked against the budget as measured
(measured_wall.py)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.files import write_json
from amc_mobile.pruning.graph import PruningGraph

from .config import SearchConfig, SearchWarning
from .device_session import DeviceSession
from .run_folder import BEST_FILE, LOG_FILE, PRUNED_DIR, QUANT_POLICY_FILE, SUMMARY_FILE, read_log
from .score import evaluate_split
from .setup import SearchSetup, measured_summary

log = logging.getLogger(__name__)


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


def _measured_pick(setup: SearchSetup, device: DeviceSession, best: dict, top: list[dict]
                   ) -> tuple[dict, dict, dict | None]:
    """Item 6 of issue 19 (see measured_wall.py): (the policy to export, summary entry, its measurement
    next to the original as summary.json's `measured`, or None when no policy was picked)."""
    from .env import ActionWall
    from .measured_wall import pick_measured

    cfg = setup.config
    groups = [l.in_group for l in setup.layers]
    joint = setup.joint

    def cost_at(precisions):
        if precisions is None:
            return setup.cost
        from .cost import MixedLatencyCost

        return MixedLatencyCost(setup.cost.model, joint.int8, joint.unit_dtypes(precisions))

    def refit(channels: dict[int, int], precisions, budget: float) -> dict[int, int]:
        try:
            wall = ActionWall(setup.graph, groups, cost_at(precisions), budget, cfg.lbound, cfg.rbound,
                              cfg.channel_round)
            return wall.fit_budget(channels)[0]
        except AmcError:
            return channels  # the budget is below what the lower bounds allow: nothing to walk back

    def build(channels, precisions):
        if precisions is None:
            return setup.builder.build(channels)
        return joint.scorer.quantized(channels, precisions, check_delegation=True).module

    def score(channels, precisions) -> float:
        return (setup.scorer(channels) if precisions is None else joint.scorer(channels, precisions)).accuracy

    pool = top or [best]
    try:
        pick = pick_measured(pool, device=device.device(), original=setup.model, input_shape=setup.model.input_shape,
                             build=build, score=score, refit=refit,
                             predict=lambda ch, prec: cost_at(prec).predict(ch), target_ratio=cfg.target,
                             target_ms=cfg.target_ms)
    except AmcError as exc:
        warnings.warn(f"the measured final wall could not run on {cfg.device} ({exc}): the best predicted policy is "
                      f"kept, its budget unchecked", SearchWarning, stacklevel=2)
        return best, {"error": str(exc)}, None
    entry = pick.to_dict()
    # which candidate the search would have exported without this wall (the best by predicted reward)
    entry["best_predicted"] = next((c["label"] for c in entry["candidates"] if c["channels"] == best["channels"]),
                                   None)
    log.info(pick.line())
    if pick.picked is None:
        warnings.warn(pick.line(), SearchWarning, stacklevel=2)
        return best, entry, None
    p = pick.picked
    chosen = next((t for t in pool if {int(g): int(c) for g, c in t["channels"].items()} == p.channels
                   and t.get("precisions") == p.precisions), None)
    if chosen is None:  # a walked-back policy: the best one's record with the new channels
        chosen = {**best, "channels": {str(g): int(c) for g, c in p.channels.items()}, "accuracy": p.accuracy,
                  "cost": p.predicted, "cost_ratio": p.predicted / setup.cost.full_cost, "walked_back_measured":
                  pick.walked_back, **({"precisions": p.precisions} if p.precisions is not None else {})}
        for name, layer in chosen.get("layers", {}).items():
            layer = dict(layer)
            layer["kept"] = p.channels.get(layer["group"], layer["kept"])
            layer["ratio"] = round(layer["kept"] / layer["size"], 6)
            chosen["layers"][name] = layer
    chosen = {**chosen, "measured_ratio": p.ratio, "measured_over_target": pick.measured_over_target}
    return chosen, entry, pick.final_measurement()


def finish_run(setup: SearchSetup, device: DeviceSession, run_dir: Path, best: dict, top: list[dict] | None = None
               ) -> SearchResult:
    """Export the best policy: pruned model (reconstructed weights), its accuracy, measured latency.
    With a latency budget, the policy is the one whose measured ratio meets it (`_measured_pick`)."""
    from amc_mobile.models import model_config
    from amc_mobile.pruning.slicing import save_pruned

    cfg = setup.config
    measured_budget = measured = None
    if cfg.cost == "latency" and setup.budget is not None and cfg.measure_final and cfg.final_candidates > 0:
        best, measured_budget, measured = _measured_pick(setup, device, best, top or [])
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
    deployed = pruned
    if setup.joint is not None:
        deployed = _export_quantized(setup, run_dir, best, pruned, summary)
    if cfg.measure_final:
        if measured is None:  # no measured wall ran (or it picked nothing): time the export next to the original
            measured = measured_summary(device, [("original", setup.model), ("pruned", deployed)],
                                        setup.model.input_shape)
        if "error" in measured or not all(measured.get(n, {}).get("error") is None for n in ("original", "pruned")):
            warnings.warn(f"final measurement on {cfg.device} failed: "
                          f"{measured.get('error') or [measured[n].get('error') for n in ('original', 'pruned')]}",
                          SearchWarning, stacklevel=2)
        else:
            o, p = measured["original"]["median_ms"], measured["pruned"]["median_ms"]
            # With the original in every round (the measured wall's batch) the ratio is the median of the
            # per-round ratios, the figure the wall judged the target by; on a loaded host the original's
            # rounds scatter more than a smaller model's and the ratio of the medians can differ by 10 %+.
            paired = measured["pruned"].get("ratio")
            measured["ratio_of_medians"] = p / o
            measured["measured_ratio"] = paired if paired is not None else p / o
            measured["speedup"] = 1 / measured["measured_ratio"]
        summary["measured"] = measured
    write_json(run_dir / SUMMARY_FILE, summary)
    return SearchResult(run_dir, cfg, best, channels, pruned.eval(), setup.model, setup.graph, summary)


def _export_quantized(setup: SearchSetup, run_dir: Path, best: dict, pruned: nn.Module, summary: dict) -> nn.Module:
    """A joint policy deploys quantized: QUANT_POLICY_FILE (a --policy for `quantize`, next to pruned/) and
    quantized/ (model.pte + quantization.json: precision per layer, sizes, top-1 of the .pte); returns the
    quantized module the final measurement times."""
    from amc_mobile.quantization import QUANTIZED_DIR, quantize_to_folder
    from device import example_input

    from .joint import quant_policy

    cfg, joint = setup.config, setup.joint
    policy = quant_policy(best["precisions"])
    write_json(run_dir / QUANT_POLICY_FILE, policy.to_dict())
    x = example_input(setup.model.input_shape)
    channels = {int(g): int(c) for g, c in best["channels"].items()}
    qm = joint.scorer.quantized(channels, best["precisions"], check_delegation=True)  # the measured wall's, if it ran
    folder = quantize_to_folder(pruned, x, setup.data.train, setup.data.val, policy, run_dir / QUANTIZED_DIR,
                                calib_images=cfg.quant_calib_images, eval_images=len(setup.data.val),
                                label=f"{cfg.model} pruned [{policy.label()}]",
                                quantized=qm, extra={"channels": best["channels"], "source": "joint search"})
    rep = folder.report
    summary["quantized"] = {"dir": str(folder.out_dir), "policy": policy.to_dict(),
                            "int8_layers": len(qm.int8_layers), "layers": len(qm.layers),
                            "fallbacks": [f.to_dict() for f in qm.fallbacks],
                            "size_mb": joint.size_of(channels, {l.layer: l.actual for l in qm.layers}),
                            "size_budget_mb": joint.size_mb, "fp32_size_mb": setup.info.get("fp32_size_mb"),
                            "pte_mb": rep.get("pte_mb"), "accuracy": rep.get("accuracy")}
    return qm.module
