"""Run folders: every long job (search, table validation, compare) writes into one folder with a
`run.json` manifest (kind, exact command, versions, time), so `amc-mobile report RUN_DIR` can
rebuild a self-contained report from the folder alone."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from amc_mobile.errors import AmcError
from amc_mobile.files import make_folder, read_json, write_json
from device.user_dirs import data_dir, in_checkout

MANIFEST = "run.json"


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("amc-mobile", "torch", "executorch", "adb-shell", "numpy", "pandas"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def new_run_dir(kind: str, out: str | Path | None = None, root: str | Path | None = None) -> Path:
    """`out` if given, else <root>/<kind>-<UTC timestamp>/; root: $AMC_RUNS_DIR, else ./runs in a checkout,
    else the user data folder's runs/ (device/user_dirs.py)."""
    if out is not None:
        path = Path(out)
    else:
        base = Path(root or os.environ.get("AMC_RUNS_DIR") or ("runs" if in_checkout() else data_dir() / "runs"))
        path = base / f"{kind}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    return make_folder(path, "run folder", "pass another --out, or set AMC_RUNS_DIR")


def write_manifest(run_dir: Path, kind: str, argv: list[str] | None = None, **extra) -> Path:
    """Write (or update) run.json; `extra` holds JSON-safe facts such as device fingerprints."""
    path = Path(run_dir) / MANIFEST
    data = read_manifest(run_dir) if path.exists() else {}
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("amc-mobile", "__main__.py")):
        argv[0] = "amc-mobile"
    data.update({
        "kind": kind,
        "command": shlex.join(argv),
        "versions": versions(),
        "started": data.get("started") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    data.update(extra)
    return write_json(path, data)


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise AmcError(f"{run_dir} is not a run folder: {MANIFEST} is missing")
    return read_json(path, dict, "restore it, or rerun the job that wrote the folder")


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
