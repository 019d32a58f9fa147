"""The main job, end to end on one device: model -> latency table -> AMC search at a measured-latency
target -> brief fine-tune -> measure and report. `make demo` runs it on `local`.

Every step reuses the library (no logic lives here): `train.get_or_train`, `amc_mobile.tables.ensure_table`,
`search.run_search`, `search.finetune`, `compare`, `report`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from amc_mobile.models import DEFAULT_MODEL


@dataclass
class DemoConfig:
    model: str = DEFAULT_MODEL  # registry name; the shipped weights are used when they match
    device: str = "local"
    target: float = 0.5  # fraction of the original model's measured latency
    episodes: int = 120  # AMC: 400 (100 warm-up); the demo fits a 2-core CPU's budget
    warmup: int = 30
    val_images: int = 1000
    calib_images: int = 500
    table_budget_minutes: float = 6.0  # only spent when the device has no table yet
    finetune_images: int = 48000  # 1 epoch: ~3 min here; 24,000 left the pruned model 1.6 points short
    finetune_epochs: int = 1
    grid: int = 8  # channel rounding of the table and the search; a coarse grid is a much smaller table
    measure_iterations: int = 200  # the final measurement: timed runs per invocation, and invocations
    measure_repeats: int = 3
    eval_images: int = 0  # val and test images every accuracy figure uses (first N); 0: all 5,000 / 10,000
    seed: int = 0
    data_dir: str | None = None
    out: str | None = None

    def search_config(self, out: str | None = None, table_dir: str | None = None):
        from amc_mobile.search.config import SearchConfig

        return SearchConfig(model=self.model, device=self.device, target=self.target, episodes=self.episodes,
                            warmup=self.warmup, val_images=self.val_images, calib_images=self.calib_images,
                            seed=self.seed, data_dir=self.data_dir, out=out, channel_round=self.grid,
                            table_dir=table_dir)

    def validate(self) -> "DemoConfig":
        """Refuse bad numbers before minutes of training and table building, not at the search."""
        from amc_mobile.errors import AmcError

        self.search_config().validate()
        if not self.table_budget_minutes > 0:
            raise AmcError(f"--table-budget-minutes must be positive, got {self.table_budget_minutes}")
        if self.finetune_images < 1 or self.finetune_epochs < 1:
            raise AmcError(f"--finetune-images and --finetune-epochs must be at least 1 (got {self.finetune_images}, "
                           f"{self.finetune_epochs})")
        return self


def _step(i: int, n: int, text: str) -> float:
    print(f"\n[{i}/{n}] {text}", flush=True)
    return time.perf_counter()


def run_demo(cfg: DemoConfig) -> dict:
    from amc_mobile.data import FashionMNIST, load_fashion_mnist
    from amc_mobile.runs import new_run_dir, write_manifest
    from amc_mobile.search.loop import run_search
    from amc_mobile.train import get_or_train
    from amc_mobile.tables import ensure_table

    t_all = time.perf_counter()
    cfg.validate()
    run_dir = new_run_dir("demo", cfg.out)
    write_manifest(run_dir, "demo", demo_config=asdict(cfg))
    n = 5
    t = _step(1, n, f"model: {cfg.model} on Fashion-MNIST")
    data = load_fashion_mnist(cfg.data_dir)
    if cfg.eval_images:
        data = FashionMNIST(data.train, data.val.subset(cfg.eval_images), data.test.subset(cfg.eval_images),
                            data.source)
    model, meta = get_or_train(cfg.model, data=data)
    print(f"      {meta.get('checkpoint')} (test top-1 {meta['metrics']['test']['top1'] * 100:.2f}%)")

    t = _step(2, n, f"latency table for {cfg.device} (built once per device, then reused)")
    latency = ensure_table(model, device_uri=cfg.device, grid=cfg.grid, budget_minutes=cfg.table_budget_minutes)
    table_dir = Path(latency.source) if latency.source else None  # LatencyModel.source: the table folder
    print(f"      {table_dir} ({time.perf_counter() - t:.0f} s)")

    t = _step(3, n, f"AMC search at {cfg.target}x the measured latency ({cfg.episodes} episodes)")
    search_cfg = cfg.search_config(out=str(run_dir / "search"), table_dir=str(table_dir) if table_dir else None)
    result = run_search(search_cfg, model=model, data=data)
    print(f"      best policy: val top-1 {result.best['accuracy'] * 100:.2f}% (before fine-tuning), predicted "
          f"{result.best.get('cost', float('nan')):.3f} ms ({time.perf_counter() - t:.0f} s)")

    t = _step(4, n, f"fine-tune the pruned model briefly ({cfg.finetune_images} images x {cfg.finetune_epochs} epoch)")
    from amc_mobile.search.finetune import finetune_run

    ft = finetune_run(result.run_dir, epochs=cfg.finetune_epochs, train_images=cfg.finetune_images, data=data)
    print(f"      test top-1 {ft['before']['test_top1'] * 100:.2f}% -> {ft['after']['test_top1'] * 100:.2f}% "
          f"({time.perf_counter() - t:.0f} s)")

    t = _step(5, n, f"measure original vs pruned on {cfg.device} and write the report")
    from amc_mobile.compare import format_table, run_compare, summary_lines
    from device import MeasureConfig

    comp = run_compare([str(meta["checkpoint"]), str(ft["out"])], [cfg.device],
                       MeasureConfig(warmup=20, iterations=cfg.measure_iterations, repeats=cfg.measure_repeats),
                       out=run_dir / "compare", labels=["original", "amc-pruned"], accuracy=True,
                       data_dir=cfg.data_dir, accuracy_images=cfg.eval_images or None, log=None)
    print(format_table(comp.rows()))
    for line in summary_lines(comp):
        print("      " + line)
    summary = {"run_dir": str(run_dir), "search": str(result.run_dir), "finetune": ft,
               "compare": str(run_dir / "compare"), "seconds": round(time.perf_counter() - t_all, 1)}
    print(f"\ndone in {summary['seconds'] / 60:.1f} min: {run_dir}")
    write_manifest(run_dir, "demo", demo_summary=summary)
    return summary
