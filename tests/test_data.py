"""The Fashion-MNIST IDX loader: synthetic IDX files written here, the real files when installed."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from adaexit.data import (
    DEFAULT_DIR,
    MEAN,
    STD,
    TensorLoader,
    load_fashion_mnist,
    make_loader,
    read_idx,
    train_val_split,
)


def write_idx(path: Path, array: np.ndarray, *, magic_zero=0, dtype_code=0x08, ndim=None, truncate=0):
    """Write ``array`` (uint8) as an IDX file, gzip-compressed when the name ends in .gz."""
    ndim = array.ndim if ndim is None else ndim
    header = struct.pack(">HBB", magic_zero, dtype_code, ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if truncate:
        payload = payload[:-truncate]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def fake_split(directory: Path, split: str, n: int, seed: int = 0, gz: bool = True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if gz else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


@pytest.fixture
def fake_counts(monkeypatch):
    """Let the loader accept small synthetic splits (the real ones have 60000/10000 rows)."""
    import adaexit.data as data

    files = dict(data._FILES)
    files["train"] = (*files["train"][:2], 50)
    files["test"] = (*files["test"][:2], 20)
    monkeypatch.setattr(data, "_FILES", files)


@pytest.mark.parametrize("gz", [True, False])
def test_loader_reads_synthetic_idx_files(tmp_path, fake_counts, gz):
    images, labels = fake_split(tmp_path, "train", 50, gz=gz)
    x, y = load_fashion_mnist("train", tmp_path)
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (50,) and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    expected = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD
    torch.testing.assert_close(x[:, 0], expected)
    raw, _ = load_fashion_mnist("train", tmp_path, normalize=False)
    torch.testing.assert_close(raw[:, 0] * 255.0, torch.from_numpy(images.astype(np.float32)))


def test_missing_directory_says_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        load_fashion_mnist("test", tmp_path / "nowhere")
    assert "--data" in str(err.value)


def test_missing_file_names_it_and_says_how_to_get_it(tmp_path, fake_counts):
    fake_split(tmp_path, "train", 50)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.*apt-get install"):
        load_fashion_mnist("test", tmp_path)


def test_bad_split_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_fashion_mnist("validation", tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"magic_zero": 0x0102}, "magic number"),
        ({"dtype_code": 0x0D}, "not unsigned byte"),
        ({"truncate": 5}, "payload has"),
    ],
)
def test_malformed_idx_headers_are_rejected(tmp_path, kwargs, message):
    path = tmp_path / "bad-idx3-ubyte.gz"
    write_idx(path, np.zeros((3, 28, 28), np.uint8), **kwargs)
    with pytest.raises(ValueError, match=message):
        read_idx(path)


def test_wrong_dimensions_and_counts_are_rejected(tmp_path, fake_counts):
    write_idx(tmp_path / "x-idx1-ubyte", np.zeros((4,), np.uint8))
    with pytest.raises(ValueError, match="1 dimensions, expected 3"):
        read_idx(tmp_path / "x-idx1-ubyte", expect_dims=3)
    fake_split(tmp_path, "test", 19)  # the (patched) test split must have 20 rows
    with pytest.raises(ValueError, match="expected 20 examples"):
        load_fashion_mnist("test", tmp_path)


def test_mismatched_image_and_label_counts(tmp_path, fake_counts):
    fake_split(tmp_path, "test", 20)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((21,), np.uint8))
    with pytest.raises(ValueError, match="20 images but 21 labels"):
        load_fashion_mnist("test", tmp_path)


def test_corrupt_gzip_is_a_value_error(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read"):
        read_idx(path)


def test_split_is_deterministic_stratified_and_disjoint():
    n = 1000
    x = torch.arange(n, dtype=torch.float32)[:, None]
    y = torch.arange(n) % 10
    a = train_val_split(x, y, 200, seed=4)
    b = train_val_split(x, y, 200, seed=4)
    c = train_val_split(x, y, 200, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[2], c[2])
    x_tr, y_tr, x_val, y_val = a
    assert x_tr.shape[0] == 800 and x_val.shape[0] == 200
    assert set(x_tr[:, 0].long().tolist()).isdisjoint(x_val[:, 0].long().tolist())
    assert sorted(x_tr[:, 0].long().tolist() + x_val[:, 0].long().tolist()) == list(range(n))
    assert torch.bincount(y_val, minlength=10).tolist() == [20] * 10
    assert train_val_split(x, y, 0.1)[2].shape[0] == 100


@pytest.mark.parametrize("val_size", [0, 1000, 1500])
def test_split_rejects_sizes_that_empty_a_side(val_size):
    x, y = torch.zeros(1000, 1), torch.zeros(1000, dtype=torch.long)
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(x, y, val_size)


def test_tensor_loader_covers_every_row_once_per_pass_and_is_seeded():
    x, y = torch.arange(10).float(), torch.arange(10)
    loader = TensorLoader(x, y, batch_size=4, seed=1)
    assert len(loader) == 3
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(10))
    again = [b[1] for b in TensorLoader(x, y, batch_size=4, seed=1)]
    assert all(torch.equal(p, q[1]) for p, q in zip(again, batches))
    assert len(TensorLoader(x, y, batch_size=4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(x, y, batch_size=0)


REAL = DEFAULT_DIR / "train-images-idx3-ubyte.gz"


@pytest.mark.skipif(not REAL.is_file(), reason=f"real Fashion-MNIST not installed at {DEFAULT_DIR} "
                    "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_files():
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [6000] * 10 and torch.bincount(yt).tolist() == [1000] * 10
    # the normalisation constants are the training set's statistics
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-3


def test_batches_reads_tensor_pairs_and_iterables_alike():
    from adaexit.data import batches

    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    chunks = list(batches((x, y), 4))
    assert [c[0].shape[0] for c in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)
    shuffled = list(batches((x, y), 3, shuffle=True, generator=torch.Generator().manual_seed(1)))
    ys = torch.cat([c[1] for c in shuffled])
    assert sorted(ys.tolist()) == list(range(10)) and not torch.equal(ys, y)
    assert all(torch.equal(c[0].squeeze(1).long(), c[1]) for c in shuffled)  # rows stay paired
    assert [len(c[0]) for c in batches([(x[:3], y[:3]), (x[3:], y[3:])])] == [3, 7]
    with pytest.raises(ValueError, match="rows"):
        list(batches((x, y[:5])))
    with pytest.raises(ValueError, match="iterable of \\(x, y\\) batches"):
        list(batches(42))
    with pytest.raises(ValueError, match="iterable of \\(x, y\\) batches"):
        list(batches([x]))


def test_tensor_loader_carries_row_aligned_targets_together():
    """``y`` as a tuple (labels, teacher logits): every batch's parts belong to the same rows."""
    x = torch.arange(10.0).unsqueeze(1)
    labels, logits = torch.arange(10), torch.arange(10.0).unsqueeze(1) * 2
    seen = []
    for xb, (yb, zb) in make_loader(x, (labels, logits), batch_size=3, seed=1):
        assert torch.equal(xb[:, 0].long(), yb) and torch.equal(zb, 2 * xb)
        seen += yb.tolist()
    assert sorted(seen) == list(range(10))
    with pytest.raises(ValueError, match=r"y\[1\] has 9"):
        make_loader(x, (labels, logits[:9]))
