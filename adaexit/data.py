"""Fashion-MNIST from local gzip IDX files: nothing is downloaded.

The files come from the Debian package ``dataset-fashion-mnist`` (installed under
``/usr/share/datasets/fashion-mnist/``) or from any directory holding the four standard files::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

(uncompressed copies without ``.gz`` are accepted too). The IDX format is a big-endian header --
two zero bytes, a type code (``0x08`` = unsigned byte), the number of dimensions, then one 32-bit size
per dimension -- followed by the raw array. The loader checks every part of the header against what
the file is supposed to hold, so a truncated or mislabelled file fails loudly instead of silently
training on garbage.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "ADAEXIT_FASHION_MNIST"  # overrides DEFAULT_DIR when set

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# Mean and std of the Fashion-MNIST training pixels in [0, 1] (computed once on the 60k images).
MEAN, STD = 0.2860, 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
_UBYTE = 0x08

HOW_TO_GET = (
    "Install the Debian/Ubuntu package (no download at run time): "
    "`sudo apt-get install dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist/), "
    "or point at a directory holding the four *-idx?-ubyte(.gz) files with `--data DIR` "
    f"(or data_dir=..., or the {ENV_VAR} environment variable)."
)


def read_idx(path: str | os.PathLike, expect_dims: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip-compressed if its name ends in ``.gz``) into a uint8 numpy array.

    Raises ``ValueError`` naming the file when the magic number, the element type, the number of
    dimensions or the payload size is wrong.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError on truncation
        raise ValueError(f"{path}: cannot read the IDX file ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise ValueError(f"{path}: bad IDX magic number (first two bytes must be zero, got {zero:#06x})")
    if dtype_code != _UBYTE:
        raise ValueError(f"{path}: IDX element type {dtype_code:#04x} is not unsigned byte (0x08)")
    if expect_dims is not None and ndim != expect_dims:
        raise ValueError(f"{path}: IDX file has {ndim} dimensions, expected {expect_dims}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX payload has {len(raw) - header} bytes but the header's shape {shape} needs {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {data_dir}. {HOW_TO_GET}")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$ADAEXIT_FASHION_MNIST``, else the Debian package's directory."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None, normalize: bool = True):
    """Load a Fashion-MNIST split from local IDX files.

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        data_dir: directory with the IDX files; default: ``$ADAEXIT_FASHION_MNIST`` or
            ``/usr/share/datasets/fashion-mnist``.
        normalize: standardise pixels with the training set's mean/std (else scale to [0, 1]).

    Returns:
        ``(images, labels)``: float32 ``[N, 1, 28, 28]`` and int64 ``[N]``.

    Raises:
        FileNotFoundError: the files are absent (the message says how to get them).
        ValueError: a bad ``split``, or a malformed file (wrong magic, shape or count).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = resolve_data_dir(data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory {directory} does not exist. {HOW_TO_GET}")
    image_stem, label_stem, count = _FILES[split]
    images = read_idx(_find(directory, image_stem), expect_dims=3)
    labels = read_idx(_find(directory, label_stem), expect_dims=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{image_stem}: images are {images.shape[1:]}, expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] != count:
        raise ValueError(f"{split}: expected {count} examples, found {images.shape[0]}")
    if labels.size and labels.max() >= len(CLASSES):
        raise ValueError(f"{label_stem}: label {int(labels.max())} out of range 0..{len(CLASSES) - 1}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        x = (x - MEAN) / STD
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def train_val_split(x: torch.Tensor, y: torch.Tensor, val_size: int | float = 5000, seed: int = 0):
    """Hold out a validation split from the training data with a fixed seed (deterministic).

    The split is stratified: each class gives the same share of its examples, so the validation set
    has the training set's class balance. ``val_size`` is a count, or a fraction in (0, 1).

    Returns ``(x_train, y_train, x_val, y_val)``.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} rows but y has {y.shape[0]}")
    if isinstance(val_size, float) and 0 < val_size < 1:
        val_size = int(round(val_size * n))
    val_size = int(val_size)
    if not 0 < val_size < n:
        raise ValueError(f"val_size must leave both splits non-empty: got {val_size} of {n} examples")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    # Stratify: order the shuffled rows by class (stable), then take every k-th row for validation.
    by_class = perm[torch.sort(y[perm], stable=True).indices]
    step = n / val_size
    val_pos = (torch.arange(val_size, dtype=torch.float64) * step).long()
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[by_class[val_pos]] = True
    train_idx = perm[~is_val[perm]]  # keep the shuffled order for training
    val_idx = torch.sort(perm[is_val[perm]]).values
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]



def to_device(x, device):
    """``x`` on ``device``: a tensor, a mapping or tuple of tensors (a tokenizer's output; labels with
    a teacher's logits) or any object with ``.to(device)``; ``device=None`` leaves it where it is."""
    if device is None:
        return x
    if hasattr(x, "to"):  # tensors, a tokenizer's BatchEncoding, RowBatch inputs
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, tuple):  # row-aligned targets: (labels, teacher logits)
        return tuple(to_device(v, device) for v in x)
    return x


def _is_rows(x) -> bool:
    """A tensor, or keyword inputs (a dict / tokenizer ``BatchEncoding`` of tensors with one row count)."""
    if isinstance(x, torch.Tensor):
        return True
    return isinstance(x, Mapping) and len(x) > 0 and all(isinstance(v, torch.Tensor) for v in x.values())


def _num_rows(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    counts = {name: v.shape[0] for name, v in x.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"data: the keyword inputs have different row counts: {counts}")
    return next(iter(counts.values()))


def _take_rows(x, sel: torch.Tensor):
    if isinstance(x, torch.Tensor):
        return x[sel.to(x.device)]
    return {name: v[sel.to(v.device)] for name, v in x.items()}


def batches(data, batch_size: int | None = None, shuffle: bool = False, generator=None, device=None):
    """Yield ``(x, y)`` batches from an ``(x, y)`` pair (``x`` a tensor or keyword inputs such as a
    tokenizer's output; ``y`` a tensor) or from an iterable of batches
    (a ``DataLoader``, a :class:`TensorLoader`, a list), moved to ``device`` when given.

    Every adaexit function that takes ``data`` reads it through here. For tensors, ``batch_size``
    rows at a time (all at once if None), optionally in a random order drawn from ``generator``.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and _is_rows(data[0]) and isinstance(data[1], torch.Tensor):
        x, y = data
        n = _num_rows(x)
        if n != y.shape[0]:
            raise ValueError(f"data: x has {n} rows but y has {y.shape[0]}")
        size = int(batch_size or max(1, n))
        index = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        pairs = ((_take_rows(x, sel), y[sel.to(y.device)]) for sel in index.split(size))
    else:
        try:
            pairs = iter(data)
        except TypeError as err:
            raise ValueError(
                f"data must be an (x, y) pair of tensors or an iterable of (x, y) batches, got {type(data).__name__}"
            ) from err
    for batch in pairs:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("data must be an (x, y) pair of tensors or an iterable of (x, y) batches")
        inputs, labels = batch[0], batch[1]
        yield (inputs, labels) if device is None else (to_device(inputs, device), labels.to(device))


class TensorLoader:
    """Mini-batches ``(x[idx], y[idx])`` over in-memory tensors: a lean stand-in for a ``DataLoader``.

    Indexing whole batches avoids the per-example Python calls of ``DataLoader(TensorDataset)``,
    which cost more than a small network's training step on a 2-core CPU. Shuffling draws a new
    permutation per pass from a generator seeded once, so runs are reproducible.

    Args:
        x, y: inputs and labels with the same number of rows; ``y`` may be a tuple of row-aligned
            tensors (labels and a teacher's logits, for distillation), yielded as a tuple.
        batch_size: rows per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: reshuffle at every pass.
        seed: seed of the shuffling generator.
        drop_last: skip a final incomplete batch.
    """

    def __init__(self, x, y, batch_size=128, shuffle=True, seed=0, drop_last=False):
        for k, t in enumerate(y if isinstance(y, tuple) else (y,)):
            if t.shape[0] != x.shape[0]:
                name = f"y[{k}]" if isinstance(y, tuple) else "y"
                raise ValueError(f"x has {x.shape[0]} rows but {name} has {t.shape[0]}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), bool(shuffle), bool(drop_last)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = self.x.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min(n, (b + 1) * self.batch_size)
            rows = slice(lo, hi) if order is None else order[lo:hi]
            if isinstance(self.y, tuple):
                yield self.x[rows], tuple(t[rows] for t in self.y)
            else:
                yield self.x[rows], self.y[rows]


def make_loader(x: torch.Tensor, y, batch_size: int = 128, shuffle: bool = True, seed: int = 0):
    """A :class:`TensorLoader` over ``(x, y)`` (deterministic shuffling with ``seed``); ``y``: labels, or
    a tuple ``(labels, teacher_logits)`` for :class:`~adaexit.training.MultiExitLoss`'s distillation."""
    return TensorLoader(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed)
