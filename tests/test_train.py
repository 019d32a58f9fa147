import json
import time

import pytest
import torch

from amc_mobile import train as T
from amc_mobile.cli import main
from amc_mobile.data import FashionMNIST, load_fashion_mnist
from amc_mobile.errors import AmcError
from amc_mobile.models import build_model, model_config

try:
    load_fashion_mnist()
    HAVE_DATA = True
except AmcError:
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST is not installed (dataset-fashion-mnist)")


@pytest.fixture
def small():
    d = load_fashion_mnist()
    return FashionMNIST(d.train.subset(2000), d.val.subset(1000), d.test.subset(1000), d.source)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv(T.CACHE_ENV, str(tmp_path / "cache"))


def test_evaluate_on_tensors_and_loaders():
    torch.manual_seed(0)
    m = build_model("resnet20").eval()
    x, y = torch.randn(30, 1, 28, 28), torch.randint(0, 10, (30,))
    with torch.no_grad():
        out = m(x)
    r = T.evaluate(m, (x, y), batch_size=7)
    assert r["images"] == 30
    assert r["top1"] == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert r["loss"] == pytest.approx(torch.nn.functional.cross_entropy(out, y).item(), rel=1e-4)
    assert 0 <= r["top1"] <= r["top5"] <= 1
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]
    assert T.evaluate(m, loader, max_images=10)["images"] == 10
    m.train()
    T.evaluate(m, (x, y), topk=(1,))
    assert m.training  # mode restored


def test_cosine_schedule_with_warmup():
    f = T._cosine_with_warmup(100, 10)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(99) < 0.01 and f(55) == pytest.approx(0.5, abs=0.01)


@needs_data
@pytest.mark.slow
def test_tiny_training_learns(small):
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", width_mult=0.25)
    t0 = time.perf_counter()
    res = T.train(model, small, epochs=1, lr=0.05, batch_size=32, device="cpu", seed=0, progress=False)
    assert res.val["images"] == 1000 and res.test["images"] == 1000
    assert res.val["top1"] > 0.5, res.history  # chance is 0.1
    assert len(res.history) == 1 and res.history[0]["seconds"] < time.perf_counter() - t0 + 1


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = build_model("mobilenet_v2", width_mult=0.25, channels={"head": 64}).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for _ in range(1):  # make BN running stats non-default
            m.train()(torch.randn(8, 1, 28, 28))
        m.eval()
        expected = m(x)
    T.save_checkpoint(m, tmp_path / "ck", {"train": {"epochs": 1}, "metrics": {"val": {"top1": 0.5}}})
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["model"] == model_config(m) and meta["torch"] == torch.__version__ and "date" in meta
    m2, meta2 = T.load_checkpoint(tmp_path / "ck")
    assert not m2.training and meta2["metrics"]["val"]["top1"] == 0.5
    with torch.no_grad():
        torch.testing.assert_close(m2(x), expected)


def test_corrupt_checkpoints_are_amc_errors(tmp_path):
    m = build_model("resnet20")
    ck = T.save_checkpoint(m, tmp_path / "ck")
    weights = ck / "model.pt"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(AmcError, match="corrupt checkpoint"):
        T.load_checkpoint(ck)
    weights.write_bytes(b"not a checkpoint at all")
    with pytest.raises(AmcError, match="model.pt"):
        T.load_checkpoint(ck)
    weights.unlink()
    with pytest.raises(AmcError, match="no model.pt"):
        T.load_checkpoint(ck)
    # weights of another architecture
    T.save_checkpoint(build_model("plain20"), tmp_path / "other")
    weights.write_bytes((tmp_path / "other" / "model.pt").read_bytes())
    with pytest.raises(AmcError, match="do not fit"):
        T.load_checkpoint(ck)
    (ck / "config.json").write_text("{broken")
    with pytest.raises(AmcError, match="config"):
        T.load_checkpoint(ck)
    with pytest.raises(AmcError, match="not a checkpoint"):
        T.load_checkpoint(tmp_path / "nothing")
    # a pickled module (not a state_dict) is refused by weights_only loading
    (ck / "config.json").write_text(json.dumps({"model": model_config(m)}))
    torch.save(m, weights)
    with pytest.raises(AmcError, match="corrupt checkpoint"):
        T.load_checkpoint(ck)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet20"])
def test_shipped_weights(name):
    """The shipped weights are tracked files: a checkout without them is broken, not a reason to skip."""
    shipped = T.pretrained_dir(name)
    assert (shipped / "config.json").is_file() and (shipped / T.WEIGHTS_FILE).is_file(), shipped
    meta = T.read_checkpoint_meta(shipped)
    assert meta["model"] == model_config(build_model(name))
    assert meta["metrics"]["test"]["top1"] > 0.9
    model, meta = T.get_or_train(name)
    assert meta["checkpoint"] == str(shipped) and not model.training


@needs_data
def test_get_or_train_caches(tmp_path, monkeypatch):
    d = load_fashion_mnist()
    tiny = FashionMNIST(d.train.subset(64), d.val.subset(50), d.test.subset(50), d.source)
    cfg = T.TrainConfig(epochs=1, batch_size=32, train_limit=64)
    m1, meta1 = T.get_or_train("resnet20", train_config=cfg, data=tiny, device="cpu", progress=False)
    ck = meta1["checkpoint"]
    assert ck.startswith(str(tmp_path / "cache" / "checkpoints" / "resnet20-"))
    assert meta1["train"] == cfg.to_dict()

    def boom(*a, **k):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(T, "train", boom)
    m2, meta2 = T.get_or_train("resnet20", train_config=cfg, data=tiny, device="cpu")
    assert meta2["checkpoint"] == ck
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a.cpu(), b)
    # another config is another folder
    assert T.checkpoint_dir(model_config(m1), T.TrainConfig(epochs=2, batch_size=32, train_limit=64)) != ck


@needs_data
def test_cli_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "ck"
    rc = main(["train", "--model", "resnet20", "--epochs", "1", "--train-limit", "128", "--batch-size", "64",
               "--eval-limit", "100", "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "val top-1" in text and "test top-1" in text and f"checkpoint: {out}" in text
    assert "epoch 1/1" in text
    meta = json.loads((out / "config.json").read_text())
    assert meta["train"]["train_limit"] == 128 and meta["metrics"]["val"]["images"] == 100
    model, _ = T.load_checkpoint(out)
    assert model_config(model)["name"] == "resnet20"


def test_cli_train_missing_data_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["train", "--model", "resnet20", "--epochs", "1", "--data-dir", str(empty), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("amc-mobile: error: Fashion-MNIST not found in") and "\n" not in err
    assert str(empty) in err


def test_cli_train_bad_options(capsys):
    assert main(["train", "--model", "resnet20", "--width-mult", "0.5"]) == 2
    assert "--width-mult applies to" in capsys.readouterr().err
    assert main(["train", "--epochs", "0"]) == 2
