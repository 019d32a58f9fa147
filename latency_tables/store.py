"""A table folder on disk: `meta.json` plus append-only CSVs, and where table folders live.

    latency_tables/<fingerprint.slug()>/
        meta.json         fingerprint, versions, created/updated, measure config, grid, one entry per build
        units.csv         one row per measured fused unit (schema.UNIT_COLUMNS)
        calibration.csv   whole models measured end to end (schema.CALIBRATION_COLUMNS)
        failures.csv      units that could not be measured, with the reason (skipped on resume)
        origins.csv       which device (URI, e.g. adb:SERIAL) measured each unit row (schema.ORIGIN_COLUMNS)

The root is `--tables-dir`, else `$AMC_TABLES_DIR`, else this package's folder.

Nothing measured is lost: every row is appended as soon as it is measured, with ONE `os.write`
of the whole line on an `O_APPEND` descriptor (a reader never sees half a row unless the disk
itself fails), and an `fsync` per batch. A build holds an exclusive lock on the folder so that two
builds never measure the same units twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from device.errors import AmcError
from device.files import make_folder, read_json
from device.base import Fingerprint
from device.user_dirs import data_dir, in_checkout

from .schema import (CALIBRATION_COLUMNS, FAILURE_COLUMNS, ORIGIN_COLUMNS, TABLE_FORMAT, UNIT_COLUMNS, CalibrationRow,
                     FailureRow, TableRow, now_iso, read_calibration_rows, read_failure_rows, read_origin_rows,
                     read_unit_rows)

ENV_TABLES_DIR = "AMC_TABLES_DIR"
PACKAGE_DIR = Path(__file__).resolve().parent
META_FILE = "meta.json"
UNITS_FILE = "units.csv"
CALIBRATION_FILE = "calibration.csv"
FAILURES_FILE = "failures.csv"
ORIGINS_FILE = "origins.csv"
LOCK_FILE = ".build.lock"


def tables_root(root: str | os.PathLike | None = None) -> Path:
    """Where table folders live: `root`, else $AMC_TABLES_DIR, else the latency_tables package folder in
    a checkout, else the user data folder (device/user_dirs.py: never into site-packages)."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_TABLES_DIR)
    if env:
        return Path(env)
    return PACKAGE_DIR if in_checkout() else data_dir() / "tables"


