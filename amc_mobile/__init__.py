"""amc-mobile: AMC channel pruning with measured latency on the target device.

Python entry points (see the README's "From Python"):

    from amc_mobile import compress, build_table, measure
"""

__version__ = "0.1.0"

__all__ = ["compress", "build_table", "measure", "CompressResult", "__version__"]


def __getattr__(name: str):
    # the entry points import torch and ExecuTorch: only when asked for, so `amc-mobile --help` stays fast
    if name in ("compress", "build_table", "measure", "CompressResult"):
        from amc_mobile import api

        return getattr(api, name)
    raise AttributeError(f"module 'amc_mobile' has no attribute {name!r}")
