"""Shared fixtures. The ADB test device's fixtures live in conftest_adb.py (a real ADB peer on loopback)."""

import os
import warnings

import pytest

warnings.filterwarnings("ignore")
# Tests must never write into the user's cache or the repo's stored tables.
os.environ.setdefault("AMC_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", "build", "test-cache"))

try:  # pytest puts tests/ on sys.path (rootdir conftest)
    from conftest_adb import *  # noqa: E402,F401,F403
except ImportError as _exc:  # e.g. a GPU image without `cryptography`: the ADB tests can't run there
    collect_ignore_glob = ["test_adb*.py"]
    print(f"conftest: ADB test device unavailable ({_exc}); skipping tests/test_adb*.py")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AMC_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"
