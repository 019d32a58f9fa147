"""Reading a run folder for a report: which files it holds, each CSV/JSON read without raising (an
unreadable file becomes a message in the report), and the small tables every section builds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from amc_mobile.errors import AmcError
from amc_mobile.runs import MANIFEST

from .render import Table

HTML_FILE = "report.html"
MD_FILE = "report.md"
MAX_ROWS = 50
MAX_JSON_CHARS = 20_000
MAX_DEPTH = 2  # how deep below the run folder files are looked for
SKIP_NAMES = {HTML_FILE, MD_FILE, MANIFEST}


def run_files(run_dir: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under the run folder (at most MAX_DEPTH deep) with one of `suffixes`, sorted, hidden ones skipped."""
    out = []
    for root, dirs, files in os.walk(run_dir):
        rel = Path(root).relative_to(run_dir)
        depth = 0 if str(rel) == "." else len(rel.parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and depth < MAX_DEPTH)
        for name in sorted(files):
            if name.startswith(".") or name in SKIP_NAMES and depth == 0 or name.endswith(".tmp"):
                continue
            if name.lower().endswith(suffixes):
                out.append(Path(root) / name)
    return sorted(out, key=lambda p: (len(p.relative_to(run_dir).parts), str(p)))


def read_csv(path: Path):
    """A DataFrame, or an error string."""
    import pandas as pd

    try:
        return pd.read_csv(path)
    except Exception as exc:
        return f"could not read {path.name}: {' '.join(str(exc).split())[:200]}"


def df_table(df, caption: str = "", max_rows: int = MAX_ROWS, columns: list[str] | None = None) -> Table:
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    note = f"showing the first {max_rows} of {len(df)} rows" if len(df) > max_rows else ""
    rows = [[py_value(v) for v in r] for r in df[cols].head(max_rows).itertuples(index=False, name=None)]
    return Table([str(c) for c in cols], rows, caption, note)


def py_value(v):
    """A numpy/pandas scalar as the Python value (so tables render it as a number)."""
    if hasattr(v, "item"):
        try:
            return v.item()
        except (ValueError, AttributeError):
            pass
    return v


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except Exception as exc:
        return AmcError(f"could not read {path.name}: {' '.join(str(exc).split())[:200]}")


def flatten(obj, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists of scalars stay as values."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(flatten(v, key))
            else:
                out[key] = v
    else:
        out[prefix or "value"] = obj
    return out


def kv_table(d: dict, caption: str = "", key_name: str = "field") -> Table:
    return Table([key_name, "value"], [[k, v] for k, v in d.items()], caption)


def is_fingerprint(d) -> bool:
    return isinstance(d, dict) and "kind" in d and "hardware" in d


def fingerprints_of(manifest: dict) -> dict[str, dict | None]:
    """{label: fingerprint dict or None} from any manifest key that holds fingerprints."""
    out: dict[str, dict | None] = {}
    for key, val in manifest.items():
        if "fingerprint" not in key.lower():
            continue
        if is_fingerprint(val):
            out[val.get("kind", key)] = val
        elif isinstance(val, dict):
            for name, fp in val.items():
                if fp is None or is_fingerprint(fp):
                    out[str(name)] = fp
    return out


def fingerprints_in(obj, where: str, depth: int = 0) -> list[tuple[str, dict]]:
    """Every fingerprint-shaped dict inside a JSON value, with where it sits ("summary.json: measured.fingerprint")."""
    if depth > 6:
        return []
    if is_fingerprint(obj) and "runtime" in obj and "backend" in obj:
        return [(where, obj)]
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            sep = ": " if depth == 0 else "."
            out += fingerprints_in(v, f"{where}{sep}{k}", depth + 1)
    return out


def dump_json(obj) -> str:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    if len(text) > MAX_JSON_CHARS:
        text = text[:MAX_JSON_CHARS] + f"\n... ({len(text) - MAX_JSON_CHARS} more characters in the file)"
    return text
