"""Top-1 of each compared model on the Fashion-MNIST test split, or a note saying why not."""

from __future__ import annotations

from typing import Sequence

from amc_mobile.errors import AmcError

from .load import ModelEntry
from .messages import Log, one_line


def add_accuracy(models: Sequence[ModelEntry], data_dir: str | None = None, max_images: int | None = None,
                 log: Log | None = None) -> None:
    """Top-1 on the Fashion-MNIST test split for each model that fits the data; a note for the others."""
    from amc_mobile.data import load_fashion_mnist
    from amc_mobile.train import evaluate

    log = log or (lambda _msg: None)
    try:
        data = load_fashion_mnist(data_dir)
    except AmcError as exc:
        for m in models:
            m.accuracy_note = f"skipped: {one_line(exc)}"
        return
    test = data.test
    data_shape = tuple(test.images.shape[1:])
    for m in models:
        module = m.loaded.module
        if m.load_error:
            m.accuracy_note = "skipped: not loaded"
            continue
        if module is None and m.loaded.source == "quantized":
            _pte_accuracy(m, test, max_images, log)
            continue
        if module is None:
            m.accuracy_note = "skipped: a .pte cannot be evaluated here (pass its pruned-model folder)"
            continue
        shape = tuple(getattr(module, "input_shape", ()) or tuple(m.loaded.example_input.shape[1:]))
        if shape != data_shape:
            m.accuracy_note = (f"skipped: the model takes input {_shape_str(shape)}, Fashion-MNIST images are "
                               f"{_shape_str(data_shape)}")
            continue
        log(f"accuracy: {m.label} on {min(len(test), max_images or len(test))} test images ...")
        try:
            res = evaluate(module, test, device="cpu", topk=(1,), max_images=max_images)
        except Exception as exc:
            m.accuracy_note = f"skipped: evaluation failed: {one_line(exc, 200)}"
            continue
        m.top1 = float(res["top1"])
        notes = [f"test split, {int(res['images'])} images"]
        if m.loaded.source == "registry":
            notes.append("registry model: fresh untrained weights")
        m.accuracy_note = "; ".join(notes)


def _pte_accuracy(m: ModelEntry, test, max_images: int | None, log: Log) -> None:
    """A quantized program's top-1, run by ExecuTorch's runtime itself (its int8 kernels, as it deploys)."""
    from amc_mobile.quantization import pte_accuracy

    log(f"accuracy: {m.label} (.pte, ExecuTorch runtime) on {min(len(test), max_images or len(test))} test images ...")
    try:
        res = pte_accuracy(m.loaded.pte_path, test, max_images)
    except Exception as exc:
        m.accuracy_note = f"skipped: the .pte did not run in ExecuTorch's runtime: {one_line(exc, 200)}"
        return
    m.top1 = float(res["top1"])
    m.accuracy_note = f"test split, {int(res['images'])} images, the .pte in ExecuTorch's runtime"


def _shape_str(shape) -> str:
    return "x".join(str(int(s)) for s in shape)
