"""Options and printing shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import math

from device import LatencyStats, MeasureConfig

MAX_MIN_TIME_MS = 1e9  # et_bench refuses more


def add_measure_options(p: argparse.ArgumentParser, iterations: int = 50, warmup: int = 10) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--iterations", type=int, default=iterations, help="timed runs per candidate (default %(default)s)")
    g.add_argument("--warmup", type=int, default=warmup, help="untimed runs first (default %(default)s)")
    g.add_argument("--min-time-ms", type=float, default=0.0, help="keep timing until this much time was timed")
    g.add_argument("--repeats", type=int, default=1, help="runner invocations per batch; samples pooled")
    g.add_argument("--threads", type=int, default=None, help="runtime threads (default: device's choice)")
    g.add_argument("--affinity", default=None, help="hex CPU mask to pin to, e.g. f0 (default: device's choice)")
    g.add_argument("--interleave", action="store_true",
                   help="time in interleaved rounds (each round runs every candidate once, shuffled), the first "
                        "candidate as the drift reference in every round; prints each one's ratio to it and the "
                        "device noise")
    g.add_argument("--ci-target", type=float, default=0.0,
                   help="with --interleave: keep timing until each ratio's 95%% CI is within +-this fraction "
                        "(e.g. 0.02), or --max-time-ms was timed (default: off)")
    g.add_argument("--max-time-ms", type=float, default=20000.0,
                   help="time cap of --ci-target per batch (default %(default)s)")


def measure_config(args: argparse.Namespace) -> MeasureConfig:
    from amc_mobile.errors import AmcError

    if args.iterations < 1 or args.warmup < 0 or args.repeats < 1:
        raise AmcError("--iterations and --repeats must be >= 1 and --warmup >= 0")
    # NaN/inf are refused by the parser (cli.finite_float); the bound is the runner's own.
    if not 0 <= args.min_time_ms <= MAX_MIN_TIME_MS:
        raise AmcError(f"--min-time-ms must be between 0 and {MAX_MIN_TIME_MS:.0f}, got {args.min_time_ms:g}")
    check_threads_affinity(args)
    ci_target = getattr(args, "ci_target", 0.0)
    max_time_ms = getattr(args, "max_time_ms", 20000.0)
    if not 0 <= ci_target < 1:
        raise AmcError(f"--ci-target must be a fraction between 0 and 1 (e.g. 0.02), got {ci_target:g}")
    if not 0 < max_time_ms <= MAX_MIN_TIME_MS:
        raise AmcError(f"--max-time-ms must be between 0 and {MAX_MIN_TIME_MS:.0f}, got {max_time_ms:g}")
    return MeasureConfig(warmup=args.warmup, iterations=args.iterations, min_time_ms=args.min_time_ms,
                         threads=args.threads, affinity=args.affinity, repeats=args.repeats,
                         interleave=bool(getattr(args, "interleave", False)) or ci_target > 0,
                         ci_target=ci_target, max_time_ms=max_time_ms)


def check_threads_affinity(args: argparse.Namespace) -> None:
    """--threads >= 1 and --affinity a non-zero hex mask, where the command has them and they are set."""
    from amc_mobile.errors import AmcError

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise AmcError("--threads must be >= 1")
    affinity = getattr(args, "affinity", None)
    if affinity is not None:
        try:
            if int(affinity, 16) <= 0:
                raise ValueError
        except ValueError:
            raise AmcError(f"--affinity {affinity!r} is not a non-zero hex CPU mask (e.g. f0)") from None


def ratio_lines(rows: list[tuple[str, LatencyStats]]) -> list[str]:
    """Per row measured with a drift reference: its ratio to it, and the CI the runner reached."""
    out = []
    for label, s in rows:
        if s.ok and s.has_reference:
            ci = "" if s.ci_rel is None else f", CI ±{100 * s.ci_rel:.1f} %" + ("" if s.converged else " (not converged)")
            out.append(f"{label}: {s.ratio:.4f}x the reference ({s.ref_median_ms:.4f} ms in the same rounds{ci})")
    return out


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def stats_table(rows: list[tuple[str, LatencyStats]]) -> str:
    head = f"{'model':28s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} {'mean':>8s} {'std':>7s} {'n':>5s} {'load ms':>8s}"
    out = [head, "-" * len(head)]
    for label, s in rows:
        if not s.ok:
            out.append(f"{label:28s} error: {s.error}")
            continue
        out.append(f"{label:28s} {_fmt(s.median_ms):>10s} {_fmt(s.p10_ms):>8s} {_fmt(s.p90_ms):>8s} "
                   f"{_fmt(s.mean_ms):>8s} {_fmt(s.std_ms):>7s} {s.n:>5d} {_fmt(s.load_ms):>8s}")
    return "\n".join(out)


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def check_at_least(args: argparse.Namespace, **minimums: float) -> None:
    """Each named option is >= its minimum (an option left at None, "no limit", is not checked).

    NaN and infinity never get here: the parser refuses them for every float option."""
    from amc_mobile.errors import AmcError

    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and not value >= low:
            raise AmcError(f"--{name.replace('_', '-')} must be >= {low:g}, got {value:g}")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Each named option (when set) is > 0."""
    from amc_mobile.errors import AmcError

    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise AmcError(f"--{name.replace('_', '-')} must be positive, got {value:g}")
