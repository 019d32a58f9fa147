"""Per-device latency lookup tables: build, store, predict, validate.

    lat = amc_mobile.tables.ensure_table("mobilenet_v2", device_uri="local")  # the model side names the
                                                              # model; builds what is missing, then loads
    lat.predict({group: kept, ...})                           # ms, whole model
    lat.unit_latencies(channels)                              # ms per unit template (unscaled)
    lat.full_latency_ms

This package knows units, not models: it takes a `network.Target` (a network's unit templates, its
channel groups, the scope and a `prune(channels)` for whole-model calibration), which
`amc_mobile.tables` makes from a model name, folder or module. It imports only `device`.

Modules: `units` (the fused unit a table is keyed by), `network` (what a table knows of a network),
`schema` (CSV rows), `store` (a table folder),
`space` (channel choices, unit plans), `sampling` (adaptive sampling), `batching` (measure in
multi-method .pte batches), `build`, `calibrate` (overhead term), `predict` (LatencyModel),
`loading` (find + compile), `session` (re-time the calibration models now), `mixed` (mixed-precision
latency: units at their dtypes plus the q/dq edges a policy creates), `plots`.

The names below are imported lazily, so that `units` and `network` (which the pruning graph
imports) do not pull in ExecuTorch's lowering.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BuildReport": "build", "build_table": "build", "ensure_table": "build",
    "load_latency_model": "loading", "open_table": "loading",
    "LatencyModel": "predict", "MixedLatencyModel": "mixed",
    "Recalibration": "session", "recalibrate": "session",
    "channel_choices": "space", "round_channels": "space",
    "TableStore": "store", "tables_root": "store",
    "UnitSpec": "units",
    "Target": "network", "UnitNetwork": "network", "UnitTemplate": "network", "UnitsOn": "network",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
