"""The report section of a `table-validate` run: the latency table's accuracy metrics against fresh
measurements and the predicted-vs-measured plot, read from the files `amc_mobile.table_validation` writes.
"""

from __future__ import annotations

from amc_mobile.table_validation import SCATTER_PNG, SUMMARY_FILE

from .folder import flatten, kv_table, read_json
from .render import Heading, Image, Para, Report, rel

# a number whose key holds one of these goes in the headline table, the rest below it
_METRIC_WORDS = ("mape", "mae", "rmse", "r2", "spearman", "kendall", "pearson", "error", "corr", "rank", "bias",
                 "within", "max_", "mean_")


def section_table_validate(report: Report, manifest: dict) -> None:
    """The accuracy metrics of a latency table against fresh measurements."""
    found = False
    summary = report.run_dir / SUMMARY_FILE
    if summary.is_file():
        data = read_json(summary)
        report.used.add(summary)
        report.add(Heading("Table accuracy"))
        found = True
        if isinstance(data, Exception):
            report.add(Para(str(data), "error"))
        else:
            flat = flatten(data) if isinstance(data, dict) else {"value": data}
            headline = {k: v for k, v in flat.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                        and any(w in k.lower() for w in _METRIC_WORDS)}
            if headline:
                report.add(kv_table(headline, f"metrics ({rel(report, summary)})", "metric"))
            rest = {k: v for k, v in flat.items() if k not in headline}
            if rest:
                report.add(kv_table(rest, f"other fields of {rel(report, summary)}"))
    for key in ("metrics", "summary"):
        val = manifest.get(key)
        if isinstance(val, dict):
            if not found:
                report.add(Heading("Table accuracy"))
                found = True
            report.add(kv_table(flatten(val), f"{key} (run.json)", "metric"))
    scatter = report.run_dir / SCATTER_PNG
    if scatter.is_file():
        report.add(Image(scatter, rel(report, scatter)))
        report.used.add(scatter)
    if not found:
        report.add(Para(f"No metrics file found ({SUMMARY_FILE}); all files follow below.", "note"))
