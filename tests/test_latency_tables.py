"""Latency tables without a real device: storage, bad input, sampling, prediction, calibration, CLI.

The device here is `FormulaDevice`: a real `Device` whose "measurement" is a deterministic formula of
the candidate module (FLOPs with a step every 16 output channels), so builds are fast and every
prediction can be checked against the truth. The real `local` device is in
test_latency_tables_local.py (slow).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.models import build_model
from amc_mobile.pruning import build_graph, prune_by_counts
from device.base import Device, Fingerprint, MeasureConfig
from device.stats import LatencyStats
from amc_mobile.tables import build_table, load_latency_model
from latency_tables import channel_choices, round_channels
from latency_tables.calibrate import fit_overhead
from latency_tables.predict import LatencyModel, dense_1d, reference_latency
from latency_tables.sampling import AdaptiveSampler
from latency_tables.schema import (UNIT_COLUMNS, CalibrationRow, Stats, TableRow, read_calibration_rows,
                                   read_unit_rows)
from latency_tables.space import Axis, UnitPlan, random_channels, unit_plans
from latency_tables.store import AppendLog, TableStore, find_table
from amc_mobile.tables import resolve_target
from latency_tables.units import UnitSpec
from amc_mobile.table_validation import accuracy_metrics, spearman, validate_table

FAST = MeasureConfig(warmup=0, iterations=1, repeats=1)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The formula device runs real forward passes: with torch's default two threads on a busy
    two-core machine they are ~30x slower than with one. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def formula_ms(module: nn.Module, x: torch.Tensor) -> float:
    """2 us per call + FLOPs-proportional conv/linear cost, padded up to 16 output channels."""
    cost = [0.002]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            pad = math.ceil(m.out_channels / 16) * 16 / m.out_channels
            cost[0] += 2e-7 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] ** 2 * pad
        elif isinstance(m, nn.Linear):
            cost[0] += 1e-7 * m.in_features * m.out_features

    hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module.eval()(x)
    for h in hooks:
        h.remove()
    return cost[0]


class FormulaDevice(Device):
    uri = "formula"

    def __init__(self, threads: int = 1, fail_after: int | None = None):
        self.threads = threads
        self.fail_after = fail_after
        self.calls = 0

    def fingerprint(self, config=None):
        return Fingerprint("formula", "test formula", "none", "none", self.threads)

    def measure(self, candidates, config=FAST, progress=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return [LatencyStats.from_samples(c.name, [formula_ms(c.module, c.example_input)] * 3) for c in candidates]


def _stats(ms: float) -> Stats:
    return Stats(ms, ms, 0.0, ms, ms, 10, "2026-01-01T00:00:00+00:00")


def _build(model, tmp_path, **kw):
    kw.setdefault("config", FAST)
    kw.setdefault("model_config", FAST)
    return build_table(model, kw.pop("device", FormulaDevice()), tables_dir=tmp_path, progress=False,
                       batch_size=kw.pop("batch_size", 32), **kw)


# ------------------------------------------------------------------------------------ the space


def test_channel_choices_follow_amc_rounding():
    assert channel_choices(32) == [8, 16, 24, 32]
    assert channel_choices(96)[0] == 24 and channel_choices(96)[-1] == 96  # 0.2*96=19.2 -> 19 -> 24
    assert channel_choices(20, 8) == [8, 16, 20]  # full width is always a choice
    assert channel_choices(1280, 32)[:2] == [256, 288]
    assert round_channels(64, 0.2) == 16 and round_channels(64, 1.0) == 64 and round_channels(4, 0.2) == 4


def test_mobilenet_v2_space_is_one_dimensional_and_deduplicated():
    t = resolve_target("mobilenet_v2")
    assert t.scope == "decoupled"
    plans = unit_plans(t.graph, t.scope, 8)
    assert max(len(p.axes) for p in plans) == 1
    from latency_tables.space import all_specs

    n8, n32 = len(all_specs(plans)), len(all_specs(unit_plans(t.graph, t.scope, 32)))
    per_layer = sum(len(p.lattice()) for p in plans)
    assert 1000 < n8 < per_layer and 300 < n32 < n8  # shared across identical layers


# --------------------------------------------------------------------------------- store + schema


def test_the_shipped_table_loads_read_only_and_fits_its_own_calibration():
    """The table shipped in the package (measured on the dev machine) is read as a table of the default
    model as it is now: the same architecture hash, every layer covered, a stored fit that is the fit of
    its own calibration rows; and loading it writes nothing into the package."""
    import hashlib

    import latency_tables
    from latency_tables.calibrate import calibration_for, fit_overhead
    from latency_tables.loading import calibration_points, compile_for, table_grid

    shipped = [p for p in Path(latency_tables.__file__).parent.iterdir() if (p / "meta.json").is_file()]
    assert [p.name[:len("local-amd-epyc-")] for p in shipped] == ["local-amd-epyc-"], shipped
    folder = shipped[0]

    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    before = digest()
    store = TableStore(folder)
    target = resolve_target("mobilenet_v2")
    assert store.fingerprint.kind == "local" and store.fingerprint.backend == "xnnpack"
    assert target.hash in {b["model_hash"] for b in store.meta()["builds"]}  # the default model, unchanged
    rows, duplicates = read_unit_rows(store.units_path)
    assert duplicates == 0 and len(rows) == sum(b["measured"] for b in store.meta()["builds"])  # none lost
    lat = compile_for(target, store)
    assert table_grid(store, target) == 8 and lat.source == str(folder)
    # where the table has a measurement the model looks it up; interpolation only fills the gaps
    medians = np.array(sorted(r.stats.median_ms for r in rows.values()))
    looked_up = lat.lut[lat.exact]
    assert 0 < looked_up.size < lat.lut.size
    assert np.allclose(medians[np.searchsorted(medians, looked_up).clip(0, medians.size - 1)], looked_up)
    half = {g: lat.graph.groups[g].size // 2 for g in lat.groups}
    assert 0 < lat.predict(half) < lat.full_latency_ms
    assert lat.predict(half) == pytest.approx(lat.reference_predict(half))
    sums, measured, used = calibration_points(lat, calibration_for(store.calibration(), target.hash))
    assert lat.calibration["points"] == len(used) >= 3
    fit = fit_overhead(sums, measured)
    assert (lat.scale, lat.offset, lat.calibration["method"]) == (fit.scale, fit.offset, fit.method)
    assert digest() == before


def test_store_round_trip(tmp_path):
    store = TableStore(tmp_path / "t")
    fp = Fingerprint("formula", "cpu", "rt", "be", 1, None, {"governor": "performance"})
    store.init(fp, FAST.to_dict(), 8)
    rows = [TableRow(UnitSpec("conv", 14, 14, 16, c, 3, 1, 1, 1, "relu6"), _stats(0.01 * c)) for c in (8, 16, 24)]
    rows.append(TableRow(UnitSpec("dwconv", 7, 7, 32, 32, 3, 2, 1, 32, "relu6"), _stats(0.0123456789)))
    assert store.append_units(rows) == 4
    back = TableStore(tmp_path / "t")
    units = back.units()
    assert list(units) == [r.key for r in rows]
    assert units[rows[0].key] == rows[0]
    assert units[rows[3].key].median_ms == pytest.approx(0.0123457, rel=1e-5)  # 6 significant digits
    assert back.fingerprint == fp and back.meta()["grid"] == 8
    cal = CalibrationRow("abc", "resnet20", "uniform-0.50", {3: 8, 5: 16}, _stats(1.5))
    with back.calibration_log() as log:
        log.append(cal.to_line())
    assert read_calibration_rows(back.calibration_path) == [cal]
    # the file is plain CSV a person can read
    header = (tmp_path / "t" / "units.csv").read_text().splitlines()[0]
    assert header == ",".join(UNIT_COLUMNS)


def test_appends_are_whole_lines_even_after_a_hand_edit(tmp_path):
    path = tmp_path / "x.csv"
    log = AppendLog(path, ("a", "b"))
    log.append("1,2\n")
    log.close()
    with open(path, "a") as f:
        f.write("3,4")  # no final newline
    log = AppendLog(path, ("a", "b"))
    log.append("5,6\n")
    log.close()
    assert path.read_text() == "a,b\n1,2\n3,4\n5,6\n"
    with pytest.raises(ValueError):
        AppendLog(path, ("a", "b")).append("7,8\n9,10\n")


def _table_with_lines(tmp_path, extra: str) -> TableStore:
    store = TableStore(tmp_path / "t")
    store.init(Fingerprint("formula", "cpu", "rt", "be", 1), FAST.to_dict(), 8)
    store.append_units([TableRow(UnitSpec("conv", 14, 14, 16, 8, 3, 1, 1, 1), _stats(0.1))])
    with open(store.units_path, "a") as f:
        f.write(extra)
    return store


def test_truncated_csv_names_the_line_and_the_fix(tmp_path):
    good = TableRow(UnitSpec("conv", 14, 14, 16, 16, 3, 1, 1, 1), _stats(0.2)).to_line()
    store = _table_with_lines(tmp_path, good[:40])  # a row cut short, as by a crash mid-copy
    with pytest.raises(AmcError) as err:
        store.units()
    msg = str(err.value)
    assert f"{store.units_path} line 3: truncated row" in msg and "sed -i '3d'" in msg and "\n" not in msg


def test_malformed_csv_names_the_line(tmp_path):
    row = TableRow(UnitSpec("conv", 14, 14, 16, 16, 3, 1, 1, 1), _stats(0.2)).to_line()
    bad = row.replace(",0.2,", ",fast,", 1)
    store = _table_with_lines(tmp_path, bad + row)
    with pytest.raises(AmcError, match=r"line 3: median_ms 'fast' is not a number"):
        store.units()


def test_unknown_unit_kind_is_a_clear_error(tmp_path):
    row = TableRow(UnitSpec("conv", 14, 14, 16, 16, 3, 1, 1, 1), _stats(0.2)).to_line()
    store = _table_with_lines(tmp_path, row.replace("conv", "attention"))
    with pytest.raises(AmcError, match=r"line 3: unknown unit kind 'attention' \(expected one of conv, "):
        store.units()
    with pytest.raises(AmcError, match="unknown unit kind 'attention'"):
        UnitSpec("attention", 1, 1, 8, 8)


def test_a_key_that_disagrees_with_its_fields_is_refused(tmp_path):
    row = TableRow(UnitSpec("conv", 14, 14, 16, 16, 3, 1, 1, 1), _stats(0.2)).to_line()
    store = _table_with_lines(tmp_path, row.replace(",16,16,3,", ",16,24,3,", 1))
    with pytest.raises(AmcError, match="line 3: key .* does not match its fields"):
        store.units()


def test_duplicate_rows_are_counted_not_doubled(tmp_path):
    row = TableRow(UnitSpec("conv", 14, 14, 16, 16, 3, 1, 1, 1), _stats(0.2)).to_line()
    store = _table_with_lines(tmp_path, row + row)
    rows, dups = read_unit_rows(store.units_path)
    assert len(rows) == 2 and dups == 1


def test_second_build_on_the_same_table_is_refused(tmp_path):
    a, b = TableStore(tmp_path / "t"), TableStore(tmp_path / "t")
    a.lock()
    try:
        # flock is per open file description: a second descriptor in this process conflicts like another process
        with pytest.raises(AmcError, match="another build is writing"):
            b.lock()
    finally:
        a.unlock()
    b.lock()
    b.unlock()


# --------------------------------------------------------------------------------- fingerprints


def test_fingerprint_mismatch_lists_the_fields_and_can_be_overridden(tmp_path):
    _build("resnet20", tmp_path, grid=32, calibrate=False)
    other = FormulaDevice(threads=4)
    with pytest.raises(AmcError) as err:
        load_latency_model("resnet20", device_uri=other, tables_dir=tmp_path)
    msg = str(err.value)
    assert "threads: 1 != 4" in msg and "--allow-fingerprint-mismatch" in msg and "\n" not in msg
    lat = load_latency_model("resnet20", device_uri=other, tables_dir=tmp_path, allow_mismatch=True)
    assert lat.full_latency_ms > 0
    # a table folder given explicitly is checked against the device too
    folder = find_table(FormulaDevice().fingerprint(), tmp_path).folder
    with pytest.raises(AmcError, match="threads: 1 != 4"):
        load_latency_model("resnet20", device_uri=other, table_dir=folder)
    # and building into a table of another configuration is refused outright
    with pytest.raises(AmcError, match="threads: 1 != 4"):
        build_table("resnet20", other, table_dir=folder, progress=False, config=FAST)


def test_no_table_at_all_says_how_to_build_one(tmp_path):
    with pytest.raises(AmcError, match=r"no latency table for .*: run `amc-mobile table build --model resnet20 "
                                       r"--device formula`"):
        load_latency_model("resnet20", device_uri=FormulaDevice(), tables_dir=tmp_path)


# ------------------------------------------------------------------------------------- predict


def _widest_plan() -> UnitPlan:
    """MobileNet-V2's head conv: 1280 output channels, 129 choices on the grid of 8."""
    graph = build_graph(build_model("mobilenet_v2"))
    return max(unit_plans(graph, "decoupled", 8), key=lambda p: max([len(a.choices) for a in p.axes] or [0]))


