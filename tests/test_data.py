import gzip
import struct

import numpy as np
import pytest
import torch

from amc_mobile import data as D
from amc_mobile.errors import AmcError

HAVE_REAL = all((D.DEFAULT_DATA_DIR / n).exists() for n in D.FILES.values())
real = pytest.mark.skipif(not HAVE_REAL, reason="Debian's dataset-fashion-mnist is not installed")


def _idx(arr: np.ndarray, dtype_code=0x08) -> bytes:
    head = bytes([0, 0, dtype_code, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_tiny(folder, n_train=40, n_test=10, corrupt=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": np.arange(n_test) % 10,
    }
    for key, arr in arrays.items():
        blob = _idx(arr)
        if corrupt == (key, "magic"):
            blob = b"\x00\x00\x07\x03" + blob[4:]
        if corrupt == (key, "truncate"):
            blob = blob[:-100]
        with gzip.open(folder / D.FILES[key], "wb") as f:
            f.write(blob)
    return arrays


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    D.clear_cache()
    yield
    D.clear_cache()


def test_tiny_set_parses_and_splits(tmp_path):
    arrays = write_tiny(tmp_path / "fm")
    d = D.load_fashion_mnist(tmp_path / "fm", val_size=8)
    assert (len(d.train), len(d.val), len(d.test)) == (32, 8, 10)
    assert d.train.images.shape == (32, 1, 28, 28) and d.train.images.dtype == torch.float32
    assert d.train.labels.dtype == torch.int64
    # normalised exactly as documented, and train + val is the whole training file
    pixels = torch.cat([d.train.images, d.val.images]) * D.STD + D.MEAN
    expected = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255).unsqueeze(1)
    assert torch.allclose(pixels.sum(0), expected.sum(0), atol=1e-3)
    assert sorted(torch.cat([d.train.labels, d.val.labels]).tolist()) == sorted(arrays["train_labels"].tolist())
    # the split is deterministic
    D.clear_cache()
    d2 = D.load_fashion_mnist(tmp_path / "fm", val_size=8)
    assert torch.equal(d.val.labels, d2.val.labels) and torch.equal(d.val.images, d2.val.images)


def test_uncompressed_files_accepted(tmp_path):
    write_tiny(tmp_path / "gz")
    for name in D.FILES.values():
        (tmp_path / "raw").mkdir(exist_ok=True)
        (tmp_path / "raw" / name.removesuffix(".gz")).write_bytes(gzip.decompress((tmp_path / "gz" / name).read_bytes()))
    assert len(D.load_fashion_mnist(tmp_path / "raw", val_size=4).test) == 10


def test_env_var_used(tmp_path, monkeypatch):
    write_tiny(tmp_path / "fm")
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "fm"))
    assert D.find_data_dir() == (tmp_path / "fm").resolve()


def test_missing_names_both_ways(tmp_path, monkeypatch):
    with pytest.raises(AmcError) as ei:
        D.load_fashion_mnist(tmp_path)
    msg = str(ei.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg and "AMC_DATA_DIR" in msg
    assert str(tmp_path) in msg and "train-images-idx3-ubyte.gz" in msg and "\n" not in msg
    # an explicit env dir that is empty is an error too, not a silent fall-back to the default
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path))
    with pytest.raises(AmcError, match="AMC_DATA_DIR"):
        D.find_data_dir()


@pytest.mark.parametrize("key", ["train_images", "test_labels"])
def test_bad_magic(tmp_path, key):
    write_tiny(tmp_path, corrupt=(key, "magic"))
    with pytest.raises(AmcError, match=f"{D.FILES[key]}.*(magic|dimensions)"):
        D.load_fashion_mnist(tmp_path, val_size=4)


def test_truncated_payload(tmp_path):
    write_tiny(tmp_path, corrupt=("train_images", "truncate"))
    with pytest.raises(AmcError, match="train-images-idx3-ubyte.gz.*truncated"):
        D.load_fashion_mnist(tmp_path, val_size=4)


def test_truncated_gzip_stream(tmp_path):
    write_tiny(tmp_path)
    p = tmp_path / D.FILES["test_images"]
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(AmcError, match="t10k-images-idx3-ubyte.gz"):
        D.load_fashion_mnist(tmp_path, val_size=4)


def test_mismatched_counts(tmp_path):
    write_tiny(tmp_path)
    with gzip.open(tmp_path / D.FILES["test_labels"], "wb") as f:
        f.write(_idx(np.zeros(9)))
    with pytest.raises(AmcError, match="do not match"):
        D.load_fashion_mnist(tmp_path, val_size=4)


def test_augment_and_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    out = D.augment_batch(x, g)
    assert out.shape == x.shape
    # with no padding and no flips it is the identity; with padding most images move
    assert not torch.equal(out, x)
    same = [torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    assert 0 < sum(same) < 32  # offset (2,2) is the un-shifted crop: ~1 in 25
    split = D.Split(torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 28, 28).contiguous(), torch.arange(10))
    batches = list(split.loader(batch_size=4, shuffle=True, seed=1))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    for xb, yb in batches:
        assert torch.equal(xb[:, 0, 0, 0], yb.float())
    assert len(split.loader(batch_size=4, drop_last=True)) == 2


@real
def test_real_fashion_mnist():
    d = D.load_fashion_mnist()
    assert (len(d.train), len(d.val), len(d.test)) == (55000, 5000, 10000)
    assert d.train.images.shape == (55000, 1, 28, 28)
    assert abs(d.train.images.mean().item()) < 0.01 and abs(d.train.images.std().item() - 1) < 0.01
    assert torch.equal(d.test.labels.bincount(), torch.full((10,), 1000))
    assert d.val.labels.bincount().min() > 400  # a random slice covers every class
    assert D.load_fashion_mnist() is d or D.load_fashion_mnist().val.images is d.val.images  # cached
    assert len(D.load_fashion_mnist(train_limit=2000).train) == 2000
