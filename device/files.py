"""Files, by one set of rules for every package: reading what a user hands us with one-line errors,
writing atomically, hashing.

Any such file can be missing, a folder, unreadable, not text, cut short, or valid JSON of the wrong
type (a list where an object belongs, from another version or edited by hand). Each case is an
`AmcError` that names the file and ends with `fix`: what the user can do about it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import AmcError

_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


def make_folder(path: str | Path, what: str, fix: str) -> Path:
    """mkdir -p `path`; `AmcError` ("cannot make the {what} PATH: ...; {fix}") when it or a folder
    above it is a file, or it may not be written. Called before the work whose output goes there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise AmcError(f"cannot make the {what} {path}: it or a folder above it is a file ({fix})") from None
    except OSError as exc:
        raise AmcError(f"cannot make the {what} {path}: {exc.strerror or exc} ({fix})") from None
    return path


def read_text(path: str | Path, fix: str = "") -> str:
    """The file's text; `AmcError` when it is missing, a folder, unreadable or not UTF-8."""
    path = Path(path)
    tail = f": {fix}" if fix else ""
    try:
        return path.read_text()
    except FileNotFoundError:
        raise AmcError(f"{path} is missing{tail}") from None
    except IsADirectoryError:
        raise AmcError(f"{path} is a folder, not a file{tail}") from None
    except UnicodeDecodeError:
        raise AmcError(f"{path} is not a text file{tail}") from None
    except OSError as exc:
        raise AmcError(f"cannot read {path}: {exc.strerror or exc}{tail}") from None


def read_json(path: str | Path, expect: type = dict, fix: str = "") -> Any:
    """The file's JSON value, which must be of type `expect` (default: an object)."""
    path = Path(path)
    tail = f": {fix}" if fix else ""
    text = read_text(path, fix)
    try:
        value = json.loads(text)
    except ValueError as exc:
        what = "empty" if not text.strip() else f"not valid JSON ({exc})"
        raise AmcError(f"{path} is {what}{tail}") from None
    if not isinstance(value, expect) or (isinstance(value, bool) and expect in (int, float)):
        raise AmcError(f"{path} holds {_JSON_TYPES.get(type(value), type(value).__name__)} where "
                       f"{_JSON_TYPES.get(expect, expect.__name__)} belongs{tail}")
    return value


def atomic_write(path: str | Path, data: str | bytes, *, durable: bool = True, mode: int = 0o644) -> Path:
    """Replace `path` with `data` so that a reader (or a crash) sees the old file or the new one, never
    a part; the folder is made when missing. `durable`: fsync the data before the rename, for what
    cannot be measured or computed again cheaply (results, checkpoints, manifests); without it (caches,
    reports) a power cut may leave the old file, never a torn one. `mode`: mkstemp's 0600 would make
    shared files (tables, run folders) unreadable to others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any, *, durable: bool = True) -> Path:
    """`obj` as indented, key-sorted JSON (anything else as str), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", durable=durable)


def config_hash(config: dict[str, Any], length: int = 10) -> str:
    """A short stable hash of a JSON-safe dict (model config, training args, unit list...)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


_SHA_CACHE: dict[tuple, str] = {}


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256, cached by (path, size, mtime): runners and models are hashed again and again."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]
