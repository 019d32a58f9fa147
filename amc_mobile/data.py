"""Fashion-MNIST from the IDX `.gz` files, as in-memory tensors with AMC's splits.

Search order for the files: the explicit `data_dir`, the env var `AMC_DATA_DIR`, then
`/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`). Nothing is downloaded.

Splits (AMC rule: the search reward never sees the real test set):
  * `train`: the 60,000 training images minus the validation slice (55,000 by default)
  * `val`:   5,000 images held out from the training set with a fixed seed
  * `test`:  the official 10,000-image test set

Images come back normalised with Fashion-MNIST's mean/std, shape (N, 1, 28, 28) float32,
labels int64. Loaded data is cached per process: treat the tensors as read-only.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from amc_mobile.errors import AmcError

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "AMC_DATA_DIR"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MEAN = 0.2860
STD = 0.3530
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
VAL_SIZE = 5000
SPLIT_SEED = 0  # fixed: the validation slice must be the same in every run and every process

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------- finding files


def _missing_message(where: str) -> str:
    names = ", ".join(FILES.values())
    return (
        f"Fashion-MNIST not found in {where}: install Debian's dataset-fashion-mnist "
        f"(apt-get install dataset-fashion-mnist) or pass --data-dir DIR / set {ENV_VAR} to a folder with {names}"
    )


def _file_in(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the four IDX files; an explicit or env folder is never silently skipped."""
    if data_dir is not None:
        candidates, where = [Path(data_dir).expanduser()], f"{data_dir} (--data-dir)"
    elif os.environ.get(ENV_VAR):
        candidates, where = [Path(os.environ[ENV_VAR]).expanduser()], f"{os.environ[ENV_VAR]} (${ENV_VAR})"
    else:
        candidates, where = [DEFAULT_DATA_DIR], str(DEFAULT_DATA_DIR)
    for d in candidates:
        if d.is_dir() and all(_file_in(d, n) for n in FILES.values()):
            return d.resolve()
    raise AmcError(_missing_message(where))


# ----------------------------------------------------------------------------- IDX parsing


def read_idx(path: str | os.PathLike, expect_dims: int | None = None) -> np.ndarray:
    """Parse one IDX file (gzip-compressed or not); any corruption is an AmcError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise AmcError(f"{path}: cannot read ({exc}); the file is corrupt or truncated, reinstall or re-copy it") from exc
    if len(raw) < 4:
        raise AmcError(f"{path}: truncated IDX file ({len(raw)} bytes); reinstall or re-copy it")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise AmcError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()}); point --data-dir at the right folder")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    if expect_dims is not None and ndim != expect_dims:
        raise AmcError(f"{path}: expected an IDX file with {expect_dims} dimensions, found {ndim} (wrong file?)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise AmcError(f"{path}: truncated IDX header; reinstall or re-copy it")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise AmcError(
            f"{path}: IDX payload is {len(raw) - header} bytes but its header says {shape} ({expected} bytes); "
            "the file is truncated or corrupt, reinstall or re-copy it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _load_pair(directory: Path, images: str, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_path, lab_path = _file_in(directory, FILES[images]), _file_in(directory, FILES[labels])
    x = read_idx(img_path, expect_dims=3)
    y = read_idx(lab_path, expect_dims=1)
    if x.shape[1:] != (28, 28):
        raise AmcError(f"{img_path}: images are {x.shape[1]}x{x.shape[2]}, Fashion-MNIST's are 28x28 (wrong file?)")
    if len(x) != len(y):
        raise AmcError(f"{img_path} has {len(x)} images but {lab_path} has {len(y)} labels; the files do not match")
    if len(y) and (y.min() < 0 or y.max() >= len(CLASSES)):
        raise AmcError(f"{lab_path}: labels outside 0..{len(CLASSES) - 1}; wrong or corrupt file")
    xt = torch.from_numpy(x.astype(np.float32)).div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    yt = torch.from_numpy(y.astype(np.int64))
    return xt.contiguous(), yt


# ----------------------------------------------------------------------------- splits and batching


@dataclass
class Split:
    """Images (N,1,28,28) float32 normalised, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: str | torch.device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, n: int | None) -> "Split":
        """The first `n` examples (all when n is None or larger than the split)."""
        if n is None or n >= len(self):
            return self
        return Split(self.images[:n], self.labels[:n])

    def loader(
        self,
        batch_size: int = 256,
        shuffle: bool = False,
        augment: bool = False,
        seed: int | None = 0,
        drop_last: bool = False,
    ) -> "BatchLoader":
        return BatchLoader(self, batch_size, shuffle=shuffle, augment=augment, seed=seed, drop_last=drop_last)


@dataclass
class FashionMNIST:
    train: Split
    val: Split
    test: Split
    source: Path
    note: str = ""  # how the splits were made, for the run folder (e.g. "1000 held out of train/ (seed 0)")

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}: train, val or test")
        return getattr(self, name)


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    val_size: int = VAL_SIZE,
    split_seed: int = SPLIT_SEED,
    train_limit: int | None = None,
) -> FashionMNIST:
    """Load (once per process) and split Fashion-MNIST. `train_limit` keeps the first n train images."""
    directory = find_data_dir(data_dir)
    data = _load_cached(str(directory), int(val_size), int(split_seed))
    if train_limit is not None:
        data = FashionMNIST(data.train.subset(train_limit), data.val, data.test, data.source)
    return data


@functools.lru_cache(maxsize=2)
def _load_cached(directory: str, val_size: int, split_seed: int) -> FashionMNIST:
    d = Path(directory)
    x, y = _load_pair(d, "train_images", "train_labels")
    xt, yt = _load_pair(d, "test_images", "test_labels")
    if not 0 <= val_size < len(y):
        raise AmcError(f"validation size {val_size} must be between 0 and {len(y) - 1}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return FashionMNIST(
        train=Split(x[train_idx], y[train_idx]),
        val=Split(x[val_idx], y[val_idx]),
        test=Split(xt, yt),
        source=d,
    )


def clear_cache() -> None:
    _load_cached.cache_clear()


_BACKGROUND = (0.0 - MEAN) / STD  # a black pixel after normalisation


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 2) -> torch.Tensor:
    """Random crop with `pad` pixels of black padding, and a random horizontal flip, per image."""
    b, c, h, w = x.shape
    dev = x.device  # random numbers come from the (CPU) generator, then move to the data's device
    padded = F.pad(x, (pad, pad, pad, pad), value=_BACKGROUND)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (b, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, :]  # (b, 1, w)
    batch = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # (b, h, w, c)
    out = out.permute(0, 3, 1, 2)
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


class BatchLoader:
    """Minibatches straight from the in-memory tensors (much faster than a per-item DataLoader)."""

    def __init__(
        self,
        split: Split,
        batch_size: int = 256,
        shuffle: bool = False,
        augment: bool = False,
        seed: int | None = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            if order is None:
                x, y = self.split.images[sl], self.split.labels[sl]
            else:
                idx = order[sl].to(self.split.images.device)
                x, y = self.split.images[idx], self.split.labels[idx]
            if self.augment:
                x = augment_batch(x, self.generator)
            yield x, y
