"""amc-mobile: AMC channel pruning with measured latency on the target device."""

__version__ = "0.1.0"
