"""`amc-mobile table build | calibrate | show | validate | plot`: per-device latency lookup tables."""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from amc_mobile.cli.common import (add_measure_options, check_at_least, check_positive, check_threads_affinity,
                                   dump_json, measure_config)
from amc_mobile.cli.model_options import MODEL_HELP, add_model_options, model_options
from amc_mobile.errors import AmcError


def _common(p: argparse.ArgumentParser, device: bool = True) -> None:
    from amc_mobile.models import DEFAULT_MODEL

    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: %(default)s)")
    add_model_options(p)
    if device:
        p.add_argument("--device", "-d", default="local", help="device URI (default: local)")
    p.add_argument("--scope", choices=("all", "decoupled"), default=None,
                   help="channel groups the search prunes (default: the model family's: decoupled for "
                        "mobilenet_v2, all otherwise)")
    p.add_argument("--tables-dir", default=None,
                   help="root of the table folders (default: $AMC_TABLES_DIR, else latency_tables/)")
    p.add_argument("--table-dir", default=None,
                   help="one table folder to use directly (e.g. copied from another machine)")


def _mismatch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="use a table measured on a differently configured device anyway")


def _lookup_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device configuration the table was measured with")
    g.add_argument("--threads", type=int, default=None, help="runtime threads (default: device's choice)")
    g.add_argument("--affinity", default=None, help="hex CPU mask (default: device's choice)")


def register(sub) -> None:
    from latency_tables.batching import DEFAULT_BATCH, DEFAULT_WORKERS
    from latency_tables.build import MODEL_CONFIG, UNIT_CONFIG
    from latency_tables.sampling import DEFAULT_TOLERANCE
    from latency_tables.space import DEFAULT_COARSE_STEP, DEFAULT_GRID

    table = sub.add_parser("table", help="per-device latency lookup tables: build, calibrate, show, validate, plot",
                           description="Per-device latency lookup tables keyed by fused unit.")
    tsub = table.add_subparsers(dest="table_command", metavar="ACTION")

    b = tsub.add_parser("build", help="measure the unit configurations a search can reach (resumes)",
                        description="Measure every unit configuration the search can produce for MODEL on "
                                    "DEVICE (adaptively sampled; interpolation fills the rest), plus whole "
                                    "models for calibration. Rows are saved as measured; rerun to resume. "
                                    "Several -d share the work when their fingerprints agree (one table), "
                                    "and get one table per fingerprint when they do not.")
    _common(b, device=False)
    b.add_argument("--device", "-d", action="append", default=None,
                   help="device URI (repeatable: phones of one model share the build; default: local)")
    b.add_argument("--grid", type=int, default=DEFAULT_GRID, help="channel rounding grid (default %(default)s)")
    b.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="refine where interpolation misses a measured midpoint by more than this (default "
                        "%(default)s = 5%%)")
    b.add_argument("--coarse-step", type=int, default=DEFAULT_COARSE_STEP,
                   help="first pass: every N-th grid point plus both ends (default %(default)s)")
    b.add_argument("--no-refine", action="store_true", help="measure the coarse pass only")
    b.add_argument("--max-configs", type=int, default=None, help="measure at most this many unit configurations")
    b.add_argument("--budget-minutes", type=float, default=None, help="stop starting new batches after this long")
    b.add_argument("--no-calibrate", action="store_true", help="skip the whole-model calibration measurements")
    b.add_argument("--calibration-variants", type=int, default=5,
                   help="whole models for calibration: the full one + uniformly pruned (default %(default)s)")
    b.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="processes lowering batches in parallel (default %(default)s)")
    b.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="methods per .pte (default %(default)s)")
    b.add_argument("--retry-failed", action="store_true", help="measure again the units that failed before")
    b.add_argument("--dtype", choices=("fp32", "int8"), default="fp32",
                   help="precision of the units: int8 units are quantized as `amc-mobile quantize` does (XNNPACK "
                        "quantizer), measured taking and returning int8 and keyed by dtype next to fp32 ones; int8 "
                        "also measures the quantize/dequantize on every fp32<->int8 edge a policy can create, so "
                        "that fp32 + int8 rows predict any mixed-precision variant (default %(default)s; int8 "
                        "builds units only: `table validate --dtype mixed` times whole int8 models)")
    b.add_argument("--dry-run", action="store_true", help="print what would be measured and stop")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_measure_options(b, iterations=UNIT_CONFIG.iterations, warmup=UNIT_CONFIG.warmup)
    b.set_defaults(func=run_build, min_time_ms=UNIT_CONFIG.min_time_ms, repeats=UNIT_CONFIG.repeats)

    c = tsub.add_parser("calibrate", help="re-time the calibration models now and refit the overhead term",
                        description="Time the table's whole-model calibration models on the device now (a few "
                                    "models, seconds), append every pass to the table and refit the overhead "
                                    "term on the latest passes: run it when the device's state changed since "
                                    "the build (a search does it by itself).")
    _common(c)
    _mismatch(c)
    _lookup_options(c)
    c.add_argument("--passes", type=int, default=5, help="interleaved passes (default %(default)s)")
    c.set_defaults(func=run_calibrate)

    s = tsub.add_parser("show", help="fingerprint, counts per unit kind, coverage per layer of a model")
    _common(s)
    _mismatch(s)
    _lookup_options(s)
    s.add_argument("--no-model", action="store_true", help="only the table, no per-layer coverage")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=run_show)

    v = tsub.add_parser("validate", help="predict and measure random pruned variants end to end",
                        description="Build N random pruned variants (seeded), predict each from the table, "
                                    "measure each end to end on the device, and report the accuracy.")
    _common(v)
    _mismatch(v)
    v.add_argument("--samples", "-n", type=int, default=50, help="random variants (default %(default)s)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--grid", type=int, default=None, help="channel grid of the variants (default: the table's)")
    v.add_argument("--out", default=None, help="output folder (default runs/table-validate-<timestamp>/)")
    v.add_argument("--passes", type=int, default=5,
                   help="time every program this many times, interleaved; a sample's latency is the median of "
                        "its passes (default %(default)s)")
    v.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    v.add_argument("--batch-size", type=int, default=4, help="models per .pte (default %(default)s)")
    v.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    v.add_argument("--dtype", choices=("fp32", "mixed"), default="fp32",
                   help="mixed: each variant also gets a random precision per conv/linear layer (int8 with "
                        "probability 1/2), predicted from the fp32 and int8 rows (`table build --dtype int8`) plus "
                        "a q/dq per fp32<->int8 edge, calibrated on the calibration models at fp32 and all-int8 "
                        "timed in the same passes (default %(default)s)")
    v.add_argument("--full-width", action="store_true", help="with --dtype mixed: precision only, no pruning")
    add_measure_options(v, iterations=MODEL_CONFIG.iterations, warmup=MODEL_CONFIG.warmup)
    v.set_defaults(func=run_validate, min_time_ms=MODEL_CONFIG.min_time_ms, repeats=MODEL_CONFIG.repeats)

    pl = tsub.add_parser("plot", help="latency over channel counts per layer (measured points marked)")
    _common(pl)
    _mismatch(pl)
    _lookup_options(pl)
    pl.add_argument("--layers", default=None, help="regex: only layers whose name matches")
    pl.add_argument("--out", default=None, help="PNG path (default: <table folder>/<model>-<scope>.png)")
    pl.set_defaults(func=run_plot)

    table.set_defaults(func=lambda args: (table.print_help(), 2)[1])