def test_exact_hit_interpolation_and_clamping():
    pts = {(16,): 1.0, (32,): 3.0, (64,): 4.0}
    assert reference_latency(pts, (32,)) == (3.0, True)
    assert reference_latency(pts, (24,)) == (2.0, False)
    assert reference_latency(pts, (48,)) == (3.5, False)
    assert reference_latency(pts, (8,)) == (1.0, False)  # below the measured range: the nearest end
    vals, exact = dense_1d(pts, 64)
    assert vals[24] == 2.0 and vals[32] == 3.0 and exact[32] and not exact[24] and vals[8] == 1.0


def test_predict_exact_interpolated_and_missing(tmp_path):
    _build("resnet20", tmp_path, grid=8, calibrate=False, refine=False, coarse_step=8)
    lat = load_latency_model("resnet20", device_uri=FormulaDevice(), tables_dir=tmp_path)
    target = resolve_target("resnet20")
    g = target.graph
    group = next(gid for gid in lat.groups if g.groups[gid].size == 64)
    # measured ends: exact; a midpoint: interpolated and counted as a miss
    assert lat.interpolated({group: 64}) == 0
    assert lat.interpolated({group: 40}) == 2  # the conv before and the conv after the group
    ch = {group: 40}
    truth = formula_ms(prune_by_counts(target.module, g, ch), target.example_input())
    assert lat.predict_raw(ch) == pytest.approx(lat.reference_predict(ch, raw=True))
    assert abs(lat.predict_raw(ch) - truth) / truth < 0.2  # no calibration here: the per-call terms add up
    # remove every row of one layer's line: the error names the layer and the command
    store = find_table(FormulaDevice().fingerprint(), tmp_path)
    victim = next(p for p in lat.plans if p.name == "blocks.6.conv2.conv")
    keep = [r for r in store.units().values()
            if not (r.spec.shape_key() == victim.full_spec.shape_key() and r.spec.c_out == victim.full_spec.c_out)]
    store.units_path.unlink()
    store.append_units(keep)
    with pytest.raises(AmcError) as err:
        load_latency_model("resnet20", device_uri=FormulaDevice(), tables_dir=tmp_path)
    msg = str(err.value)
    assert msg.startswith("no entries for layer blocks.6.conv2.conv (unit key conv3x3-s1-p1-g1-in64-out64-hw7x7")
    assert "run `amc-mobile table build --model resnet20 --device formula`" in msg


