"""`pip install .` (not editable) works outside the checkout: nothing is written into site-packages,
the runner is built into the user cache on first use, tables and runs go to the user data folder,
and the table shipped with the package is found there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package installed (from a wheel of this tree) into a folder of its own, as pip would."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "__pycache__",
                                                             "*.egg-info", ".pytest_cache"))
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True, cwd=tmp)
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    *map(str, wheels.glob("*.whl"))], check=True, cwd=tmp)
    return tmp, site


def _run(installed, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    tmp, site = installed
    home, work = tmp / "home", tmp / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMC_", "XDG_")) and k != "PYTHONPATH"}
    env.update(HOME=str(home), PYTHONPATH=str(site))
    argv = [sys.executable, "-c", code] if code else [sys.executable, "-m", "amc_mobile", *args]
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)


def test_imports_the_installed_copy_and_knows_it_is_not_a_checkout(installed):
    tmp, site = installed
    done = _run(installed, code="import amc_mobile, device.user_dirs as u, latency_tables.store as s; "
                                "print(amc_mobile.__file__); print(u.in_checkout()); print(s.tables_root())")
    assert done.returncode == 0, done.stderr
    where, checkout, tables = done.stdout.split()
    assert Path(where).is_relative_to(site) and checkout == "False"
    assert Path(tables) == tmp / "home" / ".local" / "share" / "amc-mobile" / "tables"


def test_bench_builds_the_runner_once_and_writes_nothing_into_the_package(installed):
    tmp, site = installed
    before = _tree(site)
    done = _run(installed, "bench", "-m", "resnet20", "-d", "local", "--iterations", "3", "--warmup", "1", "--json")
    assert done.returncode == 0, done.stderr
    assert "building the et_bench runner" in done.stderr
    assert json.loads(done.stdout)["results"][0]["median_ms"] > 0
    runners = list((tmp / "home" / ".cache" / "amc_mobile" / "runner").glob("*/et_bench"))
    assert len(runners) == 1 and os.access(runners[0], os.X_OK)
    again = _run(installed, "bench", "-m", "resnet20", "-d", "local", "--iterations", "3", "--warmup", "1")
    assert again.returncode == 0 and "building" not in again.stderr, again.stderr
    assert {k for k in _tree(site) if "__pycache__" not in k} == {k for k in before if "__pycache__" not in k}


def test_the_shipped_table_is_read_from_the_package_and_runs_go_to_the_user_folder(installed):
    tmp, site = installed
    shipped = [p.parent.name for p in (site / "latency_tables").glob("*/meta.json")]
    assert shipped, "the wheel ships no table"
    code = ("import json, sys; from device.base import Fingerprint; from latency_tables.store import TableStore, "
            "find_table; from amc_mobile.runs import new_run_dir; "
            f"meta = json.load(open({str(site / 'latency_tables' / shipped[0] / 'meta.json')!r})); "
            "fp = Fingerprint.from_dict(meta['fingerprint']); print(find_table(fp).folder); print(new_run_dir('x'))")
    done = _run(installed, code=code)
    assert done.returncode == 0, done.stderr
    table, run = map(Path, done.stdout.split())
    data = tmp / "home" / ".local" / "share" / "amc-mobile"
    assert table == data / "tables" / shipped[0] and (table / "units.csv").is_file()
    assert run.is_relative_to(data / "runs")
