"""Per-device latency lookup tables: build, store, predict, validate.

    from latency_tables import ensure_table, load_latency_model
    lat = ensure_table("mobilenet_v2", device_uri="local")   # builds what is missing, then loads
    lat.predict({group: kept, ...})                           # ms, whole model
    lat.unit_latencies(channels)                              # ms per unit template (unscaled)
    lat.full_latency_ms

Modules: `units` (the fused unit a table is keyed by), `schema` (CSV rows), `store` (a table folder),
`space` (channel choices, unit plans), `sampling` (adaptive sampling), `batching` (measure in
multi-method .pte batches), `build`, `calibrate` (overhead term), `predict` (LatencyModel),
`loading` (find + compile), `validate`, `plots`.

The names below are imported lazily: `amc_mobile.pruning.graph` imports `latency_tables.units`,
and the rest of this package imports the graph.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BuildReport": "build", "build_table": "build", "ensure_table": "build",
    "load_latency_model": "loading", "open_table": "loading",
    "LatencyModel": "predict",
    "Recalibration": "session", "recalibrate": "session",
    "channel_choices": "space", "round_channels": "space",
    "TableStore": "store", "tables_root": "store",
    "UnitSpec": "units",
    "validate_table": "validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
