"""Fine-tune a pruned model (AMC's recipe: SGD momentum 0.9, cosine LR, weight decay 4e-5) and record
top-1 on the validation and test sets before and after.

    result = finetune("runs/search-.../")           # or the pruned/ folder itself
    result.before["val"]["top1"], result.after["test"]["top1"]

Input: a pruned-model folder (architecture.json + model.pt) or a run folder holding one in pruned/.
Output: `<run>/finetuned/` in the same pruned format (same base model, `fine_tuned: true`) and
`<run>/finetune.json` (the recipe, before/after, per-epoch history); a run's summary.json gets the
same record under "finetune". The training loop is `amc_mobile.train.train` (its SGD is Nesterov).

A quantized result (issue 15, item 4): with a precision policy (`quant_policy`, default the run's
quant_policy.json that a joint search writes) the model is fine-tuned in fp32 as above and then quantized
again at that policy (post-training, calibrated on training images): finetune.json's "quantized" holds
the quantized top-1 before and after, and `<run>/quantized_finetuned/` the program (model.pte +
quantization.json). PTQ after fine-tuning rather than QAT: PT2E's `prepare_qat_pt2e` works on torch 2.13 /
torchao 0.18, but the model it trains is an exported graph whose BN is fused into fake-quantized convs,
which the pruned-model folder (our modules, sliced per channel) cannot hold; PTQ at 8 bits costs
ResNet-20 no measurable top-1 (docs/BENCHMARKS.md), so the fp32 fine-tune carries over.

The defaults are brief on purpose: on a 2-core CPU MobileNet-V2 trains at a few hundred images/s, so
one epoch over the first 24,000 training images is the default; longer runs are options. Batch 64 at
lr 0.005 (the 128 / 0.01 pair scaled linearly): on this CPU a batch of 64 trains about twice as many
images per second as a batch of 128 (its activations stay in cache).
Evaluation folds the BNs into the convs and uses channels-last (the same numbers, about twice as fast).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.files import write_json
from amc_mobile.pruning.slicing import SPEC_FILE, WEIGHTS_FILE, load_pruned, save_pruned

from .run_folder import CONFIG_FILE, PRUNED_DIR, SUMMARY_FILE

FINETUNED_DIR = "finetuned"
RECORD_FILE = "finetune.json"
QUANTIZED_FINETUNED_DIR = "quantized_finetuned"


@dataclass
class FinetuneConfig:
    """AMC's fine-tune recipe, kept brief by default (see module doc)."""

    epochs: int = 1
    lr: float = 0.005
    train_images: int | None = 24_000  # first N training images; None: all 55,000
    batch_size: int = 64
    weight_decay: float = 4e-5
    augment: bool = True
    seed: int = 0
    eval_images: int | None = None  # score on the first N val and test images; None: all (5,000 / 10,000)
    eval_before: tuple[str, ...] = ("val", "test")  # splits scored before fine-tuning ((): none)
    eval_after: tuple[str, ...] = ("val", "test")  # splits scored after
    device: str | None = None  # compute (--compute): cpu, cuda, cuda:N; None: cuda if there is one
    data_dir: str | None = None
    data: str | None = None  # like the search's --data; None: what the search that made the model used
    input_size: int | None = None
    mean: str | None = None
    std: str | None = None
    progress: bool = True
    quant_policy: str | None = None  # int8, or a policy .json: quantize before and after; None: the run's, if any
    quant_calib_images: int = 128  # training images that calibrate the int8 ranges

    def validate(self) -> "FinetuneConfig":
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise AmcError(f"need --epochs >= 1, --batch-size >= 1 and --lr > 0 (got {self.epochs}, "
                           f"{self.batch_size}, {self.lr})")
        if self.train_images is not None and self.train_images < 1:
            raise AmcError(f"--train-images must be at least 1, got {self.train_images}")
        if self.eval_images is not None and self.eval_images < 1:
            raise AmcError(f"--eval-images must be at least 1, got {self.eval_images}")
        bad = sorted((set(self.eval_before) | set(self.eval_after)) - {"val", "test"})
        if bad:
            raise AmcError(f"unknown split(s) to evaluate: {', '.join(bad)} (val or test)")
        if self.weight_decay < 0:
            raise AmcError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        from device.quantize import MIN_CALIBRATION_IMAGES, QuantPolicy

        if self.quant_calib_images < MIN_CALIBRATION_IMAGES:
            raise AmcError(f"--quant-calib-images must be at least {MIN_CALIBRATION_IMAGES}, got "
                           f"{self.quant_calib_images}")
        if self.quant_policy is not None:
            QuantPolicy.parse(self.quant_policy)  # a bad policy fails before any training
        return self


@dataclass
class FinetuneResult:
    model: nn.Module
    source: Path  # the pruned folder that was read
    out: Path  # the fine-tuned folder written
    run_dir: Path | None  # where finetune.json went
    before: dict  # {"val": {...}, "test": {...}}
    after: dict
    record: dict = field(default_factory=dict)


