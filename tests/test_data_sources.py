"""`--data`: image folders of real PNGs (Fashion-MNIST written out as RGB class folders), user functions,
their bad inputs, and a short search on an image folder through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from amc_mobile.data_sources import ImageTransform, load_data, load_image_folder
from amc_mobile.errors import AmcError

from _search_helpers import fashion

USER_MODEL = '''
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_shape = (3, 32, 32)
        self.c1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, 2, 1)
        self.b2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def make():
    return Net()
'''


def write_folder(root, per_class: int = 30, with_val: bool = True, size: int = 32):
    """Real PNG files: Fashion-MNIST images (the Debian package's IDX files) as RGB, resized to `size`."""
    from PIL import Image

    data = fashion()
    imgs = ((data.train.images[:2000, 0] * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).numpy()
    labels = data.train.labels[:2000].numpy()
    for split, lo in (("train", 0), ("val", 1000)) if with_val else (("train", 0),):
        counts = {}
        for i in range(lo, lo + 1000):
            c = int(labels[i])
            if counts.get(c, 0) >= per_class:
                continue
            counts[c] = counts.get(c, 0) + 1
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(imgs[i]).convert("RGB").resize((size, size)).save(d / f"{i}.png")
    return root


def test_image_folder_reads_real_pngs_and_caches_them(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=8)
    cache = tmp_path / "cache"
    a = load_image_folder(root, ImageTransform(None, 3, (0.5,), (0.5,)), cache_dir=cache)
    assert a.train.images.shape == (80, 3, 32, 32) and a.val.images.shape == (80, 3, 32, 32)
    assert sorted(set(a.train.labels.tolist())) == list(range(10))
    assert float(a.train.images.min()) >= -1.0 and float(a.train.images.max()) <= 1.0
    assert len(list((cache / "images").glob("*.pt"))) == 2
    b = load_image_folder(root, ImageTransform(None, 3, (0.5,), (0.5,)), cache_dir=cache)  # from the cache
    torch.testing.assert_close(a.train.images, b.train.images)
    c = load_image_folder(root, ImageTransform(16, 1, (0.5,), (0.25,)), cache_dir=cache)
    assert c.train.images.shape == (80, 1, 16, 16)
    # the decoded pixels are the PNGs' pixels
    from PIL import Image

    files = sorted(f for d in sorted((root / "val").iterdir()) for f in sorted(d.glob("*.png")))
    px = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255 * 2 - 1 for f in files]
    want = torch.from_numpy(np.stack(px))
    assert a.val.labels[:20].unique().numel() > 3  # a prefix mixes the classes
    # the same pixels, in one seeded order
    order = torch.randperm(len(want), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.val.images, want[order])


def test_image_folder_without_val_holds_out_a_seeded_split(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=10, with_val=False)
    d1 = load_image_folder(root, val_size=20, split_seed=3, cache_dir=tmp_path / "c")
    d2 = load_image_folder(root, val_size=20, split_seed=3, cache_dir=tmp_path / "c")
    assert len(d1.val) == 20 and len(d1.train) == 80
    torch.testing.assert_close(d1.val.images, d2.val.images)
    assert "20 held out of train/ (seed 3)" in d1.note


def test_image_folder_bad_inputs(tmp_path):
    with pytest.raises(AmcError, match="not an image folder"):
        load_image_folder(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(AmcError, match="no class folders"):
        load_image_folder(tmp_path)
    (tmp_path / "train" / "a").mkdir()
    with pytest.raises(AmcError, match="no images"):
        load_image_folder(tmp_path, cache_dir=tmp_path / "c")
    (tmp_path / "train" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(AmcError, match="not a readable image"):
        load_image_folder(tmp_path, cache_dir=tmp_path / "c")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "x.png")
    Image.new("RGB", (9, 7)).save(tmp_path / "train" / "a" / "y.png")
    with pytest.raises(AmcError, match="different sizes.*--input-size"):
        load_image_folder(tmp_path, cache_dir=tmp_path / "c")
    with pytest.raises(AmcError, match="expected fashion-mnist, imagefolder"):
        load_data("nonsense")
    with pytest.raises(AmcError, match="--mean"):
        load_data(f"imagefolder:{tmp_path}", mean="a,b")
    with pytest.raises(AmcError, match="--std must be positive"):
        load_data(f"imagefolder:{tmp_path}", std="0")


def test_user_data_function(tmp_path):
    f = tmp_path / "mydata.py"
    f.write_text("import torch\n"
                 "def both():\n    g = torch.Generator().manual_seed(0)\n"
                 "    return (torch.randn(50, 1, 8, 8, generator=g), torch.arange(50) % 5), "
                 "[(torch.zeros(1, 8, 8), 1)] * 10\n"
                 "def only_train():\n    return {'train': (torch.randn(50, 1, 8, 8), torch.zeros(50))}\n"
                 "def broken():\n    raise OSError('disk gone')\n")
    d = load_data(f"{f}:both")
    assert len(d.train) == 50 and len(d.val) == 10
    d = load_data(f"{f}:only_train", val_size=10)
    assert len(d.val) == 10 and len(d.train) == 40 and "held out" in d.note
    with pytest.raises(AmcError, match="raised OSError: disk gone"):
        load_data(f"{f}:broken")


@pytest.mark.slow
def test_search_on_an_image_folder_through_the_cli(tmp_path, monkeypatch):
    from amc_mobile.cli import main

    root = write_folder(tmp_path / "imgs", per_class=30)
    model_file = tmp_path / "user_model.py"
    model_file.write_text(USER_MODEL)
    monkeypatch.setenv("AMC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rc = main(["search", "-m", f"{model_file}:make", "--data", f"imagefolder:{root}", "--cost", "flops",
               "--target", "0.5", "--episodes", "4", "--warmup", "2", "--val-images", "200", "--calib-images", "100",
               "--out", str(out), "--no-measure-final", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "imagefolder" in summary["setup"]["data"]
    arch = json.loads((out / "pruned" / "architecture.json").read_text())
    assert arch["base_model"]["factory"].endswith("user_model.py:make")
    from amc_mobile.pruning import load_pruned

    pruned, _ = load_pruned(out / "pruned")
    assert pruned(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    # fine-tuning takes the search's images by default; compare takes the factory and the pruned folder
    assert main(["finetune", str(out), "--epochs", "1", "--train-images", "100", "--eval-images", "50",
                 "--quiet", "--no-plots"]) == 0
    ft = json.loads((out / "finetune.json").read_text())
    assert '"train_images_used": 100' in json.dumps(ft)
    assert main(["compare", f"{model_file}:make", str(out / "pruned"), "--devices", "local", "--iterations", "5",
                 "--warmup", "2", "--no-report", "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.csv").is_file()


def test_user_metric_scores_and_refuses_nan(tmp_path):
    from torch import nn

    from amc_mobile.data import Split
    from amc_mobile.search import SearchConfig
    from amc_mobile.search.score import evaluate_split

    f = tmp_path / "metrics.py"
    f.write_text("import torch\n"
                 "def neg_mse(model, loader):\n"
                 "    tot, n = 0.0, 0\n"
                 "    for x, y in loader:\n"
                 "        tot += float(((model(x)[:, 0] - y.float()) ** 2).sum()); n += len(y)\n"
                 "    return -tot / n\n"
                 "def nan(model, loader):\n    return float('nan')\n"
                 "def boom(model, loader):\n    raise KeyError('labels')\n")
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    split = Split(torch.randn(10, 1, 2, 2), torch.arange(10) % 2)
    value, loss = evaluate_split(model, split, f"{f}:neg_mse", batch_size=4)
    with torch.no_grad():
        want = -float(((model(split.images)[:, 0] - split.labels.float()) ** 2).mean())
    assert value == pytest.approx(want, rel=1e-5) and loss != loss
    with pytest.raises(AmcError, match="returned nan"):
        evaluate_split(model, split, f"{f}:nan")
    with pytest.raises(AmcError, match="raised KeyError"):
        evaluate_split(model, split, f"{f}:boom")
    assert SearchConfig(eval=f"{f}:neg_mse").validate().score_metric.endswith(":neg_mse")
    with pytest.raises(AmcError, match="--eval"):
        SearchConfig(eval="not a ref").validate()


def test_train_a_user_model_on_an_image_folder(tmp_path, capsys):
    from amc_mobile.cli import main
    from amc_mobile.train import load_checkpoint

    root = write_folder(tmp_path / "imgs", per_class=6)
    model_file = tmp_path / "user_model.py"
    model_file.write_text(USER_MODEL)
    out = tmp_path / "ckpt"
    assert main(["train", "-m", f"{model_file}:make", "--data", f"imagefolder:{root}", "--epochs", "1",
                 "--batch-size", "16", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    model, meta = load_checkpoint(out)
    assert meta["model"]["factory"].endswith("user_model.py:make")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert main(["train", "-m", "nonsense", "--out", str(tmp_path / "x")]) == 2
    assert "expected one of" in capsys.readouterr().err
