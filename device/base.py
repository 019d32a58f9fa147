"""The Device interface: measure a batch of candidates, describe what makes measurements comparable."""

from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import torch

from .stats import LatencyStats

_METHOD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def example_input(shape: Sequence[int]) -> torch.Tensor:
    """The input a model of input shape `shape` (C, H, W) is exported and timed with, batch 1: seeded,
    so the same model lowers to the same `.pte` bytes."""
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))


@dataclass
class Candidate:
    """One thing to time: a module and an example input; `name` becomes the .pte method name."""

    name: str
    module: torch.nn.Module
    example_input: torch.Tensor

    def __post_init__(self) -> None:
        if not _METHOD_RE.match(self.name):
            raise ValueError(f"candidate name {self.name!r} must be an identifier (it becomes a method name)")


@dataclass(frozen=True)
class MeasureConfig:
    """How to time each candidate. Devices pick sane defaults for what is None."""

    warmup: int = 10  # untimed runs first: caches, page faults, frequency ramp-up
    iterations: int = 50  # timed runs per candidate
    min_time_ms: float = 0.0  # keep iterating until this much time was timed, if more than `iterations`
    threads: int | None = None  # None: the device's default (1 on the host, the big cores on a phone)
    affinity: str | None = None  # hex CPU mask, e.g. "f0"; None: device default
    repeats: int = 1  # whole runner invocations per batch; samples are pooled
    # Interleaved rounds (et_bench --interleave): every round runs each method of a group once, in a
    # seeded shuffled order, so a slow stretch of the device lands on all of them alike.
    interleave: bool = False
    group: int = 32  # methods interleaved (and loaded) at once; bounds memory on big batches
    seed: int = 0  # shuffles each round's order
    # A method that runs in every round of every group (a drift reference): each result then holds the
    # reference's samples of the same rounds (`LatencyStats.reference_ms`). Implies interleave.
    reference: str | None = None
    # > 0: keep running rounds until each estimate's 95 % CI is within +-ci_target (relative; of the ratio
    # to the reference when there is one), or `max_time_ms` was timed in a group. Implies interleave.
    ci_target: float = 0.0
    max_time_ms: float = 20000.0
    # Untimed runs of a method right before its timed one in each round: keeps a small unit timed after
    # a big one off the big one's caches (et_bench --rewarm).
    rewarm: int = 1

    @property
    def interleaved(self) -> bool:
        return bool(self.interleave or self.reference is not None or self.ci_target > 0)

    def to_dict(self) -> dict:
        return asdict(self)

    def without_unlowered_reference(self, failed: dict[str, str]) -> tuple["MeasureConfig", str | None]:
        """The config to time a batch with when the candidates in `failed` (name -> why) did not lower:
        a drift reference among them is dropped, and the second item says so (else None)."""
        if self.reference is None or self.reference not in failed:
            return self, None
        why = (f"the drift reference {self.reference!r} did not lower ({failed[self.reference]}); "
               f"measured without it (rows unreferenced)")
        return replace(self, reference=None), why


@dataclass(frozen=True)
class Fingerprint:
    """What makes two latency measurements comparable. Tables are keyed by it."""

    kind: str  # "local", "cuda", "adb"
    hardware: str  # CPU model, GPU name, or phone manufacturer/model/SoC
    runtime: str  # e.g. "executorch-1.4.1", "torch-2.13.0+cu130"
    backend: str  # "xnnpack", "cuda-fp32", ...
    threads: int
    affinity: str | None = None
    extra: dict = field(default_factory=dict)  # governor, ABI, ...: recorded, not compared

    def comparable_fields(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d

    def digest(self) -> str:
        blob = json.dumps(self.comparable_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def slug(self) -> str:
        """A folder name a person can read: kind-hardware-backend-tN-digest."""
        hw = re.sub(r"[^a-z0-9]+", "-", self.hardware.lower()).strip("-")[:40]
        return f"{self.kind}-{hw}-{self.backend}-t{self.threads}-{self.digest()}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fingerprint":
        return cls(**d)

    def differences(self, other: "Fingerprint") -> list[str]:
        a, b = self.comparable_fields(), other.comparable_fields()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]


ProgressFn = Callable[[int], None]


def tick(progress: ProgressFn | None) -> None:
    """One candidate done, whatever its outcome (fits `tqdm.update`)."""
    if progress is not None:
        progress(1)


class Device(ABC):
    """A measurement target. Each device does its own lowering of the candidates."""

    uri: str
    # Why the last measurement ran without its drift reference (MeasureConfig.reference), when it did:
    # the reference did not lower or run, the rest was measured without it.
    reference_error: str | None = None

    @abstractmethod
    def fingerprint(self, config: MeasureConfig | None = None) -> Fingerprint:
        """The fingerprint of measurements taken with `config`."""

    @abstractmethod
    def measure(
        self,
        candidates: Sequence[Candidate],
        config: MeasureConfig = MeasureConfig(),
        progress: ProgressFn | None = None,
    ) -> list[LatencyStats]:
        """Time every candidate; one result per candidate, in order.

        A candidate that fails to lower or run gets a result with `error` set,
        so one bad candidate never loses the others' measurements.
        """

    def info(self) -> dict:
        """Everything worth printing about the device (`amc-mobile device-info`)."""
        return self.fingerprint().to_dict()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PteDevice(Device):
    """A device that runs ExecuTorch programs: it can also time a `.pte` lowered elsewhere (a model file
    the user hands us, or a batch another process lowered), without lowering anything itself."""

    @abstractmethod
    def measure_pte(
        self,
        path: str | os.PathLike,
        methods: Sequence[str] | None = None,
        config: MeasureConfig = MeasureConfig(),
        progress: ProgressFn | None = None,
    ) -> list[LatencyStats]:
        """Time the methods of an existing `.pte` (all of them when `methods` is None), one result per
        method in order; a method that fails gets a result with `error` set."""
