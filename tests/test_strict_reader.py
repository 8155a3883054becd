"""bench/strict_reader.py on a tiny stand-in for Fashion-MNIST: ten classes that a square's brightness tells apart
(neither the reader's shifts nor its flips change it)."""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import strict_reader  # noqa: E402
from conftest import check_user_error, run_script  # noqa: E402


def squares(n, seed):
    """n images of class i % 10: a 14x14 square of grey level 40 + 24 k in the middle, over faint noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 20, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 10
    x[:, :, 7:21, 7:21] = (40 + 24 * y).to(torch.uint8).view(-1, 1, 1, 1)
    return x, y


def stand_in():
    (tx, ty), (hx, hy) = squares(200, 0), squares(400, 1)
    return dict(train_x=tx, train_y=ty, held_x=hx, held_y=hy)


def test_reads_what_it_learnt_and_refuses_what_was_not_asked(tmp_path):
    """It learns from the held-out split only; samples drawn as asked read high, the same images with each label
    moved by one read low, and its ceiling is measured on the training images it never saw."""
    real = stand_in()
    images, labels = squares(100, 2)
    right = strict_reader.score(images, labels, real, seed=0, cache_dir=tmp_path, epochs=10)
    wrong = strict_reader.score(images, (labels + 1) % 10, real, seed=0, cache_dir=tmp_path, epochs=10)
    assert right["accuracy"] >= 0.9 and right["ceiling"] >= 0.9
    assert wrong["accuracy"] <= 0.2
    assert set(right["per_label"]) == set(range(10)) and right["n"] == 100


def test_trained_once_per_images_seed_and_epochs_then_cached(tmp_path, monkeypatch):
    real = stand_in()
    calls = []
    train = strict_reader.train_reader
    monkeypatch.setattr(strict_reader, "train_reader", lambda *a: calls.append(a[2:]) or train(*a))
    first = strict_reader.load_reader(real, 0, tmp_path, epochs=1)
    again = strict_reader.load_reader(real, 0, tmp_path, epochs=1)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    strict_reader.load_reader(real, 1, tmp_path, epochs=1)                 # another seed
    strict_reader.load_reader(real, 0, tmp_path, epochs=2)                 # other epochs
    real["held_x"] = real["held_x"].flip(-1)
    strict_reader.load_reader(real, 0, tmp_path, epochs=1)                 # other images
    assert len(calls) == 4 and len(list(tmp_path.glob("strict_reader_*.pt"))) == 4


def test_bad_samples_or_missing_data_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("no samples\n")
    check_user_error(run_script("bench/strict_reader.py", tmp_path / "notes.txt", "--data-root", tmp_path),
                     "notes.txt")
    images, labels = squares(20, 0)
    torch.save({"images": images, "labels": labels}, tmp_path / "s.pt")
    check_user_error(run_script("bench/strict_reader.py", tmp_path / "s.pt", "--data-root", tmp_path / "nothing"),
                     "FashionMNIST")
