"""Check a table against reality: random pruned variants, predicted, then measured end to end.

Each sample keeps a random grid choice per group in scope (seeded). All samples, and the table's
calibration models, are lowered first (multi-method `.pte` batches), then timed in `passes` passes,
each pass covering every program: on a shared machine the load drifts, and this way every sample
and every calibration model sees the same mixture of conditions. Each pass's result is appended to
`samples.csv` (one row per sample per pass) as measured; a rerun with the same `--out` skips the
samples that have all their passes. A sample's latency is the median over its passes.

Two overhead fits are reported: the table's (what a search gets) and this session's (the table's
calibration models timed in the same passes): their difference is machine drift since the build.
The summary: share within +-5% / +-10%, RMSPE, the under-prediction share (predicted more than 5%
below measured: a search would believe these meet a budget they miss) and Spearman's rank
correlation (ranks with pandas, Pearson on the ranks; no scipy needed).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from device.base import Device, MeasureConfig
from device.stats import LatencyStats
from latency_tables.batching import DEFAULT_WORKERS, BatchRunner, Job, Programs
from latency_tables.build import MODEL_CONFIG
from latency_tables.calibrate import calibration_variants, fit_overhead
from latency_tables.loading import calibration_points, compile_for, device_label, open_table, table_grid
from latency_tables.schema import (CALIBRATION_COLUMNS, CalibrationRow, Stats, clean_field, decode_channels, encode_channels,
                     now_iso, read_calibration_rows)
from latency_tables.space import random_channels
from latency_tables.store import AppendLog

from .errors import AmcError
from .pruning.graph import PruningGraph
from .runs import new_run_dir, write_manifest
from .tables import resolve_target

SAMPLE_COLUMNS = ("index", "seed", "pass", "channels", "predicted_ms", "unit_sum_ms", "interpolated_units", "median_ms",
                  "mean_ms", "std_ms", "p10_ms", "p90_ms", "n", "error_pct", "measured_at")
SAMPLES_FILE = "samples.csv"  # one row per sample per pass
# The drift reference of a validation (issue 19): the unpruned model, lowered into every program and
# run in every round; one row per measured sample (or calibration model) per pass.
REFERENCE_NAME = "original"
REFERENCES_FILE = "references.csv"
REFERENCE_COLUMNS = ("kind", "index", "pass", "ratio", "ref_median_ms", "noise", "measured_at")
DEFAULT_PASSES = 5
CALIBRATION_FILE = "calibration.csv"  # this session's timings of the table's calibration models
SUMMARY_FILE = "summary.json"  # the metrics (what `amc-mobile report` shows first)
SCATTER_PNG = "scatter.png"  # predicted vs measured


def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson's r of the (average-tie) ranks."""
    ra = pd.Series(np.asarray(a, dtype=float)).rank().to_numpy()
    rb = pd.Series(np.asarray(b, dtype=float)).rank().to_numpy()
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def accuracy_metrics(predicted, measured) -> dict:
    p = np.asarray(predicted, dtype=float)
    m = np.asarray(measured, dtype=float)
    rel = (p - m) / m
    return {
        "samples": int(p.size),
        "within_5pct": float(np.mean(np.abs(rel) <= 0.05)) if p.size else float("nan"),
        "within_10pct": float(np.mean(np.abs(rel) <= 0.10)) if p.size else float("nan"),
        "rmspe_pct": float(np.sqrt(np.mean(rel ** 2)) * 100) if p.size else float("nan"),
        "mean_error_pct": float(np.mean(rel) * 100) if p.size else float("nan"),
        "max_abs_error_pct": float(np.max(np.abs(rel)) * 100) if p.size else float("nan"),
        "under_predicted_5pct": float(np.mean(rel < -0.05)) if p.size else float("nan"),
        "spearman": spearman(p, m),
    }


def format_metrics(m: dict) -> str:
    return (f"within ±5%: {m['within_5pct']:.0%}  within ±10%: {m['within_10pct']:.0%}  "
            f"RMSPE {m['rmspe_pct']:.1f}%  mean error {m['mean_error_pct']:+.1f}%  "
            f"under-predicted by >5%: {m['under_predicted_5pct']:.0%}  Spearman {m['spearman']:.3f}  "
            f"(n={m['samples']})")


