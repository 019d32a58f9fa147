"""Where a command's images come from: `--data SPEC`.

- `fashion-mnist` (default): the IDX files (`--data-dir`, `$AMC_DATA_DIR`, Debian's package);
- `imagefolder:DIR`: `DIR/train/<class>/*.png|jpg|...` and optionally `DIR/val/<class>/...`, the layout
  torchvision's ImageFolder reads (read here with Pillow, no torchvision). Images are resized (shorter side
  to `input_size / 0.875`, then center-cropped to `input_size`; or straight to `input_size` when they are
  already that small), converted to `channels` (3: RGB, 1: grey) and normalised with `mean`/`std`. The decoded
  images are cached as one uint8 tensor file keyed by the files (paths, sizes, times) and the transform, so an
  episode at 224x224 does not decode JPEGs;
- `FILE.py:FUNCTION` / `package.module:FUNCTION`: a function returning `(train, val)` (or a dict with
  those keys), each a dataset or iterable of `(image, label)`, or an `(images, labels)` pair of tensors.

Without a validation split, AMC's rule holds: the reward's images are held out of the training images,
seeded (`split_seed`), and the data's `note` says how (the run folder records it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amc_mobile.data import FashionMNIST, Split
from amc_mobile.errors import AmcError
from amc_mobile.files import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEFAULT_VAL_SIZE = 1000


@dataclass(frozen=True)
class ImageTransform:
    input_size: int | None = None  # None: the images' own size (they must all agree)
    channels: int = 3
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def key(self) -> str:
        return json.dumps([self.input_size, self.channels, list(self.mean), list(self.std)])


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        vals = ()
    if not vals or not all(np.isfinite(vals)):
        raise AmcError(f"--{what} {text!r}: expected finite numbers separated by commas (e.g. 0.485,0.456,0.406)")
    return vals


def load_data(spec: str | None = None, *, data_dir: str | None = None, input_size: int | None = None,
              channels: int | None = None, mean: str | tuple | None = None, std: str | tuple | None = None,
              val_size: int = DEFAULT_VAL_SIZE, split_seed: int = 0, cache_dir: str | None = None) -> FashionMNIST:
    """The train / val / test splits that `spec` names (see the module doc)."""
    if spec in (None, "", "fashion-mnist", "fashion_mnist"):
        from amc_mobile.data import load_fashion_mnist

        return load_fashion_mnist(data_dir)
    mean_t = mean if isinstance(mean, tuple) else parse_floats(mean, "mean")
    std_t = std if isinstance(std, tuple) else parse_floats(std, "std")
    if std_t is not None and min(std_t) <= 0:
        raise AmcError(f"--std must be positive, got {std_t}")
    if input_size is not None and input_size < 1:
        raise AmcError(f"--input-size must be positive, got {input_size}")
    if spec.startswith("imagefolder:"):
        tf = ImageTransform(input_size, channels or 3, mean_t or (0.5,), std_t or (0.5,))
        return load_image_folder(spec.split(":", 1)[1], tf, val_size, split_seed, cache_dir)
    from amc_mobile.model_io import is_factory_ref

    if is_factory_ref(spec):
        return _from_function(spec, val_size, split_seed)
    raise AmcError(f"--data {spec!r}: expected fashion-mnist, imagefolder:DIR, or FILE.py:FUNCTION")


def hold_out(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    n = len(train)
    k = min(int(val_size), n // 5)
    if k < 1:
        raise AmcError(f"{n} training images are too few to hold out validation images: give a validation split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return (Split(train.images[perm[k:]], train.labels[perm[k:]]), Split(train.images[perm[:k]], train.labels[perm[:k]]))


# ------------------------------------------------------------------------------------ image folders


def _classes(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _files(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    out = []
    for i, c in enumerate(classes):
        for f in sorted((split_dir / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                out.append((f, i))
    return out


def _decode(path: Path, tf: ImageTransform) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if tf.channels == 3 else "L")
            if tf.input_size is not None and im.size != (tf.input_size, tf.input_size):
                s = tf.input_size
                if min(im.size) > s:  # evaluation resize: shorter side to s / 0.875, then the center s x s
                    short = int(round(s / 0.875))
                    w, h = im.size
                    scale = short / min(w, h)
                    im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BILINEAR)
                    w, h = im.size
                    left, top = (w - s) // 2, (h - s) // 2
                    im = im.crop((left, top, left + s, top + s))
                else:
                    im = im.resize((s, s), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as exc:
        raise AmcError(f"{path} is not a readable image ({type(exc).__name__}: {str(exc)[:120]}): remove it "
                       f"or replace it") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decoded(split_dir: Path, classes: list[str], tf: ImageTransform, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    files = _files(split_dir, classes)
    if not files:
        raise AmcError(f"{split_dir} has class folders but no images in them ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
    h = hashlib.sha256(tf.key().encode())
    for f, label in files:
        st = f.stat()
        h.update(f"{f.relative_to(split_dir)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = cache_dir / f"images-{h.hexdigest()[:20]}.pt"
    if cache.is_file():
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True)
            return blob["images"], blob["labels"]
        except Exception:  # a truncated cache is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    arrays = [_decode(f, tf) for f, _ in files]
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise AmcError(f"{split_dir}: the images have different sizes ({', '.join('x'.join(map(str, s[1:])) for s in shapes[:3])}"
                       f"{', ...' if len(shapes) > 3 else ''}): pass --input-size to resize them to one")
    images = torch.from_numpy(np.stack(arrays))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    buf = io.BytesIO()
    torch.save({"images": images, "labels": labels}, buf)
    atomic_write(cache, buf.getvalue(), durable=False)  # a cache: decoding again is the worst case
    return images, labels


def _normalise(images: torch.Tensor, tf: ImageTransform) -> torch.Tensor:
    x = images.float() / 255.0
    c = x.shape[1]
    mean = torch.tensor(tf.mean if len(tf.mean) == c else tf.mean[:1] * c).reshape(1, c, 1, 1)
    std = torch.tensor(tf.std if len(tf.std) == c else tf.std[:1] * c).reshape(1, c, 1, 1)
    if len(tf.mean) not in (1, c) or len(tf.std) not in (1, c):
        raise AmcError(f"--mean/--std give {len(tf.mean)}/{len(tf.std)} values for {c}-channel images")
    return (x - mean) / std


def load_image_folder(root: str | os.PathLike, tf: ImageTransform = ImageTransform(), val_size: int = DEFAULT_VAL_SIZE,
                      split_seed: int = 0, cache_dir: str | os.PathLike | None = None) -> FashionMNIST:
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise AmcError(f"{root} is not an image folder: expected {train_dir}/<class>/<images> (and optionally val/)")
    classes = _classes(train_dir)
    if not classes:
        raise AmcError(f"{train_dir} has no class folders: put each class's images in {train_dir}/<class name>/")
    from device.user_dirs import cache_dir as user_cache

    cache = Path(cache_dir or user_cache()) / "images"
    images, labels = _decoded(train_dir, classes, tf, cache)
    train = Split(_normalise(images, tf), labels)
    val_dir = root / "val"
    if val_dir.is_dir():
        val_classes = _classes(val_dir)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise AmcError(f"{val_dir} has classes that train/ has not: {', '.join(unknown[:5])}")
        vi, vl = _decoded(val_dir, classes, tf, cache)
        val = Split(_normalise(vi, tf), vl)
        how = f"{val_dir}"
    else:
        train, val = hold_out(train, val_size, split_seed)
        how = f"{len(val)} held out of train/ (seed {split_seed})"
    # files are read class by class; commands score and train on prefixes ("the first N images"), so
    # every split is put in one seeded order that mixes the classes
    train, val = _shuffled(train, split_seed), _shuffled(val, split_seed + 1)
    return FashionMNIST(train, val, val, root, f"imagefolder {root}: {len(classes)} classes, {len(train)} train, "
                                                f"val {how}")


def _shuffled(split: Split, seed: int) -> Split:
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return Split(split.images[perm], split.labels[perm])


# ------------------------------------------------------------------------------------- functions


def _from_function(spec: str, val_size: int, seed: int) -> FashionMNIST:
    from amc_mobile.api import as_split
    from amc_mobile.model_io import import_ref

    fn = import_ref(spec)
    try:
        got = fn()
    except Exception as exc:
        raise AmcError(f"{spec} raised {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}") from exc
    if isinstance(got, dict):
        train, val = got.get("train"), got.get("val")
    elif isinstance(got, (tuple, list)) and len(got) == 2 and not isinstance(got[0], torch.Tensor):
        train, val = got
    else:
        train, val = got, None
    if train is None:
        raise AmcError(f"{spec} returned no training data: return (train, val) or {{'train': ..., 'val': ...}}")
    train_s = as_split(train, f"{spec} train")
    if val is None:
        train_s, val_s = hold_out(train_s, val_size, seed)
    else:
        val_s = as_split(val, f"{spec} val")
    if tuple(train_s.images.shape[1:]) != tuple(val_s.images.shape[1:]):
        raise AmcError(f"{spec}: train images are {tuple(train_s.images.shape[1:])}, val images "
                       f"{tuple(val_s.images.shape[1:])}")
    how = "given" if val is not None else f"{len(val_s)} held out of train (seed {seed})"
    return FashionMNIST(train_s, val_s, val_s, Path(spec), f"{spec}: {len(train_s)} train, val {how}")
