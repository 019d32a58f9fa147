"""Every model on every device: one `measure_models` batch per device (the original, first, is the
drift reference in every round with --interleave), a `.pte` model through the device's `measure_pte`,
several phones in parallel on one lowering; a device that cannot run marks its cells with why."""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from amc_mobile.errors import AmcError
from amc_mobile.measure_models import Lowered, measure_candidates

from .load import ModelEntry
from .messages import Log, one_line

EXECUTORCH_KINDS = ("local", "adb", "adb-tcp", "adb-server")
PHONE_KINDS = ("adb", "adb-tcp", "adb-server")


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
                   prebuilt: Lowered | None = None) -> DeviceResult:
    """Every model on one device (a URI, or an opened `device.Device`); never raises for a device
    problem: its cells say why. `prebuilt`: the PyTorch models already lowered into one .pte as
    m0, m1, ... (`_lowered_once`), for a device that can time a .pte."""
    from device import PteDevice, open_device

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
                cands = _candidates(modules)
                log(f"{uri}: measuring {len(cands)} model(s) in one batch ...")
                # --interleave: the first model (the original) is the drift reference in every round
                cfg = replace(config, reference=cands[0].name) if config.interleaved else config
                try:
                    measured = measure_candidates(dev, cands, cfg, lowered=prebuilt, fingerprint=False)
                    stats = measured.stats()
                    if cfg.interleaved and stats and stats[0].ok:
                        from device.noise import noise_sentence

                        log(f"{uri}: {noise_sentence(measured.noise(cands[0].name))}")
                except AmcError as exc:  # runner missing, bad affinity, ...: the device cannot run at all
                    return _finish(_skip_all(uri, models, one_line(exc)), fp, t0)
                except Exception as exc:
                    return _finish(_skip_all(uri, models, f"measuring failed: {one_line(exc)}", "failed"), fp, t0)
                for m, s in zip(modules, stats):
                    cells[m.label] = _cell(m, uri, s)
            for m in models:
                if not m.is_pte:
                    continue
                if not isinstance(dev, PteDevice) and m.loaded.source == "quantized":
                    cells[m.label] = Cell(m.label, uri, "skipped", error=(
                        f"skipped: {m.label} is int8 for XNNPACK ({m.precision} layers); {uri} runs PyTorch "
                        f"modules in fp32 and has no int8 kernels here: int8 is measured on local and adb"))
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
                cells[m.label] = _cell(m, uri, s)
    except Exception as exc:  # close() or anything unforeseen: keep what was measured
        for m in models:
            cells.setdefault(m.label, Cell(m.label, uri, "failed", error=f"failed: {one_line(exc)}"))
    return _finish(DeviceResult(uri, [cells[m.label] for m in models]), fp, t0)


def _cell(m: ModelEntry, uri: str, s) -> Cell:
    return Cell(m.label, uri, "ok", s) if s.ok else Cell(m.label, uri, "failed", s, f"failed: {s.error}")


def _candidates(modules: Sequence[ModelEntry]) -> list:
    """The PyTorch models as candidates m0, m1, ... (method names: a label need not be an identifier)."""
    from device import Candidate

    return [Candidate(f"m{i}", m.loaded.module, m.loaded.example_input) for i, m in enumerate(modules)]


def _is_phone(device) -> bool:
    uri = device if isinstance(device, str) else device.uri
    return uri.partition(":")[0] in PHONE_KINDS


@contextlib.contextmanager
def _lowered_once(models: Sequence[ModelEntry]):
    """The PyTorch models in one .pte (names m0, m1, ... as `measure_device` gives them)."""
    from device.lowering import lower_to_pte

    cands = _candidates([m for m in models if m.loaded.module is not None])
    with tempfile.TemporaryDirectory(prefix="amc-compare-") as tmp:
        path = Path(tmp) / "models.pte"
        try:
            failed = lower_to_pte(cands, path) if cands else {}
        except Exception as exc:  # every phone's cells say why; the host devices' results stand
            failed = {c.name: f"lowering failed: {one_line(exc)}" for c in cands}
        yield Lowered(path, failed)


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
