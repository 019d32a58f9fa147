"""Device bridges: measure candidate models on the host CPU, an NVIDIA GPU or an Android phone."""

from .base import Candidate, Device, Fingerprint, MeasureConfig, PteDevice, example_input
from .registry import discover, known_schemes, open_device
from .stats import LatencyStats, merge_repeats

__all__ = [
    "Candidate",
    "Device",
    "Fingerprint",
    "LatencyStats",
    "MeasureConfig",
    "PteDevice",
    "discover",
    "example_input",
    "known_schemes",
    "merge_repeats",
    "open_device",
]
