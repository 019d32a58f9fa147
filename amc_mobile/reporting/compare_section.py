"""The report section of a `compare` run: latency and speedup per model and device, the charts, every
cell, the models and the measurement protocol, read from the files `amc_mobile.compare` writes.
"""

from __future__ import annotations

from amc_mobile.compare import CSV_FILE, LATENCY_PNG, MEASUREMENTS_FILE, SPEEDUP_PNG
from amc_mobile.formatting import si

from .folder import df_table, kv_table, py_value, read_csv
from .render import Heading, Image, Para, Report, Table, fmt_value


def section_compare(report: Report, manifest: dict) -> None:
    run_dir = report.run_dir
    summary = manifest.get("summary") or []
    errors = manifest.get("device_errors") or {}
    if summary:
        report.add(Heading("Summary"), *[Para(s) for s in summary])
    for uri, err in errors.items():
        report.add(Para(f"{uri}: {err}", "error"))
    csv_path = run_dir / CSV_FILE
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
                row.append(fmt_value(py_value(first.get("size_mb"))))
                row.append(str(first.get("precision")) if pd.notna(first.get("precision", float("nan"))) else "fp32")
                top1 = first.get("top1")
                row.append(f"{top1 * 100:.2f}%" if pd.notna(top1) else (str(first.get("accuracy_note") or "-")
                                                                         if pd.notna(first.get("accuracy_note")) else "-"))
                rows.append(row)
            report.add(Heading("Latency and speedup"),
                       Table(["model"] + [f"{d} median (speedup)" for d in devices]
                             + ["MACs (of original)", "params", "size MB", "precision", "top-1"], rows,
                             caption="median latency per device; speedup = original median / model median"))
        for name, caption in ((SPEEDUP_PNG, "Speedup over the original, per device"),
                              (LATENCY_PNG, "Latency per device (median, p10..p90)")):
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
        cols = ["label", "ref", "source", "params", "macs", "size_mb", "precision", "top1", "notes"]
        report.add(Heading("Models", 3),
                   Table(cols, [[m.get(c) if isinstance(m, dict) else m for c in cols] for m in models],
                         caption="the first model is the original"))
        for m in models:
            layers = m.get("layer_precisions") if isinstance(m, dict) else None
            if isinstance(layers, list) and layers:
                report.add(Heading(f"Precision per layer: {m.get('label')}", 3),
                           Table(["layer", "asked", "got", "why not"],
                                 [[l.get("layer"), l.get("requested"), l.get("actual"), l.get("reason") or ""]
                                  for l in layers if isinstance(l, dict)],
                                 caption="conv/linear layers of the quantized program; the ops between them "
                                         "follow the layers that feed them"))
    cfg = manifest.get("config")
    if isinstance(cfg, dict):
        report.add(Heading("Measurement protocol", 3), kv_table(cfg, "the same MeasureConfig on every device"))
    meas = run_dir / MEASUREMENTS_FILE
    if meas.exists():
        report.used.add(meas)
        report.add(Para(f"Raw samples of every cell: {meas.name} (one JSON line per device).", "note"))