def resolve_pruned(path: str | Path) -> tuple[Path, Path]:
    """(pruned-model folder, run folder) for a run folder or a pruned folder; one-line AmcErrors otherwise.
    A pruned folder's run folder is its parent when the parent is a run (run.json), else the folder itself."""
    path = Path(path)
    if not path.exists():
        raise AmcError(f"{path} does not exist: pass a search run folder or a pruned-model folder")
    if not path.is_dir():
        if path.name == SPEC_FILE:
            path = path.parent
        else:
            raise AmcError(f"{path} is a file: pass a search run folder or a pruned-model folder "
                           f"({SPEC_FILE} + {WEIGHTS_FILE})")
    if (path / SPEC_FILE).exists():
        pruned = path
        run_dir = path.parent if (path.parent / "run.json").exists() else path
    elif (path / PRUNED_DIR / SPEC_FILE).exists():
        pruned, run_dir = path / PRUNED_DIR, path
    else:
        raise AmcError(f"{path} holds no pruned model: expected {SPEC_FILE} + {WEIGHTS_FILE} in it or in "
                       f"{PRUNED_DIR}/ (did the search finish?)")
    if not (pruned / WEIGHTS_FILE).exists():
        raise AmcError(f"{pruned} has {SPEC_FILE} but no {WEIGHTS_FILE}: the pruned model is incomplete")
    return pruned, run_dir


@torch.no_grad()
def fast_evaluate(model: nn.Module, split, max_images: int | None = None, batch_size: int | None = None,
                  compute: torch.device | str = "cpu") -> dict:
    """top-1/top-5/loss of `model` on a split, on `compute`, through a BN-folded channels-last copy."""
    from amc_mobile.data import Split
    from amc_mobile.train import evaluate

    from .reconstruct import conv_bn_pairs, fold_batchnorms

    m = copy.deepcopy(model).cpu().eval()
    fold_batchnorms(m, conv_bn_pairs(m))
    m = m.to(memory_format=torch.channels_last).to(compute)
    split = split.subset(max_images)
    if split.images.dim() == 4:
        split = Split(split.images.contiguous(memory_format=torch.channels_last), split.labels)
    res = evaluate(m, split, device=compute, topk=(1, 5), batch_size=batch_size)
    return {k: float(v) if k != "images" else int(v) for k, v in res.items()}


def _scores(model: nn.Module, data, max_images: int | None, splits=("val", "test"),
            compute: torch.device | str = "cpu") -> dict:
    return {s: fast_evaluate(model, getattr(data, s), max_images, compute=compute) for s in splits}


def _data_for(cfg: FinetuneConfig, run_dir: Path, model):
    """The data options given, else those of the search that made the model (its config.json)."""
    import json

    from amc_mobile.data_sources import load_data

    opts = {"data": cfg.data, "input_size": cfg.input_size, "mean": cfg.mean, "std": cfg.std}
    saved = run_dir / CONFIG_FILE
    if cfg.data is None and saved.is_file():
        try:
            search = json.loads(saved.read_text())
        except ValueError:
            search = {}
        if isinstance(search, dict) and search.get("data"):
            opts = {k: search.get(k) for k in opts}
    return load_data(opts["data"], data_dir=cfg.data_dir, input_size=opts["input_size"], mean=opts["mean"],
                     std=opts["std"], channels=int(model.input_shape[0]) if getattr(model, "input_shape", None) else None)


