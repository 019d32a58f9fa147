"""Reading the files a user hands us (run folders, tables, configs) with one-line errors.

Any such file can be missing, a folder, unreadable, not text, cut short, or valid JSON of the wrong
type (a list where an object belongs, from another version or edited by hand). Each case is an
`AmcError` that names the file and ends with `fix`: what the user can do about it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amc_mobile.errors import AmcError

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