def _lookup_config(args):
    from device import MeasureConfig

    check_threads_affinity(args)  # the lookup options are checked as the measure options are
    return MeasureConfig(threads=getattr(args, "threads", None), affinity=getattr(args, "affinity", None))


def run_build(args: argparse.Namespace) -> int:
    from amc_mobile.tables import build_tables
    from amc_mobile.tables import resolve_target

    config = measure_config(args)
    check_at_least(args, grid=1, coarse_step=1, max_configs=1, calibration_variants=1, workers=1, batch_size=1)
    check_positive(args, "tolerance", "budget_minutes")
    target = resolve_target(args.model, scope=args.scope, options=model_options(args))
    if args.dtype != "fp32":
        from amc_mobile.precision import PrecisionMap
        from latency_tables.mixed import int8_build_network

        # int8 units (taking and returning int8) and the quantize/dequantize of every edge a policy can make
        target.graph = int8_build_network(target.graph, PrecisionMap(target.module, target.graph).edge_units)
        args.no_calibrate = True  # whole int8 models are timed by `table validate --dtype mixed` and searches
    devices = list(dict.fromkeys(args.device or ["local"]))
    if args.dry_run:
        args.device = devices[0]
        return _dry_run(args, target, config)
    reports = build_tables(target, devices, grid=args.grid, tolerance=args.tolerance, coarse_step=args.coarse_step,
                         refine=not args.no_refine, config=config, tables_dir=args.tables_dir,
                         table_dir=args.table_dir, max_configs=args.max_configs, budget_minutes=args.budget_minutes,
                         calibrate=not args.no_calibrate, calibration_count=args.calibration_variants,
                         batch_size=args.batch_size, workers=args.workers, progress=not args.quiet,
                         retry_failed=args.retry_failed)
    print("\n\n".join(r.summary() for r in reports))
    return 0 if not any(r.failed for r in reports) else 1


