"""What a search prepares once, before its first episode: `prepare(config) -> SearchSetup` loads the
model and data, analyses the pruning graph, builds the cost model and its budget (measured on the
device for a latency budget), the reconstruction cache and the scorer."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.measure_models import measure_models
from amc_mobile.pruning.graph import Layer, PruningGraph, build_graph, default_scope, require_prunable
from latency_tables.predict import LatencyModel

from .config import SearchConfig, SearchWarning
from .cost import CostModel, FlopsCost, LatencyCost, ParamsCost
from .device_session import DeviceSession
from .env import ActionWall
from .joint import JointSetup
from .reconstruct import ChannelSelector, PrunedModelBuilder, Reconstructor, collect_layer_stats
from .score import EpisodeScorer


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
    joint: "JointSetup | None" = None  # --precision joint: the int8 table, precision map, quantizing scorer


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


def _latency_model(model: nn.Module, graph: PruningGraph, scope: str, cfg: SearchConfig, device: DeviceSession,
                   dtype: str = "fp32"):
    """The tables engineer's predictor for this model, scope and device: from --table-dir when given,
    else `ensure_table` (builds whatever the device's table still lacks, then loads it). `dtype` int8: the
    same units keyed int8 (no whole-model calibration: the fp32 table's overhead fit is the one used)."""
    try:
        from amc_mobile.tables import ensure_table, load_latency_model
    except ImportError as exc:
        raise AmcError(f"latency tables are not available in this installation ({exc}); use --cost flops") from exc
    kw = {}
    if dtype != "fp32":
        from amc_mobile.precision import with_dtypes
        from amc_mobile.tables import resolve_target

        target = resolve_target(model, graph, scope)
        target.graph = with_dtypes(target.graph, dtype)
        model, graph, kw = target, None, {"calibrate": False}
    if cfg.table_dir:
        return load_latency_model(model, graph, scope, device_uri=device.device(), table_dir=cfg.table_dir,
                                  unit_values=cfg.unit_values)
    return ensure_table(model, graph, scope, device_uri=device.device(), progress=cfg.progress,
                        unit_values=cfg.unit_values, **kw)


def make_cost(name: str, model: nn.Module, graph: PruningGraph, scope: str, cfg: SearchConfig, device: DeviceSession,
              latency_model=None) -> CostModel:
    if name == "flops":
        return FlopsCost(graph)
    if name == "params":
        return ParamsCost(graph)
    if name == "latency":
        if latency_model is None:
            latency_model = _latency_model(model, graph, scope, cfg, device)
        return LatencyCost(latency_model)
    raise AmcError(f"unknown cost {name!r}: latency, flops or params")


def measured_summary(device: DeviceSession, models: list[tuple[str, nn.Module]], input_shape) -> dict:
    """`models` measured on the device in ONE batch as setup.json and summary.json record it:
    {name: LatencyStats dict, "fingerprint": ...}, or {"error": why} when the device cannot measure."""
    try:
        return measure_models(device.device(), models, input_shape).to_dict()
    except AmcError as exc:
        return {"error": str(exc)}


def _recalibrate(cfg: SearchConfig, cost: CostModel, model: nn.Module, info: dict, device: DeviceSession
                 ) -> dict | None:
    """Re-time the table's calibration models on the device and refit the overhead term (see
    latency_tables.session); returns the unpruned model's timing as `measured_summary` does, or
    None (with a warning) when this cost model has no table or the device fails."""
    import latency_tables as lt
    from latency_tables.session import SESSION_CONFIG
    from amc_mobile.tables import resolve_target

    lat = cost.model if isinstance(cost, LatencyCost) else None
    if not isinstance(lat, LatencyModel):
        return None
    try:
        store = lt.TableStore(lat.source) if lat.source else None
        dev = device.device()
        if store is not None and store.exists():
            if store.fingerprint.differences(dev.fingerprint(SESSION_CONFIG)):
                store = None  # a table from another device configuration: refit for this session only
        else:
            store = None
        rec = lt.recalibrate(lat, resolve_target(model, lat.graph, lat.scope), dev, store=store,
                             anchored=cfg.unit_values == "anchored")
    except AmcError as exc:
        warnings.warn(f"could not re-time the calibration models on {cfg.device} ({exc}): the table's stored "
                      f"calibration is used", SearchWarning, stacklevel=2)
        return None
    cost.refresh()
    info["recalibration"] = rec.to_dict()
    if rec.original is None:
        return None
    return {"original": rec.original}


def _budget(cfg: SearchConfig, cost: CostModel, model: nn.Module, info: dict, device: DeviceSession
            ) -> float | None:
    if cfg.cost == "latency" and cfg.recalibrate and (
            cfg.reward == "guaranteed" or (cfg.latency_reference == "predicted" and cfg.target_ms is None)):
        # Issue 19: these paths set no measured budget, but their predictions must still be on today's
        # scale: the table is re-timed as for a measured budget (a failure warns, never silently).
        measured = _recalibrate(cfg, cost, model, info, device)
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
    measured = _recalibrate(cfg, cost, model, info, device) if cfg.recalibrate else None
    if measured is None:
        measured = measured_summary(device, [("original", model)], model.input_shape)
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


def restore_budget(cost: CostModel, saved: dict, info: dict) -> float | None:
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
            saved_info: dict | None = None, device: DeviceSession | None = None,
            int8_latency_model=None) -> SearchSetup:
    """Load the model and data, analyse the graph, build the cost model, the reconstruction cache and the
    scorer. `saved_info` (a resumed run's setup.json) restores the budget instead of measuring again;
    `device`: the run's device session (else cfg.device is opened for the preparation only, if needed);
    `int8_latency_model`: --precision joint's int8 predictor instead of the int8 table."""
    if device is None:
        with DeviceSession(cfg.device) as session:
            return prepare(cfg, model, data, latency_model, saved_info, session, int8_latency_model)
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
    cost = make_cost(cfg.cost, model, graph, scope, cfg, device, latency_model)
    budget = (restore_budget(cost, saved_info, info) if saved_info and "budget" in saved_info
              else _budget(cfg, cost, model, info, device))
    groups = [l.in_group for l in layers]
    # an unreachable budget is an error now, before minutes of calibration (the joint env checks its own)
    if cfg.precision == "fp32":
        ActionWall(graph, groups, cost, budget, cfg.lbound, cfg.rbound, cfg.channel_round,
                   info.get("original_measured_ms"))
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
    joint = None
    if cfg.precision == "joint":
        from amc_mobile.quantization import calibration_images

        from .joint import make_joint_env, prepare_joint

        int8 = int8_latency_model if int8_latency_model is not None else \
            _latency_model(model, graph, scope, cfg, device, "int8")
        joint = prepare_joint(model, graph, int8, builder, val, calibration_images(data.train, cfg.quant_calib_images),
                              cfg.size_mb, cfg.score_metric, cfg.eval_batch)
        info.update(size_budget_mb=cfg.size_mb, precision_layers=joint.layers,
                    fp32_size_mb=joint.size_of({}, {n: "fp32" for n in joint.layers}))
    setup = SearchSetup(cfg, model, graph, scope, layers, cost, budget, builder, scorer, data, info, joint)
    if joint is not None:
        make_joint_env(setup)  # an unreachable latency or size budget is an error before the first episode
    return setup