def table_folder(fingerprint: Fingerprint, root: str | os.PathLike | None = None) -> Path:
    """The table folder for `fingerprint`; in an installed package, a table shipped with it is copied
    to the user's folder the first time it is needed (appends then go there, not into the package)."""
    folder = tables_root(root) / fingerprint.slug()
    shipped = PACKAGE_DIR / fingerprint.slug()
    if folder != shipped and not folder.exists() and (shipped / META_FILE).is_file() and root is None \
            and not os.environ.get(ENV_TABLES_DIR):
        shutil.copytree(shipped, folder, ignore=shutil.ignore_patterns(LOCK_FILE, "*.tmp"))
    return folder


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("amc-mobile", "torch", "executorch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; tables are shared files
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _create_with_header(path: Path, columns: tuple[str, ...]) -> None:
    """Create `path` holding just the header, atomically; a file that exists is left alone."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; tables are shared files
    try:
        with os.fdopen(fd, "w") as f:
            f.write(",".join(columns) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic: fails if another process created it first
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


class AppendLog:
    """An append-only CSV: whole lines, one os.write each, O_APPEND, fsync on `sync()`/`close()`."""

    def __init__(self, path: Path, columns: tuple[str, ...]):
        self.path = Path(path)
        _create_with_header(self.path, columns)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._ends_clean()

    def _ends_clean(self) -> None:
        # A file someone edited by hand may lack its final newline: start our rows on a line of their own.
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
        if last != b"\n":
            os.write(self._fd, b"\n")

    def append(self, line: str) -> None:
        data = line.encode()
        if not data.endswith(b"\n") or b"\n" in data[:-1]:
            raise ValueError("append() takes exactly one whole line")
        n = os.write(self._fd, data)
        if n != len(data):  # regular files do not short-write short of a full disk; say so rather than tear a row
            raise AmcError(f"short write to {self.path} ({n} of {len(data)} bytes): is the disk full?")

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TableStore:
    """One table folder. Reads are checked (a bad line is an AmcError naming file and line)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._units: dict[str, TableRow] | None = None
        self._units_sig: tuple | None = None
        self.duplicates = 0
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------ paths and meta
    @property
    def meta_path(self) -> Path:
        return self.folder / META_FILE

    @property
    def units_path(self) -> Path:
        return self.folder / UNITS_FILE

    @property
    def calibration_path(self) -> Path:
        return self.folder / CALIBRATION_FILE

    @property
    def failures_path(self) -> Path:
        return self.folder / FAILURES_FILE

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def meta(self) -> dict:
        if not self.meta_path.exists():
            raise AmcError(f"{self.folder} is not a latency table: {META_FILE} is missing "
                           f"(build one with `amc-mobile table build`)")
        fix = "restore it from version control or delete the folder and rebuild"
        meta = read_json(self.meta_path, dict, fix)
        try:
            if meta.get("format") != TABLE_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {TABLE_FORMAT!r}")
            if not isinstance(meta["fingerprint"], dict):
                raise TypeError("the fingerprint is not an object")
            Fingerprint.from_dict(meta["fingerprint"])
            if not isinstance(meta.get("builds", []), list):
                raise TypeError("builds is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise AmcError(f"{self.meta_path} is not valid table metadata ({exc}): {fix}") from None
        return meta

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint.from_dict(self.meta()["fingerprint"])

    def init(self, fingerprint: Fingerprint, measure_config: dict, grid: int) -> dict:
        """Create the folder's metadata if missing; an existing table must match `fingerprint`."""
        if self.exists():
            meta = self.meta()
            diff = Fingerprint.from_dict(meta["fingerprint"]).differences(fingerprint)
            if diff:
                raise fingerprint_mismatch(self.folder, diff)
            return meta
        meta = {
            "format": TABLE_FORMAT,
            "fingerprint": fingerprint.to_dict(),
            "versions": versions(),
            "created": now_iso(),
            "updated": now_iso(),
            "measure_config": measure_config,
            "grid": int(grid),
            "builds": [],
        }
        atomic_write_text(self.meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return meta

    def record_build(self, entry: dict) -> None:
        """Add (or update, by `entry['started']`) one build's record in meta.json."""
        meta = self.meta()
        builds = [b for b in meta.get("builds", []) if b.get("started") != entry.get("started")]
        builds.append(entry)
        meta["builds"] = builds
        meta["updated"] = now_iso()
        meta["versions"] = versions()
        atomic_write_text(self.meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------------------- rows
    def units(self) -> dict[str, TableRow]:
        """Every measured unit by key; re-read only when the file changed."""
        if not self.units_path.exists():
            return {}
        st = self.units_path.stat()
        sig = (st.st_size, st.st_mtime_ns)
        if self._units is None or sig != self._units_sig:
            self._units, self.duplicates = read_unit_rows(self.units_path)
            self._units_sig = sig
        return self._units

    def calibration(self) -> list[CalibrationRow]:
        return read_calibration_rows(self.calibration_path) if self.calibration_path.exists() else []

    def failures(self) -> dict[str, FailureRow]:
        return read_failure_rows(self.failures_path) if self.failures_path.exists() else {}

    def origins(self) -> dict[str, str]:
        path = self.folder / ORIGINS_FILE
        return read_origin_rows(path) if path.exists() else {}

    def references(self) -> dict:
        """unit key -> ReferenceRow (`reference.py`); {} for a table built before drift references."""
        from .reference import REFERENCES_FILE, read_reference_rows

        path = self.folder / REFERENCES_FILE
        return read_reference_rows(path) if path.exists() else {}

    def reference_log(self) -> AppendLog:
        from .reference import REFERENCE_COLUMNS, REFERENCES_FILE

        return AppendLog(self.folder / REFERENCES_FILE, REFERENCE_COLUMNS)

    def reference_status(self):
        from .reference import reference_status

        return reference_status(self.units(), self.references())

    def origin_log(self) -> AppendLog:
        return AppendLog(self.folder / ORIGINS_FILE, ORIGIN_COLUMNS)

    def unit_log(self) -> AppendLog:
        return AppendLog(self.units_path, UNIT_COLUMNS)

    def calibration_log(self) -> AppendLog:
        return AppendLog(self.calibration_path, CALIBRATION_COLUMNS)

    def append_calibration(self, rows) -> None:
        """Append whole-model timings (CalibrationRow) to calibration.csv at once, as they are taken."""
        with self.calibration_log() as log:
            for r in rows:
                log.append(r.to_line())

    def failure_log(self) -> AppendLog:
        return AppendLog(self.failures_path, FAILURE_COLUMNS)

    def append_units(self, rows: Iterable[TableRow]) -> int:
        """Append and fsync (one batch); returns how many were written."""
        n = 0
        with self.unit_log() as log:
            for r in rows:
                log.append(r.to_line())
                n += 1
        return n

    # ------------------------------------------------------------------------------ locking
    def lock(self) -> None:
        """Hold the folder's build lock (released by `unlock` or process exit)."""
        make_folder(self.folder, "table folder", "pass another --table-dir / --tables-dir")
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise AmcError(f"another build is writing to {self.folder}: wait for it to finish "
                               f"(or stop it; it resumes where it stopped)") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def fingerprint_mismatch(folder: Path, differences: list[str]) -> AmcError:
    return AmcError(f"the latency table in {folder} was measured on another device configuration "
                    f"({'; '.join(differences)}): build a table for this device, or pass "
                    f"--allow-fingerprint-mismatch to use it anyway")


def list_tables(root: str | os.PathLike | None = None) -> list[TableStore]:
    base = tables_root(root)
    if not base.is_dir():
        return []
    return [TableStore(p) for p in sorted(base.iterdir()) if (p / META_FILE).is_file()]


def find_table(fingerprint: Fingerprint, root: str | os.PathLike | None = None, allow_mismatch: bool = False,
               hint: str = "") -> TableStore:
    """The table for `fingerprint` under `root`.

    When there is none, a table for the same kind of device with other settings is a clear error
    listing what differs (or, with `allow_mismatch`, the closest such table is used).
    """
    store = TableStore(table_folder(fingerprint, root))
    if store.exists():
        diff = store.fingerprint.differences(fingerprint)
        if diff and not allow_mismatch:
            raise fingerprint_mismatch(store.folder, diff)
        return store
    others = []
    for t in list_tables(root):
        try:
            fp = t.fingerprint
        except AmcError:
            continue
        if fp.kind == fingerprint.kind:
            others.append((len(fp.differences(fingerprint)), t, fp.differences(fingerprint)))
    others.sort(key=lambda x: (x[0], str(x[1].folder)))
    if others and allow_mismatch:
        return others[0][1]
    build = hint or "`amc-mobile table build --model MODEL --device DEVICE`"
    if others:
        _, t, diff = others[0]
        raise AmcError(f"no latency table for this device configuration under {tables_root(root)}; the closest, "
                       f"{t.folder.name}, differs in {'; '.join(diff)}: run {build}, or pass "
                       f"--allow-fingerprint-mismatch to use it anyway")
    raise AmcError(f"no latency table for {fingerprint.slug()} under {tables_root(root)}: run {build}")
