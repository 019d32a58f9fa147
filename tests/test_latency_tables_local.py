"""Latency tables on the real `local` device (ExecuTorch + XNNPACK through et_bench): a small ResNet-20
build at a coarse grid that is interrupted and resumed, predictions from it, and a tiny validation.

Slow (lowering costs ~0.5 s per method): one module-scoped build is shared by the tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from amc_mobile.errors import AmcError
from device.base import Device, MeasureConfig
from latency_tables import build_table, load_latency_model
from latency_tables.build import CALIBRATION_PASSES
from latency_tables.schema import read_unit_rows
from latency_tables.space import all_specs, unit_plans
from latency_tables.store import find_table
from latency_tables.target import resolve_target
from latency_tables.validate import validate_table

pytestmark = pytest.mark.slow

QUICK = MeasureConfig(warmup=5, iterations=20, min_time_ms=5.0, repeats=1)


def _local():
    from device.local import LocalDevice
    from device.runner import find_runner

    try:
        find_runner()
    except AmcError as exc:
        pytest.skip(f"et_bench is not built: {exc}")
    return LocalDevice()


class InterruptAfter(Device):
    """The real local device for the first `n` programs it times, then an interruption (Ctrl-C)."""

    uri = "local"

    def __init__(self, inner, n: int):
        self.inner, self.n, self.calls = inner, n, 0

    def fingerprint(self, config=None):
        return self.inner.fingerprint(config)

    def _tick(self):
        if self.calls >= self.n:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1

    def measure(self, candidates, config=QUICK, progress=None):
        self._tick()
        return self.inner.measure(candidates, config, progress)

    def measure_pte(self, path, methods=None, config=QUICK, progress=None):
        self._tick()
        return self.inner.measure_pte(path, methods, config, progress)


@pytest.fixture(scope="module")
def resnet_table(tmp_path_factory):
    local = _local()
    root = tmp_path_factory.mktemp("tables")
    kw = dict(grid=32, tables_dir=root, config=QUICK, model_config=QUICK, batch_size=4, workers=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_table("resnet20", InterruptAfter(local, 1), calibrate=False, **kw)
    store = find_table(local.fingerprint(QUICK), root)
    before = dict(store.units())
    report = build_table("resnet20", local, calibrate=True, calibration_count=2, **kw)
    return root, store, before, report


def test_interrupted_real_build_resumes_without_loss_or_duplicates(resnet_table):
    root, store, before, report = resnet_table
    assert len(before) == 4  # the one program timed before the interruption: all its rows were kept
    rows, duplicates = read_unit_rows(store.units_path)
    assert duplicates == 0
    assert all(rows[k] == before[k] for k in before)
    assert report.present == 4 and report.failed == 0 and report.calibration == 2 * CALIBRATION_PASSES  # two models, each timed in every pass
    target = resolve_target("resnet20")
    assert set(all_specs(unit_plans(target.graph, target.scope, 32))) <= set(rows)  # every reachable config
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
    assert res.metrics["max_abs_error_pct"] < 60  # a sanity bound: the accuracy bar is a benchmark
    # a rerun into the same folder measures nothing new
    rows = (tmp_path / "val" / "samples.csv").read_text()
    again = validate_table("resnet20", "local", samples=2, out_dir=tmp_path / "val", tables_dir=root, config=QUICK,
                           table_config=QUICK, batch_size=1, workers=2, progress=False, plot=False, passes=2,
                           session_calibration=False)
    assert len(again.samples) == 2 and (tmp_path / "val" / "samples.csv").read_text() == rows


def test_recalibration_refits_on_fresh_timings_and_keeps_them(resnet_table):
    """Last in this file: it adds calibration rows to the shared table."""
    from latency_tables import recalibrate
    from latency_tables.calibrate import calibration_variants
    from latency_tables.loading import RECENT_PASSES

    root, store, _, _ = resnet_table
    lat = load_latency_model("resnet20", device_uri="local", tables_dir=root, config=QUICK)
    target = resolve_target("resnet20")
    n_before = len(store.calibration())
    lat.scale, lat.offset = 3.0, 5.0  # a stale fit, far from this machine as it is now
    rec = recalibrate(lat, target, _local(), passes=2, config=QUICK, store=store, grid=32)
    variants = calibration_variants(target.graph, target.scope, 32)
    assert rec.passes == 2 and not rec.failures
    assert rec.persisted == len(store.calibration()) - n_before == 2 * len(variants)  # every pass kept
    assert lat.calibration["session"] and lat.calibration["points"] == len(variants)
    assert rec.original_ms > 0 and lat.predict({}) == pytest.approx(rec.original_ms, rel=0.3)
    # the stored fit now follows the most recent passes, the fresh ones included
    again = load_latency_model("resnet20", device_uri="local", tables_dir=root, config=QUICK)
    assert again.calibration["points"] == len(variants) and RECENT_PASSES >= 2
