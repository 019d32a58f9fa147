"""`amc-mobile search`: the AMC search under a latency (or FLOPs/params) budget.

The flags are made from `SearchConfig` and `DDPGConfig` (field -> --flag, help from the field);
`--resume RUN_DIR` continues a run from its saved config (only --episodes and a few run-time
flags may change).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
import warnings
from dataclasses import MISSING, fields

from amc_mobile.search.config import DDPGConfig, SearchConfig

_SHORT = {"model": "-m", "device": "-d"}
_RUN_ONLY = {"resume": "continue the search in this run folder from its newest checkpoint"}


def _base_type(tp):
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"int": int, "float": float, "str": str, "bool": bool})
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _add_fields(group, cls, skip=()) -> None:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        names = [flag] + ([_SHORT[f.name]] if f.name in _SHORT else [])
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{f.metadata['help']} (default: {default})")
            continue
        kw = {"type": tp, "default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {default})"}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        group.add_argument(*names, **kw)


def register(sub) -> None:
    p = sub.add_parser(
        "search", help="AMC: search per-layer preserve ratios under a latency/FLOPs/params budget",
        description="AMC (He et al. 2018) with the budget on predicted device latency (table) or FLOPs/params. "
                    "Writes config.json, episodes.csv, best_policy.json, checkpoints/, pruned/ and summary.json "
                    "(with the pruned and original models measured on the device) into the run folder.")
    _add_fields(p, SearchConfig, skip=("agent", "resume"))
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help=_RUN_ONLY["resume"])
    p.add_argument("--json", action="store_true", help="print the run's summary.json instead of the lines above")
    _add_fields(p.add_argument_group("DDPG agent (AMC's defaults)"), DDPGConfig)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    given = {f.name: getattr(args, f.name) for f in fields(SearchConfig) if hasattr(args, f.name) and f.name != "agent"}
    if args.quiet and "progress" not in given:
        given["progress"] = False
    agent = {f.name: getattr(args, f.name) for f in fields(DDPGConfig) if hasattr(args, f.name)}
    if args.resume:
        from amc_mobile.errors import AmcError
        from amc_mobile.search.run_folder import RESUMABLE_OVERRIDES, resume_config

        changed = sorted(set(given) - set(RESUMABLE_OVERRIDES)) + sorted(agent)
        if changed:
            raise AmcError(f"--resume continues a run with its saved config: drop "
                           f"{', '.join('--' + c.replace('_', '-') for c in changed)} (only --episodes and run-time "
                           f"flags may change)")
        return resume_config(args.resume, **given)
    return SearchConfig(**given, agent=DDPGConfig(**agent))


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"amc-mobile: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from amc_mobile.search.config import SearchWarning
    from amc_mobile.search.loop import run_search

    cfg = config_from_args(args)
    with warnings.catch_warnings():
        warnings.simplefilter("always", SearchWarning)  # the CLI silences libraries, not the search's own notes
        warnings.showwarning = _show
        result = run_search(cfg)
    if args.json:
        from amc_mobile.cli.common import dump_json

        print(dump_json({"run_dir": str(result.run_dir), **result.summary}))
        return 0
    best, s = result.best, result.summary
    print(f"run folder: {result.run_dir}")
    print(f"best policy: episode {best['episode']}, {best['metric']} {best['accuracy']:.4f} on "
          f"{s['setup']['val_images']} val images (original {s['setup']['original_accuracy']:.4f}), predicted cost "
          f"{best['cost']:.4g} {best['cost_unit']} = {best['cost_ratio']:.1%} of {best['full_cost']:.4g}")
    if s.get("timing"):
        from amc_mobile.search.timing import describe

        print(describe(s["timing"]))
    q = s.get("quantized")
    if q:
        acc = q.get("accuracy") or {}
        print(f"quantized: {q['int8_layers']}/{q['layers']} layers int8, weights {q['size_mb']:.4f} MB"
              + (f" (budget {q['size_budget_mb']:.4f} MB)" if q.get("size_budget_mb") else "")
              + f", .pte {q['pte_mb']:.4f} MB; top-1 of the .pte {acc.get('quantized_pte', float('nan')):.4f} on "
              f"{acc.get('images', 0)} val images; {q['dir']}")
    m = s.get("measured")
    if m and "speedup" in m:
        print(f"measured on {cfg.device}: original {m['original']['median_ms']:.3f} ms, "
              f"{'pruned+quantized' if q else 'pruned'} {m['pruned']['median_ms']:.3f} ms ({m['measured_ratio']:.1%}"
              + (" in the same rounds" if m['pruned'].get('ratio') is not None else "")
              + f", {m['speedup']:.2f}x faster)")
    elif m:
        print(f"measurement on {cfg.device} failed: {json.dumps(m.get('error') or m)[:300]}")
    mb = s.get("measured_budget")
    if mb and "error" not in mb:
        from device.noise import noise_sentence

        picked = next((c for c in mb["candidates"] if c["label"] == mb["picked"]), None)
        if picked is not None:
            print(f"measured budget: {picked['ratio']:.3f}x the original measured in the same rounds (CI "
                  f"±{100 * picked['ci']:.1f} %) for a {mb['target_ratio']:.3f}x target: measured/target "
                  f"{mb['measured_over_target']:.3f}" + (f" after {mb['walked_back']} walk-back(s)"
                                                         if mb["walked_back"] else "")
                  + f" ({len(mb['candidates'])} policies measured)")
        else:
            print(f"measured budget: none of {len(mb['candidates'])} policies met the {mb['target_ratio']:.3f}x "
                  f"target as measured (walked back {mb['walked_back']} times); the best predicted one is kept")
        print(noise_sentence(mb["noise"], 0.10))
    elif mb:
        print(f"measured budget: not checked ({mb['error'][:300]})")
    return 0
