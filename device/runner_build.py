"""The host runner, built once per user when amc-mobile is installed as a package.

A checkout builds `build/host/et_bench` with `make runner`. An installed package carries the
runner's sources (`android_bench/`, package data) and builds them, on first use, into the user
cache folder, one build per ExecuTorch version and Python (the runner links the wheel's libraries).
The build needs cmake and g++; without them the error says what to install.
"""

from __future__ import annotations

import fcntl
import importlib.util
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .errors import AmcError
from .user_dirs import REPO_ROOT, cache_dir


def runner_sources() -> Path | None:
    """The folder with et_bench.cpp, CMakeLists.txt and build_host.sh: the checkout's, else the package's."""
    local = REPO_ROOT / "android_bench"
    if (local / "et_bench.cpp").is_file():
        return local
    spec = importlib.util.find_spec("android_bench")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "et_bench.cpp").is_file():
            return Path(folder)
    return None


def cached_runner() -> Path:
    """Where the user cache keeps the runner for this ExecuTorch and Python."""
    try:
        et = metadata.version("executorch")
    except metadata.PackageNotFoundError:
        et = "none"
    return cache_dir() / "runner" / f"executorch-{et}-py{sys.version_info[0]}{sys.version_info[1]}" / "et_bench"


def build_runner(out: Path | None = None, log=print) -> Path:
    """Build et_bench from the shipped sources into `out`'s folder (default: `cached_runner()`), once:
    a second process waits for the first one's build instead of starting its own."""
    out = out or cached_runner()
    src = runner_sources()
    if src is None:
        raise AmcError("the et_bench sources are not installed with amc-mobile (android_bench/): reinstall it, "
                       "or build the runner elsewhere and set AMC_ET_BENCH=/path/to/et_bench")
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        raise AmcError(f"building the et_bench runner needs {' and '.join(missing)}: install them (Debian/Ubuntu: "
                       f"sudo apt-get install cmake g++ ninja-build), or set AMC_ET_BENCH=/path/to/et_bench")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():
            return out
        log(f"amc-mobile: building the et_bench runner into {out.parent} (once per ExecuTorch version; about a "
            f"minute) ...")
        done = subprocess.run(["bash", str(src / "build_host.sh"), sys.executable, str(out.parent)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise AmcError(f"building the et_bench runner failed ({tail[0][:200]}); the full command: bash "
                           f"{src / 'build_host.sh'} {sys.executable} {out.parent}")
    return out
