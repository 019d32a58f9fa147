"""`cuda:N`: time candidates as eager PyTorch modules on an NVIDIA GPU, with CUDA events.

URI form (the one way to choose the options; the constructor takes the same ones):

    cuda:0                          GPU 0, fp32 (PyTorch defaults: cuDNN may use TF32 for convolutions)
    cuda:0?dtype=fp16               GPU 0, module and input cast to half precision
    cuda:1?dtype=fp16&channels_last=1
                                    also NHWC memory layout for the module and a 4-D input
    cuda:0?batch=50                 the example input repeated to a batch of 50 along dim 0
                                    (latency is per batch: how a GPU is used for throughput)
    cuda:0?graph=1                  the forward captured once as a CUDA graph and replayed:
                                    no per-kernel launch cost, what a deployed GPU model pays

    CudaDevice(index=0, dtype="fp16", channels_last=False)   # the same, from Python

The options change what is measured, so they are part of the fingerprint's `backend`:
"cuda-fp32", "cuda-fp16", "cuda-fp16-channels_last" when that layout is on, then "-b50" for a
batch other than 1 and "-graph" for graph replay (e.g. "cuda-fp16-b50-graph").

How a candidate is timed (`measure`):

- the caller's module is deep-copied, then the copy is moved to the GPU (and cast / re-laid-out);
  the caller's module is never touched. The copy time, up to a synchronize, is `load_ms`.
- `torch.backends.cudnn.benchmark = True` while measuring (restored afterwards), `module.eval()`,
  `torch.inference_mode()`.
- one untimed priming call (lazy CUDA init, cuDNN autotuning), then `config.warmup` untimed calls,
  `torch.cuda.synchronize()`.
- per timed iteration one start/end `torch.cuda.Event` pair recorded on the current stream around
  the forward call; one synchronize at the end; `elapsed_time` of each pair is a sample in ms.
  Small models are launch-bound: the samples then include the GPU waiting for the CPU's kernel
  launches, which is what an eager-mode caller pays too.
- with `graph=1`: after the warm-up (run on a side stream, as CUDA graph capture requires) the
  forward is captured into a `torch.cuda.CUDAGraph` and each timed iteration is one `replay()`.
  A module that cannot be captured (host synchronisation, dynamic shapes) fails with the reason.
- `config.iterations` samples, more while their sum is under `config.min_time_ms`;
  `config.repeats` times (each a fresh copy on the GPU), samples pooled.
- `config.threads` and `config.affinity` do not apply (fingerprint threads = 0, affinity None).
- a candidate that fails (out of memory, unsupported op, exception in forward) gets
  `LatencyStats.failed(name, reason)`; GPU memory is freed after every candidate.
  One exception: a device-side assert poisons the CUDA context, so every later candidate fails too.
- `progress(1)` is called after each candidate, whatever its outcome (fits `tqdm.update`).
"""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import math
import re
import subprocess
import time
import warnings
from typing import Sequence

import torch

from .errors import AmcError

