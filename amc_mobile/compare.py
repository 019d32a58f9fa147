"""Compare an original model with compressed versions of it on several devices, with one protocol.

AMC's headline is such a comparison: MobileNet at 50% FLOPs ran 1.81x faster on a phone but 1.43x
on a GPU. `run_compare` gives that table for any models and devices:

    result = run_compare(["resnet20", "runs/search-1/best"], ["local", "adb:SERIAL", "cuda:0"])
    result.table()          # tidy DataFrame, one row per model x device
    result.exit_code        # 0: every cell measured; 1: some cell failed or was skipped

How it measures:

- every model is loaded first (`amc_mobile.model_io.load_model`); a bad file or a spec that does
  not match its weights is an AmcError before any device is touched.
- every device gets the same `MeasureConfig`; all PyTorch models of a device go into ONE
  `device.measure` batch (on `local` that is one multi-method .pte, one runner invocation).
  A `.pte` model is timed with the device's `measure_pte` (ExecuTorch devices only).
- a device that cannot be opened or cannot run (no CUDA, runner missing, phone unreachable) marks
  its cells "skipped: <why>" and the other devices still run; a candidate that fails marks its
  cell "failed: <why>".
- speedup = original median / model median, per device.
- several phones (`adb:`, `adb-tcp:`, `adb-server:`) measure in parallel, one thread each, after
  the host devices (whose timings must not share the CPU with lowering): the PyTorch models are
  lowered once, here, and every phone times that one `.pte`.
- each device's results are appended to `measurements.jsonl` (raw samples included) as soon as
  the device is done; the run folder then gets `compare.csv`, `speedup.png`, `latency.png`,
  `run.json` (fingerprints per device) and `report.html` / `report.md`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from amc_mobile.errors import AmcError
from amc_mobile.files import atomic_write
from amc_mobile.formatting import si
from amc_mobile.model_io import LoadedModel, load_model
from amc_mobile.runs import new_run_dir, write_manifest

KIND = "compare"
CSV_FILE = "compare.csv"
MEASUREMENTS_FILE = "measurements.jsonl"
SPEEDUP_PNG = "speedup.png"
LATENCY_PNG = "latency.png"
EXECUTORCH_KINDS = ("local", "adb", "adb-tcp", "adb-server")
PHONE_KINDS = ("adb", "adb-tcp", "adb-server")

# Column order of compare.csv (tidy: one row per model x device).
COLUMNS = [
    "model", "role", "source", "device", "status", "error",
    "median_ms", "p90_ms", "p10_ms", "mean_ms", "std_ms", "n", "load_ms", "speedup",
    "size_mb", "params", "macs", "macs_ratio", "top1", "accuracy_note",
    "hardware", "runtime", "backend", "threads", "fingerprint",
]

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    if not isinstance(exc, AmcError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- models


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

    @property
    def is_pte(self) -> bool:
        return self.loaded.pte_path is not None

    def describe(self) -> dict:
        return {"label": self.label, "ref": self.ref, "source": self.loaded.source, "params": self.params,
                "macs": self.macs, "size_mb": self.size_mb, "top1": self.top1,
                "accuracy_note": self.accuracy_note, "notes": self.notes, "load_error": self.load_error}


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


# ----------------------------------------------------------------------------- cells and devices


@dataclass
class Cell:
    """One model on one device."""

    model: str
    device: str
    status: str  # "ok", "skipped", "failed"
    stats: object | None = None  # device.LatencyStats when measured
    error: str | None = None  # "skipped: why" / "failed: why"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self, with_samples: bool = False) -> dict:
        d = {"model": self.model, "device": self.device, "status": self.status, "error": self.error}
        if self.stats is not None:
            d["stats"] = self.stats.to_dict(with_samples=with_samples)
        return d


@dataclass
class DeviceResult:
    uri: str
    cells: list[Cell]
    fingerprint: object | None = None  # device.Fingerprint
    error: str | None = None  # set when the whole device was skipped or failed
    seconds: float = 0.0

    @property
    def ran(self) -> bool:
        return any(c.ok for c in self.cells)


def _skip_all(uri: str, models: Sequence[ModelEntry], why: str, status: str = "skipped") -> DeviceResult:
    text = f"{status}: {why}"
    return DeviceResult(uri, [Cell(m.label, uri, status, error=text) for m in models], error=text)


def _pick_pte_result(results: list) -> object:
    if len(results) == 1:
        return results[0]
    for r in results:
        if r.name == "forward":
            return r
    return results[0]


def measure_device(device, models: Sequence[ModelEntry], config, log: Log | None = None,
                   prebuilt: tuple[Path, dict[str, str]] | None = None) -> DeviceResult:
    """Every model on one device (a URI, or an opened `device.Device`); never raises for a device
    problem: its cells say why. `prebuilt`: (the PyTorch models already lowered into one .pte as
    m0, m1, ..., {name: why it failed to lower}) for a device that can time a .pte."""
    from device import Candidate, PteDevice, open_device

    t0 = time.perf_counter()
    log = log or (lambda _msg: None)
    if isinstance(device, str):
        uri = device
        try:
            dev = open_device(uri)
        except AmcError as exc:
            return _skip_all(uri, models, one_line(exc))
        except Exception as exc:
            return _skip_all(uri, models, f"cannot open {uri}: {one_line(exc)}", status="failed")
    else:  # the caller's device: the caller closes it
        dev, uri = device, device.uri
    owned = dev is not device
    cells: dict[str, Cell] = {m.label: Cell(m.label, uri, "failed", error=f"not loaded: {m.load_error}")
                              for m in models if m.load_error}
    fp = None
    try:
        with dev if owned else contextlib.nullcontext(dev):
            try:
                fp = dev.fingerprint(config)
            except Exception as exc:
                log(f"{uri}: no fingerprint ({one_line(exc)})")
            modules = [m for m in models if m.loaded.module is not None]
            if modules:
                cands = [Candidate(f"m{i}", m.loaded.module, m.loaded.example_input) for i, m in enumerate(modules)]
                log(f"{uri}: measuring {len(cands)} model(s) in one batch ...")
                # --interleave: the first model (the original) is the drift reference in every round
                cfg = replace(config, reference=cands[0].name) if config.interleaved else config
                try:
                    if prebuilt is not None and isinstance(dev, PteDevice):
                        stats = _measure_prebuilt(dev, cands, prebuilt, cfg)
                    else:
                        stats = dev.measure(cands, cfg)
                    if cfg.interleaved and stats and stats[0].ok:
                        from device.noise import noise_figure, noise_sentence, pass_drift, robust_cv

                        ref = stats[0].samples_ms
                        log(f"{uri}: {noise_sentence(noise_figure(robust_cv(ref), pass_drift(ref)))}")
                except AmcError as exc:  # runner missing, bad affinity, ...: the device cannot run at all
                    return _finish(_skip_all(uri, models, one_line(exc)), fp, t0)
                except Exception as exc:
                    return _finish(_skip_all(uri, models, f"measuring failed: {one_line(exc)}", "failed"), fp, t0)
                for m, s in zip(modules, stats):
                    cells[m.label] = (Cell(m.label, uri, "ok", s) if s.ok
                                      else Cell(m.label, uri, "failed", s, f"failed: {s.error}"))
            for m in models:
                if not m.is_pte:
                    continue
                if not isinstance(dev, PteDevice):
                    cells[m.label] = Cell(m.label, uri, "skipped", error=(
                        f"skipped: {m.label} is a .pte (ExecuTorch program); {uri} runs PyTorch modules, "
                        f"not .pte files: measure it on local or adb, or pass its pruned-model folder"))
                    continue
                log(f"{uri}: measuring {m.label} (.pte) ...")
                try:
                    s = _pick_pte_result(dev.measure_pte(m.loaded.pte_path, None, config))
                except Exception as exc:
                    cells[m.label] = Cell(m.label, uri, "failed", error=f"failed: {one_line(exc)}")
                    continue
                cells[m.label] = (Cell(m.label, uri, "ok", s) if s.ok
                                  else Cell(m.label, uri, "failed", s, f"failed: {s.error}"))
    except Exception as exc:  # close() or anything unforeseen: keep what was measured
        for m in models:
            cells.setdefault(m.label, Cell(m.label, uri, "failed", error=f"failed: {one_line(exc)}"))
    return _finish(DeviceResult(uri, [cells[m.label] for m in models]), fp, t0)


def _measure_prebuilt(dev, cands, prebuilt: tuple[Path, dict[str, str]], config) -> list:
    from device.stats import LatencyStats

    path, failed = prebuilt
    names = [c.name for c in cands if c.name not in failed]
    got = {s.name: s for s in (dev.measure_pte(path, names, config) if names else [])}
    return [LatencyStats.failed(c.name, failed[c.name]) if c.name in failed else got[c.name] for c in cands]


def _is_phone(device) -> bool:
    uri = device if isinstance(device, str) else device.uri
    return uri.partition(":")[0] in PHONE_KINDS


@contextlib.contextmanager
def _lowered_once(models: Sequence[ModelEntry]):
    """The PyTorch models in one .pte (names m0, m1, ... as `measure_device` gives them)."""
    from device import Candidate
    from device.lowering import lower_to_pte

    modules = [m for m in models if m.loaded.module is not None]
    with tempfile.TemporaryDirectory(prefix="amc-compare-") as tmp:
        path = Path(tmp) / "models.pte"
        cands = [Candidate(f"m{i}", m.loaded.module, m.loaded.example_input) for i, m in enumerate(modules)]
        try:
            failed = lower_to_pte(cands, path) if cands else {}
        except Exception as exc:  # every phone's cells say why; the host devices' results stand
            failed = {c.name: f"lowering failed: {one_line(exc)}" for c in cands}
        yield path, failed


def measure_devices(uris: Sequence, models: Sequence[ModelEntry], config, log: Log,
                    on_done: Callable[[DeviceResult], None]) -> list[DeviceResult]:
    """Every device's results in the order of `uris`: host devices one after the other, then the
    phones in parallel when there are several (`on_done` is called for each as it finishes, under a
    lock)."""
    phones = [i for i, d in enumerate(uris) if _is_phone(d)] if sum(map(_is_phone, uris)) > 1 else []
    results: dict[int, DeviceResult] = {}
    for i, dev in enumerate(uris):
        if i not in phones:
            results[i] = measure_device(dev, models, config, log)
            on_done(results[i])
    if phones:
        lock = threading.Lock()
        log(f"compare: {len(phones)} phones in parallel")
        with _lowered_once(models) as prebuilt:
            def one(dev) -> DeviceResult:
                res = measure_device(dev, models, config, log, prebuilt=prebuilt)
                with lock:
                    on_done(res)
                return res

            with ThreadPoolExecutor(len(phones), thread_name_prefix="compare") as pool:
                futures = {i: pool.submit(one, uris[i]) for i in phones}
            results.update({i: f.result() for i, f in futures.items()})
    return [results[i] for i in range(len(uris))]


def _finish(res: DeviceResult, fp, t0: float) -> DeviceResult:
    res.fingerprint = fp
    res.seconds = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- accuracy


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


def _shape_str(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


# ----------------------------------------------------------------------------- result


@dataclass
class CompareResult:
    models: list[ModelEntry]
    devices: list[DeviceResult]
    config: object  # device.MeasureConfig
    run_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def original(self) -> ModelEntry:
        return self.models[0]

    def cell(self, model: str, device: str) -> Cell:
        for d in self.devices:
            if d.uri == device:
                for c in d.cells:
                    if c.model == model:
                        return c
        raise KeyError((model, device))

    @property
    def exit_code(self) -> int:
        cells = [c for d in self.devices for c in d.cells]
        return 0 if all(c.ok for c in cells) else 1

    def rows(self) -> list[dict]:
        nan = float("nan")
        orig = self.original
        rows = []
        for d in self.devices:
            base = next((c for c in d.cells if c.model == orig.label), None)
            base_ms = base.stats.median_ms if base is not None and base.ok else nan
            fp = d.fingerprint
            for i, m in enumerate(self.models):
                c = next(c for c in d.cells if c.model == m.label)
                s = c.stats if c.ok else None
                med = s.median_ms if s is not None else nan
                rows.append({
                    "model": m.label,
                    "role": "original" if i == 0 else "compressed",
                    "source": m.loaded.source,
                    "device": d.uri,
                    "status": c.status,
                    "error": c.error or "",
                    "median_ms": med,
                    "p90_ms": s.p90_ms if s is not None else nan,
                    "p10_ms": s.p10_ms if s is not None else nan,
                    "mean_ms": s.mean_ms if s is not None else nan,
                    "std_ms": s.std_ms if s is not None else nan,
                    "n": s.n if s is not None else 0,
                    "load_ms": (s.load_ms if s is not None and s.load_ms is not None else nan),
                    "speedup": base_ms / med if med > 0 and not math.isnan(base_ms) else nan,
                    "size_mb": _num(m.size_mb),
                    "params": _num(m.params),
                    "macs": _num(m.macs),
                    "macs_ratio": (m.macs / orig.macs if m.macs is not None and orig.macs else nan),
                    "top1": _num(m.top1),
                    "accuracy_note": m.accuracy_note or "",
                    "hardware": fp.hardware if fp else "",
                    "runtime": fp.runtime if fp else "",
                    "backend": fp.backend if fp else "",
                    "threads": fp.threads if fp else "",
                    "fingerprint": fp.digest() if fp else "",
                })
        return rows

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.rows(), columns=COLUMNS)


def _num(x) -> float:
    return float("nan") if x is None else x


# ----------------------------------------------------------------------------- printing


def _f(x, fmt: str, dash: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)) or x == "":
        return dash
    return format(x, fmt)




def format_table(rows: list[dict]) -> str:
    """The console table: one line per model x device; a failed cell shows its reason."""
    mw = max([len(r["model"]) for r in rows] + [5])
    dw = max([len(r["device"]) for r in rows] + [6])
    head = (f"{'model':{mw}s}  {'device':{dw}s}  {'median ms':>9s}  {'p90 ms':>8s}  {'speedup':>7s}  "
            f"{'MACs':>7s}  {'params':>7s}  {'size MB':>7s}  {'top-1':>6s}")
    out = [head, "-" * len(head)]
    for r in rows:
        left = f"{r['model']:{mw}s}  {r['device']:{dw}s}  "
        if r["status"] != "ok":
            out.append(left + r["error"])
            continue
        sp = r["speedup"]
        out.append(left + f"{_f(r['median_ms'], '.3f'):>9s}  {_f(r['p90_ms'], '.3f'):>8s}  "
                   f"{(_f(sp, '.2f') + 'x') if not math.isnan(sp) else '-':>7s}  {si(r['macs']):>7s}  "
                   f"{si(r['params']):>7s}  {_f(r['size_mb'], '.2f'):>7s}  "
                   f"{(_f(r['top1'] * 100, '.2f') + '%') if not math.isnan(r['top1']) else '-':>6s}")
    return "\n".join(out)


def summary_lines(result: CompareResult) -> list[str]:
    """Headline sentences: `pruned (48% MACs): 2.10x on local, 1.40x on cuda:0`."""
    rows = result.rows()
    lines = []
    for m in result.models[1:]:
        parts = []
        for d in result.devices:
            r = next(r for r in rows if r["model"] == m.label and r["device"] == d.uri)
            parts.append(f"{r['speedup']:.2f}x on {d.uri}" if not math.isnan(r["speedup"]) else f"n/a on {d.uri}")
        ratio = f" ({m.macs / result.original.macs:.0%} MACs)" if m.macs and result.original.macs else ""
        lines.append(f"{m.label}{ratio} vs {result.original.label}: " + ", ".join(parts))
    return lines


# ----------------------------------------------------------------------------- charts


def _wrap(text: str, width: int = 110) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def plot_speedup(result: CompareResult, path: Path) -> Path:
    """Grouped bars: speedup per device (groups) per model (bars), a y=1 line, x-labels on bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result.rows()
    models = result.models[1:] or result.models[:1]
    devices = [d.uri for d in result.devices]
    n_m, n_d = len(models), len(devices)
    width = 0.8 / n_m
    fig_w = max(6.0, 1.6 + n_d * (0.9 + 0.55 * n_m))
    notes = [f"{d.uri}: {d.error}" for d in result.devices if d.error]
    fig, ax = plt.subplots(figsize=(fig_w, 4.6 + 0.22 * sum(len(_wrap(n).splitlines()) for n in notes)))
    colors = plt.get_cmap("tab10").colors
    ymax = 1.0
    x = np.arange(n_d)
    for j, m in enumerate(models):
        heights = []
        for uri in devices:
            r = next(r for r in rows if r["model"] == m.label and r["device"] == uri)
            heights.append(r["speedup"])
        pos = x - 0.4 + width * (j + 0.5)
        label = m.label + (f" ({m.macs / result.original.macs:.0%} MACs)" if m.macs and result.original.macs else "")
        h = np.array([0.0 if math.isnan(v) else v for v in heights])
        bars = ax.bar(pos, h, width * 0.92, label=label, color=colors[j % len(colors)])
        for b, v, d in zip(bars, heights, result.devices):
            if math.isnan(v):
                if not d.error:  # a whole skipped device gets one label below, not one per bar
                    ax.text(b.get_x() + b.get_width() / 2, 0.03, "n/a", ha="center", va="bottom", fontsize=8,
                            color="0.4", rotation=90)
            else:
                ymax = max(ymax, v)
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}\u00d7", ha="center", va="bottom", fontsize=9)
    ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
    for i, d in enumerate(result.devices):
        if d.error:
            ax.text(i, 0.5, d.error.split(":")[0] + "\n(see note below)", ha="center", va="center", fontsize=9,
                    color="firebrick")
    ax.text(ax.get_xlim()[1] if n_d else 0, 1.0, f" {result.original.label} = 1\u00d7", va="bottom", ha="right",
            fontsize=8, color="0.3")
    ticks = []
    for d in result.devices:
        t = d.uri
        if d.fingerprint is not None:
            t += "\n" + textwrap.shorten(d.fingerprint.hardware, 28, placeholder="...")
        if d.error:
            t += "\n(" + d.error.split(":")[0] + ")"
        ticks.append(t)
    ax.set_xticks(x, ticks, fontsize=9)
    ax.set_ylim(0, ymax * 1.18)
    ax.set_ylabel(f"speedup over {result.original.label} (median latency)")
    ax.set_title("Measured speedup per device")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    if notes:
        fig.text(0.01, 0.01, "\n".join(_wrap(n) for n in notes), fontsize=7.5, color="firebrick",
                 va="bottom", ha="left")
        n_lines = sum(len(_wrap(n).splitlines()) for n in notes)
        fig.tight_layout(rect=(0, min(0.45, 0.035 * n_lines + 0.02), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(result: CompareResult, path: Path) -> Path | None:
    """One panel per device that measured something: median latency per model, p10..p90 whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows()
    devices = [d for d in result.devices if d.ran]
    if not devices:
        return None
    labels = [m.label for m in result.models]
    fig, axes = plt.subplots(1, len(devices), figsize=(max(5.0, 4.2 * len(devices)), 0.9 + 0.45 * len(labels) + 1),
                             squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, d in zip(axes[0], devices):
        vals, lo, hi = [], [], []
        for lbl in labels:
            r = next(r for r in rows if r["model"] == lbl and r["device"] == d.uri)
            med = 0.0 if math.isnan(r["median_ms"]) else r["median_ms"]
            vals.append(med)
            lo.append(0.0 if math.isnan(r["p10_ms"]) else max(0.0, med - r["p10_ms"]))
            hi.append(0.0 if math.isnan(r["p90_ms"]) else max(0.0, r["p90_ms"] - med))
        ys = list(range(len(labels)))
        ax.barh(ys, vals, xerr=[lo, hi], color=[colors[(i - 1) % len(colors)] if i else "0.55"
                                                 for i in range(len(labels))], capsize=3)
        for y, v, h in zip(ys, vals, hi):
            ax.text(v + h, y, f"  {v:.3g} ms" if v else "  n/a", va="center", fontsize=8)
        ax.set_yticks(ys, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("latency, ms (median; whiskers p10..p90)")
        title = d.uri if d.fingerprint is None else f"{d.uri}: {textwrap.shorten(d.fingerprint.hardware, 30)}"
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, max([v + h for v, h in zip(vals, hi)] + [1e-3]) * 1.25)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the whole run


def check_device_uris(uris: Sequence) -> list:
    """Drop duplicates; an unknown scheme is a typo, an AmcError before anything runs.
    Opened `device.Device` objects pass through."""
    from device import known_schemes

    out: list = []
    for uri in uris:
        if not isinstance(uri, str):
            out.append(uri)
            continue
        scheme = uri.partition(":")[0]
        if scheme not in known_schemes():
            raise AmcError(f"unknown device URI {uri!r}: expected local, cuda:N, adb:SERIAL, adb-tcp:HOST:PORT "
                           f"or adb-server:HOST:PORT/SERIAL")
        if uri not in out:
            out.append(uri)
    if not out:
        raise AmcError("no device to compare on: pass --devices local (and e.g. adb:SERIAL, cuda:0)")
    return out


def _append_jsonl(path: Path, obj: dict) -> None:
    line = json.dumps(obj, default=str, sort_keys=True) + "\n"
    with open(path, "a") as f:  # one write per device: a whole line or nothing
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def run_compare(
    refs: Sequence[str],
    devices: Sequence,  # URIs, or opened device.Device objects
    config=None,
    *,
    out: str | Path | None = None,
    allow_pickle: bool = False,
    labels: Sequence[str] | None = None,
    accuracy: bool = False,
    data_dir: str | None = None,
    accuracy_images: int | None = None,
    argv: list[str] | None = None,
    report: bool = True,
    log: Log | None = _stderr,
    original_options=None,
) -> CompareResult:
    """Load, measure every model on every device, write the run folder. Bad models raise AmcError."""
    from device import MeasureConfig

    log = log or (lambda _msg: None)
    config = config or MeasureConfig()
    uris = check_device_uris(devices)
    models = load_models(refs, allow_pickle=allow_pickle, labels=labels, keep_going=True,
                         original_options=original_options)
    for m in models:
        if m.load_error:
            log(f"{m.label}: {m.load_error}")
    if accuracy:
        from amc_mobile.data import find_data_dir

        find_data_dir(data_dir)  # missing data is an error now, not after minutes of measuring
    run_dir = new_run_dir(KIND, out)
    meas_path = run_dir / MEASUREMENTS_FILE
    base_manifest = {
        "models": [m.describe() for m in models],
        "devices": [u if isinstance(u, str) else u.uri for u in uris],
        "config": config.to_dict(),
    }
    write_manifest(run_dir, KIND, argv, status="running", **base_manifest)
    log(f"compare: {len(models)} model(s) x {len(uris)} device(s) -> {run_dir}")

    def on_done(res: DeviceResult) -> None:
        if res.error:
            log(f"{res.uri}: {res.error}")
        _append_jsonl(meas_path, {
            "device": res.uri,
            "fingerprint": res.fingerprint.to_dict() if res.fingerprint else None,
            "error": res.error,
            "seconds": round(res.seconds, 3),
            "config": config.to_dict(),
            "cells": [c.to_dict(with_samples=True) for c in res.cells],
        })

    results = measure_devices(uris, models, config, log, on_done)

    if accuracy:
        add_accuracy(models, data_dir, accuracy_images, log)

    result = CompareResult(models, results, config, run_dir)
    table = result.table()
    csv_path = run_dir / CSV_FILE
    atomic_write(csv_path, table.to_csv(index=False))
    result.files["csv"] = csv_path
    for key, fn, name in (("speedup", plot_speedup, SPEEDUP_PNG), ("latency", plot_latency, LATENCY_PNG)):
        try:
            p = fn(result, run_dir / name)
            if p is not None:
                result.files[key] = p
        except Exception as exc:  # a chart must never lose the table
            log(f"could not draw {name}: {one_line(exc)}")

    write_manifest(
        run_dir, KIND, argv,
        status="done" if result.exit_code == 0 else "done with errors",
        **{**base_manifest, "models": [m.describe() for m in models]},
        fingerprints={d.uri: d.fingerprint.to_dict() if d.fingerprint else None for d in results},
        device_errors={d.uri: d.error for d in results if d.error},
        summary=summary_lines(result),
        files={k: p.name for k, p in result.files.items()},
    )
    if report:
        from amc_mobile.report import write_report

        try:
            html_path, md_path = write_report(run_dir)
            result.files["report"] = html_path
            if md_path is not None:
                result.files["report_md"] = md_path
        except Exception as exc:  # the measurements are on disk; `amc-mobile report` can retry
            log(f"could not write the report: {one_line(exc)} (retry with `amc-mobile report {run_dir}`)")
    return result
