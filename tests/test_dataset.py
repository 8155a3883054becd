"""Batches (epoch coverage, resumable state) and loading a folder of images."""
import gzip
import io
import os
import sys

import pytest
import torch
import torchvision

from config import UserError
from conftest import write_image_folder
from dataset import Batches, fit_size, load_images, to_model_range


def numbered_images(n):
    """Image i is filled with the value i, so a batch tells which images it holds."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()
    return images, torch.arange(n)


def ids(x):
    """Recover the image numbers from a batch in model range."""
    return ((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


@pytest.mark.parametrize("n,batch_size", [(24, 8), (25, 8), (7, 7)])
def test_every_image_once_per_epoch(n, batch_size):
    """Within an epoch no image repeats; when N is a multiple of the batch size every image appears
    exactly once; a new epoch reshuffles; labels travel with their images."""
    images, labels = numbered_images(n)
    batches = Batches(images, labels, batch_size, seed=3)
    assert len(batches) == n // batch_size
    orders = []
    for epoch in range(3):
        seen = []
        for _ in range(len(batches)):
            x, y = batches.next()
            assert x.shape == (batch_size, 1, 28, 28) and x.dtype == torch.float32
            assert ids(x) == y.tolist()
            seen += y.tolist()
        assert batches.epoch == epoch
        assert len(seen) == len(set(seen)) == len(batches) * batch_size
        if n % batch_size == 0:
            assert sorted(seen) == list(range(n))
        orders.append(seen)
    if n > batch_size:
        assert orders[0] != orders[1]
    batches.next()
    assert batches.epoch == 3


def test_batch_size_larger_than_data_is_clipped():
    """A batch size above N gives one batch of all N images per epoch."""
    images, labels = numbered_images(5)
    batches = Batches(images, labels, 64, seed=0)
    x, y = batches.next()
    assert sorted(y.tolist()) == [0, 1, 2, 3, 4] and len(batches) == 1


def test_batch_size_must_be_positive():
    """Batch size 0 is a UserError."""
    images, labels = numbered_images(5)
    with pytest.raises(UserError):
        Batches(images, labels, 0, seed=0)


def test_state_dict_resumes_the_same_sequence():
    """A Batches restored from state_dict (saved through torch.save/load like a checkpoint, into an
    object made with another seed) yields exactly the batches the original would have."""
    images, labels = numbered_images(20)
    a = Batches(images, labels, 6, seed=1)
    for _ in range(4):                                  # into the second epoch
        a.next()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    expected = [a.next()[1].tolist() for _ in range(7)]      # crosses more epoch boundaries

    b = Batches(images, labels, 6, seed=99)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert [b.next()[1].tolist() for _ in range(7)] == expected
    assert b.epoch == a.epoch and b.pos == a.pos


def write_idx(path, tensor):
    """An IDX file as MNIST ships it: magic 0,0,8 (uint8), ndim, big-endian sizes, then the bytes."""
    header = bytes([0, 0, 8, tensor.dim()]) + b"".join(n.to_bytes(4, "big") for n in tensor.shape)
    data = header + tensor.numpy().tobytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_raw_files_are_read_without_downloading(tmp_path, suffix, monkeypatch):
    """--data mnist with root/MNIST/raw/train-*-ubyte[.gz] present reads those files (nothing is fetched)."""
    monkeypatch.setitem(sys.modules, "torchvision", None)     # any download attempt fails the test
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    write_idx(raw / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(raw / f"train-labels-idx1-ubyte{suffix}", labels)
    got_images, got_labels = load_images("mnist", str(tmp_path), 28)
    assert torch.equal(got_images, images.unsqueeze(1))
    assert got_labels.dtype == torch.int64 and got_labels.tolist() == [3, 1, 4, 1, 5]


def test_failed_download_is_one_line_and_leaves_no_empty_folders(tmp_path, monkeypatch):
    """Offline, torchvision makes ROOT/MNIST/raw and then fails: the line names the raw files that were looked
    for, and the folders the attempt made are gone again (a folder that was there before stays)."""
    class Offline:
        def __init__(self, root, train, download):
            os.makedirs(os.path.join(root, "MNIST", "raw"), exist_ok=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")
    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    for root in (tmp_path / "new" / "data", tmp_path):
        with pytest.raises(UserError, match=r"could not load or download MNIST .*train-images-idx3-ubyte\[\.gz\]"):
            load_images("mnist", str(root), 28)
        assert not (root / "MNIST").exists()
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()


def test_load_folder(tmp_path, capsys):
    """An ImageFolder loads as uint8 (N,1,28,28) with the subfolder names as labels; stray files (a text file,
    a cut-short PNG, a folder) are skipped with one warning that counts and names them."""
    folder = write_image_folder(tmp_path / "d", per_label=2)
    (folder / "3" / "README.txt").write_text("not an image")
    (folder / "4" / "half.png").write_bytes((folder / "4" / "0.png").read_bytes()[:60])
    (folder / "5" / "sub").mkdir()
    images, labels = load_images(str(folder), None, 28)
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [2] * 10
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "skipped 3 file(s)" in warning[0]
    assert all(name in warning[0] for name in ("README.txt", "half.png", "sub"))


@pytest.mark.parametrize("make", ["missing", "bad_subfolder", "no_images"])
def test_load_folder_errors_are_user_errors(tmp_path, make):
    """A missing folder, non-numeric subfolders or no images at all are UserErrors."""
    folder = tmp_path / "d"
    if make == "bad_subfolder":
        (folder / "cats").mkdir(parents=True)
    elif make == "no_images":
        (folder / "0").mkdir(parents=True)
        (folder / "0" / "x.txt").write_text("hello")
    with pytest.raises(UserError):
        load_images(str(folder), None, 28)


def test_fit_size_pads_and_crops_without_resizing():
    """Smaller images are padded with black, larger ones center-cropped; pixels are never resampled."""
    x = torch.full((1, 1, 20, 20), 200, dtype=torch.uint8)
    padded = fit_size(x, 28)
    assert padded.shape == (1, 1, 28, 28) and padded.sum() == x.sum()
    assert torch.equal(padded[..., 4:24, 4:24], x)
    big = torch.arange(32 * 32).view(1, 1, 32, 32)
    assert torch.equal(fit_size(big, 28), big[..., 2:30, 2:30])


def test_to_model_range():
    """uint8 0 and 255 map to -1 and 1."""
    x = to_model_range(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.tolist() == [-1.0, 1.0]
