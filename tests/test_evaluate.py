"""Fast tests for bench/evaluate.py: the Frechet distance and the samples-file checks.
No classifier is trained and nothing is downloaded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "evaluate.py"
sys.path.insert(0, str(BENCH))
import evaluate as ev  # noqa: E402
from conftest import write_image_folder  # noqa: E402


def test_fd_identical_sets_is_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g) @ torch.randn(16, 16, generator=g)
    assert ev.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fd_shifted_gaussian_is_squared_mean_difference():
    # Same covariance, means differ by delta: FD = ||delta||^2 exactly (for the fitted stats).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    delta = torch.tensor([3.0, -1.0, 0.5, 0, 0, 2.0, 0, 0], dtype=torch.float64)
    fd = ev.frechet_distance(x, x + delta)
    assert fd == pytest.approx(float(delta.pow(2).sum()), rel=1e-6)


def test_fd_matches_closed_form_for_diagonal_covariances():
    # For diagonal S1, S2: FD = ||mu1-mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2.
    mu1 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    s1 = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    s2 = torch.tensor([9.0, 1.0, 0.0], dtype=torch.float64)  # singular on purpose
    expected = (mu1 - mu2).pow(2).sum() + (s1.sqrt() - s2.sqrt()).pow(2).sum()
    fd = ev.frechet_distance_from_stats(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert fd == pytest.approx(float(expected), rel=1e-6)


def test_fd_general_covariances_against_rotation_invariance():
    # FD is invariant to a common rotation of both sets; compare with the unrotated value.
    g = torch.Generator().manual_seed(2)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) * 2 + 1
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert ev.frechet_distance(a, b) == pytest.approx(ev.frechet_distance(a @ q, b @ q), rel=1e-6)
    assert ev.frechet_distance(a, b) == pytest.approx(ev.frechet_distance(b, a), rel=1e-6)


def test_fd_fewer_samples_than_dims_is_finite():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(20, 128, generator=g), torch.randn(30, 128, generator=g)
    fd = ev.frechet_distance(a, b)
    assert fd == fd and 0 < fd < float("inf")


def test_within_label_spread_compares_each_labels_variety_with_reals():
    g = torch.Generator().manual_seed(4)
    means = torch.randn(3, 8, generator=g, dtype=torch.float64) * 10
    ref_y = torch.arange(3).repeat_interleave(4000)
    ref = means[ref_y] + torch.randn(len(ref_y), 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0] * 2000 + [1] * 2000 + [2])                       # label 2: one sample, no spread
    same = means[y] + torch.randn(len(y), 8, generator=g, dtype=torch.float64)
    ratios = ev.within_label_spread(same, y, ev.label_traces(ref, ref_y))
    assert set(ratios) == {0, 1} and all(r == pytest.approx(1, abs=0.1) for r in ratios.values())
    narrow = means[y] + 0.5 * (same - means[y])                           # half the spread: a quarter of tr(cov)
    ratios = ev.within_label_spread(narrow, y, ev.label_traces(ref, ref_y))
    assert all(r == pytest.approx(0.25, abs=0.03) for r in ratios.values())
    assert ev.mean_spread(ratios) == pytest.approx(sum(ratios.values()) / 2, abs=1e-3) and ev.mean_spread({}) is None


def test_score_reports_samples_that_are_all_alike_as_no_spread():
    """score() end to end with a stand-in classifier (features: the image's first pixels): samples that repeat
    one image per label have no spread, real images drawn for the floor have about the held-out's."""
    class Features(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 10), x.flatten(1)[:, :16]
    g = torch.Generator().manual_seed(5)
    real_y = torch.arange(10).repeat(300)
    real_x = torch.randint(0, 256, (len(real_y), 1, 28, 28), generator=g, dtype=torch.uint8)
    feats = lambda images: ev.run_classifier(Features(), images)[1]      # noqa: E731
    info = dict(heldout_features=feats(real_x[:1000]).double(), held_y=real_y[:1000],
                train_features=feats(real_x[1000:]), train_y=real_y[1000:], heldout_accuracy=1.0, source="made-up")
    labels = torch.arange(10).repeat_interleave(20)
    r = ev.score(real_x[labels + 1000], labels, classifier=(Features(), info))     # image i repeated 20 times
    assert r["spread"] == 0 and set(r["spread_per_label"]) == set(range(10))
    assert r["spread_floor"] == pytest.approx(1, abs=0.15)
    assert "spread within each label, samples / held-out real: 0.00" in ev.format_report(r)


def test_load_samples_accepts_a_good_file(tmp_path):
    p = tmp_path / "ok.pt"
    torch.save({"images": torch.zeros(4, 1, 28, 28, dtype=torch.uint8),
                "labels": torch.tensor([0, 1, 2, 9])}, p)
    images, labels = ev.load_samples(p)
    assert images.shape == (4, 1, 28, 28) and labels.tolist() == [0, 1, 2, 9]


def _bad_files(tmp_path):
    good_images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    good_labels = torch.tensor([0, 1, 2, 3])
    cases = {
        "missing": None,
        "wrong_keys": {"imgs": good_images, "labels": good_labels},
        "float_images": {"images": good_images.float(), "labels": good_labels},
        "wrong_shape": {"images": torch.zeros(4, 28, 28, dtype=torch.uint8), "labels": good_labels},
        "int32_labels": {"images": good_images, "labels": good_labels.int()},
        "label_count": {"images": good_images, "labels": good_labels[:3]},
        "label_range": {"images": good_images, "labels": torch.tensor([0, 1, 2, 10])},
        "not_a_dict": [good_images, good_labels],
        "garbage": b"this is not a torch file",
    }
    paths = {}
    for name, obj in cases.items():
        p = tmp_path / f"{name}.pt"
        if isinstance(obj, bytes):
            p.write_bytes(obj)
        elif obj is not None:
            torch.save(obj, p)
        paths[name] = p
    return paths


def test_bad_sample_files_raise_usage_error(tmp_path):
    for name, p in _bad_files(tmp_path).items():
        with pytest.raises(ev.UsageError):
            ev.load_samples(p)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_samples_path_that_is_no_regular_file_is_named_as_such(tmp_path):
    """A folder or a pipe is there but is not a file: the message says so rather than 'not found'."""
    os.mkfifo(tmp_path / "pipe.pt")
    (tmp_path / "folder.pt").mkdir()
    for name, fragment in [("pipe.pt", "not a regular file"), ("folder.pt", "not a regular file"),
                           ("missing.pt", "not found")]:
        with pytest.raises(ev.UsageError, match=fragment):
            ev.load_samples(tmp_path / name)


def test_main_bad_sample_files_return_2(tmp_path, capsys):
    args = ["--data-root", str(tmp_path / "nodata"), "--cache-dir", str(tmp_path / "cache")]
    for name, p in _bad_files(tmp_path).items():
        assert ev.main([str(p)] + args) == 2, name
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("case", ["missing", "wrong_shape"])
def test_cli_bad_sample_file_exit_code_2(tmp_path, case):
    p = _bad_files(tmp_path)[case]
    # Point data and cache at empty folders: a bad samples file must be rejected before
    # any real data is read or any classifier trained.
    r = subprocess.run([sys.executable, str(SCRIPT), str(p), "--data-root", str(tmp_path / "nodata"),
                        "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "cache").exists()


def test_main_missing_real_data_is_one_line_and_exit_2(tmp_path, capsys):
    """A good samples file but no real data where --data-root points: one error line, exit 2, nothing cached."""
    p = tmp_path / "s.pt"
    torch.save({"images": torch.zeros(10, 1, 28, 28, dtype=torch.uint8), "labels": torch.arange(10)}, p)
    assert ev.main([str(p), "--data-root", str(tmp_path / "nodata"), "--cache-dir", str(tmp_path / "cache")]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), err


def _rows(images, labels):
    return sorted((bytes(x.flatten().tolist()), int(y)) for x, y in zip(images, labels))


def test_export_train_split_writes_the_classifier_split_and_no_held_out_digit(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "digits", per_label=5)
    out = tmp_path / "train-split"
    assert ev.main(["--export-train-split", str(out), "--mnist-folder", str(folder),
                    "--cache-dir", str(tmp_path / "cache")]) == 0
    real = ev.load_real("mnist", mnist_folder=folder, cache_dir=tmp_path / "cache")
    written = ev._load_png_folder(out, tmp_path / "cache2")
    assert _rows(*written) == _rows(real["train_x"], real["train_y"])          # 40 of the 50, as PNGs
    assert len(written[0]) == 40
    held = set(_rows(real["held_x"], real["held_y"]))
    assert held and not held & set(_rows(*written))
    assert "wrote 40 digits" in capsys.readouterr().out


def test_real_data_source_names_the_folder_however_its_path_is_written(tmp_path, monkeypatch):
    """The cached classifier is keyed on `source`: a relative path, an absolute one and a link to the same
    folder must give the same key, or each spelling would retrain the classifier over the other's cache."""
    folder = write_image_folder(tmp_path / "data" / "mnist-t10k", per_label=5)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    load = lambda **where: ev.load_real("mnist", cache_dir=tmp_path / "cache", **where)["source"]  # noqa: E731
    sources = {load(mnist_folder=f) for f in (folder, Path("data/mnist-t10k"), Path("link/mnist-t10k"))}
    sources |= {load(data_root=r) for r in (tmp_path / "data", Path("data"), Path("link"), Path("link/../data"))}
    assert len(sources) == 1 and str(folder.resolve()) in sources.pop()


def test_export_train_split_refuses_a_folder_with_files_and_keeps_them(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "digits", per_label=5)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert ev.main(["--export-train-split", str(out), "--mnist-folder", str(folder),
                    "--cache-dir", str(tmp_path / "cache")]) == 2
    out_text, err = capsys.readouterr()
    assert out_text == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "mine"]      # no temporary folder left


def test_export_train_split_to_an_unwritable_name_is_one_line_and_leaves_nothing(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "digits", per_label=5)
    out = tmp_path / ("x" * 300)                                     # longer than a file name may be
    assert ev.main(["--export-train-split", str(out), "--mnist-folder", str(folder),
                    "--cache-dir", str(tmp_path / "cache")]) == 2
    out_text, err = capsys.readouterr()
    assert out_text == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "digits"]


def test_classifiers_of_two_data_sources_are_cached_side_by_side(tmp_path, monkeypatch):
    """Reading with one folder, then another, then the first again trains two classifiers, not three: each
    source keeps its own cache file instead of one file that the other source retrains over."""
    trained = []

    def train_stub(x, y, domain, seed=0, verbose=True):              # untrained weights: only the count matters
        trained.append(len(x))
        torch.manual_seed(seed)
        return ev.Classifier().eval()

    monkeypatch.setattr(ev, "train_classifier", train_stub)
    first = write_image_folder(tmp_path / "first", per_label=5, seed=0)
    second = write_image_folder(tmp_path / "second", per_label=10, seed=1)
    for folder in (first, second, first, second):
        ev.load_classifier("mnist", mnist_folder=folder, cache_dir=tmp_path / "cache", verbose=False)
    assert trained == [40, 80]
    assert len(list((tmp_path / "cache").glob("classifier_mnist_seed0_*.pt"))) == 2
