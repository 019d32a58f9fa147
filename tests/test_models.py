import json
import sys

import pytest
import torch
from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.models import (
    DEFAULT_MODEL,
    MODEL_NAMES,
    ModelSpec,
    build_model,
    config_hash,
    count_params,
    example_input,
    model_config,
)
from amc_mobile.models.layers import ConvBNAct


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shapes(name):
    torch.manual_seed(0)
    m = build_model(name).eval()
    assert m.input_shape == (1, 28, 28)
    with torch.no_grad():
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    m3 = build_model(name, in_channels=3, num_classes=7, input_size=32).eval()
    assert m3.input_shape == (3, 32, 32)
    with torch.no_grad():
        assert m3(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def _no_numeric_sequential(module: nn.Module, path="model"):
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            assert not any(n.isdigit() for n, _ in child.named_children()), f"{path}.{name} is a numeric Sequential"
        _no_numeric_sequential(child, f"{path}.{name}")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_layout_and_config_roundtrip(name):
    m = build_model(name)
    _no_numeric_sequential(m)
    cfg = model_config(m)
    assert cfg["name"] == name
    cfg2 = json.loads(json.dumps(cfg))
    m2 = build_model(**cfg2)
    assert [(k, v.shape) for k, v in m.state_dict().items()] == [(k, v.shape) for k, v in m2.state_dict().items()]
    assert ModelSpec.of(m).build().state_dict().keys() == m.state_dict().keys()
    assert config_hash(cfg) == config_hash(cfg2)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet20", "mobilenet_v1", "vgg16", "plain20"])
def test_torch_export(name):
    kw = {"width_mult": 0.25} if name in ("mobilenet_v2", "mobilenet_v1", "vgg16") else {}
    m = build_model(name, **kw).eval()
    x = example_input(m)
    ep = torch.export.export(m, (x,), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x))


def test_param_counts():
    assert DEFAULT_MODEL == "mobilenet_v2"
    n = count_params(build_model("mobilenet_v2"))
    assert 2.1e6 < n < 2.35e6, n  # the reference has 2.24M with 1000 classes minus the 1280x990 FC
    assert 0.26e6 < count_params(build_model("resnet20")) < 0.28e6
    assert 0.84e6 < count_params(build_model("resnet56")) < 0.87e6
    assert 3.1e6 < count_params(build_model("mobilenet_v1")) < 3.3e6
    assert 14e6 < count_params(build_model("vgg16")) < 15.5e6


def test_width_mult_scales_channels():
    full = build_model("mobilenet_v2")
    half = build_model("mobilenet_v2", width_mult=0.5)
    assert full.stem.out_channels == 32 and half.stem.out_channels == 16
    assert full.blocks[-1].project.out_channels == 320 and half.blocks[-1].project.out_channels == 160
    for m in half.modules():
        if isinstance(m, ConvBNAct) and m.conv.groups == 1 and m is not half.stem:
            assert m.out_channels % 8 == 0
    assert count_params(half) < count_params(full) / 2
    assert build_model("mobilenet_v1", width_mult=0.5).blocks[-1].pointwise.out_channels == 512


def test_mobilenet_v2_structure():
    m = build_model("mobilenet_v2")
    assert len(m.blocks) == 17
    assert m.blocks[0].expand is None  # t = 1
    assert m.blocks[1].expand.out_channels == 16 * 6
    assert m.blocks[1].depthwise.conv.groups == 96
    assert isinstance(m.blocks[1].project.act, nn.Identity)
    assert [b.use_residual for b in m.blocks].count(True) == 10
    assert m.head.out_channels == 1280
    assert isinstance(m.pool, nn.AdaptiveAvgPool2d) and isinstance(m.classifier, nn.Linear)
    # CIFAR-style on 28x28 (stem and stage 2 at stride 1): 28, 28, 28, 14, 7, 7, 4, 4
    x = m.stem(torch.randn(1, 1, 28, 28))
    sizes = [x.shape[-1]]
    with torch.no_grad():
        for b in m.blocks:
            x = b(x)
            sizes.append(x.shape[-1])
    stage_ends = [0, 1, 3, 6, 10, 13, 16, 17]
    assert [sizes[i] for i in stage_ends] == [28, 28, 28, 14, 7, 7, 4, 4]
    big = build_model("mobilenet_v2", input_size=224)
    assert big.stem.conv.stride == (2, 2) and big.blocks[1].depthwise.conv.stride == (2, 2)


def test_resnets():
    r56 = build_model("resnet56")
    assert len(r56.blocks) == 27
    assert sum(b.shortcut is not None for b in r56.blocks) == 2  # option B at the two stage changes
    p20 = build_model("plain20")
    assert len(p20.blocks) == 9
    assert all(not b.use_residual and b.shortcut is None for b in p20.blocks)
    r20 = build_model("resnet20")
    assert all(b.use_residual for b in r20.blocks)


def test_channel_overrides_rebuild_pruned_model():
    m = build_model("mobilenet_v2", width_mult=0.5, channels={"blocks.3.expand": 40, "head": 300})
    assert m.blocks[3].expand.out_channels == 40 and m.blocks[3].depthwise.conv.groups == 40
    assert m.classifier.in_features == 300
    m2 = build_model(**json.loads(json.dumps(model_config(m))))
    assert m2.blocks[3].expand.out_channels == 40
    with torch.no_grad():
        assert m2.eval()(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    tied = {f"blocks.{i}.conv2": 20 for i in (3, 4, 5)}  # one stage's residual-tied outputs
    r = build_model("resnet20", channels={"blocks.0.conv1": 5, **tied})
    assert r.blocks[0].conv1.out_channels == 5 and r.blocks[4].conv1.in_channels == 20
    with pytest.raises(ValueError, match="must equal its input"):
        build_model("resnet20", channels={"blocks.3.conv2": 20})
    with pytest.raises(ValueError, match="no prunable layer"):
        build_model("mobilenet_v2", channels={"blocks.0.expand": 8})  # t=1 block has no expand
    with pytest.raises(ValueError, match="must equal its input"):
        build_model("mobilenet_v2", channels={"blocks.2.project": 8})


def test_unknown_model_is_amc_error():
    with pytest.raises(AmcError, match="unknown model"):
        build_model("alexnet")
    with pytest.raises(AmcError, match="bad options"):
        build_model("resnet20", width_mult=0.5)


def test_torchvision_adapter_error_when_unimportable(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    with pytest.raises(AmcError, match="torchvision could not be imported .*install the 'torchvision' extra"):
        build_model("torchvision:mobilenet_v2")


def test_models_package_does_not_import_torchvision():
    import subprocess

    code = "import sys, amc_mobile.models; assert 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