def _dry_run(args, target, config) -> int:
    from device import open_device
    from latency_tables.sampling import AdaptiveSampler
    from latency_tables.space import all_specs, unit_plans
    from latency_tables.store import TableStore, table_folder

    plans = unit_plans(target.graph, target.scope, args.grid)
    coarse = AdaptiveSampler(plans, args.coarse_step, args.tolerance).next_round({})
    with open_device(args.device) as dev:
        folder = Path(args.table_dir) if args.table_dir else table_folder(dev.fingerprint(config), args.tables_dir)
    store = TableStore(folder)
    have = store.units() if store.exists() else {}
    missing = [s for s in coarse if s.key() not in have]
    print(f"table {folder}")
    print(f"{target.label} (scope {target.scope}, grid {args.grid}): {len(plans)} units, "
          f"{len(all_specs(plans))} reachable configurations; coarse pass {len(coarse)} "
          f"({len(missing)} not yet measured); refinement adds more where interpolation misses by "
          f">{args.tolerance:.0%}")
    return 0


def _target_and_model(args, need_model: bool = True, check_table_dir: bool = True):
    """(target, table store, compiled LatencyModel); `show` inspects a --table-dir without checking
    its fingerprint against the device."""
    from latency_tables.loading import compile_for, open_table
    from amc_mobile.tables import resolve_target

    target = resolve_target(args.model, scope=args.scope, options=model_options(args)) if need_model else None
    hint = target.build_command(args.device) if target else ""
    device = args.device if (check_table_dir or not args.table_dir) else None
    store = open_table(device, args.table_dir, args.tables_dir, args.allow_fingerprint_mismatch,
                       _lookup_config(args), hint)
    lat = compile_for(target, store, args.device) if target else None
    return target, store, lat


def run_show(args: argparse.Namespace) -> int:
    _, store, _ = _target_and_model(args, need_model=False, check_table_dir=False)
    meta = store.meta()
    units = store.units()
    kinds = collections.Counter(r.spec.kind for r in units.values())
    failures = store.failures()
    calib = store.calibration()
    info = {"folder": str(store.folder), "fingerprint": meta["fingerprint"], "created": meta.get("created"),
            "updated": meta.get("updated"), "versions": meta.get("versions"), "grid": meta.get("grid"),
            "measure_config": meta.get("measure_config"), "units": len(units), "per_kind": dict(kinds),
            "duplicates": store.duplicates, "failures": len(failures), "calibration_models": len(calib),
            "builds": len(meta.get("builds", []))}
    ref_status = store.reference_status()
    info["drift_reference"] = {"status": ref_status.label, "referenced": ref_status.referenced,
                               "noisy": ref_status.noisy, "noise": ref_status.noise}
    coverage = None
    if not args.no_model:
        from latency_tables.loading import compile_for
        from amc_mobile.tables import resolve_target

        target = resolve_target(args.model, scope=args.scope, options=model_options(args))
        try:
            lat = compile_for(target, store, args.device)
            coverage = {"model": target.label, "scope": target.scope, "calibration": lat.calibration,
                        "full_latency_ms": lat.full_latency_ms, "layers": lat.coverage()}
        except AmcError as exc:
            coverage = {"model": target.label, "scope": target.scope, "error": str(exc)}
    if args.json:
        print(dump_json({**info, "coverage": coverage}))
        return 0
    fp = meta["fingerprint"]
    print(f"table {store.folder}")
    print(f"fingerprint: {fp['kind']} | {fp['hardware']} | {fp['runtime']} | {fp['backend']} | threads "
          f"{fp['threads']} | affinity {fp['affinity']}")
    print(f"created {meta.get('created')}, updated {meta.get('updated')}, {info['builds']} build(s), grid "
          f"{meta.get('grid')}")
    print(f"{len(units)} measured units: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
          + (f"; {store.duplicates} duplicate rows ignored" if store.duplicates else "")
          + (f"; {len(failures)} failed" if failures else ""))
    print(ref_status.line())
    models = collections.Counter(r.model for r in calib)
    variants = len({(r.model_hash, tuple(sorted(r.channels.items()))) for r in calib})
    print(f"calibration: {len(calib)} whole-model timings of {variants} models ("
          + ", ".join(f"{m} {n}" for m, n in models.items()) + ")")
    if coverage:
        print()
        if "error" in coverage:
            print(f"{coverage['model']} (scope {coverage['scope']}): {coverage['error']}")
            return 1
        c = coverage["calibration"]
        print(f"{coverage['model']} (scope {coverage['scope']}): full model {coverage['full_latency_ms']:.3f} ms "
              f"predicted; overhead {c['method']} (scale {c['scale']:.3f}, offset {c['offset']:+.4f} ms, "
              f"{c['points']} calibration models)")
        print(f"{'layer':32s} {'axes':44s} {'measured':>9s} {'configs':>8s}")
        for row in coverage["layers"]:
            print(f"{row['unit']:32s} {row['axes'][:44]:44s} {row['measured']:9d} {row['configs']:8d}")
        tot_m = sum(r["measured"] for r in coverage["layers"])
        tot_c = sum(r["configs"] for r in coverage["layers"])
        print(f"{'total':32s} {'':44s} {tot_m:9d} {tot_c:8d}  ({tot_m / max(tot_c, 1):.0%} measured, rest "
              f"interpolated)")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from latency_tables.loading import compile_for
    from latency_tables.session import SESSION_CONFIG, recalibrate

    check_at_least(args, passes=1)
    target, store, lat = _target_and_model(args)
    before = dict(lat.calibration)
    full_before = lat.full_latency_ms
    config = SESSION_CONFIG if args.threads is None and args.affinity is None else \
        _with(SESSION_CONFIG, threads=args.threads, affinity=args.affinity)
    same = not store.fingerprint.differences(_fingerprint(args.device, config))
    # the stored fit is refitted from calibration.csv's raw rows: no drift reference needed here
    rec = recalibrate(lat, target, args.device, passes=args.passes, config=config, store=store if same else None,
                      anchored=False)
    stored = compile_for(target, store, args.device)
    print(f"table {store.folder}" + ("" if same else " (fingerprint differs: timings not stored)"))
    print(f"{target.label}: {rec.passes} passes of {rec.fit.points} calibration models in {rec.seconds:.0f} s"
          + (f"; {len(rec.failures)} failed: {rec.failures[0]}" if rec.failures else ""))
    if rec.original_ms is not None:
        print(f"unpruned model measured {rec.original_ms:.4f} ms; predicted {full_before:.4f} ms before, "
              f"{stored.full_latency_ms:.4f} ms now")
    print(f"overhead before: scale {before.get('scale', 1):.3f}, offset {before.get('offset', 0):+.4f} ms "
          f"({before.get('points', 0)} models)")
    c = stored.calibration
    print(f"overhead now:    scale {c['scale']:.3f}, offset {c['offset']:+.4f} ms ({c['points']} models, fit "
          f"RMSPE {c['rmspe']:.1f}%, on each model's latest passes)")
    return 0


