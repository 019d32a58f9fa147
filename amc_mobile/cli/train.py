"""`amc-mobile train`: train a model on Fashion-MNIST and save a checkpoint folder."""

from __future__ import annotations

import argparse

from amc_mobile.cli.common import check_at_least
from amc_mobile.errors import AmcError
from amc_mobile.files import make_folder

_WIDTH_MODELS = ("mobilenet_v1", "mobilenet_v2", "vgg16")
_STEM_MODELS = ("mobilenet_v1", "mobilenet_v2")


def register(sub) -> None:
    from amc_mobile.models import DEFAULT_MODEL, MODEL_NAMES
    from amc_mobile.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a model on Fashion-MNIST and save a checkpoint",
        description="Train a model on Fashion-MNIST (55k train images; accuracy reported on the 5k held-out "
        "validation images and the official test set) and save a checkpoint folder (model.pt + config.json). "
        "Without --out it goes to the cache that the search uses ($AMC_CACHE_DIR or ~/.cache/amc_mobile).",
    )
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"architecture: one of {', '.join(MODEL_NAMES)}, or FILE.py:FACTORY / package.module:FACTORY "
                        f"(default %(default)s)")
    p.add_argument("--model-kwargs", default=None, metavar="JSON", help="keyword arguments of a FILE.py:FACTORY")
    p.add_argument("--data", default=None, help="fashion-mnist (default), imagefolder:DIR or FILE.py:FUNCTION")
    p.add_argument("--input-size", type=int, default=None, help="imagefolder: resize / center-crop to this size")
    p.add_argument("--mean", default=None, help="imagefolder: per-channel mean, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", default=None, help="imagefolder: per-channel std, e.g. 0.229,0.224,0.225")
    p.add_argument("--width-mult", type=float, default=None, help="channel width multiplier (MobileNets, VGG)")
    p.add_argument("--stem-stride", type=int, default=None, help="MobileNets' first stride (default: 1 on 28x28)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="default %(default)s")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate, cosine decay (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default %(default)s")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="default %(default)s")
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--eval-limit", type=int, default=None, help="score on the first N val/test images only")
    p.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    p.add_argument("--out", default=None, help="checkpoint folder to write (default: the cache)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: $AMC_DATA_DIR or the system one)")
    p.add_argument("--compute", "--device", dest="device", default=None, metavar="COMPUTE",
                   help="where it trains: cpu, cuda or cuda:N (default: cuda if there is one; --device is the old name)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from amc_mobile.data import load_fashion_mnist
    from amc_mobile.models import build_model, model_config
    from amc_mobile.train import TrainConfig, checkpoint_dir, resolve_device, train_and_save

    kwargs = {}
    if args.width_mult is not None:
        if args.model not in _WIDTH_MODELS:
            raise AmcError(f"--width-mult applies to {', '.join(_WIDTH_MODELS)}, not {args.model}")
        if args.width_mult <= 0:
            raise AmcError("--width-mult must be positive")
        kwargs["width_mult"] = args.width_mult
    if args.stem_stride is not None:
        if args.model not in _STEM_MODELS:
            raise AmcError(f"--stem-stride applies to {', '.join(_STEM_MODELS)}, not {args.model}")
        kwargs["stem_stride"] = args.stem_stride
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise AmcError("--epochs and --batch-size must be at least 1 and --lr positive")
    check_at_least(args, stem_stride=1, train_limit=1, eval_limit=1, weight_decay=0, label_smoothing=0)
    if not args.label_smoothing < 1:
        raise AmcError(f"--label-smoothing must be below 1, got {args.label_smoothing:g}")
    from amc_mobile.data_sources import load_data
    from amc_mobile.model_io import factory_reference, is_factory_ref, load_factory, parse_kwargs
    from amc_mobile.models import MODEL_NAMES

    user = is_factory_ref(args.model)
    if not user and args.model not in MODEL_NAMES:
        raise AmcError(f"--model {args.model!r}: expected one of {', '.join(MODEL_NAMES)} or FILE.py:FACTORY")
    if args.model_kwargs is not None:
        kwargs.update(parse_kwargs(args.model_kwargs))
    device = resolve_device(args.device)
    if user:
        probe = load_factory(args.model, kwargs)  # fails here, in one line, when the factory does
        model_cfg = factory_reference(args.model, kwargs)
        channels = int(probe.input_shape[0]) if getattr(probe, "input_shape", None) else None
    else:
        channels = None
    tcfg = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        augment=not args.no_augment,
        seed=args.seed,
        train_limit=args.train_limit,
    )
    if not user:
        model_cfg = model_config(build_model(args.model, **kwargs))
    out = args.out or checkpoint_dir(model_cfg, tcfg)
    make_folder(out, "checkpoint folder", "pass another --out, or set AMC_CACHE_DIR")  # before, not after, training
    data = load_data(args.data, data_dir=args.data_dir, input_size=args.input_size, mean=args.mean, std=args.std,
                     channels=channels, split_seed=args.seed) if args.data else load_fashion_mnist(args.data_dir)
    n_train = min(len(data.train), args.train_limit or len(data.train))
    print(f"training {args.model} {kwargs or ''} on {n_train} images for {args.epochs} epochs on {device} ...".replace("  ", " "))
    def epoch_line(e: dict) -> None:
        print(
            f"epoch {e['epoch']}/{args.epochs}: loss {e['train_loss']:.4f}, train top-1 {100 * e['train_top1']:.2f}%, "
            f"val top-1 {100 * e.get('val_top1', float('nan')):.2f}%, {e['seconds']:.1f} s",
            flush=True,
        )

    _, meta = train_and_save(
        model_cfg, tcfg, data, out, device=device, progress=not args.quiet,
        on_epoch=epoch_line if args.quiet else None, eval_limit=args.eval_limit,
    )
    times = [h["seconds"] for h in meta["history"]]
    val, test = meta["metrics"]["val"], meta["metrics"]["test"]
    print(f"epoch time: {sum(times) / len(times):.1f} s mean ({meta['train_seconds']:.0f} s in all)")
    print(f"val top-1 {100 * val['top1']:.2f}%  (top-5 {100 * val['top5']:.2f}%, {val['images']} images)")
    print(f"test top-1 {100 * test['top1']:.2f}%  (top-5 {100 * test['top5']:.2f}%, {test['images']} images)")
    print(f"checkpoint: {out}")
    return 0
