"""`amc-mobile noise -d DEVICE`: how noisy the device is right now, in a few seconds (issue 19)."""

from __future__ import annotations

import argparse

from amc_mobile.cli.common import dump_json


def register(sub) -> None:
    p = sub.add_parser("noise", help="measure the device's latency noise now (a few seconds)",
                       description="Time the drift reference unit and a second unit in interleaved rounds for "
                                   "--seconds and print the reference's spread, the drift between five slices "
                                   "of the run, and whether the device can hold --tolerance.")
    p.add_argument("--device", "-d", default="local", help="device URI (default: local)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds (default %(default)s)")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="the relative error results must hold, e.g. 0.10 for ±10 %% (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from amc_mobile.errors import AmcError
    from latency_tables.reference import measure_noise

    if not 0.1 <= args.seconds <= 600:
        raise AmcError(f"--seconds must be between 0.1 and 600, got {args.seconds:g}")
    if not 0 < args.tolerance < 1:
        raise AmcError(f"--tolerance must be a fraction between 0 and 1 (e.g. 0.10), got {args.tolerance:g}")
    report = measure_noise(args.device, seconds=args.seconds, tolerance=args.tolerance)
    print(dump_json(report.to_dict()) if args.json else report.summary())
    return 0
