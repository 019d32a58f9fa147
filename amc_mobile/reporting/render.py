"""Report blocks and their two renderings: a self-contained HTML page (figures embedded as base64) and
a Markdown twin that links the PNGs next to it.

A report is a title and a list of small blocks (heading, paragraph, table, image, code); nothing here
knows what kind of run the blocks describe (the sections in ``amc_mobile.reporting`` do).
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

MAX_IMAGE_BYTES = 8_000_000


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


def rel(report: Report, path: Path) -> str:
    """`path` relative to the run folder (as the Markdown links it), or as is when it lies outside."""
    try:
        return str(path.relative_to(report.run_dir))
    except ValueError:
        return str(path)


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