from .base import Candidate, Device, Fingerprint, MeasureConfig, ProgressFn, tick
from .stats import LatencyStats, merge_repeats

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}
_INDEX_RE = re.compile(r"^[0-9]+$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# A forward taking ~1 us with min_time_ms=1e4 would want 1e7 events; stop well before that.
_MAX_SAMPLES = 200_000
_MAX_BATCH = 65536


def _uri_help() -> str:
    return (
        "expected cuda:N with N a GPU index (e.g. cuda:0), "
        "options ?dtype=fp32|fp16&channels_last=0|1&batch=N&graph=0|1"
    )


def _flag(uri: str, key: str, value: str) -> bool:
    if value.lower() not in _TRUE | _FALSE:
        raise AmcError(f"bad device URI {uri!r}: {key}={value!r} must be 0 or 1")
    return value.lower() in _TRUE


def parse_uri_rest(rest: str) -> tuple[int, dict]:
    """`"0?dtype=fp16"` -> `(0, {"dtype": "fp16", ...defaults})`; malformed -> AmcError."""
    uri = f"cuda:{rest}"
    index_s, _, query = rest.partition("?")
    if not _INDEX_RE.match(index_s):
        raise AmcError(f"bad device URI {uri!r}: {_uri_help()}")
    options: dict = {"dtype": "fp32", "channels_last": False, "batch": 1, "graph": False}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq:
            raise AmcError(f"bad device URI {uri!r}: option {item!r} needs a value; {_uri_help()}")
        if key == "dtype":
            if value not in DTYPES:
                raise AmcError(f"bad device URI {uri!r}: dtype {value!r} is not one of {', '.join(DTYPES)}")
            options["dtype"] = value
        elif key in ("channels_last", "graph"):
            options[key] = _flag(uri, key, value)
        elif key == "batch":
            if not _INDEX_RE.match(value) or not 1 <= int(value) <= _MAX_BATCH:
                raise AmcError(f"bad device URI {uri!r}: batch={value!r} must be a whole number 1..{_MAX_BATCH}")
            options["batch"] = int(value)
        else:
            raise AmcError(f"bad device URI {uri!r}: unknown option {key!r}; {_uri_help()}")
    return int(index_s), options


def _cuda_usable() -> bool:
    """torch.cuda.is_available() without its warning when a driver is missing."""
    if torch.version.cuda is None:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(torch.cuda.is_available())


def _check_available(index: int) -> None:
    name = f"cuda:{index}"
    if torch.version.cuda is None:
        raise AmcError(
            f"{name} is not available: torch was built without CUDA (torch {torch.__version__}); "
            "install a CUDA build of PyTorch, or measure on `local`"
        )
    count = torch.cuda.device_count() if _cuda_usable() else 0
    if count == 0:
        raise AmcError(
            f"{name} is not available: no NVIDIA GPU visible (torch {torch.__version__}); "
            "check `nvidia-smi` and CUDA_VISIBLE_DEVICES"
        )
    if index >= count:
        plural = "GPU" if count == 1 else "GPUs"
        valid = "cuda:0" if count == 1 else f"cuda:0 .. cuda:{count - 1}"
        raise AmcError(f"{name} out of range ({count} {plural}); use {valid}")


def discover() -> list[tuple[str, str]]:
    """[("cuda:N", "<GPU name>, <mem> GiB, CUDA <ver>")], or [] when torch has no CUDA or sees no GPU."""
    if not _cuda_usable():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        found.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}"))
    return found


