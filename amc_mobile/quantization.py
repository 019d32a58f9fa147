"""Post-training int8 quantization of a model as it deploys: calibrate on training images, lower to a
`.pte`, score the `.pte` itself (ExecuTorch's runtime, XNNPACK's int8 kernels) on validation images.

`device/quantize.py` does the PT2E part; this adds the data, the scoring and the output folder:

    out/model.pte            the quantized program (method `forward`), runs in et_bench locally and on phones
    out/quantization.json    policy, precision per layer (asked / got / why not), calibration size,
                             top-1 of the fp32 model and of the .pte, sizes (`weights_mb`: the weights at
                             their precisions, `search.cost.model_size_mb`; `pte_mb`: the file); written
                             after each step

`compare` and the report read such a folder as one quantized model (`is_quantized_folder`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from amc_mobile.data import Split
from amc_mobile.errors import AmcError
from device import Candidate
from device.lowering import lower_to_pte
from device.quantize import QuantizedModel, QuantPolicy, quantize_model

PTE_NAME = "model.pte"
REPORT_NAME = "quantization.json"
QUANTIZED_DIR = "quantized"  # where a search or precision-search run puts its quantized result (this layout)


def calibration_images(train: Split, n: int) -> torch.Tensor:
    """The first `n` training images (the calibration set is part of training data, never validation)."""
    if n < 0:
        raise AmcError(f"--calib-images must be >= 0, got {n}")
    return train.images[:n]


def pte_accuracy(pte: Path, split: Split, max_images: int | None = None, method: str = "forward") -> dict:
    """Top-1 of a `.pte` method run by ExecuTorch's runtime image by image (the program is batch 1)."""
    from executorch.runtime import Runtime

    loaded = Runtime.get().load_program(Path(pte)).load_method(method)
    n = len(split) if max_images is None else min(max_images, len(split))
    if n == 0:
        raise AmcError("nothing to evaluate: the split is empty")
    correct = 0
    for i in range(n):
        out = loaded.execute([split.images[i:i + 1].contiguous()])[0]
        correct += int(out.argmax(1).item() == int(split.labels[i]))
    return {"top1": correct / n, "images": n}


@dataclass
class QuantizeResult:
    out_dir: Path
    quantized: QuantizedModel
    report: dict = field(default_factory=dict)

    @property
    def pte(self) -> Path:
        return self.out_dir / PTE_NAME


def _write_report(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=REPORT_NAME, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, out_dir / REPORT_NAME)


def is_quantized_folder(path: Path) -> bool:
    return path.is_dir() and (path / REPORT_NAME).is_file() and (path / PTE_NAME).is_file()


def weights_mb(module: nn.Module, layers) -> dict:
    """{"weights_mb": at the precisions `layers` (LayerPrecision) got, "fp32_weights_mb": all fp32}; {} for a
    model the pruning graph cannot analyse (its size is then the .pte's alone)."""
    from amc_mobile.precision import PrecisionMap, units_at
    from amc_mobile.pruning.graph import build_graph
    from amc_mobile.search.cost import model_size_mb

    try:
        graph = build_graph(module)
        pmap = PrecisionMap(module, graph)
    except Exception:  # the graph's refusal is not the quantizer's: the .pte size still stands
        return {}
    got = QuantPolicy("fp32", {l.layer: l.actual for l in layers if l.layer in pmap.layers})
    return {"weights_mb": model_size_mb(units_at(graph, pmap.unit_dtypes(got))),
            "fp32_weights_mb": model_size_mb(graph.units_for({}))}


def quantize_to_folder(module: nn.Module, example_input: torch.Tensor, train: Split, val: Split | None,
                       policy: QuantPolicy, out_dir: str | os.PathLike, *, calib_images: int = 256,
                       eval_images: int | None = 1000, label: str = "model", quantized: QuantizedModel | None = None,
                       extra: dict | None = None) -> QuantizeResult:
    """Quantize `module` per `policy` (or take `quantized`, already made from it), write `out_dir/model.pte`
    and `quantization.json` (with `extra` merged in), score both models."""
    out_dir = Path(out_dir)
    qm = quantized or quantize_model(module, example_input, calibration_images(train, calib_images), policy)
    report: dict = {"model": label, **qm.to_dict(), **weights_mb(module, qm.layers), **(extra or {})}
    _write_report(out_dir, report)
    failed = lower_to_pte([Candidate("forward", qm.module, example_input)], out_dir / PTE_NAME, shared=False)
    if failed:
        raise AmcError(next(iter(failed.values())))
    report["pte_mb"] = (out_dir / PTE_NAME).stat().st_size / 1e6
    _write_report(out_dir, report)
    if val is not None and eval_images != 0:
        from amc_mobile.train import evaluate

        report["accuracy"] = {
            "fp32_torch": evaluate(module, val, max_images=eval_images, topk=(1,))["top1"],
            "quantized_pte": pte_accuracy(out_dir / PTE_NAME, val, eval_images)["top1"],
            "images": min(eval_images or len(val), len(val)),
        }
        _write_report(out_dir, report)
    return QuantizeResult(out_dir, qm, report)
