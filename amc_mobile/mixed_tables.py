"""Mixed-precision (and pruned) latency from a table, for models: load the predictor, time its calibration
models, and check it against reality (`amc-mobile table validate --dtype mixed`).

The table needs the model's fp32 rows (`table build`) and its int8 rows (`table build --dtype int8`: int8
units taking and returning int8, and the quantize/dequantize of every fp32<->int8 edge). A prediction is
`MixedPredictor.predict(channels, dtypes)` (amc_mobile/precision.py); its overhead term is fitted on whole
models at both precisions: the table's fp32 calibration models and the same channel variants all-int8.

Validation: random variants, each a random channel choice (as `table validate`) and a random precision per
conv/linear layer (int8 with probability 1/2), plus the calibration models at fp32 and all-int8, lowered
once and timed in `passes` interleaved passes with the unpruned fp32 model in every round. Every pass is
appended to `samples.csv` and `calibration.csv` as measured. Reported: the share within +-5 % / +-10 %,
RMSPE, the under-prediction share and Spearman, with three overhead fits: the table's (its fp32
calibration models), this session's fp32 calibration models only, and this session's fp32 + all-int8 ones
(the session calibration a search uses).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from device.base import Device, MeasureConfig
from device.quantize import QuantPolicy, quantize_model
from device.stats import LatencyStats
from latency_tables.batching import BatchRunner, Job, Programs
from latency_tables.build import MODEL_CONFIG
from latency_tables.calibrate import DEFAULT_VARIANTS, calibration_for, calibration_variants
from latency_tables.loading import device_label, open_table, table_grid, RECENT_PASSES
from latency_tables.mixed import MixedLatencyModel, at_dtype
from latency_tables.network import Target, model_hash
from latency_tables.schema import (CALIBRATION_COLUMNS, CalibrationRow, Stats, clean_field, encode_channels, now_iso,
                                   read_calibration_rows)
from latency_tables.space import random_channels
from latency_tables.store import AppendLog, TableStore

from .errors import AmcError
from .precision import MixedPredictor, PrecisionMap, int8_mask
from .runs import new_run_dir, write_manifest
from .table_validation import REFERENCE_NAME, accuracy_metrics, format_metrics
from .tables import resolve_target

CALIBRATION_IMAGES = 16  # random images: the activation ranges change the values, not the kernels' speed
MIXED_SAMPLE_COLUMNS = ("index", "seed", "pass", "channels", "policy", "int8_units", "edges", "unit_sum_ms",
                        "median_ms", "p10_ms", "n", "measured_at")


def int8_hash(target: Target) -> str:
    """Calibration rows of the all-int8 models are keyed by the int8 network, next to the fp32 model's."""
    return model_hash(at_dtype(target.graph, "int8"))