def finetune(path: str | Path, config: FinetuneConfig | None = None, out: str | Path | None = None,
             data=None) -> FinetuneResult:
    """Fine-tune the pruned model at `path` (see module doc); `data`: the FashionMNIST splits (loaded
    from config.data_dir when None)."""
    from amc_mobile.train import resolve_device, train

    cfg = (config or FinetuneConfig()).validate()
    pruned_dir, run_dir = resolve_pruned(path)
    device = resolve_device(cfg.device)
    model, spec = load_pruned(pruned_dir)
    out = Path(out) if out is not None else run_dir / FINETUNED_DIR
    if out.resolve() == pruned_dir.resolve():
        raise AmcError(f"--out {out} is the pruned model being fine-tuned: choose another folder")
    if data is None:
        data = _data_for(cfg, run_dir, model)
    policy = _quant_policy(cfg, run_dir)
    t0 = time.perf_counter()
    before = _scores(model, data, cfg.eval_images, cfg.eval_before, device)
    if policy is not None:
        q_before, policy = _quantized_scores(model, data, policy, cfg)
    eval_s = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(True)
    res = train(model, data.train, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                weight_decay=cfg.weight_decay, device=device, seed=cfg.seed, progress=cfg.progress,
                augment=cfg.augment, train_limit=cfg.train_images)
    model = model.cpu().eval()
    t1 = time.perf_counter()
    after = _scores(model, data, cfg.eval_images, cfg.eval_after, device)
    eval_s += time.perf_counter() - t1
    channels = {int(g): int(c) for g, c in (spec.get("group_channels") or {}).items()}
    keep = {k: v for k, v in spec.items() if k not in ("format", "base_model", "input_shape", "modules",
                                                      "group_channels", "fine_tuned", "finetune")}
    n_train = min(len(data.train), cfg.train_images or len(data.train))
    recipe = {**asdict(cfg), "optimizer": "SGD momentum 0.9 (Nesterov), cosine LR after a short linear warm-up",
              "train_images_used": n_train, "device_used": str(device)}
    save_pruned(model, out, spec["base_model"], channels,
                extra={**keep, "fine_tuned": True, "finetune": recipe, "source": str(pruned_dir)})
    record = {
        "source": str(pruned_dir),
        "out": str(out),
        "recipe": recipe,
        "before": before,
        "after": after,
        "delta_top1": {s: after[s]["top1"] - before[s]["top1"] for s in ("val", "test") if s in before and s in after},
        "train_seconds": round(res.seconds, 1),
        "eval_seconds": round(eval_s, 1),
        "images_per_s": round(n_train * cfg.epochs / res.seconds, 1) if res.seconds > 0 else None,
        "history": res.history,
    }
    if policy is not None:
        q_after, _ = _quantized_scores(model, data, policy, cfg, run_dir / QUANTIZED_FINETUNED_DIR)
        record["quantized"] = {"policy": policy.to_dict(), "calibration_images": cfg.quant_calib_images,
                               "before": q_before, "after": q_after, "dir": str(run_dir / QUANTIZED_FINETUNED_DIR),
                               "delta_top1": {s: q_after[s] - q_before[s] for s in q_before if s in q_after}}
    write_json(run_dir / RECORD_FILE, record)
    summary = run_dir / SUMMARY_FILE
    if summary.exists() and run_dir != pruned_dir:
        try:
            data_ = json.loads(summary.read_text())
            if isinstance(data_, dict):
                data_["finetune"] = {k: record[k] for k in ("out", "before", "after", "delta_top1", "train_seconds",
                                                             "quantized") if k in record}
                data_["finetune"]["recipe"] = {k: recipe[k] for k in ("epochs", "lr", "train_images_used",
                                                                     "weight_decay", "batch_size", "seed")}
                write_json(summary, data_)
        except (OSError, ValueError):
            pass  # an unreadable summary (or a folder in its place) is the report's problem, not the fine-tune's
    return FinetuneResult(model, pruned_dir, out, run_dir, before, after, record)


def _quant_policy(cfg: FinetuneConfig, run_dir: Path):
    from device.quantize import QuantPolicy

    from .run_folder import QUANT_POLICY_FILE

    if cfg.quant_policy is not None:
        return QuantPolicy.parse(cfg.quant_policy)
    if (run_dir / QUANT_POLICY_FILE).is_file():
        return QuantPolicy.parse(str(run_dir / QUANT_POLICY_FILE))
    return None


def _quantized_scores(model: nn.Module, data, policy, cfg: FinetuneConfig, out: Path | None = None):
    """({split: top-1} of `model` quantized at `policy` (PT2E, first training images) on the splits fine-tuning
    scores, the policy as it was honoured). Without `out` the layers XNNPACK would not delegate in int8 are
    found (one lowering) and the returned policy has them fp32, so the model after fine-tuning is quantized
    the same way without that check; with `out` the program is written there (model.pte + quantization.json)."""
    from amc_mobile.quantization import calibration_images, quantize_to_folder
    from amc_mobile.train import evaluate
    from device import example_input
    from device.quantize import QuantPolicy, quantize_model

    model = model.cpu().eval()
    x = example_input(model.input_shape)
    qm = quantize_model(model, x, calibration_images(data.train, cfg.quant_calib_images), policy,
                        check_delegation=out is None)
    scores = {s: float(evaluate(qm.module, getattr(data, s), device="cpu", topk=(1,),
                                max_images=cfg.eval_images)["top1"])
              for s in dict.fromkeys((*cfg.eval_before, *cfg.eval_after))}
    honoured = QuantPolicy(policy.default, {**policy.layers, **{l.layer: l.actual for l in qm.layers}})
    if out is not None:
        quantize_to_folder(model, x, data.train, None, honoured, out, calib_images=cfg.quant_calib_images,
                           label=f"fine-tuned [{policy.label()}]", quantized=qm,
                           extra={"top1_torch": scores, "fine_tuned": True})
    return scores, honoured


def finetune_run(path: str | Path, epochs: int = FinetuneConfig.epochs, train_images: int | None = FinetuneConfig.train_images,
                 lr: float = FinetuneConfig.lr, data=None, out: str | Path | None = None, **config) -> dict:
    """`finetune` with keyword options, returning a flat JSON-safe dict (the demo and scripts use it):
    {"out", "run_dir", "before": {"val_top1", "test_top1", ...}, "after": {...}, "record": finetune.json}."""
    cfg = FinetuneConfig(epochs=epochs, train_images=train_images, lr=lr, **config)
    r = finetune(path, cfg, out=out, data=data)

    def flat(scores: dict) -> dict:
        return {f"{split}_{k}": v for split, d in scores.items() for k, v in d.items()}

    return {"out": str(r.out), "run_dir": str(r.run_dir), "source": str(r.source), "before": flat(r.before),
            "after": flat(r.after), "record": r.record}
