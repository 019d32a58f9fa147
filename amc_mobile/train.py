"""Training, evaluation and cached checkpoints.

    data = load_fashion_mnist()
    model = build_model("mobilenet_v2")
    result = train(model, data, epochs=15, lr=0.05, batch_size=128, weight_decay=4e-5)
    evaluate(model, data.val)                     # {"top1": 0.93, "top5": 0.99, "loss": 0.2, "images": 5000}
    save_checkpoint(model, "ckpt/", meta)
    model, meta = load_checkpoint("ckpt/")
    model, meta = get_or_train("mobilenet_v2")     # shipped weights, else the cache, else trains

Accuracies are fractions in [0, 1]. A checkpoint is a directory with `model.pt` (a state_dict,
loaded with weights_only=True) and `config.json` (the model config from the registry, the
training arguments, val/test accuracy, torch version, date).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from amc_mobile import __version__
from amc_mobile.data import FashionMNIST, Split, load_fashion_mnist
from amc_mobile.errors import AmcError
from amc_mobile.files import atomic_write
from amc_mobile.models import DEFAULT_MODEL, build_model, config_hash, model_config, rebuild
from device.user_dirs import ENV_CACHE as CACHE_ENV  # noqa: F401 - the variable tests set
from device.user_dirs import cache_dir

PRETRAINED_DIR = Path(__file__).resolve().parent / "models" / "pretrained"
WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights besides the architecture (and the hardware's numerics)."""

    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 128
    weight_decay: float = 4e-5
    label_smoothing: float = 0.0
    augment: bool = True
    seed: int = 0
    train_limit: int | None = None  # first n training images only (tests, quick runs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def resolve_device(device: str | torch.device | None = None, flag: str = "--compute") -> torch.device:
    """None: CUDA when there is one, else CPU. Asking for CUDA without one is a user error (one line naming
    `flag`); see amc_mobile.compute."""
    from amc_mobile.compute import resolve_compute

    if isinstance(device, torch.device) and (device.type == "cpu" or torch.cuda.is_available()):
        return device
    return resolve_compute(device, flag)


# ----------------------------------------------------------------------------- evaluation


def _batches(source, batch_size: int, device: torch.device, max_images: int | None) -> Iterable:
    if isinstance(source, FashionMNIST):
        raise TypeError("evaluate() takes one split (data.val / data.test), not the whole dataset")
    if isinstance(source, (tuple, list)) and len(source) == 2 and isinstance(source[0], torch.Tensor):
        source = Split(source[0], source[1])
    if isinstance(source, Split):
        n = len(source) if max_images is None else min(len(source), max_images)
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size)
            yield source.images[i:j].to(device, non_blocking=True), source.labels[i:j].to(device, non_blocking=True)
        return
    seen = 0
    for x, y in source:  # any iterable of (images, labels) batches
        if max_images is not None:
            if seen >= max_images:
                return
            x, y = x[: max_images - seen], y[: max_images - seen]
        seen += len(y)
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# Inference batch size. Small batches keep MobileNet-V2's 28x28 activations in cache: 10,000 test images
# take ~18 s at 32 and ~120 s at 1000 on this 2-core box (the big batches spend their time in page faults).
EVAL_BATCH = 32


