"""Optional: build a torchvision architecture (random init, never downloaded weights).

torchvision is imported lazily, here only: with the CPU-only torch wheel it fails at
import time, and the rest of amc-mobile must work without it. These models use
torchvision's own module layout (Sequentials with numeric children), so they are
for comparison only; the pruning and export paths are written for our own families.
"""

from __future__ import annotations

from torch import nn

from amc_mobile.errors import AmcError


def import_torchvision():
    try:
        import torchvision  # noqa: PLC0415 - lazy on purpose
    except Exception as exc:  # ImportError, or RuntimeError "operator torchvision::nms does not exist"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AmcError(
            f"torchvision could not be imported ({reason[:200]}): "
            "install the 'torchvision' extra with a torch build it matches"
        ) from exc
    if torchvision is None:  # a None placed in sys.modules
        raise AmcError(
            "torchvision could not be imported (module is disabled): "
            "install the 'torchvision' extra with a torch build it matches"
        )
    return torchvision


def torchvision_model(arch: str, num_classes: int = 10, in_channels: int = 3, input_size: int = 224, **kw) -> nn.Module:
    """`arch` is a torchvision.models builder name, e.g. "mobilenet_v2" or "resnet18"."""
    tv = import_torchvision()
    try:
        builder = tv.models.get_model_builder(arch)
    except Exception as exc:
        raise AmcError(f"torchvision has no model {arch!r}: see torchvision.models.list_models()") from exc
    if kw.get("weights") not in (None,):
        raise AmcError("torchvision models are built without pretrained weights (nothing may be downloaded)")
    kw.pop("weights", None)
    model = builder(weights=None, num_classes=num_classes, **kw)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    model.amc_config = {
        "name": f"torchvision:{arch}",
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": input_size,
        **kw,
    }
    model.input_shape = (in_channels, input_size, input_size)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                module.bias is not None,
            )
            setattr(parent, attr, new)
            return
    raise AmcError("could not find the first 3-channel conv to adapt to in_channels")
