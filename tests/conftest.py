"""Shared fixtures. The ADB test device's fixtures live in conftest_adb.py (a real ADB peer on loopback).

- every test runs with AMC_TABLES_DIR, AMC_CACHE_DIR and AMC_RUNS_DIR pointing into this session's temp
  folder, so nothing writes into the checkout's latency_tables/ or runs/ or the user's cache;
- `et_bench`: the host runner, built when it is missing (what `make runner` does); a test that needs it
  fails when it cannot be built, it does not skip: after `make` a missing runner is a defect;
- `resnet20_local_table`: one coarse table measured on `local`, shared by the session (read-only: copy it).
"""

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parent.parent

# The test phone needs `cryptography` (RSA, the ADB auth handshake). Only that missing is a reason to
# leave the ADB tests out; each test_adb*.py says so itself with importorskip. Any other ImportError
# under tests/adb_test_device is a bug there and fails the run loudly.
if importlib.util.find_spec("cryptography") is not None:
    from conftest_adb import *  # noqa: E402,F401,F403  (pytest puts tests/ on sys.path)


def pytest_configure(config):
    """Under pytest-xdist (`make test`) the workers share the cores: one torch thread each, and the same
    for the Python processes tests start (the CLI in a subprocess), instead of every worker's torch
    spreading over all cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_state_folders(tmp_path_factory):
    """Tables, trained-model cache and run folders of this session live in its temp folder."""
    mp = pytest.MonkeyPatch()
    for var, name in (("AMC_TABLES_DIR", "tables"), ("AMC_CACHE_DIR", "cache"), ("AMC_RUNS_DIR", "runs")):
        mp.setenv(var, str(tmp_path_factory.mktemp(name)))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def et_bench() -> Path:
    """The host runner (found like the library finds it), built first when it is not there."""
    from amc_mobile.errors import AmcError
    from device.runner import ENV_RUNNER, find_runner

    try:
        return find_runner()
    except AmcError as exc:
        if os.environ.get(ENV_RUNNER):
            pytest.fail(f"{exc} (unset {ENV_RUNNER} to let the tests build build/host/et_bench)")
    proc = subprocess.run(["bash", str(REPO / "android_bench" / "build_host.sh"), sys.executable,
                           str(REPO / "build" / "host")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building et_bench failed (run `make runner` to see why):\n{proc.stderr[-2000:]}")
    return find_runner()


@pytest.fixture(scope="session")
def resnet20_local_table(tmp_path_factory, et_bench):
    """A coarse ResNet-20 table measured on `local` (see tests/_local_table.py); copy it before changing it."""
    from _local_table import build_interrupted_then_resumed

    return build_interrupted_then_resumed(tmp_path_factory.mktemp("resnet20-local-table"))


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AMC_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"
