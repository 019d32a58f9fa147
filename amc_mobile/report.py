"""Reports for run folders: one self-contained HTML file (figures embedded as base64), plus a
Markdown twin next to the PNGs, rebuilt from the folder alone (`amc-mobile report RUN_DIR`).

    html_path, md_path = write_report("runs/compare-20250101-120000")

What goes in, in order:

1. a section per `kind` from run.json (`compare`, `search`, `table-validate`), each reading what
   files it finds and skipping what is missing;
2. every CSV (first 50 rows), PNG and JSON file of the folder that section did not already show
   (so a kind without a renderer still gets a useful report);
3. the run itself: exact command, times, device fingerprints, software versions, other manifest fields.

The document is built as a list of small blocks (heading, paragraph, table, image, code) and
rendered twice, to HTML and to Markdown.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from amc_mobile.errors import AmcError
from amc_mobile.files import atomic_write
from amc_mobile.formatting import si
from amc_mobile.runs import MANIFEST, read_manifest

HTML_FILE = "report.html"
MD_FILE = "report.md"
MAX_ROWS = 50
MAX_JSON_CHARS = 20_000
MAX_IMAGE_BYTES = 8_000_000
MAX_DEPTH = 2  # how deep below the run folder files are looked for
SKIP_NAMES = {HTML_FILE, MD_FILE, MANIFEST}


# ----------------------------------------------------------------------------- blocks


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    tone: str = ""  # "", "note", "error"


@dataclass
class Table:
    columns: list[str]
    rows: list[list]
    caption: str = ""
    note: str = ""


@dataclass
class Image:
    path: Path
    caption: str = ""


@dataclass
class Code:
    text: str


@dataclass
class Report:
    title: str
    run_dir: Path
    blocks: list = field(default_factory=list)
    used: set[Path] = field(default_factory=set)  # files a section already showed

    def add(self, *blocks) -> None:
        self.blocks.extend(blocks)


# ----------------------------------------------------------------------------- helpers


MAX_CELL_CHARS = 240


def cell_text(v) -> str:
    """fmt_value, cut to MAX_CELL_CHARS (JSON columns such as a policy's channels can be long)."""
    text = fmt_value(v)
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "\u2026"


def fmt_value(v) -> str:
    """A cell as text: floats to 4 significant digits, NaN/None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


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


def rel(report: Report, path: Path) -> str:
    try:
        return str(path.relative_to(report.run_dir))
    except ValueError:
        return str(path)


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
    rows = [[_py(v) for v in r] for r in df[cols].head(max_rows).itertuples(index=False, name=None)]
    return Table([str(c) for c in cols], rows, caption, note)


def _py(v):
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


def first_match(report: Report, patterns: tuple[str, ...], suffixes: tuple[str, ...]) -> Path | None:
    """The first file (shallowest, sorted) whose lower-case name contains one of `patterns`."""
    for p in run_files(report.run_dir, suffixes):
        if any(pat in p.name.lower() for pat in patterns):
            return p
    return None


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


def _is_fingerprint(d) -> bool:
    return isinstance(d, dict) and "kind" in d and "hardware" in d


def fingerprints_of(manifest: dict) -> dict[str, dict | None]:
    """{label: fingerprint dict or None} from any manifest key that holds fingerprints."""
    out: dict[str, dict | None] = {}
    for key, val in manifest.items():
        if "fingerprint" not in key.lower():
            continue
        if _is_fingerprint(val):
            out[val.get("kind", key)] = val
        elif isinstance(val, dict):
            for name, fp in val.items():
                if fp is None or _is_fingerprint(fp):
                    out[str(name)] = fp
    return out


def fingerprints_in(obj, where: str, depth: int = 0) -> list[tuple[str, dict]]:
    """Every fingerprint-shaped dict inside a JSON value, with where it sits ("summary.json: measured.fingerprint")."""
    if depth > 6:
        return []
    if _is_fingerprint(obj) and "runtime" in obj and "backend" in obj:
        return [(where, obj)]
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            sep = ": " if depth == 0 else "."
            out += fingerprints_in(v, f"{where}{sep}{k}", depth + 1)
    return out


# ----------------------------------------------------------------------------- kind sections


def section_compare(report: Report, manifest: dict) -> None:
    run_dir = report.run_dir
    summary = manifest.get("summary") or []
    errors = manifest.get("device_errors") or {}
    if summary:
        report.add(Heading("Summary"), *[Para(s) for s in summary])
    for uri, err in errors.items():
        report.add(Para(f"{uri}: {err}", "error"))
    csv_path = run_dir / "compare.csv"
    df = read_csv(csv_path) if csv_path.exists() else None
    if isinstance(df, str):
        report.add(Para(df, "error"))
        df = None
    if df is not None:
        report.used.add(csv_path)
        import pandas as pd

        if {"model", "device", "speedup"} <= set(df.columns):
            models = list(dict.fromkeys(df["model"]))
            devices = list(dict.fromkeys(df["device"]))
            rows = []
            for m in models:
                row = [m]
                for d in devices:
                    r = df[(df["model"] == m) & (df["device"] == d)]
                    if r.empty:
                        row.append("-")
                        continue
                    r = r.iloc[0]
                    if str(r.get("status", "ok")) != "ok":
                        row.append(str(r.get("status")))
                    else:
                        sp = r.get("speedup")
                        row.append(f"{fmt_value(float(r['median_ms']))} ms ({float(sp):.2f}\u00d7)"
                                   if pd.notna(sp) else f"{fmt_value(float(r['median_ms']))} ms")
                first = df[df["model"] == m].iloc[0]
                macs = first.get("macs")
                ratio = first.get("macs_ratio")
                row.append(si(macs) + (f" ({ratio:.0%})" if pd.notna(ratio) else ""))
                row.append(si(first.get("params")))
                row.append(fmt_value(_py(first.get("size_mb"))))
                top1 = first.get("top1")
                row.append(f"{top1 * 100:.2f}%" if pd.notna(top1) else (str(first.get("accuracy_note") or "-")
                                                                         if pd.notna(first.get("accuracy_note")) else "-"))
                rows.append(row)
            report.add(Heading("Latency and speedup"),
                       Table(["model"] + [f"{d} median (speedup)" for d in devices]
                             + ["MACs (of original)", "params", "size MB", "top-1"], rows,
                             caption="median latency per device; speedup = original median / model median"))
        for name, caption in (("speedup.png", "Speedup over the original, per device"),
                              ("latency.png", "Latency per device (median, p10..p90)")):
            p = run_dir / name
            if p.exists():
                report.add(Image(p, caption))
                report.used.add(p)
        report.add(Heading("All cells", 3), df_table(df, caption=f"{csv_path.name}: one row per model x device",
                                                     max_rows=500))
        failed = df[df["status"] != "ok"] if "status" in df.columns else df.iloc[0:0]
        if len(failed):
            report.add(Heading("Cells not measured", 3),
                       df_table(failed, columns=["model", "device", "error"], max_rows=500))
        if "accuracy_note" in df.columns:
            notes = df.drop_duplicates("model")[["model", "top1", "accuracy_note"]]
            notes = notes[notes["accuracy_note"].notna() & (notes["accuracy_note"].astype(str) != "")]
            if len(notes):
                report.add(Heading("Accuracy (Fashion-MNIST test split)", 3), df_table(notes))
    models = manifest.get("models")
    if isinstance(models, list) and models:
        cols = ["label", "ref", "source", "params", "macs", "size_mb", "top1", "notes"]
        report.add(Heading("Models", 3),
                   Table(cols, [[m.get(c) if isinstance(m, dict) else m for c in cols] for m in models],
                         caption="the first model is the original"))
    cfg = manifest.get("config")
    if isinstance(cfg, dict):
        report.add(Heading("Measurement protocol", 3), kv_table(cfg, "the same MeasureConfig on every device"))
    meas = run_dir / "measurements.jsonl"
    if meas.exists():
        report.used.add(meas)
        report.add(Para(f"Raw samples of every cell: {meas.name} (one JSON line per device).", "note"))




_POLICY_KEYS = ("ratios", "preserve_ratios", "policy", "actions", "channels", "group_channels")
_REWARD_KEYS = ("reward", "best_reward", "return")


def section_search(report: Report, manifest: dict) -> None:
    """Best policy, reward curve, episode summary: whatever the search left in the folder."""
    import pandas as pd

    added = False
    best_json = first_match(report, ("best",), (".json",))
    if best_json is not None:
        data = read_json(best_json)
        report.used.add(best_json)
        report.add(Heading("Best policy"))
        added = True
        if isinstance(data, Exception):
            report.add(Para(str(data), "error"))
        elif isinstance(data, dict):
            scalars = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
            if scalars:
                report.add(kv_table(scalars, f"{rel(report, best_json)}"))
            layers = data.get("layers")
            if isinstance(layers, dict) and layers and all(isinstance(v, dict) for v in layers.values()):
                cols = list(dict.fromkeys(k for v in layers.values() for k in v))
                report.add(Table(["layer"] + cols, [[name] + [v.get(c) for c in cols] for name, v in layers.items()],
                                 "per decision layer: channels kept of size, preserve ratio"))
            for key in _POLICY_KEYS:
                val = data.get(key)
                if isinstance(layers, dict) and layers and key in ("preserve_ratios", "channels", "actions"):
                    continue  # the layer table shows them
                if isinstance(val, list) and val:
                    report.add(Table(["layer", key], [[i, v] for i, v in enumerate(val)], f"{key} per decision layer"))
                elif isinstance(val, dict) and val:
                    report.add(Table(["layer/group", key], [[k, v] for k, v in val.items()], f"{key}"))
            rest = {k: v for k, v in data.items()
                    if isinstance(v, (dict, list)) and k not in _POLICY_KEYS and k != "layers"}
            if rest:
                report.add(Code(_dump(rest)))
        else:
            report.add(Code(_dump(data)))
    best_csv = first_match(report, ("best", "policy"), (".csv",))
    if best_csv is not None:
        df = read_csv(best_csv)
        report.used.add(best_csv)
        if not added:
            report.add(Heading("Best policy"))
            added = True
        report.add(Para(df, "error") if isinstance(df, str) else df_table(df, caption=rel(report, best_csv)))
    reward_png = first_match(report, ("reward",), (".png",))
    episodes = first_match(report, ("episode", "history", "log"), (".csv",))
    if reward_png is not None:
        report.add(Heading("Reward curve"), Image(reward_png, rel(report, reward_png)))
        report.used.add(reward_png)
    if episodes is not None:
        df = read_csv(episodes)
        if isinstance(df, str):
            report.add(Para(df, "error"))
        else:
            report.used.add(episodes)
            col = next((c for c in df.columns if str(c).lower() in _REWARD_KEYS), None)
            if col is None:
                col = next((c for c in df.columns if "reward" in str(c).lower()), None)
            report.add(Heading("Episodes"))
            rewards = pd.to_numeric(df[col], errors="coerce") if col is not None else None
            if rewards is not None and rewards.notna().any():
                best = df.loc[rewards.idxmax()]
                report.add(Para(f"{len(df)} episodes; best {col} {fmt_value(float(rewards.max()))} "
                                f"(row {int(rewards.idxmax())})."))
                report.add(kv_table({k: _py(v) for k, v in best.items()}, "the best episode"))
                if reward_png is None:
                    png = _reward_curve(report.run_dir, df, col)
                    if png is not None:
                        report.add(Image(png, f"{col} per episode (drawn by the report from {episodes.name})"))
                        report.used.add(png)
            else:
                report.add(Para(f"{len(df)} rows."))
            report.add(df_table(df.tail(MAX_ROWS) if len(df) > MAX_ROWS else df,
                                caption=rel(report, episodes) + (" (last rows)" if len(df) > MAX_ROWS else "")))
    summary = report.run_dir / "summary.json"
    if summary.exists():
        data = read_json(summary)
        report.used.add(summary)
        report.add(Heading("Search summary"))
        if isinstance(data, Exception):
            report.add(Para(str(data), "error"))
        elif isinstance(data, dict):
            measured = data.get("measured")
            if isinstance(measured, dict) and measured.get("speedup") is not None:
                fp = measured.get("fingerprint") if _is_fingerprint(measured.get("fingerprint")) else {}
                where = f" on {fp.get('hardware')} ({fp.get('backend')})" if fp else ""
                report.add(Para(f"The pruned model measured {float(measured['speedup']):.2f}\u00d7 faster than the "
                                f"original{where}."))
            flat = {k: v for k, v in flatten({k: v for k, v in data.items() if k not in ("best", "setup")}).items()
                    if not isinstance(v, list) or len(v) <= 8}
            if flat:
                report.add(kv_table(flat, "summary.json (the best policy is above)"))
            if isinstance(data.get("setup"), dict):
                report.add(Heading("Setup", 3), Code(_dump(data["setup"])))
        else:
            report.add(Code(_dump(data)))
    pruned = [p for p in run_files(report.run_dir, (".json",)) if p.name == "architecture.json"]
    for p in pruned:
        report.used.add(p)
        folder = p.parent
        report.add(Para(f"Pruned model: {rel(report, folder)}/ (architecture.json + model.pt). Compare it on your "
                        f"devices: amc-mobile compare ORIGINAL {folder} --devices local cuda:0 adb:SERIAL", "note"))
    if not added and reward_png is None and episodes is None:
        report.add(Para("No best-policy, reward-curve or episode file found; all files follow below.", "note"))


def _reward_curve(run_dir: Path, df, col: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        import pandas as pd

        scatter = {"accuracy", "cost_ratio"} <= set(df.columns)
        fig, axes = plt.subplots(1, 2 if scatter else 1, figsize=(11 if scatter else 7, 3.6), squeeze=False)
        ax = axes[0][0]
        y = pd.to_numeric(df[col], errors="coerce")
        ax.plot(range(len(y)), y, lw=1, alpha=0.6, label=col)
        ax.plot(range(len(y)), y.cummax(), lw=1.5, label="best so far")
        ax.set_xlabel("episode")
        ax.set_ylabel(col)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if scatter:
            ax2 = axes[0][1]
            acc = pd.to_numeric(df["accuracy"], errors="coerce")
            cost = pd.to_numeric(df["cost_ratio"], errors="coerce")
            sc = ax2.scatter(cost, acc, c=range(len(df)), cmap="viridis", s=12)
            ax2.set_xlabel("cost ratio (of the original)")
            ax2.set_ylabel("accuracy")
            ax2.grid(alpha=0.3)
            fig.colorbar(sc, ax=ax2, label="episode")
        fig.tight_layout()
        path = run_dir / "report_reward_curve.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    except Exception:
        return None


_METRIC_WORDS = ("mape", "mae", "rmse", "r2", "spearman", "kendall", "pearson", "error", "corr", "rank", "bias",
                 "within", "max_", "mean_")


def section_table_validate(report: Report, manifest: dict) -> None:
    """The accuracy metrics of a latency table against fresh measurements."""
    found = False
    for p in run_files(report.run_dir, (".json",)):
        name = p.name.lower()
        if not any(w in name for w in ("metric", "summary", "validation", "validate", "result")):
            continue
        data = read_json(p)
        report.used.add(p)
        if not found:
            report.add(Heading("Table accuracy"))
            found = True
        if isinstance(data, Exception):
            report.add(Para(str(data), "error"))
            continue
        flat = flatten(data) if isinstance(data, dict) else {"value": data}
        headline = {k: v for k, v in flat.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and any(w in k.lower() for w in _METRIC_WORDS)}
        if headline:
            report.add(kv_table(headline, f"metrics ({rel(report, p)})", "metric"))
        rest = {k: v for k, v in flat.items() if k not in headline}
        if rest:
            report.add(kv_table(rest, f"other fields of {rel(report, p)}"))
    for key in ("metrics", "summary"):
        val = manifest.get(key)
        if isinstance(val, dict):
            if not found:
                report.add(Heading("Table accuracy"))
                found = True
            report.add(kv_table(flatten(val), f"{key} (run.json)", "metric"))
    for p in run_files(report.run_dir, (".png",)):
        if any(w in p.name.lower() for w in ("pred", "scatter", "valid", "error", "measured")):
            report.add(Image(p, rel(report, p)))
            report.used.add(p)
    if not found:
        report.add(Para("No metrics file found (metrics*.json / summary*.json / validation*.json); "
                        "all files follow below.", "note"))


SECTIONS: dict[str, Callable[[Report, dict], None]] = {
    "compare": section_compare,
    "search": section_search,
    "table-validate": section_table_validate,
}


# ----------------------------------------------------------------------------- generic parts


def _dump(obj) -> str:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    if len(text) > MAX_JSON_CHARS:
        text = text[:MAX_JSON_CHARS] + f"\n... ({len(text) - MAX_JSON_CHARS} more characters in the file)"
    return text


def section_files(report: Report) -> None:
    """Every CSV, PNG and JSON a kind section did not show."""
    rd = report.run_dir
    csvs = [p for p in run_files(rd, (".csv",)) if p not in report.used]
    pngs = [p for p in run_files(rd, (".png",)) if p not in report.used]
    jsons = [p for p in run_files(rd, (".json",)) if p not in report.used]
    if not (csvs or pngs or jsons):
        return
    report.add(Heading("Files in the run folder"))
    for p in pngs:
        report.add(Image(p, rel(report, p)))
    for p in csvs:
        df = read_csv(p)
        report.add(Heading(rel(report, p), 3))
        report.add(Para(df, "error") if isinstance(df, str) else df_table(df))
    for p in jsons:
        report.add(Heading(rel(report, p), 3))
        try:
            report.add(Code(_dump(json.loads(p.read_text()))))
        except Exception as exc:
            report.add(Para(f"could not read {p.name}: {' '.join(str(exc).split())[:200]}", "error"))


def section_run(report: Report, manifest: dict) -> None:
    report.add(Heading("Run"))
    if manifest.get("command"):
        report.add(Para("Command:"), Code(str(manifest["command"])))
    facts = {k: manifest.get(k) for k in ("kind", "status", "started", "updated") if manifest.get(k) is not None}
    facts["folder"] = str(report.run_dir.resolve())
    report.add(kv_table(facts))
    fps = fingerprints_of(manifest)
    for p in run_files(report.run_dir, (".json",)):
        if len(p.relative_to(report.run_dir).parts) > 1:
            continue
        data = read_json(p)
        for where, fp in fingerprints_in(data, p.name):
            if fp not in fps.values():
                fps[where] = fp
    report.add(Heading("Devices (fingerprints)"))
    if not fps:
        report.add(Para("run.json records no device fingerprint.", "note"))
    for name, fp in fps.items():
        if fp is None:
            report.add(Para(f"{name}: no fingerprint (the device was not reached)", "note"))
            continue
        from device import Fingerprint

        fields = {k: v for k, v in fp.items() if k != "extra"}
        try:
            obj = Fingerprint.from_dict(fp)
            fields["digest"], fields["slug"] = obj.digest(), obj.slug()
        except Exception:
            pass
        for k, v in (fp.get("extra") or {}).items():
            fields[f"extra.{k}"] = v
        report.add(kv_table(fields, name))
    versions = manifest.get("versions")
    if isinstance(versions, dict):
        report.add(Heading("Versions"), kv_table(versions, key_name="package"))
    shown = {"kind", "status", "started", "updated", "command", "versions", "summary", "device_errors",
             "models", "config", "files", "devices"} | {k for k in manifest if "fingerprint" in k.lower()}
    rest = {k: v for k, v in manifest.items() if k not in shown}
    if rest:
        report.add(Heading("Other run.json fields", 3), Code(_dump(rest)))


def build_report(run_dir: str | Path) -> Report:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AmcError(f"{run_dir} is not a folder: pass a run folder (it holds {MANIFEST})")
    manifest = read_manifest(run_dir)
    if not isinstance(manifest, dict):
        raise AmcError(f"{run_dir / MANIFEST} is not a JSON object")
    kind = str(manifest.get("kind") or "run")
    report = Report(f"amc-mobile {kind}: {run_dir.resolve().name}", run_dir)
    section = SECTIONS.get(kind)
    if section is not None:
        try:
            section(report, manifest)
        except Exception as exc:  # a broken file must not lose the rest of the report
            report.add(Para(f"the {kind} section could not be rendered: {type(exc).__name__}: {exc}", "error"))
    else:
        report.add(Para(f"No specific section for kind {kind!r}: showing every file of the run folder.", "note"))
    section_files(report)
    section_run(report, manifest)
    return report


# ----------------------------------------------------------------------------- rendering

_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #eee}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.86em;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f4f4f4} tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;color:#555;font-size:.95em;padding:.2em 0}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em;border-radius:4px}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
.note{color:#555;font-style:italic} .error{color:#b00020}
.small{color:#777;font-size:.85em}
"""


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def render_html(report: Report) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(report.title)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>{e(report.title)}</h1>"]
    for b in report.blocks:
        if isinstance(b, Heading):
            lvl = min(max(b.level, 2), 4)
            parts.append(f"<h{lvl}>{e(b.text)}</h{lvl}>")
        elif isinstance(b, Para):
            cls = f' class="{b.tone}"' if b.tone else ""
            parts.append(f"<p{cls}>{e(b.text)}</p>")
        elif isinstance(b, Code):
            parts.append(f"<pre>{e(b.text)}</pre>")
        elif isinstance(b, Table):
            rows = ["<table>"]
            if b.caption:
                rows.append(f"<caption>{e(b.caption)}</caption>")
            rows.append("<tr>" + "".join(f"<th>{e(str(c))}</th>" for c in b.columns) + "</tr>")
            for r in b.rows:
                rows.append("<tr>" + "".join(
                    f'<td class="num">{e(cell_text(v))}</td>' if _is_num(v) else f"<td>{e(cell_text(v))}</td>"
                    for v in r) + "</tr>")
            rows.append("</table>")
            parts.append("".join(rows))
            if b.note:
                parts.append(f'<p class="small">{e(b.note)}</p>')
        elif isinstance(b, Image):
            parts.append(_html_image(report, b))
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts.append(f'<p class="small">Rebuilt with <code>amc-mobile report {e(str(report.run_dir))}</code> '
                 f"at {e(stamp)}; this file is self-contained.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_image(report: Report, b: Image) -> str:
    e = html.escape
    try:
        data = b.path.read_bytes()
    except OSError as exc:
        return f'<p class="error">image {e(rel(report, b.path))} could not be read: {e(str(exc))}</p>'
    if len(data) > MAX_IMAGE_BYTES:
        return f'<p class="note">image {e(rel(report, b.path))} is too large to embed ({len(data)} bytes)</p>'
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{e(b.caption)}</figcaption>" if b.caption else ""
    return f'<figure><img src="{uri}" alt="{e(b.caption or b.path.name)}">{cap}</figure>'


def _numeric_column(rows: list[list], i: int) -> bool:
    vals = [r[i] for r in rows if i < len(r) and r[i] is not None and not (isinstance(r[i], float) and math.isnan(r[i]))]
    return bool(vals) and all(_is_num(v) for v in vals)


def _md_cell(v) -> str:
    return cell_text(v).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report) -> str:
    out = [f"# {report.title}", ""]
    for b in report.blocks:
        if isinstance(b, Heading):
            out += ["#" * min(max(b.level, 2), 4) + " " + b.text, ""]
        elif isinstance(b, Para):
            text = b.text
            if b.tone == "error":
                text = f"**{text}**"
            elif b.tone == "note":
                text = f"_{text}_"
            out += [text, ""]
        elif isinstance(b, Code):
            fence = "````" if "```" in b.text else "```"
            out += [fence, b.text, fence, ""]
        elif isinstance(b, Table):
            if b.caption:
                out += [f"*{b.caption}*", ""]
            out.append("| " + " | ".join(_md_cell(c) for c in b.columns) + " |")
            out.append("|" + "|".join("---:" if _numeric_column(b.rows, i) else "---"
                                      for i in range(len(b.columns))) + "|")
            for r in b.rows:
                out.append("| " + " | ".join(_md_cell(v) for v in r) + " |")
            out.append("")
            if b.note:
                out += [f"_{b.note}_", ""]
        elif isinstance(b, Image):
            out += [f"![{b.caption or b.path.name}]({rel(report, b.path)})", ""]
            if b.caption:
                out += [f"*{b.caption}*", ""]
    return "\n".join(out) + "\n"


def write_report(run_dir: str | Path, markdown: bool = True) -> tuple[Path, Path | None]:
    """Write report.html (self-contained) and, unless `markdown=False`, report.md into the run folder."""
    report = build_report(run_dir)
    run_dir = Path(run_dir)
    html_path = run_dir / HTML_FILE
    atomic_write(html_path, render_html(report), durable=False)
    md_path = None
    if markdown:
        md_path = run_dir / MD_FILE
        atomic_write(md_path, render_markdown(report), durable=False)
    return html_path, md_path
