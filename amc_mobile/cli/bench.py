"""`amc-mobile bench`: measure whole models on a device and print latency statistics."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from amc_mobile.cli.common import add_measure_options, dump_json, measure_config, ratio_lines, stats_table
from amc_mobile.cli.model_options import add_model_options, model_options
from amc_mobile.cli.quantize import QUANTIZE_HELP, add_calibration_options
from amc_mobile.errors import AmcError
from device import Candidate, LatencyStats


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure the latency of whole models on a device",
                       description="Measure whole models on a device. MODEL is a registry name "
                                   "(e.g. mobilenet_v2), a pruned-model or checkpoint folder, or a .pte file.")
    p.add_argument("--model", "-m", action="append", default=None,
                   help="model to measure (repeatable; default: the default model)")
    p.add_argument("--device", "-d", default="local", help="device URI (default: local)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading a fully pickled module (.pt)")
    p.add_argument("--json", action="store_true", help="print JSON (with raw samples) instead of a table")
    p.add_argument("--quantize", action="append", default=None, metavar="POLICY",
                   help="measure each model quantized: " + QUANTIZE_HELP + "; repeatable, e.g. "
                        "`--quantize fp32 --quantize int8` times both side by side in one program")
    add_calibration_options(p, 128)
    add_model_options(p)
    add_measure_options(p, iterations=100, warmup=20)
    p.set_defaults(func=run)


def method_label(name: str) -> str:
    """A method name as a row label: quoted when it is empty or not a plain identifier (e.g. "a,b")."""
    return name if name.isidentifier() else json.dumps(name)


def _candidates(modules, args) -> list[tuple[int, str, Candidate]]:
    """(model index, row label, candidate) for each model, once per --quantize policy (as loaded without)."""
    if not args.quantize:
        return [(i, m.label, Candidate(f"m{i}", m.module, m.example_input)) for i, m in modules]
    from amc_mobile.data_sources import load_data
    from amc_mobile.quantization import calibration_images
    from device.quantize import QuantPolicy, quantize_model

    policies = [QuantPolicy.parse(q) for q in args.quantize]
    calib = None
    if not all(p.all_fp32 for p in policies):
        calib = calibration_images(load_data(args.data, data_dir=args.data_dir).train, args.calib_images)
    rows = []
    for i, m in modules:
        for k, policy in enumerate(policies):
            qm = quantize_model(m.module, m.example_input, calib, policy) if not policy.all_fp32 else None
            for f in (qm.fallbacks if qm else []):
                print(f"amc-mobile: note: {m.label}: layer {f.layer} stays fp32: {f.reason}", file=sys.stderr)
            rows.append((i, f"{m.label} [{policy.label()}]",
                         Candidate(f"m{i}_q{k}", qm.module if qm else m.module, m.example_input)))
    return rows


def run(args: argparse.Namespace) -> int:
    from amc_mobile.model_io import load_model
    from amc_mobile.models import DEFAULT_MODEL
    from device import PteDevice, open_device

    config = measure_config(args)
    refs = args.model or [DEFAULT_MODEL]
    options = model_options(args)
    models = [load_model(r, allow_pickle=args.allow_pickle, options=options) for r in refs]
    with open_device(args.device) as dev:
        results: list[tuple[int, str, LatencyStats]] = []  # (model index, row label, stats)
        modules = [(i, m) for i, m in enumerate(models) if m.module is not None]
        if modules:
            rows = _candidates(modules, args)
            if config.interleaved:  # the first model is the drift reference of the others
                config = replace(config, reference=rows[0][2].name)
            for (i, label, cand), s in zip(rows, dev.measure([c for _, _, c in rows], config)):
                results.append((i, label, s))
        for i, m in enumerate(models):
            if m.pte_path is not None:
                if not isinstance(dev, PteDevice):
                    raise AmcError(f"device {args.device} runs PyTorch modules, not .pte files: "
                                   f"pass a model name or a pruned-model folder for {m.label}")
                stats = dev.measure_pte(m.pte_path, None, config)
                for s in stats:  # one row per method: a multi-method program's rows must be told apart
                    results.append((i, m.label if len(stats) == 1 else f"{m.label}:{method_label(s.name)}", s))
        fp = dev.fingerprint(config)
    labelled = [(label, s) for _, label, s in sorted(results, key=lambda r: r[0])]
    if args.json:
        print(dump_json({"device": args.device, "fingerprint": fp.to_dict(), "config": config.to_dict(),
                         "results": [{"model": lbl, **s.to_dict(with_samples=True)} for lbl, s in labelled]}))
    else:
        print(f"device {args.device}: {fp.hardware} | {fp.runtime} | {fp.backend} | threads {fp.threads}")
        print(stats_table(labelled))
        if config.interleaved:
            from device.noise import noise_figure, noise_sentence, pass_drift, robust_cv

            for line in ratio_lines(labelled):
                print(line)
            why = dev.reference_error
            if why:
                print(f"drift reference: {why}")
            ref = [s for _, label, s in results if s.ok and s.name == config.reference]
            print(noise_sentence(noise_figure(robust_cv(ref[0].samples_ms), pass_drift(ref[0].samples_ms))
                                 if ref else float("nan")))
    return 0 if all(s.ok for _, s in labelled) else 1
