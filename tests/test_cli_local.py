"""The CLI end to end on `local` (ExecuTorch + XNNPACK through et_bench): `demo` at a tiny size, a latency
search on the default path (the table's calibration models re-timed, the budget a fraction of the measured
original) interrupted with Ctrl-C and resumed, `table calibrate`, `bench --repeats`.

The table is the session's coarse ResNet-20 one (tests/_local_table.py, grid 32); each test works on its own
copy, so none depends on another's writes or on running in a given order. How fast or how accurate anything
is here is not asserted (that is what benchmarks/ is for): only what was recorded and how it fits together.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _local_table import GRID, copy_table
from amc_mobile.cli import main
from latency_tables.calibrate import calibration_for, calibration_variants, fit_overhead
from latency_tables.session import SESSION_PASSES
from amc_mobile.tables import resolve_target

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
# the pipeline, not the accuracy, is under test: few images, few episodes, shipped ResNet-20 weights
TINY_SEARCH = ["--model", "resnet20", "--channel-round", str(GRID), "--val-images", "100", "--eval-batch", "100",
               "--calib-images", "32", "--no-progress"]


@pytest.fixture
def table(resnet20_local_table, tmp_path, monkeypatch):
    """A private copy of the session's table, where the CLI finds it ($AMC_TABLES_DIR)."""
    store = copy_table(resnet20_local_table, tmp_path / "tables")
    monkeypatch.setenv("AMC_TABLES_DIR", str(tmp_path / "tables"))
    return store


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _episodes(run: Path) -> list[dict]:
    with open(run / "episodes.csv", newline="") as f:
        return list(csv.DictReader(f))


def _variants():
    target = resolve_target("resnet20")
    return target, calibration_variants(target.graph, target.scope, GRID)


def _check_measured_budget(setup: dict, store, n_before: int, target_ratio: float) -> None:
    """The default latency path: the calibration models were re-timed (every pass kept in the table), the
    original's latency is theirs, the budget is the target times it."""
    target, variants = _variants()
    rec = setup["recalibration"]
    fresh = calibration_for(store.calibration()[n_before:], target.hash)
    assert rec["passes"] == SESSION_PASSES and rec["persisted"] == len(fresh) == SESSION_PASSES * len(variants)
    full = [r.stats.median_ms for r in fresh if r.variant == "full"]
    assert len(full) == SESSION_PASSES
    assert setup["original_measured_ms"] == pytest.approx(statistics.median(full), rel=1e-4)
    assert setup["budget"] == pytest.approx(target_ratio * setup["original_measured_ms"])


