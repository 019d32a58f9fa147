"""Get a `LatencyModel` for (model, device URI or table folder): find the table, check its device
fingerprint, compile the lookup arrays, fit the overhead term."""

from __future__ import annotations

import os

import numpy as np

from device.errors import AmcError
from device.base import Device, MeasureConfig

from .calibrate import calibration_for, fit_overhead
from .predict import LatencyModel
from .space import DEFAULT_GRID
from .store import TableStore, find_table, fingerprint_mismatch
from .network import Target, require_target


def _fingerprint(device: str | Device, config: MeasureConfig | None):
    if isinstance(device, Device):
        return device.fingerprint(config)
    from device.registry import open_device

    with open_device(device) as dev:
        return dev.fingerprint(config)


def device_label(device: str | Device | None, store: TableStore | None = None) -> str:
    if isinstance(device, Device):
        return device.uri
    if device:
        return str(device)
    if store is not None and store.exists():
        return store.fingerprint.kind
    return "DEVICE"


def open_table(device: str | Device | None = None, table_dir: str | os.PathLike | None = None,
               tables_dir: str | os.PathLike | None = None, allow_mismatch: bool = False,
               config: MeasureConfig | None = None, hint: str = "") -> TableStore:
    """The table for `device` (under `tables_dir`), or the folder `table_dir` (checked against `device`
    when both are given). A fingerprint mismatch is an AmcError unless `allow_mismatch`."""
    if table_dir is not None:
        store = TableStore(table_dir)
        store.meta()  # a clear error when it is not a table
        if device is not None and not allow_mismatch:
            diff = store.fingerprint.differences(_fingerprint(device, config))
            if diff:
                raise fingerprint_mismatch(store.folder, diff)
        return store
    if device is None:
        raise AmcError("no latency table given: pass a device URI (e.g. --device local) or a table folder")
    return find_table(_fingerprint(device, config), tables_dir, allow_mismatch, hint)


def table_grid(store: TableStore, target: Target) -> int:
    """The grid the table was last built with for this model (else the default)."""
    builds = [b for b in store.meta().get("builds", []) if b.get("model_hash") == target.hash]
    return int(builds[-1]["grid"]) if builds else DEFAULT_GRID


# A table's fit follows the device as it is now: per calibration model, only its most recent passes
# count (rows are appended in time order), so `table calibrate` or a search's recalibration moves it.
RECENT_PASSES = 5


def calibration_points(model: LatencyModel, rows, recent: int = RECENT_PASSES
                       ) -> tuple[list[float], list[float], list[str]]:
    """(unit sum, measured median, variant) per calibration model; a model timed in several passes
    counts once, with the median of its `recent` latest passes. Rows of groups outside the model's
    scope are skipped."""
    by_variant: dict[tuple, list[float]] = {}
    labels: dict[tuple, str] = {}
    for r in rows:
        k = tuple(sorted(r.channels.items()))
        by_variant.setdefault(k, []).append(getattr(r.stats, model.statistic))
        labels[k] = r.variant
    sums, measured, used = [], [], []
    for k, values in by_variant.items():
        values = values[-recent:]
        try:
            sums.append(model.predict_raw(dict(k)))
        except AmcError:
            continue  # measured for another scope: its groups are not in this model's scope
        measured.append(float(np.median(values)))
        used.append(labels[k])
    return sums, measured, used


# How a table's unit rows become a model's values: "median" (the raw median of each row) or "anchored"
# (each row's ratio to the drift reference of its batch x the reference's level over the build; see
# `reference.anchored_rows`).
UNIT_VALUES = ("median", "anchored")


def compile_for(target: Target, store: TableStore, device: str | Device | None = None,
                grid: int | None = None, statistic: str = "median_ms", unit_values: str = "median") -> LatencyModel:
    if unit_values not in UNIT_VALUES:
        raise AmcError(f"unknown unit values {unit_values!r}: expected one of {', '.join(UNIT_VALUES)}")
    if unit_values == "anchored" and statistic != "median_ms":
        raise AmcError("anchored unit values are medians (the ratio is a median of per-round ratios): "
                       f"statistic {statistic!r} cannot be anchored")
    grid = int(grid or table_grid(store, target))
    label = device_label(device, store)
    rows = store.units()
    if unit_values == "anchored":
        from .reference import anchored_rows

        rows = anchored_rows(rows, store.references())
    model = LatencyModel.compile(target.graph, target.scope, rows.values(), grid,
                                 build_hint=target.build_command(label, grid), source=str(store.folder),
                                 statistic=statistic)
    sums, measured, used = calibration_points(model, calibration_for(store.calibration(), target.hash))
    fit = fit_overhead(sums, measured)
    model.set_calibration(fit.scale, fit.offset, {**fit.to_dict(), "variants": used, "model_hash": target.hash,
                                                  "unit_values": unit_values})
    return model


def load_latency_model(target: Target, *, device_uri: str | Device | None = None, table_dir: str | os.PathLike | None = None,
                       allow_mismatch: bool = False, tables_dir: str | os.PathLike | None = None,
                       config: MeasureConfig | None = None, grid: int | None = None,
                       statistic: str = "median_ms", unit_values: str = "median") -> LatencyModel:
    """A compiled LatencyModel for `target` (`amc_mobile.tables.load_latency_model` takes a model name,
    folder or module) within its scope, from the table of `device_uri` or `table_dir`.
    `statistic`: predict the median (default) or the 10th percentile of the measured samples;
    `unit_values`: UNIT_VALUES."""
    require_target(target, "load_latency_model")
    hint = target.build_command(device_label(device_uri))
    store = open_table(device_uri, table_dir, tables_dir, allow_mismatch, config, hint)
    return compile_for(target, store, device_uri, grid, statistic, unit_values)
