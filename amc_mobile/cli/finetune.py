"""`amc-mobile finetune`: fine-tune a pruned model (AMC's recipe, brief by default);
`amc-mobile search-plots`: the figures of a search or baseline run folder."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from amc_mobile.search.finetune import FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser(
        "finetune", help="fine-tune a pruned model (SGD momentum 0.9, cosine LR, wd 4e-5) and report top-1",
        description="Fine-tune the pruned model of a search/baseline run folder (its pruned/) or of a pruned-model "
        "folder (architecture.json + model.pt) with AMC's recipe: SGD momentum 0.9 (Nesterov), cosine LR, weight "
        "decay 4e-5. Reports top-1 on the validation and test sets before and after, saves <run>/finetuned/ "
        "(same pruned format) and <run>/finetune.json, and adds the result to the run's summary.json. "
        f"BRIEF BY DEFAULT: {d.epochs} epoch over the first {d.train_images:,} training images at lr {d.lr} "
        "(a few minutes on a 2-core CPU); use --epochs, --train-images 0 (all 55,000) and --lr for a real fine-tune.")
    p.add_argument("path", metavar="RUN_DIR_OR_PRUNED_DIR", help="search/baseline run folder or pruned-model folder")
    p.add_argument("--epochs", type=int, default=d.epochs, help="default %(default)s")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate, cosine decay (default %(default)s)")
    p.add_argument("--train-images", type=int, default=d.train_images,
                   help="train on the first N training images; 0 = all 55,000 (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default %(default)s")
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--eval-images", type=int, default=None,
                   help="score before/after on the first N val and test images (default: all 5,000 / 10,000)")
    p.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    p.add_argument("--compute", "--device", dest="device", default=None, metavar="COMPUTE",
                   help="where it trains: cpu, cuda or cuda:N (default: cuda if there is one; --device is the old name)")
    p.add_argument("--out", default=None, help="folder for the fine-tuned model (default: <run>/finetuned)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: $AMC_DATA_DIR or the system one)")
    p.add_argument("--data", default=None,
                   help="fashion-mnist, imagefolder:DIR or FILE.py:FUNCTION (default: what the search used)")
    p.add_argument("--input-size", type=int, default=None, help="imagefolder: resize / center-crop to this size")
    p.add_argument("--mean", default=None, help="imagefolder: per-channel mean, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", default=None, help="imagefolder: per-channel std, e.g. 0.229,0.224,0.225")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="also (re)draw the run's search figures when it is a search run folder (default: on)")
    p.add_argument("--quant-policy", default=None, metavar="POLICY",
                   help="also quantize before and after (int8, or a policy .json such as a precision-search's "
                        "policy.json) and record both top-1s; default: the run's quant_policy.json when a joint "
                        "search wrote one")
    p.add_argument("--quant-calib-images", type=int, default=d.quant_calib_images,
                   help="training images that calibrate the int8 ranges (default %(default)s)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)

    q = sub.add_parser(
        "search-plots", help="draw the figures of a search or baseline run folder",
        description="Write reward.png (reward per episode, warm-up shaded, best so far), policy.png (best "
        "policy's preserve ratio per layer against the uniform width at the same cost) and accuracy_vs_cost.png "
        "(explored policies, budget, best) into a search/baseline run folder; `amc-mobile report` embeds them.")
    q.add_argument("run_dir", metavar="RUN_DIR")
    q.set_defaults(func=run_plots)


def run(args: argparse.Namespace) -> int:
    import warnings

    from amc_mobile.search.finetune import FinetuneConfig, finetune, resolve_pruned
    from device.quantize import QuantPolicy

    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, train_images=args.train_images or None,
                         batch_size=args.batch_size, weight_decay=args.weight_decay, augment=not args.no_augment,
                         seed=args.seed, eval_images=args.eval_images, device=args.device, data_dir=args.data_dir,
                         data=args.data, input_size=args.input_size, mean=args.mean, std=args.std,
                         progress=not args.quiet, quant_policy=args.quant_policy,
                         quant_calib_images=args.quant_calib_images).validate()
    from amc_mobile.train import resolve_device

    resolve_device(cfg.device)  # a --compute this host lacks fails before anything is loaded
    pruned, run_dir = resolve_pruned(args.path)  # fail fast, before loading data
    n = f"the first {cfg.train_images:,}" if cfg.train_images else "all"
    print(f"fine-tuning {pruned} for {cfg.epochs} epoch(s) on {n} training images, lr {cfg.lr} ...", flush=True)
    r = finetune(args.path, cfg, out=args.out)
    b, a = r.before, r.after
    print(f"{'':8s} {'val top-1':>10s} {'test top-1':>11s}")
    print(f"{'before':8s} {100 * b['val']['top1']:>9.2f}% {100 * b['test']['top1']:>10.2f}%")
    print(f"{'after':8s} {100 * a['val']['top1']:>9.2f}% {100 * a['test']['top1']:>10.2f}%")
    print(f"({b['val']['images']} val / {b['test']['images']} test images; training {r.record['train_seconds']:.0f} s, "
          f"{r.record['images_per_s']} images/s)")
    q = r.record.get("quantized")
    if q:
        print(f"quantized ({QuantPolicy.from_dict(q['policy']).label()}): " + ", ".join(
            f"{s} top-1 {100 * q['before'][s]:.2f}% -> {100 * q['after'][s]:.2f}%" for s in q["after"] if s in q["before"])
            + f"; program {q['dir']}")
    print(f"fine-tuned model: {r.out}")
    print(f"record: {r.run_dir / 'finetune.json'}")
    if args.plots and (run_dir / "episodes.csv").exists():
        from amc_mobile.search.plots import write_plots

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                paths = write_plots(run_dir)
            print("figures: " + ", ".join(str(p) for p in paths))
        except Exception as exc:  # the fine-tune is done and saved; a figure is not worth failing for
            print(f"figures not drawn: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return 0


def run_plots(args: argparse.Namespace) -> int:
    from amc_mobile.search.plots import write_plots

    for p in write_plots(args.run_dir):
        print(p)
    return 0