@functools.lru_cache(maxsize=None)
def _driver_version(index: int) -> str | None:
    """The NVIDIA driver release (e.g. "580.159.04"): NVML first, then nvidia-smi; None if neither answers."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            try:
                buf = ctypes.create_string_buffer(96)
                if nvml.nvmlSystemGetDriverVersion(buf, ctypes.c_uint(96)) == 0:
                    return buf.value.decode()
            finally:
                nvml.nvmlShutdown()
    except (OSError, AttributeError):
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={index}"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return out.splitlines()[0].strip() if out else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return reason[:300]


def _free_gpu_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


class CudaDevice(Device):
    """One NVIDIA GPU; candidates run as eager PyTorch modules in `dtype` ("fp32" or "fp16")."""

    def __init__(
        self, index: int = 0, dtype: str = "fp32", channels_last: bool = False, batch: int = 1, graph: bool = False
    ):
        if dtype not in DTYPES:
            raise AmcError(f"cuda dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not 1 <= int(batch) <= _MAX_BATCH:
            raise AmcError(f"cuda batch {batch!r} must be a whole number 1..{_MAX_BATCH}")
        if index < 0:
            raise AmcError(f"cuda:{index} is not a GPU index: {_uri_help()}")
        _check_available(index)
        self.index = index
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.batch = int(batch)
        self.graph = bool(graph)
        self.torch_device = torch.device("cuda", index)
        opts = []
        if dtype != "fp32":
            opts.append(f"dtype={dtype}")
        if self.channels_last:
            opts.append("channels_last=1")
        if self.batch != 1:
            opts.append(f"batch={self.batch}")
        if self.graph:
            opts.append("graph=1")
        self.uri = f"cuda:{index}" + ("?" + "&".join(opts) if opts else "")
        self._props = torch.cuda.get_device_properties(index)

    @classmethod
    def from_uri_rest(cls, rest: str) -> "CudaDevice":
        index, options = parse_uri_rest(rest)
        return cls(index, **options)

    # -- description ---------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return (
            f"cuda-{self.dtype}"
            + ("-channels_last" if self.channels_last else "")
            + (f"-b{self.batch}" if self.batch != 1 else "")
            + ("-graph" if self.graph else "")
        )

    def fingerprint(self, config: MeasureConfig | None = None) -> Fingerprint:
        p = self._props
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        extra = {
            "gpu_index": self.index,
            "driver": _driver_version(self.index),
            "compute_capability": f"{p.major}.{p.minor}",
            "cudnn": cudnn,
            "cudnn_benchmark": True,
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count,
        }
        return Fingerprint(
            kind="cuda",
            hardware=p.name,
            runtime=f"torch-{torch.__version__}-cuda-{torch.version.cuda}",
            backend=self.backend,
            threads=0,  # not applicable on a GPU
            affinity=None,
            extra=extra,
        )

    def info(self) -> dict:
        return {"uri": self.uri, **self.fingerprint().to_dict()}

    # -- measuring ------------------------------------------------------------------------------

    def measure(
        self,
        candidates: Sequence[Candidate],
        config: MeasureConfig = MeasureConfig(),
        progress: ProgressFn | None = None,
    ) -> list[LatencyStats]:
        results: list[LatencyStats] = []
        saved_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            with torch.cuda.device(self.index):
                for cand in candidates:
                    results.append(self._measure_candidate(cand, config))
                    tick(progress)
        finally:
            torch.backends.cudnn.benchmark = saved_benchmark
        return results

    def _measure_candidate(self, cand: Candidate, config: MeasureConfig) -> LatencyStats:
        runs = []
        for _ in range(max(1, config.repeats)):
            reason = None
            try:
                runs.append(self._run_once(cand, config))
            except Exception as exc:  # OOM, unsupported op, a forward that raises: this candidate only
                reason = _one_line(exc)
            # the except block is over: the traceback (and the GPU tensors its frames hold) is gone
            _free_gpu_memory()
            if reason is not None:
                return LatencyStats.failed(cand.name, reason)
        return runs[0] if len(runs) == 1 else merge_repeats(cand.name, runs)

    def _run_once(self, cand: Candidate, config: MeasureConfig) -> LatencyStats:
        t0 = time.perf_counter()
        module, x = self._to_device(cand)
        torch.cuda.synchronize(self.torch_device)
        load_ms = (time.perf_counter() - t0) * 1e3

        with torch.inference_mode():
            if self.graph:
                forward = self._captured(module, x, config.warmup)
            else:
                module(x)  # priming: lazy initialisation, cuDNN autotuning; never timed
                for _ in range(max(0, config.warmup)):
                    module(x)
                torch.cuda.synchronize(self.torch_device)
                forward = functools.partial(module, x)

            samples = self._timed(forward, max(1, config.iterations))
            total = sum(samples)
            while config.min_time_ms and total < config.min_time_ms and len(samples) < _MAX_SAMPLES:
                mean = max(total / len(samples), 1e-4)
                more = math.ceil((config.min_time_ms - total) / mean)
                more = max(1, min(more, _MAX_SAMPLES - len(samples)))
                chunk = self._timed(forward, more)
                samples.extend(chunk)
                total += sum(chunk)
        return LatencyStats.from_samples(cand.name, samples, load_ms=load_ms)

    def _to_device(self, cand: Candidate) -> tuple[torch.nn.Module, torch.Tensor]:
        module = copy.deepcopy(cand.module).to(self.torch_device)
        x = cand.example_input.detach()
        if self.batch != 1:
            if x.dim() == 0 or x.shape[0] != 1:
                raise AmcError(
                    f"batch={self.batch} needs an example input with batch size 1, got shape {tuple(x.shape)}"
                )
            x = x.repeat(self.batch, *([1] * (x.dim() - 1)))
        x = x.to(self.torch_device)
        if self.dtype != "fp32":
            module = module.to(DTYPES[self.dtype])
            if x.is_floating_point():
                x = x.to(DTYPES[self.dtype])
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
        module.eval()
        return module, x

    def _captured(self, module: torch.nn.Module, x: torch.Tensor, warmup: int):
        """Warm up on a side stream (capture needs it), capture one forward; returns its replay."""
        side = torch.cuda.Stream(self.torch_device)
        side.wait_stream(torch.cuda.current_stream(self.torch_device))
        with torch.cuda.stream(side):
            for _ in range(max(3, warmup + 1)):  # >= 3: cuDNN autotuning must be over before capture
                module(x)
        torch.cuda.current_stream(self.torch_device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            module(x)  # the output stays in the graph's private pool; only the time matters here
        graph.replay()
        torch.cuda.synchronize(self.torch_device)
        return graph.replay

    def _timed(self, forward, n: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for start, end in zip(starts, ends):
            start.record()
            forward()
            end.record()
        torch.cuda.synchronize(self.torch_device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]