@dataclass
class ValidationResult:
    out_dir: Path
    samples: pd.DataFrame
    metrics: dict
    plot: Path | None
    table: Path
    model: str = ""
    device: str = ""

    def stale_calibration_hint(self) -> str | None:
        """A line saying the table's stored overhead fit no longer matches the device, when the
        session's fit predicts well and the stored one is off by more than 10% on average."""
        s = self.metrics.get("session_calibration")
        stored = self.metrics.get("mean_error_pct")
        if not s or stored is None or not np.isfinite(stored) or abs(stored) <= 10:
            return None
        fresh = s["metrics"]["mean_error_pct"]
        if not np.isfinite(fresh) or abs(fresh) > abs(stored) / 2:
            return None
        cmd = "amc-mobile table calibrate" + (f" --model {shlex.quote(self.model)}" if self.model else "") + \
            (f" --device {shlex.quote(self.device)}" if self.device else "")
        return (f"note: the table's stored calibration is off by {stored:+.0f}% on this device now (it drifted or "
                f"changed since the fit; this session's fit: {fresh:+.1f}%). `{cmd}` refits it; searches re-time "
                f"it themselves before setting a budget")

    def summary(self) -> str:
        def line(stat: str, which: str, fit: dict, m: dict) -> str:
            return (f"{stat:6s} {which} calibration ({fit['method']}, scale {fit['scale']:.3f}, offset "
                    f"{fit['offset']:+.4f} ms):\n    " + format_metrics(m))

        lines = [f"table {self.table}", line("median", "table's  ", self.metrics["calibration"], self.metrics)]
        s = self.metrics.get("session_calibration")
        if s:
            lines.append(line("median", "session's", s["fit"], s["metrics"]))
        p = self.metrics.get("p10")
        if p:
            lines.append(line("p10", "table's  ", p["calibration"], p["metrics"]))
            if p["session_calibration"]:
                lines.append(line("p10", "session's", p["session_calibration"]["fit"],
                                  p["session_calibration"]["metrics"]))
        a = self.metrics.get("anchored_units")
        if a:
            lines.append(line("anchor", "table's  ", a["calibration"], a["metrics"]) +
                         "\n    (units: each row's ratio to the build's drift reference x its level over the build)")
            if a["session_calibration"]:
                lines.append(line("anchor", "session's", a["session_calibration"]["fit"],
                                  a["session_calibration"]["metrics"]))
        n = self.metrics.get("drift_normalised")
        if n:
            lines.append(line("median", "table's  ", self.metrics["calibration"], n["metrics"])
                         .replace("median table's", "ratio  table's") + "\n    (each variant's ratio to the original in "
                         f"the same rounds x the original's median now, {n['original_ms']:.4f} ms)")
            if n.get("session_calibration"):
                sc = n["session_calibration"]
                lines.append(line("ratio ", "session's", sc["fit"], sc["metrics"]))
            if n.get("anchored_units_session_calibration"):
                sc = n["anchored_units_session_calibration"]
                lines.append(line("ratio ", "session's", sc["fit"], sc["metrics"]).replace(
                    "ratio  session's", "ratio  session's, anchored units,"))
        noise = self.metrics.get("noise")
        if noise:
            from device.noise import noise_sentence

            lines.append(f"the original, timed in every round: spread {100 * noise['spread']:.1f} % within a pass, "
                         f"pass medians drift {100 * noise['pass_drift']:.1f} %")
            lines.append(noise_sentence(noise["figure"], 0.10))
        hint = self.stale_calibration_hint()
        if hint:
            lines.append(hint)
        lines.append(f"samples: {self.out_dir / SAMPLES_FILE}" + (f"  plot: {self.plot}" if self.plot else ""))
        return "\n".join(lines)


