"""Where amc-mobile keeps what it makes, in a checkout and in an installed package alike.

- a checkout (the repository, `make setup`): tables in `latency_tables/` (the shipped ones are
  committed there), runs in `./runs`, the runner in `build/host/`;
- an installed package (`pip install .`): nothing is written into site-packages; tables and runs go
  to the user data folder, the runner and caches to the user cache folder. The shipped tables are
  read from the package (copied to the user folder the first time they are used, so that new rows
  can be appended).

Each location can be set: AMC_TABLES_DIR, AMC_RUNS_DIR, AMC_CACHE_DIR, AMC_ET_BENCH (the runner).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_CACHE = "AMC_CACHE_DIR"


def in_checkout() -> bool:
    """Running from the repository (a clone, or an editable install of one), not from site-packages."""
    return (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "android_bench" / "et_bench.cpp").is_file()


def cache_dir() -> Path:
    """$AMC_CACHE_DIR, else $XDG_CACHE_HOME/amc_mobile, else ~/.cache/amc_mobile: things that can be
    made again (trained checkpoints, decoded images, the runner)."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "amc_mobile"


def data_dir() -> Path:
    """$XDG_DATA_HOME/amc-mobile, else ~/.local/share/amc-mobile: what an installed package measures
    and writes (tables, runs), which cannot be made again without the device."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "amc-mobile"