def quantized(target: Target, channels: dict[int, int], policy: QuantPolicy, x: torch.Tensor):
    """The model pruned to `channels`, quantized by `policy` (the original module when fp32 and unpruned)."""
    module = target.pruned(channels)
    if policy.all_fp32:
        return module
    calib = torch.randn(CALIBRATION_IMAGES, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    return quantize_model(module, x, calib, policy, check_delegation=False).module


def _points(predictor: MixedPredictor, rows: list[CalibrationRow], policy: QuantPolicy,
            recent: int = RECENT_PASSES) -> list[tuple]:
    by: dict[tuple, list[float]] = {}
    for r in rows:
        by.setdefault(tuple(sorted(r.channels.items())), []).append(r.stats.median_ms)
    mask, edges = int8_mask(predictor.pmap, policy), predictor.pmap.active_edges(policy)
    out = []
    for k, values in by.items():
        try:
            predictor.latency.unit_sum(dict(k), mask, edges)
        except AmcError:
            continue  # a variant of another scope
        out.append((dict(k), mask, edges, float(np.median(values[-recent:]))))
    return out


def fit_from_rows(predictor: MixedPredictor, target: Target, rows: list[CalibrationRow], int8: bool = True) -> dict:
    """Fit the predictor's overhead on calibration rows: the fp32 model's and (int8) the all-int8 model's."""
    points = _points(predictor, calibration_for(rows, target.hash), QuantPolicy("fp32"))
    if int8:
        points += _points(predictor, calibration_for(rows, int8_hash(target)), QuantPolicy("int8"))
    if not points:
        return {"method": "none", "points": 0, "scale": 1.0, "offset": 0.0}
    return {**predictor.latency.fit(points).to_dict(), "int8": int8}


def load_mixed_latency_model(model, device: str | Device = "local", *, graph=None, scope: str | None = None,
                             grid: int | None = None, table_dir=None, tables_dir=None, allow_mismatch: bool = False,
                             config: MeasureConfig | None = None) -> tuple[MixedPredictor, Target, TableStore]:
    """The mixed-precision predictor of `model` (registry name, folder, module or Target) from the table of
    `device`, its overhead fitted on the table's calibration rows (fp32, and all-int8 where timed)."""
    target = resolve_target(model, graph, scope)
    label = device_label(device)
    store = open_table(device, table_dir, tables_dir, allow_mismatch, config, hint=target.build_command(label))
    grid = int(grid or table_grid(store, target))
    pmap = PrecisionMap(target.module, target.graph)
    latency = MixedLatencyModel.compile(target.graph, pmap.edge_units, target.scope, store.units().values(), grid,
                                        build_hint=target.build_command(label, grid), source=str(store.folder))
    predictor = MixedPredictor(pmap, latency)
    fit_from_rows(predictor, target, store.calibration())
    return predictor, target, store


def calibration_jobs(target: Target, grid: int, count: int = DEFAULT_VARIANTS) -> list[Job]:
    """The table's calibration models (the unpruned one and uniformly pruned ones) at fp32 and all-int8."""
    x = target.example_input()
    return [Job(f"c{d}{i:02d}", example_input=x, payload=("calibration", f"{d}:{lbl}", ch, QuantPolicy(d)))
            for d in ("fp32", "int8") for i, (lbl, ch) in enumerate(calibration_variants(target.graph, target.scope,
                                                                                         grid, count))]


def recalibrate_mixed(predictor: MixedPredictor, target: Target, device: str | Device = "local", *,
                      grid: int | None = None, passes: int = 3, config: MeasureConfig | None = None,
                      store: TableStore | None = None, count: int = DEFAULT_VARIANTS) -> dict:
    """Time the calibration models at fp32 and all-int8 now (`passes` interleaved passes) and refit the
    predictor's scale and offset on them: the session calibration a search makes before it sets a budget.
    `store`, when given, gets every timing appended to its calibration rows. Returns the fit."""
    from device.registry import open_device

    if passes < 1:
        raise AmcError(f"recalibration needs at least one pass (got {passes})")
    config = config or MODEL_CONFIG
    grid = int(grid or (table_grid(store, target) if store is not None else 8))
    jobs = calibration_jobs(target, grid, count)
    x = target.example_input()
    rows: list[CalibrationRow] = []

    def materialize(job: Job) -> None:
        job.module = quantized(target, job.payload[2], job.payload[3], x)

    def on_batch(results) -> None:
        new = [CalibrationRow(target.hash if job.payload[3].default == "fp32" else int8_hash(target), target.label,
                              job.payload[1], job.payload[2], Stats.of(st)) for job, st in results if st.ok]
        rows.extend(new)
        if store is not None and new:
            store.append_calibration(new)

    owned = isinstance(device, str)
    dev = open_device(device) if owned else device
    try:
        with BatchRunner(dev, config, batch_size=len(jobs), workers=1) as runner, \
                Programs(runner, jobs, config, materialize=materialize) as programs:
            for _ in range(passes):
                programs.measure_pass(on_batch)
    finally:
        if owned:
            dev.close()
    if not rows:
        raise AmcError("recalibration measured none of the calibration models")
    return fit_from_rows(predictor, target, rows)


@dataclass
class MixedValidation:
    out_dir: Path
    samples: pd.DataFrame
    metrics: dict

    def summary(self) -> str:
        lines = []
        for key, what in (("table", "table's calibration (fp32 models)"),
                          ("session_fp32", "session calibration, fp32 models only"),
                          ("session", "session calibration, fp32 + all-int8 models")):
            m = self.metrics.get(key)
            if m:
                f = m["fit"]
                lines.append(f"{what} ({f['method']}, scale {f['scale']:.3f}, offset {f['offset']:+.4f} ms):\n    "
                             + format_metrics(m["metrics"]))
        lines.append(f"samples: {self.out_dir / 'samples.csv'}")
        return "\n".join(lines)


def validate_mixed(model, device: str | Device = "local", *, samples: int = 30, seed: int = 0, prune: bool = True,
                   scope: str | None = None, grid: int | None = None, out_dir=None, table_dir=None, tables_dir=None,
                   allow_mismatch: bool = False, config: MeasureConfig | None = None, passes: int = 3,
                   batch_size: int = 4, workers: int = 1, progress: bool = True,
                   calibration_count: int = DEFAULT_VARIANTS) -> MixedValidation:
    """See the module doc; `calibration_count`: calibration models per precision (the unpruned one first)."""
    if samples < 1:
        raise AmcError("--samples must be >= 1")
    config = config or MODEL_CONFIG
    owned = not isinstance(device, Device)
    if owned:
        from device.registry import open_device

        device = open_device(device)
    try:
        lookup = MeasureConfig(threads=config.threads, affinity=config.affinity)
        predictor, target, store = load_mixed_latency_model(model, device, scope=scope, grid=grid, table_dir=table_dir,
                                                            tables_dir=tables_dir, allow_mismatch=allow_mismatch,
                                                            config=lookup)
        stored_fit = dict(predictor.latency.calibration)
        grid = int(grid or table_grid(store, target))
        label = device_label(device)
        out = new_run_dir("table-validate-mixed", out_dir)
        write_manifest(out, "table-validate-mixed", model=target.label, device=label, table=str(store.folder),
                       samples=samples, seed=seed, scope=target.scope, grid=grid, prune=prune, passes=passes)
        rng = np.random.default_rng(seed)
        layers = predictor.pmap.layers
        variants = []
        for _ in range(samples):
            ch = random_channels(target.graph, target.scope, rng, grid) if prune else {}
            variants.append((ch, QuantPolicy("fp32", {n: ("int8" if rng.random() < 0.5 else "fp32") for n in layers})))
        x = target.example_input()
        jobs = [Job(f"s{i:04d}", example_input=x, payload=("sample", i, ch, pol)) for i, (ch, pol) in enumerate(variants)]
        jobs += calibration_jobs(target, grid, calibration_count)
        if config.reference is None:
            config = replace(config, reference=REFERENCE_NAME)

        def materialize(job: Job) -> None:
            _, _, ch, pol = job.payload
            job.module = quantized(target, ch, pol, x)

        from tqdm import tqdm

        bar = tqdm(total=len(jobs) * (passes + 1), unit="model", desc="validate mixed (lower, then time)",
                   disable=not progress, dynamic_ncols=True)
        runner = BatchRunner(device, config, batch_size, workers)
        runner.reference = Job(REFERENCE_NAME, module=target.module.eval(), example_input=x)
        failures: list[str] = []
        with runner, Programs(runner, jobs, config, materialize, progress=bar.update) as programs, \
                AppendLog(out / "samples.csv", MIXED_SAMPLE_COLUMNS) as log, \
                AppendLog(out / "calibration.csv", CALIBRATION_COLUMNS) as clog:
            for k in range(passes):
                def on_batch(results: list[tuple[Job, LatencyStats]], k=k) -> None:
                    for job, st in results:
                        kind, i, ch, pol = job.payload
                        if not st.ok:
                            if k == 0:
                                failures.append(f"{kind} {i}: {clean_field(st.error or 'failed')}")
                            continue
                        stats = Stats.of(st)
                        if kind == "calibration":
                            h = target.hash if pol.default == "fp32" else int8_hash(target)
                            clog.append(CalibrationRow(h, target.label, i, ch, stats).to_line())
                            continue
                        mask = int8_mask(predictor.pmap, pol)
                        edges = predictor.pmap.active_edges(pol)
                        unit_sum = predictor.latency.unit_sum(ch, mask, edges)
                        log.append(",".join([str(i), str(seed), str(k), encode_channels(ch),
                                             clean_field(json.dumps(pol.layers, sort_keys=True)), str(sum(mask)),
                                             str(len(edges)), f"{unit_sum:.6g}", f"{stats.median_ms:.6g}",
                                             f"{stats.p10_ms:.6g}", str(stats.n), stats.measured_at]) + "\n")
                    log.sync()
                    clog.sync()
                    bar.update(len(results))

                programs.measure_pass(on_batch)
        bar.close()
        raw = pd.read_csv(out / "samples.csv", keep_default_na=False)
        if raw.empty:
            raise AmcError(f"no sample could be measured: {'; '.join(failures[:3]) or 'no reason given'}")
        df = raw.groupby("index", sort=True).agg(unit_sum_ms=("unit_sum_ms", "first"), median_ms=("median_ms", "median"),
                                                 int8_units=("int8_units", "first"), edges=("edges", "first"),
                                                 channels=("channels", "first"), policy=("policy", "first")
                                                 ).reset_index()
        sums, meas = df["unit_sum_ms"].to_numpy(float), df["median_ms"].to_numpy(float)
        session_rows = read_calibration_rows(out / "calibration.csv")
        metrics: dict = {"failed": len(failures), "failures": failures[:5]}
        for key, rows, int8 in (("table", None, True), ("session_fp32", session_rows, False),
                                ("session", session_rows, True)):
            fit = stored_fit if rows is None else fit_from_rows(predictor, target, rows, int8)
            if not fit.get("points"):
                continue
            pred = fit["scale"] * sums + fit["offset"]
            metrics[key] = {"fit": fit, "metrics": accuracy_metrics(pred, meas), "predicted_ms": pred.tolist()}
            df[f"predicted_{key}_ms"] = pred
        df.to_csv(out / "variants.csv", index=False)
        (out / "summary.json").write_text(json.dumps({"model": target.label, "device": label, "table": str(store.folder),
                                                      "metrics": metrics, "created": now_iso()}, indent=2,
                                                     sort_keys=True, default=str) + "\n")
        return MixedValidation(out, df, metrics)
    finally:
        if owned:
            device.close()
