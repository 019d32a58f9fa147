"""`amc-mobile demo`: the whole flow on one device (what `make demo` runs)."""

from __future__ import annotations

import argparse
from dataclasses import fields


def register(sub) -> None:
    from amc_mobile.demo import DemoConfig

    p = sub.add_parser("demo", help="the whole flow: model, table, search at 0.5x latency, fine-tune, measure",
                       description="Train or load the default model, build or load the device's latency table, "
                                   "search at a fraction of the measured latency, fine-tune briefly, then measure "
                                   "original and pruned models on the device and write a report.")
    defaults = DemoConfig()
    for f in fields(DemoConfig):
        default = getattr(defaults, f.name)
        kind = type(default) if default is not None else str
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default,
                       help=f"(default: {default})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from amc_mobile.demo import DemoConfig, run_demo

    cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
    run_demo(cfg)
    return 0
