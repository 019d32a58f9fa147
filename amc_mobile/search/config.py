"""Typed configuration of the AMC search: one dataclass per job, every field with a default and a help line.

`SearchConfig` is what `amc-mobile search` is built from (field -> `--flag`) and what is saved as
`config.json` in every run folder; `DDPGConfig` holds the agent's hyper-parameters (AMC's official
defaults). Both round-trip through `to_dict` / `from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from amc_mobile.errors import AmcError

COSTS = ("latency", "flops", "params")
LATENCY_REFERENCES = ("measured", "predicted")


class SearchWarning(UserWarning):
    """Something the user should see (a discarded episode, a failed measurement...); the CLI shows
    these even though it silences the libraries' warnings."""
REWARDS = ("constrained", "guaranteed")
METRICS = ("top1", "top5")
SEARCH_PRECISIONS = ("fp32", "joint")


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a help line (used by the CLI)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DDPGConfig:
    """DDPG hyper-parameters; the defaults are AMC's (mit-han-lab/amc, amc_search.py)."""

    hidden1: int = _f(300, "actor and critic first hidden layer width")
    hidden2: int = _f(300, "actor and critic second hidden layer width")
    lr_actor: float = _f(1e-4, "actor learning rate (Adam)")
    lr_critic: float = _f(1e-3, "critic learning rate (Adam)")
    tau: float = _f(0.01, "soft update rate of the target networks")
    discount: float = _f(1.0, "discount factor")
    batch_size: int = _f(64, "minibatch size of one update")
    replay_per_layer: int = _f(100, "replay buffer capacity, in transitions per prunable layer")
    init_noise: float = _f(0.5, "sigma of the truncated-normal exploration noise right after warm-up")
    noise_decay: float = _f(0.95, "noise sigma multiplier per episode after warm-up")
    baseline_alpha: float = _f(0.5, "rate of the moving-average reward baseline")
    init_w: float = _f(3e-3, "output layers are initialised U(-init_w, init_w)")

    def validate(self) -> "DDPGConfig":
        # NaN fails every comparison below, so it is refused too (a config.json may hold one).
        if not (self.hidden1 >= 1 and self.hidden2 >= 1 and self.batch_size >= 1 and self.replay_per_layer >= 1):
            raise AmcError("--hidden1, --hidden2, --batch-size and --replay-per-layer must be at least 1")
        if not (self.lr_actor > 0 and self.lr_critic > 0 and self.init_w > 0):
            raise AmcError(f"--lr-actor, --lr-critic and --init-w must be positive (got {self.lr_actor}, "
                           f"{self.lr_critic}, {self.init_w})")
        for name, value, low_open in (("tau", self.tau, True), ("discount", self.discount, False),
                                      ("noise-decay", self.noise_decay, True),
                                      ("baseline-alpha", self.baseline_alpha, False)):
            if not ((0 < value <= 1) if low_open else (0 <= value <= 1)):
                raise AmcError(f"--{name} must be in {'(0' if low_open else '[0'}, 1], got {value}")
        if not self.init_noise >= 0:
            raise AmcError(f"--init-noise must be >= 0, got {self.init_noise}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DDPGConfig":
        return _from_dict(cls, d)


@dataclass
class SearchConfig:
    """Everything that decides a search run (saved as config.json next to its log and checkpoints)."""

    model: str = _f("mobilenet_v2", "model name (trained weights via get_or_train) or a checkpoint folder")
    model_kwargs: str | None = _f(None, "JSON keyword arguments of a FILE.py:FACTORY model, e.g. '{\"width\": 0.5}'")
    weights: str | None = _f(None, "a state_dict file for the model (loaded with weights_only=True)")
    input_shape: str | None = _f(None, "C,H,W when the model has no `input_shape` attribute")
    device: str = _f("local", "device URI for the latency table and the final measurement")
    cost: str = _f("latency", "resource the budget constrains", choices=COSTS)
    target: float = _f(0.5, "budget as a fraction of the original model's cost (latency: measured)")
    target_ms: float | None = _f(None, "absolute latency budget in ms (latency cost only; overrides --target)")
    latency_reference: str = _f("measured", "latency cost: --target is a fraction of the original's latency "
                                "measured on the device at the start, or of its predicted latency",
                                choices=LATENCY_REFERENCES)
    recalibrate: bool = _f(True, "latency cost: re-time the table's calibration models on the device first (seconds) "
                           "and fit the overhead term to the device as it is now; the unpruned model's timing is "
                           "the measured reference")
    unit_values: str = _f("anchored", "latency cost: read the table's rows as their ratio to the build's drift "
                          "reference x its level over the build (anchored; takes a slow stretch of the build off the "
                          "rows it hit), or as raw medians; the re-timed calibration is anchored to the original "
                          "likewise", choices=("anchored", "median"))
    precision: str = _f("fp32", "fp32: prune only; joint: one agent picks each conv/linear layer's preserve ratio AND "
                        "its precision (int8/fp32; APQ's joint search), every episode scored after int8 "
                        "post-training quantization, the picked model measured quantized; needs an int8 table "
                        "(`table build --dtype int8`, built on demand like the fp32 one)", choices=SEARCH_PRECISIONS)
    size_mb: float | None = _f(None, "joint: model-size budget in MB (1e6 bytes) of weights (int8 1 byte + an fp32 "
                                     "scale per channel, fp32 4 bytes, biases 4), held with the latency budget "
                                     "(--target 1 for size alone)")
    quant_calib_images: int = _f(128, "joint: training images that calibrate the int8 activation ranges")
    reward: str = _f("constrained", "constrained: -error under the budget; guaranteed: -error*log(cost), no budget",
                     choices=REWARDS)
    metric: str = _f("top1", "accuracy the reward uses (AMC's official code used top5 on ImageNet)", choices=METRICS)
    eval: str | None = _f(None, "FILE.py:FUNCTION: a metric fn(model, loader) -> float (higher is better) that "
                                "replaces --metric")
    episodes: int = _f(400, "episodes in total, warm-up included (AMC: 100 + 300)")
    warmup: int | None = _f(None, "episodes of uniform random actions first; default min(100, episodes // 4)")
    scope: str | None = _f(None, "channel groups to prune: all | decoupled; default per model family",
                           choices=("all", "decoupled"))
    lbound: float = _f(0.2, "smallest preserve ratio of a layer")
    rbound: float = _f(1.0, "largest preserve ratio of a layer")
    channel_round: int = _f(8, "kept channel counts are multiples of this")
    reconstruct: bool = _f(True, "least-squares reconstruction of the pruned layers' weights")
    calib_images: int = _f(500, "training images whose features feed the reconstruction (AMC: 3000)")
    calib_points: int = _f(10, "random spatial points sampled per calibration image (AMC: 10)")
    val_images: int = _f(1000, "held-out validation images that score each episode (5,000 exist)")
    eval_batch: int = _f(32, "batch size of the per-episode evaluation (small batches stay in cache)")
    seed: int = _f(0, "seed of the agent, the noise and the calibration sampling")
    out: str | None = _f(None, "run folder; default runs/search-<timestamp>")
    resume: str | None = _f(None, "continue the search in this run folder from its newest checkpoint")
    checkpoint_every: int = _f(10, "episodes between checkpoints (0: only at the end)")
    data: str | None = _f(None, "images: fashion-mnist (default), imagefolder:DIR (train/<class>/..., optional "
                                "val/) or FILE.py:FUNCTION returning (train, val)")
    input_size: int | None = _f(None, "imagefolder: resize / center-crop images to this size (default: as stored)")
    mean: str | None = _f(None, "imagefolder: per-channel mean for normalisation, e.g. 0.485,0.456,0.406 "
                                "(default 0.5)")
    std: str | None = _f(None, "imagefolder: per-channel std, e.g. 0.229,0.224,0.225 (default 0.5)")
    data_dir: str | None = _f(None, "folder with the Fashion-MNIST IDX files")
    table_dir: str | None = _f(None, "folder with latency tables (latency cost)")
    measure_final: bool = _f(True, "measure the pruned and original models on the device at the end")
    final_candidates: int = _f(4, "latency budget: measure this many best policies with the original at the end "
                                  "and keep the most accurate whose MEASURED ratio meets the target (walking "
                                  "back when none does); 0: keep the best predicted one")
    compute: str | None = _f(None, "where episodes are scored and the reconstruction's features collected: cpu, "
                                   "cuda or cuda:N (default: cuda when torch sees one, else cpu); latency is still "
                                   "measured on --device")
    threads: int | None = _f(None, "torch CPU threads for the search (default: torch's choice)")
    progress: bool = _f(True, "show a progress bar")
    agent: DDPGConfig = field(default_factory=DDPGConfig, metadata={"help": "DDPG hyper-parameters"})

    def __post_init__(self) -> None:
        if isinstance(self.agent, dict):
            self.agent = DDPGConfig.from_dict(self.agent)

    @property
    def warmup_episodes(self) -> int:
        return self.warmup if self.warmup is not None else min(100, self.episodes // 4)

    @property
    def score_metric(self) -> str:
        """What episodes are scored by: the user's --eval function, else --metric."""
        return self.eval or self.metric

    def validate(self) -> "SearchConfig":
        if self.cost not in COSTS:
            raise AmcError(f"unknown cost {self.cost!r}: expected one of {', '.join(COSTS)}")
        if self.reward not in REWARDS:
            raise AmcError(f"unknown reward {self.reward!r}: expected one of {', '.join(REWARDS)}")
        if self.latency_reference not in LATENCY_REFERENCES:
            raise AmcError(f"unknown latency reference {self.latency_reference!r}: measured or predicted")
        if self.precision not in SEARCH_PRECISIONS:
            raise AmcError(f"unknown precision {self.precision!r}: expected one of {', '.join(SEARCH_PRECISIONS)}")
        if self.precision == "joint":
            from device.quantize import MIN_CALIBRATION_IMAGES

            if self.cost != "latency" or self.reward != "constrained":
                raise AmcError("--precision joint searches under a latency budget: use --cost latency and "
                               "--reward constrained")
            if self.quant_calib_images < MIN_CALIBRATION_IMAGES:
                raise AmcError(f"--quant-calib-images must be at least {MIN_CALIBRATION_IMAGES}, got "
                               f"{self.quant_calib_images}")
        if self.size_mb is not None:
            if self.precision != "joint":
                raise AmcError("--size-mb is a budget of the joint search (--precision joint); for a pruned model "
                               "use `amc-mobile precision-search --size-mb`")
            if not self.size_mb > 0:
                raise AmcError(f"--size-mb must be positive, got {self.size_mb}")
        if self.metric not in METRICS:
            raise AmcError(f"unknown metric {self.metric!r}: expected top1 or top5")
        if self.eval is not None:
            from amc_mobile.model_io import is_factory_ref

            if not is_factory_ref(self.eval):
                raise AmcError(f"--eval {self.eval!r}: expected FILE.py:FUNCTION or package.module:FUNCTION")
        if self.target_ms is not None:
            if self.cost != "latency":
                raise AmcError(f"--target-ms is a latency budget: use --target RATIO with --cost {self.cost}")
            if not self.target_ms > 0:
                raise AmcError(f"--target-ms must be positive, got {self.target_ms}")
        elif not 0 < self.target <= 1:
            raise AmcError(f"--target must be a fraction in (0, 1] of the original cost, got {self.target}")
        if not 0 < self.lbound <= self.rbound <= 1:
            raise AmcError(f"need 0 < lbound <= rbound <= 1, got lbound={self.lbound}, rbound={self.rbound}")
        if self.episodes < 1:
            raise AmcError(f"--episodes must be at least 1, got {self.episodes}")
        if self.warmup is not None and not 0 <= self.warmup <= self.episodes:
            raise AmcError(f"--warmup must be between 0 and --episodes ({self.episodes}), got {self.warmup}")
        if self.channel_round < 1:
            raise AmcError(f"channel_round must be >= 1, got {self.channel_round}")
        if self.val_images < 1 or self.eval_batch < 1:
            raise AmcError("--val-images and --eval-batch must be at least 1")
        if self.reconstruct and (self.calib_images < 1 or self.calib_points < 1):
            raise AmcError("reconstruction needs --calib-images >= 1 and --calib-points >= 1 (or --no-reconstruct)")
        if not 0 <= self.final_candidates <= 16:
            raise AmcError(f"--final-candidates must be between 0 and 16, got {self.final_candidates}")
        if self.checkpoint_every < 0:
            raise AmcError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.threads is not None and self.threads < 1:
            raise AmcError(f"--threads must be >= 1, got {self.threads}")
        self.agent.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["agent"] = self.agent.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchConfig":
        return _from_dict(cls, d)


def _from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise AmcError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**d)