def evaluate(
    model: nn.Module,
    source,
    device: str | torch.device | None = "cpu",
    topk: tuple[int, ...] = (1, 5),
    max_images: int | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Top-k accuracy (fractions) and mean cross-entropy on a Split, an (images, labels) pair or a loader.

    Lean on purpose (the search calls it hundreds of times): inference mode, big batches, and
    `max_images` to score on a prefix. The model's train/eval mode is restored afterwards.
    """
    batch_size = batch_size or EVAL_BATCH
    dev = resolve_device(device)
    was_training = model.training
    model.eval()
    maxk = max(topk)
    correct = {k: 0 for k in topk}
    loss_sum = 0.0
    n = 0
    try:
        with torch.inference_mode():
            for x, y in _batches(source, batch_size, dev, max_images):
                out = model(x)
                loss_sum += F.cross_entropy(out, y, reduction="sum").item()
                k = min(maxk, out.shape[1])
                hits = out.topk(k, dim=1).indices.eq(y[:, None])
                for kk in topk:
                    correct[kk] += int(hits[:, : min(kk, k)].sum().item())
                n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise AmcError("nothing to evaluate: the split is empty")
    result = {f"top{k}": correct[k] / n for k in topk}
    result["loss"] = loss_sum / n
    result["images"] = n
    return result


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch
    val: dict[str, float] | None = None
    test: dict[str, float] | None = None
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def epoch_times(self) -> list[float]:
        return [h["seconds"] for h in self.history]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on BatchNorm parameters and biases (standard for MobileNets)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    model: nn.Module,
    data: FashionMNIST | Split,
    epochs: int = TrainConfig.epochs,
    lr: float = TrainConfig.lr,
    batch_size: int = TrainConfig.batch_size,
    weight_decay: float = TrainConfig.weight_decay,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    label_smoothing: float = 0.0,
    augment: bool = True,
    train_limit: int | None = None,
    evaluate_test: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    eval_limit: int | None = None,
) -> TrainResult:
    """SGD (momentum 0.9, Nesterov), per-step cosine schedule after a short warm-up; trains `model` in place.

    With a FashionMNIST `data`, validation accuracy is reported after every epoch and the test
    accuracy once at the end (only for reporting: nothing is selected on it). With a bare Split,
    no evaluation is done (fine-tuning inside the search evaluates itself). `eval_limit` scores
    on the first n val/test images only (quick runs).
    """
    if epochs < 1:
        raise AmcError(f"epochs must be at least 1, got {epochs}")
    if lr <= 0 or batch_size < 1:
        raise AmcError(f"need lr > 0 and batch size >= 1 (got lr={lr}, batch size={batch_size})")
    config = TrainConfig(epochs, lr, batch_size, weight_decay, label_smoothing, augment, seed, train_limit)
    dev = resolve_device(device)
    full = data if isinstance(data, FashionMNIST) else None
    train_split = full.train if full is not None else data
    train_split = train_split.subset(train_limit)
    if len(train_split) == 0:
        raise AmcError("no training images")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        train_split = train_split.to(dev)  # 55k 28x28 images: ~170 MB, indexing on the GPU is much faster
    torch.manual_seed(seed)
    model.to(dev)
    loader = train_split.loader(batch_size, shuffle=True, augment=augment, seed=seed, drop_last=len(train_split) > batch_size)
    steps = epochs * len(loader)
    optimizer = torch.optim.SGD(_param_groups(model, weight_decay), lr=lr, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(steps, warmup_steps(steps, len(loader))))
    result = TrainResult(model=model, config=config, device=str(dev))
    start = time.perf_counter()
    bar_factory = _tqdm(progress)
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        seen = 0
        bar = bar_factory(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=True, unit="batch")
        for i, (x, y) in enumerate(bar):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(y)
            correct += (out.detach().argmax(1) == y).sum()
            seen += len(y)
            if progress and (i % 20 == 0 or i == len(loader) - 1):
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
        if not math.isfinite(loss_sum.item()):
            raise AmcError(f"training diverged in epoch {epoch + 1} (loss is {loss_sum.item()}): lower --lr")
        entry = {
            "epoch": epoch + 1,
            "train_loss": loss_sum.item() / seen,
            "train_top1": correct.item() / seen,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        if full is not None:
            val = evaluate(model, full.val, dev, max_images=eval_limit)
            entry["val_top1"], entry["val_loss"] = val["top1"], val["loss"]
            result.val = val
            if progress:
                bar.set_postfix(loss=f"{entry['train_loss']:.3f}", acc=f"{entry['train_top1']:.3f}", val=f"{val['top1']:.4f}")
        bar.close()
        result.history.append(entry)
        if on_epoch is not None:
            on_epoch(entry)
    if full is not None and evaluate_test:
        result.test = evaluate(model, full.test, dev, max_images=eval_limit)
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def warmup_steps(total_steps: int, steps_per_epoch: int) -> int:
    """Linear warm-up over 3% of the run, at most one epoch: keeps a fresh BN network stable at lr 0.05+."""
    return min(steps_per_epoch, int(0.03 * total_steps))


def _cosine_with_warmup(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = min(step - warmup, total - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * t))

    return factor


def _tqdm(enabled: bool):
    if not enabled:

        class _Quiet:
            def __init__(self, it, **_):
                self.it = it

            def __iter__(self):
                return iter(self.it)

            def set_postfix(self, **_):
                pass

            def close(self):
                pass

        return _Quiet
    from tqdm.auto import tqdm

    return lambda it, **kw: tqdm(it, dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write `model.pt` (CPU state_dict) and `config.json`; returns the directory.

    config.json always gets the model's registry config under "model"; `meta` adds the rest
    (training args, metrics...). Weights are written first so a config never points at missing weights.
    """
    import io

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    meta["model"] = model_config(model)
    meta.setdefault("torch", torch.__version__)
    meta.setdefault("amc_mobile", __version__)
    meta.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write(directory / WEIGHTS_FILE, buf.getvalue())
    atomic_write(directory / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def read_checkpoint_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise AmcError(f"{directory} is not a checkpoint (no {CONFIG_FILE}); train one with `amc-mobile train`") from None
    except (OSError, ValueError) as exc:
        raise AmcError(f"{path}: unreadable checkpoint config ({exc}); delete the folder and retrain") from exc
    model = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(model, dict) or not ({"name", "factory"} & set(model)):  # a registry model or a user factory
        raise AmcError(f"{path}: no model config in it; delete the folder and retrain")
    return meta


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from config.json and load model.pt (weights_only); returns (model in eval mode, meta)."""
    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    try:
        model = rebuild(meta["model"])
    except (ValueError, TypeError) as exc:
        raise AmcError(f"{directory / CONFIG_FILE}: cannot rebuild the model ({exc}); delete the folder and retrain") from exc
    weights = directory / WEIGHTS_FILE
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AmcError(f"{directory} has a config but no {WEIGHTS_FILE}; delete the folder and retrain") from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise AmcError(f"{weights}: corrupt checkpoint ({reason}); delete the folder and retrain") from exc
    if not isinstance(state, dict):
        raise AmcError(f"{weights}: not a state_dict; delete the folder and retrain")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise AmcError(f"{weights}: weights do not fit the model in {CONFIG_FILE} ({first[0][:200] if first else exc})") from exc
    return model.to(resolve_device(device)).eval(), meta


# ----------------------------------------------------------------------------- cache


def cache_root() -> Path:
    return cache_dir()


def cache_key(model_cfg: dict[str, Any], train_cfg: TrainConfig) -> dict[str, Any]:
    return {"model": model_cfg, "train": train_cfg.to_dict()}


def checkpoint_dir(model_cfg: dict[str, Any], train_cfg: TrainConfig) -> Path:
    """`<cache>/checkpoints/<model>-<hash of model + training config>/`."""
    name = model_cfg.get("name") or model_cfg.get("factory", "model").rpartition(":")[2]
    return cache_root() / "checkpoints" / f"{name}-{config_hash(cache_key(model_cfg, train_cfg))}"


def pretrained_dir(name: str) -> Path:
    return PRETRAINED_DIR / name


def _matches(meta: dict, model_cfg: dict, train_cfg: TrainConfig | None) -> bool:
    if meta.get("model") != model_cfg:
        return False
    if train_cfg is None:
        return True
    return TrainConfig.from_dict(meta.get("train", {})) == train_cfg


def get_or_train(
    name: str = DEFAULT_MODEL,
    model_kwargs: dict[str, Any] | None = None,
    train_config: TrainConfig | None = None,
    data: FashionMNIST | None = None,
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model for this configuration: shipped weights, else the cache, else train and cache.

    With `train_config=None` any trained weights for the architecture do (the shipped default is
    preferred); with an explicit TrainConfig only a checkpoint trained with exactly it matches.
    """
    model_cfg = model_config(build_model(name, **(model_kwargs or {})))
    shipped = pretrained_dir(name)
    if (shipped / CONFIG_FILE).exists():
        meta = read_checkpoint_meta(shipped)
        if _matches(meta, model_cfg, train_config):
            model, meta = load_checkpoint(shipped, device=resolve_device(device))
            meta["checkpoint"] = str(shipped)
            return model, meta
    tcfg = train_config or TrainConfig()
    cached = checkpoint_dir(model_cfg, tcfg)
    if (cached / CONFIG_FILE).exists():
        meta = read_checkpoint_meta(cached)
        if _matches(meta, model_cfg, tcfg):
            model, meta = load_checkpoint(cached, device=resolve_device(device))
            meta["checkpoint"] = str(cached)
            return model, meta
    data = data or load_fashion_mnist(data_dir)
    model, meta = train_and_save(model_cfg, tcfg, data, cached, device=device, progress=progress)
    meta["checkpoint"] = str(cached)
    return model, meta


def train_and_save(
    model_cfg: dict[str, Any],
    tcfg: TrainConfig,
    data: FashionMNIST,
    out: str | os.PathLike,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    eval_limit: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build (seeded), train, evaluate and save a checkpoint; returns (model, meta)."""
    torch.manual_seed(tcfg.seed)
    model = rebuild(model_cfg)
    result = train(
        model,
        data,
        epochs=tcfg.epochs,
        lr=tcfg.lr,
        batch_size=tcfg.batch_size,
        weight_decay=tcfg.weight_decay,
        device=device,
        seed=tcfg.seed,
        progress=progress,
        label_smoothing=tcfg.label_smoothing,
        augment=tcfg.augment,
        train_limit=tcfg.train_limit,
        on_epoch=on_epoch,
        eval_limit=eval_limit,
    )
    meta = {
        "train": tcfg.to_dict(),
        "metrics": {"val": result.val, "test": result.test},
        "history": result.history,
        "train_seconds": round(result.seconds, 1),
        "device": result.device if not result.device.startswith("cuda") else f"cuda ({torch.cuda.get_device_name()})",
        "data": {"train_images": min(len(data.train), tcfg.train_limit or len(data.train)), "val_images": len(data.val)},
    }
    save_checkpoint(model.cpu(), out, meta)
    return model, read_checkpoint_meta(out) | {"checkpoint": str(out)}