@pytest.mark.parametrize("name, scope", [("mobilenet_v2", "decoupled"), ("plain20", "all")])
def test_latency_model_equals_the_slow_reference(tmp_path, name, scope):
    """The compiled arrays agree with a unit-by-unit lookup, for 1-axis (mobilenet_v2) and 2-axis
    (plain20: every conv between two pruned groups) plans."""
    grid = 16 if name == "mobilenet_v2" else 8
    _build(name, tmp_path, grid=grid, scope=scope, calibrate=False, refine=(name == "plain20"))
    lat = load_latency_model(name, scope=scope, device_uri=FormulaDevice(), tables_dir=tmp_path, grid=grid)
    assert any(len(p.axes) == (2 if name == "plain20" else 1) for p in lat.plans)
    rng = np.random.default_rng(0)
    configs = [random_channels(lat.graph, scope, rng, grid) for _ in range(20)]
    configs += [{g: int(rng.integers(1, lat.graph.groups[g].size + 1)) for g in lat.groups} for _ in range(10)]
    fast = np.array([lat.predict(c) for c in configs])
    slow = np.array([lat.reference_predict(c) for c in configs])
    np.testing.assert_allclose(fast, slow, rtol=1e-12)
    np.testing.assert_allclose(lat.predict_batch(configs), fast, rtol=1e-12)
    m = np.array([[c[g] for g in lat.groups] for c in configs])
    np.testing.assert_allclose(lat.predict_batch(m), fast, rtol=1e-12)
    u = lat.unit_latencies(configs[0])
    assert u.shape == (len(lat.graph.units),) and lat.predict(configs[0]) == pytest.approx(u.sum())
    assert lat.full_latency_ms == pytest.approx(lat.predict({}))