def test_demo_at_a_tiny_size(table, tmp_path, capsys):
    """`amc-mobile demo`, every step at a tiny size: the table is found (nothing measured into it), the search
    runs on the default measured-latency path, the fine-tune and the final compare run and are reported."""
    units = _digest(table.units_path)
    n_cal = len(table.calibration())
    out = tmp_path / "demo"
    rc = main(["demo", "--model", "resnet20", "--grid", str(GRID), "--target", "1.0", "--episodes", "2",
               "--warmup", "1", "--val-images", "100", "--calib-images", "32", "--finetune-images", "128",
               "--measure-iterations", "5", "--measure-repeats", "1", "--eval-images", "100", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert [f"[{i}/5]" in printed for i in range(1, 6)] == [True] * 5 and "done in" in printed
    summary = json.loads((out / "run.json").read_text())["demo_summary"]
    assert summary["search"] == str(out / "search") and summary["compare"] == str(out / "compare")
    assert _digest(table.units_path) == units  # a complete table: ensure_table only checked it
    # the search: budget from the measured original, policy within it, the pruned model exported
    setup = json.loads((out / "search" / "setup.json").read_text())
    _check_measured_budget(setup, table, n_cal, 1.0)
    best = json.loads((out / "search" / "best_policy.json").read_text())
    assert best["cost_unit"] == "ms" and best["cost"] <= setup["budget"] * (1 + 1e-9)
    assert len(_episodes(out / "search")) == 2
    # the fine-tune: before/after on the test split, the fine-tuned model saved
    ft = summary["finetune"]
    assert 0 <= ft["before"]["test_top1"] <= 1 and 0 <= ft["after"]["test_top1"] <= 1
    assert ft["before"]["test_images"] == ft["after"]["val_images"] == 100  # --eval-images
    assert ft["record"]["recipe"]["train_images_used"] == 128  # --finetune-images
    assert (Path(ft["out"]) / "model.pt").is_file()
    # the final compare: both models measured on local with the tiny settings, top-1 on 100 images
    df = pd.read_csv(out / "compare" / "compare.csv").set_index("model")
    assert list(df.index) == ["original", "amc-pruned"] and (df["status"] == "ok").all(), df.get("error")
    assert (df["device"] == "local").all() and (df["n"] == 5).all()
    assert df.loc["original", "speedup"] == pytest.approx(1.0)
    assert df.loc["amc-pruned", "speedup"] == pytest.approx(df.loc["original", "median_ms"]
                                                           / df.loc["amc-pruned", "median_ms"], rel=1e-6)
    assert df["accuracy_note"].str.contains("100 images").all() and df["top1"].between(0, 1).all()
    assert (out / "compare" / "report.html").is_file()


def test_latency_search_interrupted_by_ctrl_c_resumes_without_measuring_again(table, tmp_path):
    """A search on the default path, from the command line, stopped with SIGINT after a few episodes: exit 130,
    the measurements and episodes kept; `--resume` continues from the checkpoint with the saved budget and fit
    (nothing re-timed) and ends with every episode exactly once."""
    n_cal = len(table.calibration())
    run = tmp_path / "run"
    episodes = 40
    # --table-dir: the table's own grid (without it the search completes the table at the default grid first)
    cmd = [sys.executable, "-m", "amc_mobile", "search", *TINY_SEARCH, "--table-dir", str(table.folder),
           "--target", "1.0", "--episodes", str(episodes), "--warmup", "2", "--checkpoint-every", "2",
           "--no-measure-final",
           "--out", str(run)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # A user's terminal delivers Ctrl-C; a test run started in the background (`make test &`, a CI runner)
    # may have SIGINT ignored, and the child would inherit that: give it the default disposition.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not ((run / "episodes.csv").exists() and len(_episodes(run)) >= 3):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the search did not reach episode 3 in 5 minutes"
            time.sleep(0.01)
        # Episodes take a few tens of ms on a fast host: stop the process the moment episode 3 is on disk,
        # so the Ctrl-C lands mid-run however fast the host is (it is delivered on SIGCONT).
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert "interrupted; every measurement taken so far is saved (rerun to resume)" in err
    done = _episodes(run)
    assert 3 <= len(done) < episodes
    setup = json.loads((run / "setup.json").read_text())
    _check_measured_budget(setup, table, n_cal, 1.0)
    calibration = _digest(table.calibration_path)

    assert main(["search", "--resume", str(run), "--no-progress"]) == 0
    rows = _episodes(run)
    assert [int(r["episode"]) for r in rows] == list(range(episodes))
    # the episodes after the last checkpoint are run again, and come out the same (timings aside)
    seeded = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows[:len(done)]]
    assert seeded == [{k: v for k, v in r.items() if not k.endswith("_s")} for r in done]
    assert _digest(table.calibration_path) == calibration  # nothing re-timed on resume
    resumed = json.loads((run / "setup.json").read_text())
    assert (resumed["budget"], resumed["original_measured_ms"]) == (setup["budget"], setup["original_measured_ms"])
    best = json.loads((run / "best_policy.json").read_text())
    assert best["cost"] <= setup["budget"] * (1 + 1e-9)


def test_table_calibrate_appends_every_pass_and_refits_on_them(table, capsys):
    from amc_mobile.tables import load_latency_model

    target, variants = _variants()
    n_before = len(table.calibration())
    units = _digest(table.units_path)
    assert main(["table", "calibrate", "--model", "resnet20", "--passes", "2"]) == 0
    printed = capsys.readouterr().out
    fresh = calibration_for(table.calibration()[n_before:], target.hash)
    assert len(fresh) == 2 * len(variants) and _digest(table.units_path) == units
    assert f"resnet20: 2 passes of {len(variants)} calibration models" in printed
    # the stored fit now is the fit of each model's latest passes: refitted here from the file
    lat = load_latency_model("resnet20", device_uri="local")
    assert lat.source == str(table.folder)
    by_variant: dict[str, list[float]] = {}
    for r in calibration_for(table.calibration(), target.hash):
        by_variant.setdefault(r.variant, []).append(r.stats.median_ms)
    from latency_tables.loading import RECENT_PASSES

    sums = [lat.predict_raw(ch) for _, ch in variants]
    measured = [float(np.median(by_variant[label][-RECENT_PASSES:])) for label, _ in variants]
    fit = fit_overhead(sums, measured)
    assert lat.scale == pytest.approx(fit.scale, rel=1e-6) and lat.offset == pytest.approx(fit.offset, abs=1e-6)
    assert f"overhead now:    scale {fit.scale:.3f}, offset {fit.offset:+.4f} ms ({len(variants)} models" in printed


def test_bench_repeats_pools_every_invocation(capsys, et_bench):
    rc = main(["bench", "--model", "resnet20", "--iterations", "4", "--warmup", "1", "--repeats", "3", "--json"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads(printed)
    assert report["config"]["repeats"] == 3 and report["fingerprint"]["backend"] == "xnnpack"
    (r,) = report["results"]
    assert r["model"] == "resnet20" and r["error"] is None
    assert r["n"] == 12 and len(r["samples_ms"]) == 12  # 3 invocations x 4 timed runs, pooled
    assert r["median_ms"] == pytest.approx(float(np.median(r["samples_ms"])))
