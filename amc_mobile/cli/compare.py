"""`amc-mobile compare ORIGINAL COMPRESSED... --devices local adb:SERIAL cuda:0`: the AMC headline table
(speedup of compressed models over the original, per device) for your own models and devices."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from amc_mobile.cli.common import add_measure_options, dump_json, measure_config


from amc_mobile.cli.model_options import add_model_options, model_options


def register(sub) -> None:
    p = sub.add_parser(
        "compare", help="measure an original and compressed models on several devices; speedup table + report",
        description="Measure every model on every device with the same protocol and print latency (median, p90), "
                    "speedup over the original per device, size, params, MACs and (with --accuracy) top-1. "
                    "Writes compare.csv, speedup.png, latency.png, run.json and report.html into the run folder. "
                    "A MODEL is a registry name (e.g. mobilenet_v2), a pruned-model folder, a checkpoint folder, "
                    "a .pte (ExecuTorch devices only) or, with --allow-pickle, a pickled module. "
                    "Exit code 1 when some cell could not be measured (its reason is in the table).")
    p.add_argument("original", metavar="ORIGINAL", help="the uncompressed model: speedups are relative to it")
    p.add_argument("compressed", metavar="COMPRESSED", nargs="*", help="compressed models to compare with it")
    p.add_argument("--devices", "-d", nargs="+", default=["local"], metavar="URI",
                   help="device URIs: local, cuda:N, adb:SERIAL, adb-tcp:HOST:PORT (default: local)")
    p.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                   help="names for the models in the table, one per model (default: file or registry names)")
    p.add_argument("--accuracy", action="store_true", help="also top-1 on the Fashion-MNIST test split")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: $AMC_DATA_DIR or the system one)")
    p.add_argument("--accuracy-images", type=int, default=None, metavar="N",
                   help="score on the first N test images only (default: all 10,000)")
    p.add_argument("--out", "-o", default=None, help="run folder (default: runs/compare-<UTC time>)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading a fully pickled module (.pt)")
    p.add_argument("--no-report", action="store_true", help="skip report.html / report.md")
    p.add_argument("--json", action="store_true", help="print the result (cells, device fingerprints, files) as JSON")
    add_model_options(p)  # for ORIGINAL: a user factory's kwargs, its weights, its input shape
    add_measure_options(p, iterations=50, warmup=10)
    p.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> list[str]:
    """The command as typed when run from a shell; rebuilt from the parsed options otherwise (tests)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("amc-mobile", "__main__.py") and "compare" in argv[1:]:
        return argv
    out = ["amc-mobile", "compare", args.original, *args.compressed, "--devices", *args.devices]
    if args.labels:
        out += ["--labels", *args.labels]
    if args.accuracy:
        out.append("--accuracy")
    for flag, val in (("--data-dir", args.data_dir), ("--accuracy-images", args.accuracy_images),
                      ("--out", args.out), ("--iterations", args.iterations), ("--warmup", args.warmup),
                      ("--min-time-ms", args.min_time_ms or None), ("--repeats", args.repeats),
                      ("--threads", args.threads), ("--affinity", args.affinity)):
        if val is not None:
            out += [flag, str(val)]
    for flag, on in (("--allow-pickle", args.allow_pickle), ("--no-report", args.no_report)):
        if on:
            out.append(flag)
    return out


def run(args: argparse.Namespace) -> int:
    from amc_mobile.compare import format_table, run_compare, summary_lines
    from amc_mobile.errors import AmcError

    config = measure_config(args)
    if args.accuracy_images is not None and args.accuracy_images < 1:
        raise AmcError("--accuracy-images must be >= 1")
    if args.data_dir is not None and not args.accuracy:
        print("amc-mobile: note: --data-dir is only used with --accuracy", file=sys.stderr)
    result = run_compare(
        [args.original, *args.compressed], args.devices, config,
        out=args.out, allow_pickle=args.allow_pickle, labels=args.labels, accuracy=args.accuracy,
        data_dir=args.data_dir, accuracy_images=args.accuracy_images, argv=command_line(args),
        report=not args.no_report, original_options=model_options(args),
    )
    rows = result.rows()
    if args.json:
        print(dump_json({
            "run_dir": str(result.run_dir), "config": config.to_dict(), "rows": rows,
            "devices": [{"uri": d.uri, "fingerprint": d.fingerprint.to_dict() if d.fingerprint else None,
                         "error": d.error} for d in result.devices],
            "files": {k: str(v) for k, v in result.files.items()}}))
        return result.exit_code
    print(f"compare: warmup {config.warmup}, iterations {config.iterations}, repeats {config.repeats}, "
          f"threads {config.threads if config.threads is not None else 'device default'}")
    print(format_table(rows))
    print()
    for d in result.devices:
        if d.fingerprint is not None:
            fp = d.fingerprint
            print(f"{d.uri}: {fp.hardware} | {fp.runtime} | {fp.backend} | threads {fp.threads} | {fp.digest()}")
        else:
            print(f"{d.uri}: {d.error or 'no fingerprint'}")
        if config.interleaved and d.cells and d.cells[0].ok:
            from device.noise import noise_figure, noise_sentence, pass_drift, robust_cv

            # the original ran in every round: its spread (and drift) is the device's noise here
            ref = d.cells[0].stats.samples_ms
            print(f"{d.uri}: {noise_sentence(noise_figure(robust_cv(ref), pass_drift(ref)))}")
            for c in d.cells[1:]:
                if c.ok and c.stats.has_reference:
                    print(f"{d.uri}: {c.model}: {c.stats.ratio:.4f}x the original in the same rounds")
    for line in summary_lines(result):
        print(line)
    for m in result.models:
        for note in m.notes:
            print(f"note: {m.label}: {note}")
        if m.accuracy_note:
            print(f"note: {m.label}: top-1 {m.accuracy_note}")
    print()
    for key, path in result.files.items():
        print(f"{key:9s} {path}")
    if result.exit_code:
        bad = sum(1 for r in rows if r["status"] != "ok")
        print(f"amc-mobile: {bad} of {len(rows)} cells not measured (reasons above)", file=sys.stderr)
    return result.exit_code
