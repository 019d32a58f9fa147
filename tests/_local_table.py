"""One coarse ResNet-20 latency table measured on the real `local` device, shared by the session
(tests/conftest.py: `resnet20_local_table`): grid 32 (19 unit configurations, two calibration models),
built the way a user's build goes when it is interrupted once and rerun.

Tests that change a table work on a copy (`copy_table`), so none depends on another's writes or order."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from device.base import MeasureConfig, PteDevice

QUICK = MeasureConfig(warmup=5, iterations=20, min_time_ms=5.0, repeats=1)
GRID = 32


class InterruptAfter(PteDevice):
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


@dataclass
class BuiltTable:
    root: Path  # the tables root (pass as tables_dir / AMC_TABLES_DIR)
    store: object  # latency_tables.store.TableStore of the one folder under root
    before: dict  # the unit rows the interrupted first build had kept
    report: object  # the BuildReport of the completing second build


def build_interrupted_then_resumed(root: Path) -> BuiltTable:
    from device.local import LocalDevice
    from amc_mobile.tables import build_table
    from latency_tables.store import find_table

    local = LocalDevice()
    kw = dict(grid=GRID, tables_dir=root, config=QUICK, model_config=QUICK, batch_size=4, workers=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_table("resnet20", InterruptAfter(local, 1), calibrate=False, **kw)
    store = find_table(local.fingerprint(QUICK), root)
    before = dict(store.units())
    # the default calibration models (at this grid: the full model and one uniformly pruned), as a
    # search's recalibration and the demo's table check use them: nothing left for those to measure
    report = build_table("resnet20", local, calibrate=True, **kw)
    return BuiltTable(root, store, before, report)


def copy_table(table: BuiltTable, root: Path):
    """A private copy of the shared table under `root`; returns its TableStore."""
    from latency_tables.store import TableStore

    return TableStore(shutil.copytree(table.store.folder, Path(root) / table.store.folder.name))
