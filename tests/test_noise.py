"""The noise figure and its wording, the reference rows' noisy mark, and the noise injector (issue 19).

The injector is used for correctness only (it starts and stops, the command runs under it and
warns): how much it slows anything is a benchmark (benchmarks/noise_stability.py), never asserted.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from amc_mobile.errors import AmcError
from device.noise import is_noisy, noise_sentence, pass_drift
from device.noise_injector import NoiseInjector
from device.stats import LatencyStats, median_ci_rel, merge_repeats, robust_cv
from latency_tables.reference import NOISY_SPREAD, REFERENCE_COLUMNS, ReferenceRow, read_reference_rows


def test_the_warning_says_what_the_issue_asks():
    assert noise_sentence(0.28, 0.10) == ("device too noisy for ±10 %: reference spread 28 %; results kept, "
                                          "marked noisy")
    assert noise_sentence(0.021, 0.10) == "device noise: reference spread 2.1 % (within ±10 %)"
    assert "not measured" in noise_sentence(float("nan"))
    assert is_noisy(0.11) and not is_noisy(0.09) and not is_noisy(float("nan"))


def test_robust_spread_ignores_a_few_outliers_and_drift_sees_slow_stretches():
    steady = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98] * 10
    assert robust_cv(steady) < 0.03 and robust_cv(steady + [50.0, 80.0]) < 0.03
    slow_half = [1.0] * 30 + [1.5] * 30  # a slow stretch: half the run 50 % slower
    assert pass_drift(slow_half) == pytest.approx(0.4, abs=0.01) and pass_drift(steady) < 0.03
    assert math.isnan(robust_cv([1.0, 2.0])) and math.isnan(pass_drift([1.0] * 5))


def test_ratio_cancels_drift_that_lands_on_unit_and_reference_alike():
    ref = [0.05] * 30 + [0.08] * 30  # the device slowed down by 60 % half way
    unit = [2 * r for r in ref]
    s = LatencyStats.from_samples("u", unit, reference_ms=ref)
    assert s.ratio == pytest.approx(2.0) and s.noise > 0 and median_ci_rel([2.0] * 60) == 0
    with pytest.raises(ValueError, match="pair up"):
        LatencyStats.from_samples("u", unit, reference_ms=ref[:10])
    # repeats keep the pairs; one repeat without a reference drops the reference of the pooled result
    a = LatencyStats.from_samples("u", unit, reference_ms=ref)
    assert len(merge_repeats("u", [a, a]).reference_ms) == 120
    assert not merge_repeats("u", [a, LatencyStats.from_samples("u", unit)]).has_reference


def test_reference_rows_are_marked_noisy_and_read_back(tmp_path):
    quiet = LatencyStats.from_samples("u", [1.0, 1.01, 0.99] * 10, reference_ms=[0.05, 0.0501, 0.0499] * 10,
                                      ci_rel=0.01, converged=True)
    spread = LatencyStats.from_samples("v", [1.0, 1.3, 0.7] * 10, reference_ms=[0.05, 0.08, 0.03] * 10)
    capped = LatencyStats.from_samples("w", [1.0, 1.01, 0.99] * 10, reference_ms=[0.05, 0.0501, 0.0499] * 10,
                                       ci_rel=0.09, converged=False)  # the time cap came before the CI target
    rows = [ReferenceRow.of(k, s, "2026-01-01T00:00:00+00:00") for k, s in (("a", quiet), ("b", spread), ("c", capped))]
    assert [r.noisy for r in rows] == [False, True, True] and rows[1].noise > NOISY_SPREAD
    path = tmp_path / "references.csv"
    path.write_text(",".join(REFERENCE_COLUMNS) + "\n" + "".join(r.to_line() for r in rows))
    back = read_reference_rows(path)
    assert [back[k].noisy for k in "abc"] == [False, True, True]
    assert back["a"].ratio == pytest.approx(rows[0].ratio, rel=1e-5) and math.isnan(back["b"].ci_rel)


def test_injector_bad_settings_are_one_line_errors():
    for kw in ({"duty": 0}, {"duty": 1.5}, {"period_ms": 0.1}, {"memory_mb": 0}):
        with pytest.raises(AmcError, match="noise injector"):
            NoiseInjector(**kw)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_injector_pins_its_hogs_and_stops_them(tmp_path):
    cpu = sorted(os.sched_getaffinity(0))[0]
    inj = NoiseInjector(duty=0.5, period_ms=20, memory_mb=4, cpus=[cpu])
    with inj:
        assert inj.running and len(inj._procs) == 1
        pid = inj._procs[0].pid
        assert os.sched_getaffinity(pid) == {cpu}
    assert not inj.running and not _alive(pid)
    assert f"CPU {cpu}" in inj.describe() and "duty 50 %" in inj.describe()


@pytest.mark.slow
def test_noise_command_under_the_injector_warns_and_keeps_going(et_bench):
    """Under load, with a tolerance no real device holds: the warning, exit 0, the figures printed."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with NoiseInjector(duty=0.5, period_ms=20, memory_mb=16):
        proc = subprocess.run([sys.executable, "-m", "amc_mobile", "noise", "-d", "local", "--seconds", "0.5",
                               "--tolerance", "0.0001"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "device too noisy for ±0.01 %: reference spread" in proc.stdout and "results kept, marked noisy" in proc.stdout
    assert "interleaved rounds" in proc.stdout and "drift between 5 slices" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "amc_mobile", "noise", "--seconds", "0"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--seconds" in bad.stderr


@pytest.mark.parametrize("argv, says", [
    (["bench", "--ci-target", "2"], "--ci-target must be a fraction"),
    (["bench", "--ci-target", "0.02", "--max-time-ms", "0"], "--max-time-ms must be between"),
    (["noise", "--tolerance", "1.5"], "--tolerance must be a fraction"),
])
def test_bad_noise_options_are_one_line_errors(argv, says, capsys):
    from amc_mobile.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err


def test_the_figure_takes_the_largest_spread_and_a_build_sees_its_level_move():
    from device.noise import level_spread, noise_figure
    from latency_tables.reference import ReferenceStatus

    assert noise_figure(0.02, float("nan"), 0.15) == 0.15 and math.isnan(noise_figure(float("nan")))
    assert level_spread([0.05, 0.05, 0.05, 0.05]) == 0 and level_spread([0.04, 0.05, 0.06, 0.05]) > 0.2
    # per-row spread 2 %, but the reference's level moved 30 % between batches: the figure says 30 %
    st = ReferenceStatus(10, 10, 0, 0.02, 0.05, 0.30)
    assert st.figure == 0.30 and "moved 30.0 % between them" in st.line()
