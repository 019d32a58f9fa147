"""Latency tables on the real `local` device (ExecuTorch + XNNPACK through et_bench): a small ResNet-20
build at a coarse grid that is interrupted and resumed, predictions from it, and a tiny validation.

Slow (lowering costs ~0.5 s per method): the build is the session's shared table (tests/_local_table.py);
a test that changes a table changes its own copy.
"""

from __future__ import annotations

import numpy as np
import pytest

from _local_table import GRID, QUICK, copy_table
from amc_mobile.errors import AmcError
from amc_mobile.tables import load_latency_model
from latency_tables.build import CALIBRATION_PASSES
from latency_tables.loading import RECENT_PASSES
from latency_tables.schema import read_unit_rows
from latency_tables.space import all_specs, unit_plans
from amc_mobile.tables import resolve_target
from amc_mobile.table_validation import channels_of, validate_table

pytestmark = pytest.mark.slow


@pytest.fixture
def resnet_table(resnet20_local_table):
    t = resnet20_local_table  # built by the session, interrupted once and resumed (tests/_local_table.py)
    return t.root, t.store, t.before, t.report


def _local():
    from device.local import LocalDevice

    return LocalDevice()


def test_interrupted_real_build_resumes_without_loss_or_duplicates(resnet_table):
    root, store, before, report = resnet_table
    assert len(before) == 4  # the one program timed before the interruption: all its rows were kept
    rows, duplicates = read_unit_rows(store.units_path)
    assert duplicates == 0
    assert all(rows[k] == before[k] for k in before)
    assert report.present == 4 and report.failed == 0 and report.calibration == 2 * CALIBRATION_PASSES  # two models, each timed in every pass
    target = resolve_target("resnet20")
    assert set(all_specs(unit_plans(target.graph, target.scope, GRID))) <= set(rows)  # every reachable config
    assert report.lower_s > 0 and report.measure_s > 0


