"""`amc-mobile quantize`: post-training int8 quantization per layer -> a `.pte` and its accuracy."""

from __future__ import annotations

import argparse

from amc_mobile.cli.model_options import MODEL_HELP, add_model_options, model_options

QUANTIZE_HELP = ("int8 (every layer), fp32, or a policy JSON file {\"default\": \"int8\", \"layers\": "
                 "{\"LAYER\": \"fp32\", ...}} (layer names as `amc-mobile inspect` prints them)")


def add_calibration_options(p: argparse.ArgumentParser, calib_images: int) -> None:
    g = p.add_argument_group("int8 calibration")
    g.add_argument("--calib-images", type=int, default=calib_images,
                   help="calibrate activation ranges on the first N training images (default %(default)s)")
    g.add_argument("--data", default=None, help="fashion-mnist (default), imagefolder:DIR or FILE.py:FUNCTION")
    g.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: $AMC_DATA_DIR or the system one)")


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", help="int8 post-training quantization per layer: a .pte and its accuracy",
        description="Quantize MODEL with PT2E and ExecuTorch's XNNPACK quantizer (int8 per-channel weights, int8 "
        "activations, static ranges calibrated on training images), each conv/linear layer int8 or fp32 as "
        "--policy says, lower it to OUT/model.pte and score that program with ExecuTorch's runtime on "
        "validation images. OUT/quantization.json holds the precision of every layer (a layer the quantizer "
        "or XNNPACK cannot run in int8 stays fp32, with the reason), the sizes and both accuracies. "
        "Time the result with `amc-mobile bench -m OUT/model.pte -d DEVICE`.")
    p.add_argument("model", metavar="MODEL", help=f"{MODEL_HELP}; a registry name gets its trained weights")
    p.add_argument("--policy", default="int8", help=QUANTIZE_HELP + " (default %(default)s)")
    p.add_argument("--out", required=True, help="output folder (model.pte, quantization.json)")
    p.add_argument("--eval-images", type=int, default=1000,
                   help="score on the first N validation images; 0: skip (default %(default)s)")
    add_calibration_options(p, 256)
    add_model_options(p)
    p.set_defaults(func=run)


def load_trained(ref: str, options, allow_pickle: bool = False):
    """(module, example input, label): a registry name with its trained weights (accuracy needs them),
    anything else as loaded."""
    from amc_mobile.errors import AmcError
    from amc_mobile.model_io import load_model

    loaded = load_model(ref, allow_pickle=allow_pickle, options=options, trained=True)
    if loaded.module is None:
        raise AmcError(f"{ref} is a compiled .pte: quantize the model it came from")
    return loaded.module.eval(), loaded.example_input, loaded.label


def run(args: argparse.Namespace) -> int:
    from amc_mobile.data_sources import load_data
    from amc_mobile.errors import AmcError
    from amc_mobile.quantization import quantize_to_folder
    from device.quantize import QuantPolicy

    if args.eval_images < 0:
        raise AmcError(f"--eval-images must be >= 0, got {args.eval_images}")
    policy = QuantPolicy.parse(args.policy)
    module, example, label = load_trained(args.model, model_options(args))
    data = load_data(args.data, data_dir=args.data_dir)
    res = quantize_to_folder(module, example, data.train, data.val, policy, args.out,
                             calib_images=args.calib_images, eval_images=args.eval_images or 0, label=label)
    print(f"{'layer':36s} {'asked':>6s} {'got':>6s}  why not")
    for layer in res.quantized.layers:
        print(f"{layer.layer:36s} {layer.requested:>6s} {layer.actual:>6s}  {layer.reason or ''}")
    rep = res.report
    print(f"{len(res.quantized.int8_layers)}/{len(res.quantized.layers)} layers int8; "
          f"calibrated on {rep['calibration_images']} training images; "
          f"{res.pte}: {rep['pte_mb']:.3f} MB"
          + (f" (weights {rep['weights_mb']:.3f} MB; all fp32 {rep['fp32_weights_mb']:.3f} MB)" if "weights_mb" in rep
             else ""))
    acc = rep.get("accuracy")
    if acc:
        print(f"top-1 on {acc['images']} validation images: fp32 {acc['fp32_torch']:.4f}, "
              f"quantized .pte {acc['quantized_pte']:.4f}")
    return 0