def aggregate_passes(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per sample: the median over its passes of each pass's median (and p10)."""
    g = raw.groupby("index", sort=True)
    df = g.agg(channels=("channels", "first"), predicted_ms=("predicted_ms", "first"),
               unit_sum_ms=("unit_sum_ms", "first"), interpolated_units=("interpolated_units", "first"),
               median_ms=("median_ms", "median"), p10_ms=("p10_ms", "median"), p90_ms=("p90_ms", "median"),
               n=("n", "sum"), passes=("pass", "count")).reset_index()
    df["error_pct"] = (df["predicted_ms"] - df["median_ms"]) / df["median_ms"] * 100
    return df


def read_samples(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=SAMPLE_COLUMNS)
    try:
        df = pd.read_csv(path, dtype={"channels": str}, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, OSError) as exc:  # OSError: e.g. a folder in its place
        raise AmcError(f"{path} is not a samples file ({str(exc).splitlines()[0]}): delete it or pick another "
                       f"--out folder") from None
    if tuple(df.columns) != SAMPLE_COLUMNS:
        raise AmcError(f"{path} has unexpected columns: delete it or pick another --out folder")
    return df


def _refit(lat, unit_sums: np.ndarray, measured: np.ndarray, rows) -> dict | None:
    """Metrics when the overhead term is fitted on this session's calibration timings instead."""
    sums, meas, used = calibration_points(lat, rows)
    fit = fit_overhead(sums, meas)
    if not fit.points:
        return None
    pred = fit.scale * unit_sums + fit.offset
    return {"fit": {**fit.to_dict(), "variants": used}, "metrics": accuracy_metrics(pred, measured),
            "predicted_ms": pred.tolist()}


def validate_table(model, device: str | Device = "local", *, samples: int = 50, seed: int = 0,
                   graph: PruningGraph | None = None, scope: str | None = None, grid: int | None = None,
                   out_dir: str | os.PathLike | None = None, tables_dir: str | os.PathLike | None = None,
                   table_dir: str | os.PathLike | None = None, allow_mismatch: bool = False,
                   config: MeasureConfig | None = None, table_config: MeasureConfig | None = None,
                   batch_size: int = 4, workers: int = DEFAULT_WORKERS, progress: bool = True,
                   plot: bool = True, session_calibration: bool = True,
                   passes: int = DEFAULT_PASSES) -> ValidationResult:
    if samples < 1:
        raise AmcError("--samples must be >= 1")
    config = config or MODEL_CONFIG
    target = resolve_target(model, graph, scope)
    owned = False
    dev = device
    if not isinstance(device, Device):
        from device.registry import open_device

        dev, owned = open_device(device), True
    try:
        label = device_label(dev)
        # the table was measured with the unit config's threads/affinity: look it up with those
        lookup_config = table_config or MeasureConfig(threads=config.threads, affinity=config.affinity)
        store = open_table(dev, table_dir, tables_dir, allow_mismatch, lookup_config,
                           hint=target.build_command(label))
        lat = compile_for(target, store, dev, grid)
        grid = int(grid or table_grid(store, target))
        out = new_run_dir("table-validate", out_dir)
        write_manifest(out, "table-validate", model=target.label, device=label, table=str(store.folder),
                       samples=samples, seed=seed, scope=target.scope, grid=grid,
                       fingerprint=dev.fingerprint(config).to_dict(), calibration=lat.calibration)
        rng = np.random.default_rng(seed)
        variants = [random_channels(target.graph, target.scope, rng, grid) for _ in range(samples)]
        path, cal_path = out / SAMPLES_FILE, out / CALIBRATION_FILE
        done = read_samples(path)
        counts = done[done["seed"] == seed].groupby(["index", "channels"]).size().to_dict() if len(done) else {}
        x = target.example_input()
        jobs = [Job(f"s{i:04d}", example_input=x, payload=("sample", i, ch)) for i, ch in enumerate(variants)
                if counts.get((i, encode_channels(ch)), 0) < passes]
        if jobs and session_calibration:
            jobs += [Job(f"c{i:02d}", example_input=x, payload=("calibration", lbl, ch))
                     for i, (lbl, ch) in enumerate(calibration_variants(target.graph, target.scope, grid))]
        # The original in every round of every program (unless the caller says otherwise: reference="")
        if config.reference is None:
            config = replace(config, reference=REFERENCE_NAME)
        elif not config.reference:
            config = replace(config, reference=None)

        def materialize(job: Job) -> None:
            ch = job.payload[2]
            job.module = target.pruned(ch)

        from tqdm import tqdm

        failures: list[str] = []
        if jobs:
            bar = tqdm(total=len(jobs) * (passes + 1), unit="model", desc="validate (lower, then time)",
                       disable=not progress, dynamic_ncols=True)
            runner = BatchRunner(dev, config, batch_size, workers)
            if config.reference == REFERENCE_NAME:
                runner.reference = Job(REFERENCE_NAME, module=target.module.eval(), example_input=x)
            with runner, \
                    Programs(runner, jobs, config, materialize, progress=bar.update) as programs, \
                    AppendLog(path, SAMPLE_COLUMNS) as log, AppendLog(cal_path, CALIBRATION_COLUMNS) as clog, \
                    AppendLog(out / REFERENCES_FILE, REFERENCE_COLUMNS) as rlog:
                for k in range(passes):
                    def on_batch(results: list[tuple[Job, LatencyStats]], k=k) -> None:
                        for job, st in results:
                            kind, i, ch = job.payload
                            if not st.ok:
                                if k == 0:
                                    failures.append(f"{kind} {i}: {clean_field(st.error or 'failed')}")
                                continue
                            stats = Stats.of(st)
                            if st.has_reference:
                                rlog.append(f"{kind},{clean_field(str(i))},{k},{st.ratio:.6g},{st.ref_median_ms:.6g},"
                                            f"{st.noise:.6g},{stats.measured_at}\n")
                            if kind == "calibration":
                                clog.append(CalibrationRow(target.hash, target.label, i, ch, stats).to_line())
                                continue
                            det = lat.detail(ch)
                            err = (det.total_ms - stats.median_ms) / stats.median_ms * 100
                            log.append(",".join([str(i), str(seed), str(k), encode_channels(ch),
                                                 f"{det.total_ms:.6g}", f"{float(det.units_ms.sum()):.6g}",
                                                 str(det.interpolated), *stats.values(), f"{err:.4g}",
                                                 stats.measured_at]) + "\n")
                        log.sync()
                        clog.sync()
                        rlog.sync()
                        bar.update(len(results))

                    programs.measure_pass(on_batch)
            bar.close()
        raw = read_samples(path)
        raw = raw[raw["seed"] == seed]
        if raw.empty:
            raise AmcError(f"no sample could be measured: {'; '.join(failures[:3]) or 'no reason given'}")
        df = aggregate_passes(raw)
        metrics = accuracy_metrics(df["predicted_ms"], df["median_ms"])
        metrics.update({"failed": len(failures), "calibration": lat.calibration,
                        "interpolated_units_mean": float(df["interpolated_units"].mean())})
        session_rows = read_calibration_rows(cal_path) if cal_path.exists() else []
        session = _refit(lat, df["unit_sum_ms"].to_numpy(float), df["median_ms"].to_numpy(float), session_rows)
        metrics["session_calibration"] = session
        # the same samples against their 10th percentile, predicted from the table's 10th percentiles:
        # less sensitive to a shared machine's bursts than the median
        lat10 = compile_for(target, store, dev, grid, "p10_ms")
        sums10 = np.array([lat10.predict_raw(c) for c in channels_of(df)])
        m10 = df["p10_ms"].to_numpy(float)
        metrics["p10"] = {"calibration": lat10.calibration,
                          "metrics": accuracy_metrics(lat10.scale * sums10 + lat10.offset, m10),
                          "session_calibration": _refit(lat10, sums10, m10, session_rows)}
        anchored_lat = compile_for(target, store, dev, grid, unit_values="anchored") if store.references() else None
        if anchored_lat is not None:
            metrics.update(_anchored_units(anchored_lat, df, session_rows))
        metrics.update(_drift_normalised(out / REFERENCES_FILE, df, lat, session_rows, anchored_lat))
        png = None
        if plot:
            from latency_tables.plots import scatter_plot

            png = scatter_plot(df["predicted_ms"].to_numpy(), df["median_ms"].to_numpy(), out / SCATTER_PNG,
                               f"{target.label} on {label}: predicted vs measured ({len(df)} variants)",
                               second=None if session is None else np.asarray(session["predicted_ms"]),
                               second_label="with this session's calibration")
        (out / SUMMARY_FILE).write_text(json.dumps({"model": target.label, "device": label, "table":
                                                   str(store.folder), "metrics": metrics, "created": now_iso()},
                                                  indent=2, sort_keys=True, default=str) + "\n")
        return ValidationResult(out, df.reset_index(drop=True), metrics, png, store.folder, target.label, label)
    finally:
        if owned:
            dev.close()


def _anchored_units(lat, df: pd.DataFrame, session_rows) -> dict:
    """The same samples predicted from the table's drift-anchored unit values (`lat` compiled with
    unit_values="anchored"; `reference.anchored_rows`) instead of its raw medians, with the table's and
    this session's calibration."""
    sums = np.array([lat.predict_raw(c) for c in channels_of(df)])
    measured = df["median_ms"].to_numpy(float)
    return {"anchored_units": {"calibration": lat.calibration,
                               "metrics": accuracy_metrics(lat.scale * sums + lat.offset, measured),
                               "session_calibration": _refit(lat, sums, measured, session_rows)}}


def _drift_normalised(path: Path, df: pd.DataFrame, lat, session_rows, anchored_lat=None) -> dict:
    """Metrics of the reference-normalised measurements (each variant's median over its passes of its
    ratio to the original in the same rounds, times the original's median over the whole session) and
    the noise the original saw; {} when this validation had no reference. With `anchored_lat` (the
    table's anchored unit values) also the fully re-anchored pair: anchored units, fitted on the
    calibration models' anchored timings, against the anchored measurements."""
    if not path.exists():
        return {}
    ref = pd.read_csv(path, keep_default_na=False)
    ref = ref[ref["kind"].astype(str) == "sample"]
    if ref.empty:
        return {}
    ref["index"] = ref["index"].astype(int)
    level = float(ref["ref_median_ms"].median())
    per_pass = ref.groupby("pass")["ref_median_ms"].median()
    drift = float((per_pass.max() - per_pass.min()) / per_pass.median()) if len(per_pass) > 1 else 0.0
    spread = float(ref["noise"].median())
    ratios = ref.groupby("index")["ratio"].median()
    d = df.set_index("index").join(ratios.rename("ratio"), how="inner")
    anchored = d["ratio"].to_numpy(float) * level
    out = {"original_ms": level, "metrics": accuracy_metrics(d["predicted_ms"], anchored),
           "anchored_ms": anchored.tolist()}
    # the session fit on the calibration models' ratios, anchored the same way
    cal = pd.read_csv(path, keep_default_na=False)
    cal = cal[cal["kind"].astype(str) == "calibration"]
    if len(cal) and session_rows:
        by_label = cal.groupby("index")["ratio"].median() * level
        rows = []
        for r in session_rows:
            if str(r.variant) in by_label.index:
                rows.append(r.with_median(by_label[str(r.variant)]))
        out["session_calibration"] = _refit(lat, d["unit_sum_ms"].to_numpy(float), anchored, rows)
        if anchored_lat is not None:
            sums = np.array([anchored_lat.predict_raw(c) for c in channels_of(d.reset_index())])
            out["anchored_units_session_calibration"] = _refit(anchored_lat, sums, anchored, rows)
    # The figure the verdict uses: the larger of the within-pass spread and the drift between passes
    # (what the raw medians carry and the ratios cancel).
    return {"drift_normalised": out, "noise": {"spread": spread, "pass_drift": drift, "figure": max(spread, drift)}}


def channels_of(df: pd.DataFrame) -> list[dict[int, int]]:
    return [decode_channels(str(c)) for c in df["channels"]]
