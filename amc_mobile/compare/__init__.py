"""Compare an original model with compressed versions of it on several devices, with one protocol.

AMC's headline is such a comparison: MobileNet at 50% FLOPs ran 1.81x faster on a phone but 1.43x
on a GPU. `run_compare` gives that table for any models and devices:

    result = run_compare(["resnet20", "runs/search-1/best"], ["local", "adb:SERIAL", "cuda:0"])
    result.table()          # tidy DataFrame, one row per model x device
    result.exit_code        # 0: every cell measured; 1: some cell failed or was skipped

How it measures:

- every model is loaded first (`amc_mobile.model_io.load_model`); a bad file or a spec that does
  not match its weights is an AmcError before any device is touched.
- every device gets the same `MeasureConfig`; all PyTorch models of a device go into ONE
  `device.measure` batch (on `local` that is one multi-method .pte, one runner invocation).
  A `.pte` model is timed with the device's `measure_pte` (ExecuTorch devices only).
- a device that cannot be opened or cannot run (no CUDA, runner missing, phone unreachable) marks
  its cells "skipped: <why>" and the other devices still run; a candidate that fails marks its
  cell "failed: <why>".
- speedup = original median / model median, per device.
- several phones (`adb:`, `adb-tcp:`, `adb-server:`) measure in parallel, one thread each, after
  the host devices (whose timings must not share the CPU with lowering): the PyTorch models are
  lowered once, here, and every phone times that one `.pte`.
- each device's results are appended to `measurements.jsonl` (raw samples included) as soon as
  the device is done; the run folder then gets `compare.csv`, `speedup.png`, `latency.png`,
  `run.json` (fingerprints per device) and `report.html` / `report.md`.
"""

from .accuracy import add_accuracy
from .charts import plot_latency, plot_speedup
from .load import ModelEntry, count_macs, load_models
from .measure import (EXECUTORCH_KINDS, PHONE_KINDS, Cell, DeviceResult, check_device_uris, measure_device,
                      measure_devices)
from .messages import one_line
from .run import CSV_FILE, KIND, LATENCY_PNG, MEASUREMENTS_FILE, SPEEDUP_PNG, run_compare
from .table import COLUMNS, CompareResult, format_table, summary_lines

__all__ = [
    "COLUMNS", "CSV_FILE", "EXECUTORCH_KINDS", "KIND", "LATENCY_PNG", "MEASUREMENTS_FILE", "PHONE_KINDS",
    "SPEEDUP_PNG", "Cell", "CompareResult", "DeviceResult", "ModelEntry", "add_accuracy", "check_device_uris",
    "count_macs", "format_table", "load_models", "measure_device", "measure_devices", "one_line", "plot_latency",
    "plot_speedup", "run_compare", "summary_lines",
]
