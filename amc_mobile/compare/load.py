"""The models of a comparison, loaded before any device is touched, with what is known of each without
a device (parameters, MACs, file size); the first is the original."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from amc_mobile.errors import AmcError
from amc_mobile.model_io import LoadedModel, load_model

from .messages import one_line


@dataclass
class ModelEntry:
    """One model of the comparison and what is known about it without a device."""

    label: str
    ref: str
    loaded: LoadedModel
    params: int | None = None
    macs: int | None = None
    size_mb: float | None = None
    notes: list[str] = field(default_factory=list)
    top1: float | None = None
    accuracy_note: str | None = None
    load_error: str | None = None  # could not be loaded: its cells say why, the other models still run
    precision: str = "fp32"  # "fp32", or for a quantized program "int8 k/n" (conv/linear layers in int8)
    layer_precisions: list[dict] | None = None  # a quantized program's layers: asked / got / why not

    @property
    def is_pte(self) -> bool:
        return self.loaded.pte_path is not None

    def describe(self) -> dict:
        return {"label": self.label, "ref": self.ref, "source": self.loaded.source, "params": self.params,
                "macs": self.macs, "size_mb": self.size_mb, "top1": self.top1,
                "accuracy_note": self.accuracy_note, "notes": self.notes, "load_error": self.load_error,
                "precision": self.precision, "layer_precisions": self.layer_precisions}


def count_macs(module) -> tuple[int | None, str | None]:
    """MACs of one forward (batch 1) from the pruning graph; (None, why) when it cannot be analysed."""
    from amc_mobile.pruning import build_graph

    try:
        return int(build_graph(module).flops()), None
    except Exception as exc:  # a model outside the supported ops still gets measured
        return None, f"MACs unknown: {one_line(exc, 200)}"


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lbl in labels:
        n = seen.get(lbl, 0) + 1
        seen[lbl] = n
        out.append(lbl if n == 1 else f"{lbl}-{n}")
    return out


def load_models(refs: Sequence[str], allow_pickle: bool = False,
                labels: Sequence[str] | None = None, keep_going: bool = False,
                original_options=None) -> list[ModelEntry]:
    """Load every model (the first is the original; `original_options`, a model_io.ModelOptions, apply to
    it). An unloadable model is an AmcError, or with `keep_going` an entry whose `load_error` says why
    (an AmcError still when none loads)."""
    if len(refs) < 1:
        raise AmcError("compare needs an original model (and usually compressed ones to compare with it)")
    if labels is not None and len(labels) != len(refs):
        raise AmcError(f"--labels has {len(labels)} names for {len(refs)} models: give one per model")
    entries = []
    for i, ref in enumerate(refs):
        try:
            loaded = load_model(ref, allow_pickle=allow_pickle, label=labels[i] if labels else None,
                                options=original_options if i == 0 else None)
        except AmcError as exc:
            if not keep_going:
                raise
            label = labels[i] if labels else (Path(ref).name or str(ref))
            loaded = LoadedModel(label, None, None, "unloadable")
            entries.append(ModelEntry(label, ref, loaded, load_error=one_line(exc)))
            continue
        if not labels:
            loaded.label = _label_of(ref, loaded)
        entries.append(ModelEntry(loaded.label, ref, loaded))
    if all(e.load_error for e in entries):
        raise AmcError(entries[0].load_error if len(entries) == 1 else
                       f"none of the {len(entries)} models could be loaded; first: {entries[0].load_error}")
    for entry, lbl in zip(entries, _unique_labels([e.label for e in entries])):
        entry.label = lbl
    for e in entries:
        e.size_mb = e.loaded.size_mb()
        e.params = e.loaded.params
        if e.loaded.source == "quantized":
            _quantized_facts(e)
        if e.loaded.module is not None:
            e.macs, why = count_macs(e.loaded.module)
            if why:
                e.notes.append(why)
    return entries


def _label_of(ref: str, loaded: LoadedModel) -> str:
    path = Path(ref)
    if not path.exists():
        return loaded.label
    # "runs/x/best/architecture.json" -> "best"; "model.pte" -> "model.pte"
    if path.name == "architecture.json":
        path = path.parent
    return path.resolve().name or loaded.label


def _quantized_facts(e: ModelEntry) -> None:
    """What a quantized folder's report says: precision per layer, weights at their precisions."""
    meta = e.loaded.meta or {}
    layers = [l for l in meta.get("layers") or [] if isinstance(l, dict)]
    int8 = sum(1 for l in layers if l.get("actual") == "int8")
    e.precision = f"int8 {int8}/{len(layers)}" if int8 else "fp32"
    e.layer_precisions = layers
    if isinstance(meta.get("weights_mb"), (int, float)):
        e.notes.append(f"weights {meta['weights_mb']:.3f} MB at their precisions (fp32 "
                       f"{meta.get('fp32_weights_mb', float('nan')):.3f} MB); size_mb is the .pte")