def _with(config, **kw):
    from dataclasses import replace

    return replace(config, **{k: v for k, v in kw.items() if v is not None})


def _fingerprint(device: str, config):
    from latency_tables.loading import _fingerprint as fp

    return fp(device, config)


def run_validate(args: argparse.Namespace) -> int:
    from amc_mobile.tables import resolve_target
    from amc_mobile.table_validation import validate_table

    config = measure_config(args)
    check_at_least(args, samples=1, grid=1, passes=1, workers=1, batch_size=1)
    options = model_options(args)
    model = args.model if options.empty else resolve_target(args.model, scope=args.scope, options=options).module
    if args.full_width and args.dtype != "mixed":
        raise AmcError("--full-width goes with --dtype mixed (an fp32 validation's variants are its pruned ones)")
    if args.dtype == "mixed":
        from amc_mobile.mixed_tables import validate_mixed

        res = validate_mixed(model, args.device, samples=args.samples, seed=args.seed, prune=not args.full_width,
                             scope=args.scope, grid=args.grid, out_dir=args.out, table_dir=args.table_dir,
                             tables_dir=args.tables_dir, allow_mismatch=args.allow_fingerprint_mismatch, config=config,
                             passes=args.passes, batch_size=args.batch_size, workers=args.workers,
                             progress=not args.quiet)
        print(res.summary())
        return 0
    res = validate_table(model, args.device, samples=args.samples, seed=args.seed, scope=args.scope,
                         grid=args.grid, out_dir=args.out, tables_dir=args.tables_dir, table_dir=args.table_dir,
                         allow_mismatch=args.allow_fingerprint_mismatch, config=config,
                         batch_size=args.batch_size, workers=args.workers, progress=not args.quiet,
                         passes=args.passes)
    print(res.summary())
    return 0


def run_plot(args: argparse.Namespace) -> int:
    import re

    from latency_tables.plots import surface_plot

    if args.layers is not None:
        try:
            re.compile(args.layers)
        except re.error as exc:
            raise AmcError(f"--layers {args.layers!r} is not a regular expression ({exc})") from None
    target, store, lat = _target_and_model(args)
    name = Path(str(target.label)).name
    out = Path(args.out) if args.out else store.folder / f"{name}-{target.scope}.png"
    try:
        surface_plot(lat, out, args.layers, title=f"{target.label} ({target.scope}) on {args.device}: "
                                                   f"{store.folder.name}")
    except ValueError as exc:
        raise AmcError(str(exc)) from None
    print(out)
    return 0