def test_real_predictions(resnet_table):
    root, store, _, _ = resnet_table
    lat = load_latency_model("resnet20", device_uri="local", tables_dir=root, config=QUICK)
    assert lat.calibration["points"] == 2 and lat.calibration["method"] in ("least-squares", "offset-only")
    small = {g: lat.graph.groups[g].size // 2 for g in lat.groups}
    assert 0 < lat.predict(small) < lat.full_latency_ms
    assert lat.predict(small) == pytest.approx(lat.reference_predict(small))
    assert np.all(lat.unit_latencies(small) > 0)


def test_tiny_real_validation(resnet_table, tmp_path):
    root, _, _, _ = resnet_table
    res = validate_table("resnet20", "local", samples=2, out_dir=tmp_path / "val", tables_dir=root, config=QUICK,
                         table_config=QUICK, batch_size=1, workers=2, progress=False, passes=2,
                         session_calibration=False)
    assert len(res.samples) == 2 and set(res.samples["passes"]) == {2} and (tmp_path / "val" / "scatter.png").is_file()
    assert (tmp_path / "val" / "run.json").is_file() and (tmp_path / "val" / "summary.json").is_file()
    assert set(res.metrics) >= {"within_5pct", "within_10pct", "rmspe_pct", "under_predicted_5pct", "spearman"}
    # the metrics are those of the recorded samples (how accurate the table is here is a benchmark)
    pred, meas = res.samples["predicted_ms"].to_numpy(float), res.samples["median_ms"].to_numpy(float)
    assert np.all(pred > 0) and np.all(meas > 0)
    assert res.metrics["max_abs_error_pct"] == pytest.approx(np.max(np.abs(pred - meas) / meas) * 100)
    lat = load_latency_model("resnet20", device_uri="local", tables_dir=root, config=QUICK)
    assert pred.tolist() == pytest.approx([lat.predict(ch) for ch in channels_of(res.samples)], rel=1e-5)
    # the same samples from the drift-anchored unit values (the table carries references)
    from latency_tables.loading import UNIT_VALUES

    anchored = load_latency_model("resnet20", device_uri="local", tables_dir=root, config=QUICK, unit_values="anchored")
    a = res.metrics["anchored_units"]
    apred = np.array([anchored.predict(ch) for ch in channels_of(res.samples)])
    assert a["metrics"]["max_abs_error_pct"] == pytest.approx(np.max(np.abs(apred - meas) / meas) * 100, rel=1e-4)
    assert a["calibration"]["unit_values"] == "anchored" and "anchor" in res.summary() and "anchored" in UNIT_VALUES
    # a rerun into the same folder measures nothing new
    rows = (tmp_path / "val" / "samples.csv").read_text()
    again = validate_table("resnet20", "local", samples=2, out_dir=tmp_path / "val", tables_dir=root, config=QUICK,
                           table_config=QUICK, batch_size=1, workers=2, progress=False, plot=False, passes=2,
                           session_calibration=False)
    assert len(again.samples) == 2 and (tmp_path / "val" / "samples.csv").read_text() == rows


def test_recalibration_refits_on_fresh_timings_and_keeps_them(resnet20_local_table, tmp_path):
    """On a copy of the shared table (it appends calibration rows): the fresh fit is exactly the fit of
    what was timed and kept; how close it predicts this machine is a benchmark (table_accuracy.py)."""
    import statistics

    from latency_tables import recalibrate
    from latency_tables.calibrate import calibration_for, calibration_variants, fit_overhead
    store = copy_table(resnet20_local_table, tmp_path)
    lat = load_latency_model("resnet20", device_uri="local", tables_dir=tmp_path, config=QUICK)
    assert lat.source == str(store.folder)
    target = resolve_target("resnet20")
    n_before = len(store.calibration())
    lat.scale, lat.offset = 3.0, 5.0  # a stale fit, far from this machine as it is now
    rec = recalibrate(lat, target, _local(), passes=2, config=QUICK, store=store, grid=GRID)
    variants = calibration_variants(target.graph, target.scope, GRID)
    assert rec.passes == 2 and not rec.failures
    fresh = calibration_for(store.calibration()[n_before:], target.hash)
    assert rec.persisted == len(fresh) == 2 * len(variants)  # every pass kept
    assert sorted(r.variant for r in fresh) == sorted(2 * [label for label, _ in variants])
    assert lat.calibration["session"] and lat.calibration["points"] == len(variants)
    # anchored (the original in every round): each model's value is the median of its per-pass ratios to the
    # original x the original's level, and the fit is the fit of those values
    assert rec.anchored and lat.calibration["anchored"] and sorted(rec.ratios) == sorted(l for l, _ in variants)
    assert all(len(v) == 2 for v in rec.ratios.values())
    for label, _ in variants:
        assert rec.calibration_ms[label] == pytest.approx(statistics.median(rec.ratios[label]) * rec.reference_ms)
    by_variant = {}
    for r in fresh:  # the table keeps the raw timings
        by_variant.setdefault(r.variant, []).append(r.stats.median_ms)
    sums = [lat.predict_raw(ch) for _, ch in variants]
    measured = [rec.calibration_ms[label] for label, _ in variants]
    refit = fit_overhead(sums, measured)
    assert (lat.scale, lat.offset) != (3.0, 5.0) and rec.fit.method == refit.method
    assert lat.scale == pytest.approx(refit.scale, rel=1e-4) and lat.offset == pytest.approx(refit.offset, abs=1e-4)
    if refit.method == "least-squares":  # with an intercept, the residuals of its own points sum to zero
        residual = np.asarray(sums) * lat.scale + lat.offset - np.asarray(measured)
        assert abs(residual.mean()) <= 1e-3 * max(measured)
    # the original's latency is the median of its per-pass medians, as recorded
    assert rec.original_ms == pytest.approx(statistics.median(by_variant["full"]), rel=1e-4)
    assert any(rec.original["median_ms"] == pytest.approx(v, rel=1e-4) for v in by_variant["full"])  # one of them
    # without the reference: the raw medians of the two passes per variant, as the file has them
    raw = recalibrate(lat, target, _local(), passes=1, config=QUICK, grid=GRID, anchored=False)
    assert not raw.anchored and not raw.ratios and not lat.calibration["anchored"] and raw.reference_ms is None
    assert lat.scale == pytest.approx(fit_overhead(sums, [raw.calibration_ms[l] for l, _ in variants]).scale, rel=1e-4)
    # the stored fit now follows the most recent passes, the fresh ones included
    again = load_latency_model("resnet20", device_uri="local", tables_dir=tmp_path, config=QUICK)
    assert again.calibration["points"] == len(variants) and RECENT_PASSES >= 2


# -- the drift reference (issue 19) ---------------------------------------------------------------------


def test_every_real_unit_row_has_its_drift_reference(resnet_table):
    from latency_tables.reference import REFERENCE_SPEC

    _, store, _, report = resnet_table
    refs = store.references()
    units = store.units()
    assert set(refs) == set(units)  # the interrupted program's rows too: each row with its own reference
    for k, r in refs.items():
        assert r.ref_key == REFERENCE_SPEC.key() and r.ratio > 0 and r.ref_median_ms > 0 and r.noise >= 0
        # the ratio is of the same rounds: median(unit/ref) sits between the extremes of unit/ref medians
        assert r.median_ms == pytest.approx(units[k].median_ms, rel=1e-5)
    status = store.reference_status()
    assert status.label == "referenced" and status.referenced == len(units)
    assert report.referenced > 0 and "reference spread" in report.summary()


def test_a_table_built_before_drift_references_loads_and_says_so(resnet20_local_table, tmp_path, capsys):
    from amc_mobile.cli import main
    from latency_tables.reference import REFERENCES_FILE

    store = copy_table(resnet20_local_table, tmp_path)
    (store.folder / REFERENCES_FILE).unlink()  # what a table from before this change looks like
    lat = load_latency_model("resnet20", device_uri="local", tables_dir=tmp_path, config=QUICK)
    assert lat.full_latency_ms > 0
    assert store.reference_status().label.startswith("unreferenced (built before drift references")
    assert main(["table", "show", "--table-dir", str(store.folder), "--model", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "drift reference: unreferenced (built before drift references" in out


def test_anchored_unit_values_are_ratio_times_the_build_level(resnet20_local_table, tmp_path):
    """A table compiled with anchored unit values reads each row as its ratio to the drift reference x the
    reference's median level over the build; a row written while the device ran slow (its raw median
    doubled, its ratio not) predicts as before; an unreferenced table compiles to its raw medians."""
    from dataclasses import replace

    from amc_mobile.tables import resolve_target
    from latency_tables.loading import compile_for
    from latency_tables.reference import REFERENCES_FILE, anchored_rows
    from latency_tables.store import TableStore

    store = copy_table(resnet20_local_table, tmp_path)
    units, refs = store.units(), store.references()
    level = store.reference_status().ref_median_ms
    anchored = anchored_rows(units, refs)
    assert all(anchored[k].median_ms == pytest.approx(refs[k].ratio * level) for k in units)
    assert all(anchored[k].stats.p10_ms == units[k].stats.p10_ms for k in units)  # only the median is anchored
    target = resolve_target("resnet20")
    before = compile_for(target, store, "local", unit_values="anchored")
    raw_before = compile_for(target, store, "local")
    # the device ran twice as slow while the rows were written; their ratios came from the same rounds
    header = store.units_path.read_text().splitlines(keepends=True)[0]
    store.units_path.write_text(header + "".join(
        replace(r, stats=replace(r.stats, median_ms=2 * r.median_ms)).to_line() for r in units.values()))
    slow = TableStore(store.folder)
    after = compile_for(target, slow, "local", unit_values="anchored")
    assert after.predict_raw({}) == pytest.approx(before.predict_raw({}))
    assert compile_for(target, slow, "local").predict_raw({}) == pytest.approx(2 * raw_before.predict_raw({}))
    assert after.calibration["unit_values"] == "anchored"
    with pytest.raises(AmcError, match="unknown unit values"):
        compile_for(target, slow, "local", unit_values="mean")
    with pytest.raises(AmcError, match="cannot be anchored"):
        compile_for(target, slow, "local", statistic="p10_ms", unit_values="anchored")
    (store.folder / REFERENCES_FILE).unlink()
    raw = compile_for(target, TableStore(store.folder), "local", unit_values="anchored")
    assert raw.predict_raw({}) == pytest.approx(compile_for(target, TableStore(store.folder), "local").predict_raw({}))
