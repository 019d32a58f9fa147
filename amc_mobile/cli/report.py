"""`amc-mobile report RUN_DIR`: rebuild a run folder's self-contained report.html (and report.md)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("report", help="rebuild the report of a run folder (search, table validation, compare)",
                       description="Rebuild RUN_DIR/report.html (figures embedded, readable without the tool) and "
                                   "RUN_DIR/report.md (next to the PNGs) from the folder alone: run.json, CSV, "
                                   "PNG and JSON files.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (it holds run.json)")
    p.add_argument("--no-markdown", action="store_true", help="write report.html only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from amc_mobile.report import write_report

    html_path, md_path = write_report(args.run_dir, markdown=not args.no_markdown)
    print(html_path)
    if md_path is not None:
        print(md_path)
    return 0
