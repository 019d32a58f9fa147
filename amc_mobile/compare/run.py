"""`run_compare`: load, measure every model on every device, add accuracy, and write the run folder:
each device's results appended to measurements.jsonl as soon as it is done (raw samples included), then
compare.csv, the charts, run.json (fingerprints per device) and the report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from amc_mobile.files import atomic_write
from amc_mobile.runs import new_run_dir, write_manifest

from .accuracy import add_accuracy
from .charts import plot_latency, plot_speedup
from .load import load_models
from .measure import DeviceResult, check_device_uris, measure_devices
from .messages import Log, one_line, stderr
from .table import CompareResult, summary_lines

KIND = "compare"
CSV_FILE = "compare.csv"
MEASUREMENTS_FILE = "measurements.jsonl"
SPEEDUP_PNG = "speedup.png"
LATENCY_PNG = "latency.png"


def _append_jsonl(path: Path, obj: dict) -> None:
    line = json.dumps(obj, default=str, sort_keys=True) + "\n"
    with open(path, "a") as f:  # one write per device: a whole line or nothing
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def run_compare(
    refs: Sequence[str],
    devices: Sequence,  # URIs, or opened device.Device objects
    config=None,
    *,
    out: str | Path | None = None,
    allow_pickle: bool = False,
    labels: Sequence[str] | None = None,
    accuracy: bool = False,
    data_dir: str | None = None,
    accuracy_images: int | None = None,
    argv: list[str] | None = None,
    report: bool = True,
    log: Log | None = stderr,
    original_options=None,
) -> CompareResult:
    """Load, measure every model on every device, write the run folder. Bad models raise AmcError."""
    from device import MeasureConfig

    log = log or (lambda _msg: None)
    config = config or MeasureConfig()
    uris = check_device_uris(devices)
    models = load_models(refs, allow_pickle=allow_pickle, labels=labels, keep_going=True,
                         original_options=original_options)
    for m in models:
        if m.load_error:
            log(f"{m.label}: {m.load_error}")
    if accuracy:
        from amc_mobile.data import find_data_dir

        find_data_dir(data_dir)  # missing data is an error now, not after minutes of measuring
    run_dir = new_run_dir(KIND, out)
    meas_path = run_dir / MEASUREMENTS_FILE
    base_manifest = {
        "models": [m.describe() for m in models],
        "devices": [u if isinstance(u, str) else u.uri for u in uris],
        "config": config.to_dict(),
    }
    write_manifest(run_dir, KIND, argv, status="running", **base_manifest)
    log(f"compare: {len(models)} model(s) x {len(uris)} device(s) -> {run_dir}")

    def on_done(res: DeviceResult) -> None:
        if res.error:
            log(f"{res.uri}: {res.error}")
        _append_jsonl(meas_path, {
            "device": res.uri,
            "fingerprint": res.fingerprint.to_dict() if res.fingerprint else None,
            "error": res.error,
            "seconds": round(res.seconds, 3),
            "config": config.to_dict(),
            "cells": [c.to_dict(with_samples=True) for c in res.cells],
        })

    results = measure_devices(uris, models, config, log, on_done)

    if accuracy:
        add_accuracy(models, data_dir, accuracy_images, log)

    result = CompareResult(models, results, config, run_dir)
    table = result.table()
    csv_path = run_dir / CSV_FILE
    atomic_write(csv_path, table.to_csv(index=False))
    result.files["csv"] = csv_path
    for key, fn, name in (("speedup", plot_speedup, SPEEDUP_PNG), ("latency", plot_latency, LATENCY_PNG)):
        try:
            p = fn(result, run_dir / name)
            if p is not None:
                result.files[key] = p
        except Exception as exc:  # a chart must never lose the table
            log(f"could not draw {name}: {one_line(exc)}")

    write_manifest(
        run_dir, KIND, argv,
        status="done" if result.exit_code == 0 else "done with errors",
        **{**base_manifest, "models": [m.describe() for m in models]},
        fingerprints={d.uri: d.fingerprint.to_dict() if d.fingerprint else None for d in results},
        device_errors={d.uri: d.error for d in results if d.error},
        summary=summary_lines(result),
        files={k: p.name for k, p in result.files.items()},
    )
    if report:
        from amc_mobile.report import write_report

        try:
            html_path, md_path = write_report(run_dir)
            result.files["report"] = html_path
            if md_path is not None:
                result.files["report_md"] = md_path
        except Exception as exc:  # the measurements are on disk; `amc-mobile report` can retry
            log(f"could not write the report: {one_line(exc)} (retry with `amc-mobile report {run_dir}`)")
    return result
