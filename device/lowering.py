"""Lower candidates to one multi-method ExecuTorch `.pte` with the XNNPACK delegate."""

from __future__ import annotations

import contextlib
import functools
import gc
import re
import threading
from pathlib import Path
from typing import Sequence

import torch

from .errors import AmcError
from .files import atomic_write

from .base import Candidate


# The two exporter speed-ups below replace torch internals, so they are installed only while we
# lower (`exporter_speedups`, entered by `lower_to_pte`) and only on the torch they were read from:
# training and search code in the same process run under stock torch.
_SPEEDUPS_TORCH = "2.13.0"
_speedups_lock = threading.Lock()
_speedups_depth = 0
_saved: dict = {}
_cia_cached = None  # one memoised wrapper for the whole process, so its cache outlives each batch


def _cia_targets():
    import torch._export.utils as utils
    import torch.export.decomp_utils as decomp_utils
    import torch.export.exported_program as exported_program

    return (utils, decomp_utils, exported_program)


def _install_cia_cache() -> None:
    """torch.export rebuilds the set of CompositeImplicitAutograd ops on every run_decompositions
    call (several per method); it never changes within a process, so memoise it. Measured ~25% off
    the lowering time of small units."""
    global _cia_cached
    try:
        mods = _cia_targets()
    except ImportError:
        return
    original = mods[0]._collect_all_valid_cia_ops
    if _cia_cached is None or _cia_cached.__wrapped__ is not original:
        _cia_cached = functools.lru_cache(maxsize=None)(original)
    for mod in mods:
        if mod.__dict__.get("_collect_all_valid_cia_ops") is original:
            _saved[(mod, "_collect_all_valid_cia_ops")] = original
            mod._collect_all_valid_cia_ops = _cia_cached


def _py_impl_without_runtime_annotations(self, k):
    """`OperatorBase.py_impl`, check for check, minus one cost: torch's version defines its inner
    function with `Callable[_P, _T]` annotations, which Python evaluates (two generic aliases) on
    every call. `_override_composite_implicit_decomp` calls it ~12,000 times per
    `run_decompositions` (~560 composite ops x their dispatch keys; 3 calls per method).
    benchmarks/lowering_speed.py measures this and `_collector_paused` together against stock."""
    from torch._C import DispatchKey

    def inner(fn):
        if type(k) is not DispatchKey:  # modes, tensor subclasses, transforms: torch's own code
            return _saved[("py_impl",)](self, k)(fn)
        if k == DispatchKey.Python:
            raise AssertionError("Please register a mode for the DispatchKey.Python key instead.")
        if k in self.py_kernels:
            raise RuntimeError(f"Trying to override a python impl for {k} on operator {self.name()}")
        self.py_kernels[k] = fn
        self._dispatch_cache.clear()
        return fn

    return inner


def speedups_apply() -> bool:
    """Whether this torch is the one the speed-ups were read from (else lowering runs stock torch)."""
    return torch.__version__.split("+")[0] == _SPEEDUPS_TORCH


@contextlib.contextmanager
def exporter_speedups():
    """The exporter speed-ups installed for the duration (re-entrant, thread-safe), torch's own
    functions restored after, also on an error."""
    global _speedups_depth
    import torch._ops as ops

    with _speedups_lock:
        if _speedups_depth == 0 and speedups_apply():
            _install_cia_cache()
            _saved[("py_impl",)] = ops.OperatorBase.py_impl
            ops.OperatorBase.py_impl = _py_impl_without_runtime_annotations
        _speedups_depth += 1
    try:
        yield
    finally:
        with _speedups_lock:
            _speedups_depth -= 1
            if _speedups_depth == 0:
                original = _saved.pop(("py_impl",), None)
                if original is not None:
                    ops.OperatorBase.py_impl = original
                for key in [k for k in _saved if k != ("py_impl",)]:
                    mod, name = key
                    setattr(mod, name, _saved.pop(key))


def _short_reason(exc: BaseException) -> str:
    """First meaningful line of an export/lowering error, with the op or layer it names."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(exc).__name__
    # torch.export errors often name the offending op or module further down.
    for ln in lines[1:]:
        m = re.search(r"(aten\.[\w.]+|torch\.ops\.[\w.]+|File \".*\", line \d+, in \w+)", ln)
        if m and m.group(0) not in first:
            first = f"{first} ({m.group(0)})"
            break
    return first[:300]


def export_candidate(c: Candidate) -> torch.export.ExportedProgram:
    module = c.module.eval()
    try:
        with torch.no_grad():
            return torch.export.export(module, (c.example_input,), strict=False)
    except Exception as exc:
        raise AmcError(f"candidate {c.name!r} does not export: {_short_reason(exc)}") from exc


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic collector off while ExecuTorch lowers: lowering allocates hundreds of
    thousands of short-lived objects, which trigger full collections over torch's huge heap again
    and again. Paused for a whole batch (export and lowering), so that it resumes once. With the
    py_impl change: 0.85 -> 0.54 s per method for 20 units (benchmarks/lowering_speed.py); the cost
    is ~65 MB more peak memory per batch of 20, released when collection resumes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _lower(programs: dict[str, torch.export.ExportedProgram]) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
    return edge.to_executorch().buffer


def lower_to_pte(candidates: Sequence[Candidate], path: Path, *, shared: bool = True) -> dict[str, str]:
    """Write one `.pte` holding a method per candidate; returns {name: why} for those left out.

    A candidate that fails to export or lower is left out with its reason rather
    than failing the batch: in a table build one odd shape must not lose the rest.
    `shared`: lower a batch once for all its methods where it can (device/shared_lowering.py);
    False lowers one program per method, as ExecuTorch's multi-method API does.
    """
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError("candidate names must be unique within a batch")
    with _collector_paused(), exporter_speedups():
        return _lower_candidates(candidates, path, shared)


def _lower_shared(candidates: Sequence[Candidate]) -> bytes | None:
    """The batch lowered once per chunk (device/shared_lowering.py), or None: then one by one."""
    from .shared_lowering import lower_shared, worth_sharing

    if not worth_sharing(candidates):
        return None
    try:
        return lower_shared(candidates)
    except Exception:  # one candidate that will not export or lower: the per-method path names it
        return None


def _lower_candidates(candidates: Sequence[Candidate], path: Path, shared: bool) -> dict[str, str]:
    if shared:
        buffer = _lower_shared(candidates)
        if buffer is not None:
            atomic_write(path, buffer, durable=False)
            return {}
    failed: dict[str, str] = {}
    programs: dict[str, torch.export.ExportedProgram] = {}
    for c in candidates:
        try:
            programs[c.name] = export_candidate(c)
        except AmcError as exc:
            failed[c.name] = str(exc)
    if not programs:
        return failed
    try:
        buffer = _lower(programs)
    except Exception:
        if len(programs) == 1:
            name = next(iter(programs))
            exc_info = _lower_error(programs)
            failed[name] = f"candidate {name!r} does not lower to XNNPACK: {exc_info}"
            return failed
        # Find the culprit(s) one by one, keep the rest in one program.
        good = {}
        for name, prog in programs.items():
            reason = _lower_error({name: prog})
            if reason is None:
                good[name] = prog
            else:
                failed[name] = f"candidate {name!r} does not lower to XNNPACK: {reason}"
        if not good:
            return failed
        buffer = _lower(good)
    atomic_write(path, buffer, durable=False)
    return failed


def _lower_error(programs) -> str | None:
    try:
        _lower(programs)
        return None
    except Exception as exc:
        return _short_reason(exc)