def test_predict_refuses_bad_channels(tmp_path):
    _build("resnet20", tmp_path, grid=32, calibrate=False)
    lat = load_latency_model("resnet20", device_uri=FormulaDevice(), tables_dir=tmp_path)
    g = lat.groups[-1]
    with pytest.raises(AmcError, match="must be within 1..64"):
        lat.predict({g: 65})
    fixed = next(gid for gid, grp in lat.graph.groups.items() if not grp.prunable)
    size = lat.graph.groups[fixed].size
    assert lat.predict({fixed: size}) == lat.predict({})  # full width of an outside group is fine
    with pytest.raises(AmcError, match="outside the latency model's scope"):
        lat.predict({fixed: size // 2})


def test_predictions_are_accurate_on_the_formula_device(tmp_path):
    """Adaptive sampling + interpolation + calibration recover the truth within 2% on random variants."""
    _build("mobilenet_v2", tmp_path, grid=32, calibration_count=5)
    lat = load_latency_model("mobilenet_v2", device_uri=FormulaDevice(), tables_dir=tmp_path)
    assert lat.calibration["method"] == "least-squares" and lat.calibration["points"] == 5
    target = resolve_target("mobilenet_v2")
    rng = np.random.default_rng(1)
    errs = []
    for _ in range(8):
        ch = random_channels(target.graph, target.scope, rng, grid=8)  # off the table's grid too
        truth = formula_ms(prune_by_counts(target.module, target.graph, ch), target.example_input())
        errs.append(abs(lat.predict(ch) - truth) / truth)
    assert max(errs) < 0.02


# ------------------------------------------------------------------------------------ sampling


def test_sampler_refines_around_a_step_only():
    plan = _widest_plan()
    choices = plan.axes[0].choices
    step_at = choices[len(choices) // 2]

    def value(c):  # linear, with a 20% cliff in the middle
        return 1.0 + c / 64 + (3.0 if c > step_at else 0.0)

    sampler = AdaptiveSampler([plan], coarse_step=4, tolerance=0.05)
    values, coord = {}, {}
    while (specs := sampler.next_round(values)) is not None:
        for s in specs:
            coord[s.key()] = plan.coordinate(s, plan.axes[0])
            values[s.key()] = value(coord[s.key()])
    measured = sorted(coord.values())
    assert measured[0] == choices[0] and measured[-1] == choices[-1]
    assert step_at in measured and choices[choices.index(step_at) + 1] in measured  # the cliff is bracketed
    # the straight parts got their coarse points and one probe per interval, nothing more
    assert len(measured) < len(choices) * 0.6
    # interpolation over what was measured is now within tolerance everywhere
    pts = {(c,): value(c) for c in measured}
    assert max(abs(reference_latency(pts, (c,))[0] - value(c)) / value(c) for c in choices) <= 0.05


# ------------------------------------------------------------------------------- resume / build


def test_interrupted_build_loses_nothing_and_resumes_without_duplicates(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _build("resnet20", tmp_path, grid=8, batch_size=4, calibrate=False, device=FormulaDevice(fail_after=3))
    store = find_table(FormulaDevice().fingerprint(), tmp_path)
    first = store.units()
    assert len(first) == 12  # 3 batches of 4, every one persisted
    report = _build("resnet20", tmp_path, grid=8, batch_size=4, calibrate=False)
    assert report.present == 12 and report.measured > 0
    rows, dups = read_unit_rows(store.units_path)
    assert dups == 0
    assert all(rows[k] == first[k] for k in first)  # the rows from before the interruption are untouched
    # the same as an uninterrupted build
    fresh = tmp_path / "fresh"
    _build("resnet20", fresh, grid=8, batch_size=4, calibrate=False)
    assert set(find_table(FormulaDevice().fingerprint(), fresh).units()) == set(rows)
    # and a third run measures nothing
    assert _build("resnet20", tmp_path, grid=8, batch_size=4, calibrate=False).measured == 0


def test_limits_stop_a_build_early(tmp_path):
    report = _build("resnet20", tmp_path, grid=8, max_configs=5)
    assert report.measured == 5 and "--max-configs 5" in report.stopped
    assert report.calibration == 5 * 5  # the calibration models are timed anyway: 5 models x 5 passes


def test_failed_units_are_recorded_and_skipped(tmp_path):
    class Flaky(FormulaDevice):
        def measure(self, candidates, config=FAST, progress=None):
            out = super().measure(candidates, config, progress)
            return [LatencyStats.failed(s.name, "does not lower: boom, really") if i == 0 else s
                    for i, s in enumerate(out)]

    rep = _build("resnet20", tmp_path, grid=32, calibrate=False, device=Flaky())
    assert rep.failed == 1 and "boom, really" in rep.failures[0]
    store = find_table(FormulaDevice().fingerprint(), tmp_path)
    (failure,) = store.failures().values()
    assert failure.error == "does not lower: boom; really"  # commas cleaned for the CSV
    again = _build("resnet20", tmp_path, grid=32, calibrate=False)
    assert again.measured == 0  # the failed unit is not retried...
    retry = _build("resnet20", tmp_path, grid=32, calibrate=False, retry_failed=True)
    assert retry.measured == 1  # ...unless asked


# ---------------------------------------------------------------------------- calibration, metrics


def test_overhead_fit_recovers_scale_and_offset():
    s = np.array([1.0, 1.5, 2.0, 3.0])
    fit = fit_overhead(s, 0.8 * s - 0.1)
    assert fit.method == "least-squares" and fit.scale == pytest.approx(0.8) and fit.offset == pytest.approx(-0.1)
    one = fit_overhead(np.array([2.0]), np.array([1.5]))
    assert one.method == "offset-only" and one.scale == 1.0 and one.offset == pytest.approx(-0.5)
    assert fit_overhead(np.array([]), np.array([])).method == "none"


def test_metrics():
    m = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.04, 1.7, 3.2, 4.0])
    r = accuracy_metrics(p, m)
    assert r["within_5pct"] == 0.5 and r["within_10pct"] == 0.75 and r["under_predicted_5pct"] == 0.25
    assert r["rmspe_pct"] == pytest.approx(np.sqrt(np.mean(((p - m) / m) ** 2)) * 100)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6*4/(5*24)


# ------------------------------------------------------------------------------------------ CLI


def _cli(*args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "amc_mobile", *args], capture_output=True, text=True, env=e,
                          timeout=300)


def test_cli_missing_table_is_one_line(tmp_path):
    r = _cli("table", "show", "--model", "resnet20", "--tables-dir", str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no latency table" in lines[0] and "amc-mobile table build" in lines[0]


def test_cli_dry_run(tmp_path):
    r = _cli("table", "build", "--model", "mobilenet_v2", "--grid", "32", "--dry-run", "--tables-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "scope decoupled, grid 32" in r.stdout and "reachable configurations" in r.stdout


def test_cli_plot_of_the_shipped_table(tmp_path):
    """`table plot` draws the shipped table (to a PNG elsewhere: nothing is written into the package);
    a layer filter that matches nothing is a one-line error."""
    import latency_tables

    folder = next(p for p in Path(latency_tables.__file__).parent.iterdir() if (p / "meta.json").is_file())
    listing = sorted(p.name for p in folder.iterdir())
    png = tmp_path / "plot.png"
    base = ["table", "plot", "--model", "mobilenet_v2", "--table-dir", str(folder), "--allow-fingerprint-mismatch"]
    r = _cli(*base, "--layers", r"blocks\.1[0-6]\.", "--out", str(png))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = _cli(*base, "--layers", "no-such-layer", "--out", str(tmp_path / "none.png"))
    assert r.returncode == 2 and not (tmp_path / "none.png").exists()
    assert r.stderr.strip() == "amc-mobile: error: no layer to plot: none depends on a pruned group and matches " \
                               "'no-such-layer'"
    assert sorted(p.name for p in folder.iterdir()) == listing


def test_validate_on_the_formula_device(tmp_path):
    _build("resnet20", tmp_path, grid=16)
    out = tmp_path / "val"
    res = validate_table("resnet20", FormulaDevice(), samples=6, seed=3, out_dir=out, tables_dir=tmp_path,
                         config=FAST, progress=False)
    assert len(res.samples) == 6 and res.metrics["samples"] == 6
    assert res.metrics["within_10pct"] == 1.0 and res.metrics["spearman"] > 0.9
    assert res.metrics["session_calibration"]["fit"]["points"] >= 3  # the calibration models, timed again
    assert res.metrics["p10"]["metrics"]["samples"] == 6
    assert {"samples.csv", "calibration.csv", "scatter.png", "summary.json", "run.json"} <= {
        p.name for p in out.iterdir()}
    text = res.summary()
    assert "median table's" in text and "p10" in text and "Spearman" in text
    lines = (out / "samples.csv").read_text().splitlines()
    again = validate_table("resnet20", FormulaDevice(), samples=6, seed=3, out_dir=out, tables_dir=tmp_path,
                           config=FAST, progress=False, plot=False)
    assert (out / "samples.csv").read_text().splitlines() == lines and len(again.samples) == 6  # nothing re-measured


def test_report_of_a_real_validation_folder(tmp_path):
    """`amc-mobile report` on what `table validate` writes (not on invented file names): its metrics from
    summary.json, its scatter plot, and the samples."""
    from amc_mobile.report import build_report, fmt_value, write_report

    _build("resnet20", tmp_path, grid=16)
    out = tmp_path / "val"
    res = validate_table("resnet20", FormulaDevice(), samples=4, seed=1, out_dir=out, tables_dir=tmp_path,
                         config=FAST, progress=False)
    assert json.loads((out / "run.json").read_text())["kind"] == "table-validate"
    report = build_report(out)
    assert "Table accuracy" in [getattr(b, "text", None) for b in report.blocks]
    assert {out / "summary.json", out / "scatter.png"} <= report.used
    html_path, _ = write_report(out)
    html = html_path.read_text()
    assert "metrics.within_10pct" in html and "metrics.spearman" in html
    assert f"<td>metrics.rmspe_pct</td><td class=\"num\">{fmt_value(res.metrics['rmspe_pct'])}</td>" in html
    assert html.count("data:image/png;base64,") == 1 and "samples.csv" in html


def test_validate_says_when_the_stored_calibration_is_stale(tmp_path):
    from amc_mobile.table_validation import ValidationResult

    def result(stored: float, fresh: float) -> ValidationResult:
        metrics = {"mean_error_pct": stored, "session_calibration": {"metrics": {"mean_error_pct": fresh}}}
        return ValidationResult(tmp_path, None, metrics, None, tmp_path, "resnet20", "local")

    # measured on a 2x faster host than the table's fit: the session's fit is right, the stored one not
    hint = result(85.7, -0.1).stale_calibration_hint()
    assert hint and "+86%" in hint and "amc-mobile table calibrate --model resnet20 --device local" in hint
    assert result(4.0, -0.1).stale_calibration_hint() is None  # within 10%: nothing to say
    assert result(30.0, 25.0).stale_calibration_hint() is None  # the fresh fit is no better: not drift
    assert result(float("nan"), 0.0).stale_calibration_hint() is None
    odd = ValidationResult(tmp_path, None, {"mean_error_pct": -40.0, "session_calibration": {"metrics": {
        "mean_error_pct": 1.0}}}, None, tmp_path, "resnet20", "cuda:0?batch=8&graph=1")
    assert "--device 'cuda:0?batch=8&graph=1'" in odd.stale_calibration_hint()  # pastes into a shell as is


def test_lowering_workers_die_with_a_killed_build(tmp_path):
    """kill -9 of a build must not leave its lowering workers running (they would hold the table
    folder's build lock, and the next build would be told that another one is writing)."""
    import signal
    import time

    script = tmp_path / "pool.py"
    script.write_text(
        "import os, sys, time\n"
        "from device import MeasureConfig\nfrom device.local import LocalDevice\n"
        "from latency_tables.batching import BatchRunner\n"
        "r = BatchRunner(LocalDevice(), MeasureConfig(), batch_size=1, workers=2, warm_workers=False)\n"
        "r.start()\n"
        "print(' '.join(str(p) for p in r._pool._processes), flush=True)\n"
        "time.sleep(120)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 20
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in workers if alive(p)]
    for p in left:  # never leave them behind, even when the test fails
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived their killed parent"
