"""Reports for run folders: one self-contained HTML file (figures embedded as base64), plus a
Markdown twin next to the PNGs, rebuilt from the folder alone (`amc-mobile report RUN_DIR`).

    html_path, md_path = write_report("runs/compare-20250101-120000")

What goes in, in order:

1. a section per `kind` from run.json (`compare`, `search`, `table-validate`), each reading the
   files that kind's run writes and skipping what is missing;
2. every CSV (first 50 rows), PNG and JSON file of the folder that section did not already show
   (so a kind without a renderer still gets a useful report);
3. the run itself: exact command, times, device fingerprints, software versions, other manifest fields.

The document is built as a list of small blocks (heading, paragraph, table, image, code) and
rendered twice, to HTML and to Markdown. The parts, in `amc_mobile/reporting/`: `render.py` (blocks ->
HTML / Markdown, no knowledge of run kinds), `folder.py` (reading a run folder without raising), and
one section per kind (`compare_section.py`, `search_section.py`, `validate_section.py`), each reading
the files through the names the module that writes them exports. Here: which section a kind gets,
the generic parts (2. and 3.), and writing the two files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from amc_mobile.errors import AmcError
from amc_mobile.files import atomic_write
from amc_mobile.reporting.compare_section import section_compare
from amc_mobile.reporting.folder import (HTML_FILE, MAX_DEPTH, MAX_JSON_CHARS, MAX_ROWS, MD_FILE, SKIP_NAMES, df_table,
                                         dump_json, fingerprints_in, fingerprints_of, flatten, kv_table, read_csv,
                                         read_json, run_files)
from amc_mobile.reporting.render import (MAX_CELL_CHARS, MAX_IMAGE_BYTES, Code, Heading, Image, Para, Report, Table,
                                         cell_text, fmt_value, rel, render_html, render_markdown)
from amc_mobile.reporting.search_section import section_search
from amc_mobile.reporting.validate_section import section_table_validate
from amc_mobile.runs import MANIFEST, read_manifest

__all__ = [
    "Code", "HTML_FILE", "Heading", "Image", "MAX_CELL_CHARS", "MAX_DEPTH", "MAX_IMAGE_BYTES", "MAX_JSON_CHARS",
    "MAX_ROWS", "MD_FILE", "Para", "Report", "SECTIONS", "SKIP_NAMES", "Table", "build_report", "cell_text",
    "df_table", "fingerprints_in", "fingerprints_of", "flatten", "fmt_value", "kv_table", "read_csv", "read_json",
    "rel", "render_html", "render_markdown", "run_files", "section_compare", "section_files", "section_run",
    "section_search", "section_table_validate", "write_report",
]

SECTIONS: dict[str, Callable[[Report, dict], None]] = {
    "compare": section_compare,
    "search": section_search,
    "table-validate": section_table_validate,
}


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
            report.add(Code(dump_json(json.loads(p.read_text()))))
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
        report.add(Heading("Other run.json fields", 3), Code(dump_json(rest)))


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
