"""Wrong input to the bench scripts (bench/*.py) ends as it does for the project's commands: one `error:` line,
exit code 2, before any work, no file written; a bench run again in the same --work folder redoes its files; the
evaluator's cache of an image folder follows the folder's contents. Fast: the cases that stop at their flags run
in test_bad_inputs.py's fork server (torch imported once); nothing trains for real but the evaluator's tiny CNN."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import bench.evaluate as ev
from config import UserError
from conftest import check_ok, check_user_error, write_image_folder
from test_bad_inputs import cli, snapshot  # noqa: F401  (fixture)

# (id, script, args, fragments of the error line). {file}: an existing file; {tmp}: the case's own folder;
# {ckpt}: the session's tiny checkpoint; {digits}: a tiny image folder; {samples}: a good samples file.
CASES = [
    ("knobs-threads-negative", "bench/knobs.py", ["--threads", "-1"], ["--threads", "got -1"]),
    ("knobs-seed-too-large", "bench/knobs.py", ["--seed", "99999999999999999999"],
     ["--seed", "got 99999999999999999999"]),
    ("knobs-per-label-not-a-number", "bench/knobs.py", ["--per-label", "x"], ["--per-label", "got x"]),
    ("knobs-cache-dir-is-a-file", "bench/knobs.py", ["--cache-dir", "{file}", "--mnist-folder", "{digits}"],
     ["--cache-dir", "is a file, not a folder"]),
    ("evaluate-cache-dir-is-a-file", "bench/evaluate.py", ["{samples}", "--cache-dir", "{file}",
                                                           "--mnist-folder", "{digits}"], ["--cache-dir", "is a file"]),
    ("speed-device-not-a-device", "bench/speed.py", ["--quick", "--device", "gpu0"], ["gpu0", "not a device"]),
    ("speed-threads-negative", "bench/speed.py", ["--quick", "--threads", "-1"], ["--threads", "got -1"]),
    ("speed-batch-size-0", "bench/speed.py", ["--quick", "--batch-size", "0", "--parts", "training"],
     ["--batch-size", "got 0"]),
    ("speed-parts-unknown", "bench/speed.py", ["--quick", "--parts", "training,fast"], ["--parts", "unknown fast"]),
    ("ablation-runs-dir-is-a-file", "bench/ablation.py", ["--runs-dir", "{file}", "--only", "default"],
     ["--runs-dir", "is a file, not a folder"]),
    ("ablation-only-empty", "bench/ablation.py", ["--runs-dir", "{tmp}/runs", "--data", "{tmp}/nodata", "--only", ""],
     ["--only", "none given"]),
    ("ablation-per-label-not-a-number", "bench/ablation.py", ["--per-label", "x"], ["--per-label", "got x"]),
    # (--runs base: the unfixed script did one run, then failed at --figures)
    ("lora-fashion-figures-is-a-file", "bench/lora_fashion.py",
     ["--base", "{ckpt}", "--quick", "--runs", "base", "--work", "{tmp}/W", "--figures", "{file}"],
     ["--figures", "is a file"]),
    ("lora-fashion-work-is-a-file", "bench/lora_fashion.py",
     ["--base", "{ckpt}", "--quick", "--runs", "base", "--work", "{file}"], ["--work", "is a file"]),
    ("lora-fashion-base-is-a-folder", "bench/lora_fashion.py", ["--base", "{tmp}"], ["is a folder, not a model file"]),
    ("lora-fashion-steps-not-a-number", "bench/lora_fashion.py", ["--base", "{ckpt}", "--steps", "x"],
     ["--steps", "got x"]),
    ("lora-fashion-seed-too-large", "bench/lora_fashion.py", ["--base", "{ckpt}", "--seed", "99999999999999999999"],
     ["--seed", "got 99999999999999999999"]),
    ("lora-fashion-strict-seed-twice", "bench/lora_fashion.py", ["--base", "{ckpt}", "--strict-seeds", "0,0"],
     ["--strict-seeds", "give each seed once"]),
    ("strict-reader-cache-dir-is-a-file", "bench/strict_reader.py", ["{samples}", "--cache-dir", "{file}"],
     ["--cache-dir", "is a file"]),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, base_run):
    """Read-only inputs for the cases: the tiny checkpoint, a tiny image folder, a good samples file."""
    d = tmp_path_factory.mktemp("bench-inputs")
    torch.save({"images": torch.zeros(10, 1, 28, 28, dtype=torch.uint8), "labels": torch.arange(10)}, d / "s.pt")
    return {"ckpt": base_run["ckpt"], "digits": write_image_folder(d / "digits"), "samples": d / "s.pt"}


@pytest.mark.parametrize("script,args,fragments", [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_bad_bench_input(cli, shared, tmp_path, script, args, fragments):
    (tmp_path / "afile.pt").write_text("a file the user has\n")
    before = snapshot(tmp_path)
    names = {"{file}": tmp_path / "afile.pt", "{tmp}": tmp_path, **{f"{{{k}}}": v for k, v in shared.items()}}
    for name, value in names.items():
        args = [a.replace(name, str(value)) for a in args]
    check_user_error(cli.run(script, *args), *fragments)
    assert snapshot(tmp_path) == before                     # nothing written, the file kept


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_speed_on_a_gpu_the_machine_does_not_have(cli):
    check_user_error(cli.run("bench/speed.py", "--quick", "--device", "cuda"), "--device cuda", "no cuda device")


# lora_fashion.py with the evaluator's and the strict reader's scores faked (both are tested on their own; real ones
# would train a classifier on Fashion-MNIST): every other child runs for real.
FIXED_SCORE = r"""
import json
import bench.lora_fashion as bench
real = bench.run_child
def run_child(cmd, log_path):
    if "bench/evaluate.py" in cmd:
        log_path.write_text(json.dumps({"accuracy": 0.5, "fd_ratio": 2.0}) + "\n")
        return 0.0, 0.0
    if "bench/strict_reader.py" in cmd:           # its seed after --seeds, read back as the accuracy
        log_path.write_text(json.dumps({"accuracy": int(cmd[cmd.index("--seeds") + 1]) / 10}) + "\n")
        return 0.0, 0.0
    return real(cmd, log_path)
bench.run_child = run_child
bench.run_main(bench.main)
"""


def test_lora_fashion_runs_again_in_the_same_work_folder(cli, base_run, tmp_path):
    """The bench owns its --work folder's files: a second run redoes them (it used to stop at denoise.py, which
    refused to replace the first run's samples, leaving them older than what they were sampled from)."""
    args = ["--base", base_run["ckpt"], "--quick", "--runs", "base", "--work", tmp_path / "W",
            "--figures", tmp_path / "F"]
    check_ok(cli.run(None, *args, code=FIXED_SCORE))
    samples = tmp_path / "W" / "base.samples.pt"
    first = samples.stat().st_ino
    result = check_ok(cli.run(None, *args, code=FIXED_SCORE))
    assert samples.stat().st_ino != first and "| base |" in result.stdout      # written again (atomically)
    assert (tmp_path / "F" / "lora_fashion.png").is_file()


def test_lora_fashion_strict_seeds_read_each_run_with_each_reader(cli, base_run, tmp_path):
    """--strict-seeds 3,4: bench/strict_reader.py reads every run's samples once per seed, in a table of its own."""
    result = check_ok(cli.run(None, "--base", base_run["ckpt"], "--quick", "--runs", "base", "--work", tmp_path / "W",
                              "--figures", tmp_path / "F", "--strict-seeds", "3,4", code=FIXED_SCORE))
    assert "| run | strict 3 | strict 4 | of full's, mean |" in result.stdout
    assert "| base | 30.0% | 40.0% | - |" in result.stdout
    assert sorted(p.name for p in (tmp_path / "W").glob("base.strict_reader-seed*.log")) == \
        ["base.strict_reader-seed3.log", "base.strict_reader-seed4.log"]


def test_lora_fashion_quick_keeps_an_explicit_per_label(cli, base_run, tmp_path):
    """--quick fills in 2 samples per label (and 3 steps) only where --per-label (--steps) is not given: it used
    to replace them without a word."""
    args = ["--base", base_run["ckpt"], "--runs", "base", "--work", tmp_path / "W", "--figures", tmp_path / "F"]
    for extra, per_label in ((["--quick"], 2), (["--quick", "--per-label", "3"], 3)):
        check_ok(cli.run(None, *args, *extra, code=FIXED_SCORE))
        labels = torch.load(tmp_path / "W" / "base.samples.pt")["labels"]
        assert torch.bincount(labels).tolist() == [per_label] * 10, extra


def test_lora_fashion_child_failure_is_one_line_naming_its_log(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    line = check_user_error(cli.run(None, "--base", tmp_path / "notes.txt", "--quick", "--runs", "base", "--work",
                                    tmp_path / "W", "--figures", tmp_path / "F", code=FIXED_SCORE),
                            "denoise.py failed (exit 2", "not a readable model file")
    assert line.endswith(f"see {tmp_path / 'W' / 'base.denoise.log'}")
    assert "denoise.py" in (tmp_path / "W" / "base.denoise.log").read_text().splitlines()[0]   # the command


def test_evaluate_cache_follows_the_folders_contents(tmp_path):
    """Other images in the --mnist-folder (the same names and count): new images and a new classifier, not the
    cached ones of the old images."""
    folder, cache = write_image_folder(tmp_path / "digits", seed=0), tmp_path / "cache"
    load = lambda: ev.load_classifier("mnist", mnist_folder=folder, cache_dir=cache, verbose=False)[1]  # noqa: E731
    first = load()
    assert load()["cached"]                                 # the same folder: from the cache
    stamps = {f: f.stat().st_mtime_ns for f in folder.rglob("*.png")}
    write_image_folder(folder, seed=1)
    for f, ns in stamps.items():                            # written a second later (whatever the clock's resolution)
        os.utime(f, ns=(ns + 10 ** 9, ns + 10 ** 9))
    second = load()
    assert not second["cached"] and not torch.equal(second["train_x"], first["train_x"])
    assert second["source"] != first["source"]


def test_evaluate_skips_a_file_that_is_not_an_image(tmp_path, capsys):
    """As train.py --data does (dataset.load_folder): skipped with one warning that names it."""
    folder = write_image_folder(tmp_path / "digits")
    (folder / "3" / "bad.png").write_text("not an image\n")
    real = ev.load_real("mnist", mnist_folder=folder, cache_dir=tmp_path / "cache")
    assert len(real["train_x"]) + len(real["held_x"]) == 30
    assert "skipped 1 file(s) that are not images: 3/bad.png" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_evaluate_passes_over_a_named_pipe(cli, tmp_path):
    """A named pipe called 0/pipe.png in --mnist-folder is passed over, not opened (open() would wait forever)."""
    folder = write_image_folder(tmp_path / "digits", per_label=1)
    os.mkfifo(folder / "0" / "pipe.png")
    code = "import sys; import bench.evaluate as ev; print(len(ev._load_png_folder(sys.argv[1], sys.argv[2])[0]))"
    result = cli.run(None, folder, tmp_path / "cache", code=code, timeout=30)
    check_ok(result)
    assert result.stdout.split()[-1] == "10"


def test_evaluate_refuses_16_bit_images_in_one_line(tmp_path):
    """convert("L") would clip a 16-bit PNG's every nonzero pixel to 255: the evaluator refuses it instead."""
    folder = write_image_folder(tmp_path / "digits", per_label=1)
    Image.fromarray(np.full((28, 28), 20000, dtype=np.uint16)).save(folder / "4" / "deep.png")
    with pytest.raises(ev.DataError, match="deep.png: I;16 pixels"):
        ev.load_real("mnist", mnist_folder=folder, cache_dir=tmp_path / "cache")


def test_spread_leaves_out_a_label_without_spread_in_the_reference():
    """Reference images of a label all alike (a trace of 0) leave that label out, not a ZeroDivisionError."""
    feats, labels = torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1, 1])
    assert list(ev.within_label_spread(feats, labels, {0: 0.0, 1: 2.0})) == [1]


@pytest.mark.parametrize("damage", ["cut-gz", "not-gz", "short", "counts", "32x32", "label-10"])
def test_evaluate_refuses_damaged_raw_files_in_one_line(tmp_path, damage):
    """bench/evaluate.py reads --data-root's raw IDX files itself: damaged ones are a DataError (one line, exit 2
    through main), not an EOFError, BadGzipFile or reshape error; nor are images other than 28x28 or labels past
    9, which the classifiers cannot read (a shape error, an IndexError, or a reader of 32x32 images)."""
    import gzip
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    n_labels, side = 3 if damage == "counts" else 4, 32 if damage == "32x32" else 28
    images = (2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (4, side, side)) + bytes(4 * side ** 2)
    labels = (2049).to_bytes(4, "big") + n_labels.to_bytes(4, "big") + bytes([10 if damage == "label-10" else 0] * n_labels)
    if damage == "short":
        images = images[:-100]
    for name, data in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
        packed = gzip.compress(data)
        (raw / name).write_bytes({"cut-gz": packed[:-20], "not-gz": b"hello"}.get(damage, packed))
    with pytest.raises(ev.DataError, match="t10k"):
        ev._idx_split(raw, "t10k")


# More cases, in the table's form (kept apart from CASES so that edits to either merge cleanly).
MORE_CASES = [
    # folder flags where nothing can be written (writable_folder tries to write there)
    ("evaluate-cache-dir-unwritable", "bench/evaluate.py", ["{samples}", "--cache-dir", "/proc/cachex",
                                                            "--mnist-folder", "{digits}"], ["--cache-dir", "cannot write"]),
    ("evaluate-cache-dir-proc", "bench/evaluate.py", ["{samples}", "--cache-dir", "/proc", "--mnist-folder", "{digits}"],
     ["--cache-dir", "cannot write into /proc"]),
    ("knobs-cache-dir-unwritable", "bench/knobs.py", ["--cache-dir", "/proc/kc"], ["--cache-dir", "cannot write"]),
    ("ablation-runs-dir-unwritable", "bench/ablation.py", ["--runs-dir", "/proc/abl", "--only", "default"],
     ["--runs-dir", "cannot write"]),
    ("lora-fashion-work-unwritable", "bench/lora_fashion.py",
     ["--base", "{ckpt}", "--quick", "--runs", "base", "--work", "/proc/lfw"], ["--work", "cannot write"]),
    ("lora-fashion-figures-unwritable", "bench/lora_fashion.py",
     ["--base", "{ckpt}", "--quick", "--runs", "base", "--work", "{tmp}/W", "--figures", "/proc/lff"],
     ["--figures", "cannot write"]),
    # no output among the digits the evaluator reads (they would be read as digits, or change the cache's key)
    ("evaluate-cache-dir-inside-the-digits", "bench/evaluate.py",
     ["{samples}", "--mnist-folder", "{digits}", "--cache-dir", "{digits}/0"], ["--cache-dir", "is inside", "data this command reads"]),
    ("evaluate-export-into-the-digits", "bench/evaluate.py", ["--export-train-split", "{digits}/new", "--mnist-folder", "{digits}"],
     ["--export-train-split", "is inside"]),
]


@pytest.mark.parametrize("script,args,fragments", [pytest.param(*case[1:], id=case[0]) for case in MORE_CASES])
def test_more_bad_bench_input(cli, shared, tmp_path, script, args, fragments):
    test_bad_bench_input(cli, shared, tmp_path, script, args, fragments)


def test_a_cache_file_that_cannot_be_written_is_one_line_and_leaves_no_tmp(tmp_path):
    """A folder where the evaluator's cache file goes (mnist_folder_uint8.pt, say): a DataError, which the bench
    commands print as one line, not an IsADirectoryError with a stray .tmp beside it."""
    (tmp_path / "mnist_folder_uint8.pt").mkdir()
    with pytest.raises(ev.DataError, match="cannot write .*mnist_folder_uint8.pt: Is a directory"):
        ev.write_then_rename(tmp_path / "mnist_folder_uint8.pt", lambda tmp: tmp.write_bytes(b"cache"))
    assert [p.name for p in tmp_path.iterdir()] == ["mnist_folder_uint8.pt"]


def test_speed_child_failure_is_one_line():
    """A child of bench/speed.py that fails (denoise.py on weights that overflow, say) is one line with the child's
    own error, not the command line and the child's whole stderr."""
    import bench.speed as speed
    child = [sys.executable, "-c", "import sys; print('warning: w\\nerror: it broke', file=sys.stderr); sys.exit(2)"]
    with pytest.raises(UserError, match=r"^python -c failed \(exit 2\): it broke$"):
        speed.wall_seconds(child, env=None)


def test_ablation_keeps_a_users_files_and_reads_only_its_own_records(cli, tmp_path):
    """A run folder of --runs-dir that holds a user's file (train.py --overwrite would replace its model.pt and
    log.txt) is refused before any work, the file kept; a train.json that is not JSON is one line, not a
    traceback."""
    run = tmp_path / "runs" / "default"
    run.mkdir(parents=True)
    (run / "log.txt").write_text("the user's own notes\n")
    flags = ["--runs-dir", tmp_path / "runs", "--only", "default", "--data", tmp_path / "nodata"]
    before = snapshot(tmp_path)
    check_user_error(cli.run("bench/ablation.py", *flags), "--runs-dir's default", "did not write")
    assert snapshot(tmp_path) == before
    (run / "train.json").write_text("garbage")
    check_user_error(cli.run("bench/ablation.py", *flags), "train.json is not a record this bench wrote")


def test_lora_fashion_refuses_a_work_folder_of_the_users_files(cli, base_run, tmp_path):
    """Its children replace files in --work (--overwrite): a folder holding files it did not write (a user's own
    full.pt) is refused, before any work; the user's files are kept."""
    folder = tmp_path / "W"
    folder.mkdir()
    (folder / "full.pt").write_text("the user's own model\n")
    (folder / "full.finetune.log").write_text("the user's own log\n")
    before = snapshot(tmp_path)
    check_user_error(cli.run(None, "--base", base_run["ckpt"], "--quick", "--runs", "full", "--work", folder,
                             "--figures", tmp_path / "F", code=FIXED_SCORE), "--work", "did not write")
    assert snapshot(tmp_path) == before


def test_evaluate_refuses_mnist_folder_with_fashion(cli, shared):
    """--mnist-folder has no use with --domain fashion: refused, not ignored (a fashion score would look right)."""
    check_user_error(cli.run("bench/evaluate.py", shared["samples"], "--domain", "fashion", "--mnist-folder",
                             "/nonexistent", "--json"), "--mnist-folder", "--domain mnist")


def test_evaluate_refuses_a_label_with_no_real_images(tmp_path, monkeypatch):
    """An --mnist-folder whose 9/ is empty, samples that hold label 9: a DataError naming the label (it was a
    RuntimeError from torch.randint drawing the floor's real images), before a classifier is trained."""
    folder = write_image_folder(tmp_path / "digits")
    for f in (folder / "9").iterdir():
        f.unlink()
    monkeypatch.setattr(ev, "train_classifier", lambda *a, **k: pytest.fail("trained before checking the labels"))
    with pytest.raises(ev.DataError, match="label 9"):
        ev.score(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.arange(10), mnist_folder=folder,
                 cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """Random-weight checkpoints the sampling benches cannot use: 2 labels; T=10 diffusion steps."""
    from bench.speed import write_random_checkpoint
    from conftest import tiny_config
    d = tmp_path_factory.mktemp("odd-models")
    write_random_checkpoint(d / "labels2.pt", tiny_config(num_labels=2))
    write_random_checkpoint(d / "t10.pt", tiny_config(T=10))
    return d


@pytest.mark.parametrize("script,args,fragments", [
    ("bench/knobs.py", ["--checkpoint", "labels2.pt"], ["num_labels=2", "num_labels=10"]),
    ("bench/knobs.py", ["--checkpoint", "t10.pt"], ["T=10", "T >= 12"]),
    ("bench/speed.py", ["--quick", "--parts", "training,sampling", "--checkpoint", "labels2.pt"], ["num_labels=2"]),
    ("bench/speed.py", ["--quick", "--parts", "training,sampling", "--checkpoint", "t10.pt"], ["T=10", "T >= 50"]),
    ("bench/speed.py", ["--quick", "--parts", "training,lora", "--checkpoint", "t10.pt"], ["T=10", "T >= 12"]),
    ("bench/speed.py", ["--quick", "--parts", "training,sampling", "--checkpoint", "nope.pt"], ["nope.pt", "not found"]),
], ids=["knobs-2-labels", "knobs-T-10", "speed-2-labels", "speed-T-10", "speed-lora-T-10", "speed-no-checkpoint"])
def test_sampling_benches_refuse_a_model_they_cannot_sample_before_any_work(cli, odd_models, script, args, fragments):
    """The knobs and speed benches sample the digits 0..9 with fixed step counts: a model of other labels or of too
    small a T is refused up front (it was an IndexError, or an error naming --steps after the measuring), and so is
    a --checkpoint that is not there (speed.py found out after ~40 s of training measurements)."""
    result = cli.run(script, *[str(odd_models / a) if a.endswith(".pt") else a for a in args], timeout=30)
    check_user_error(result, *fragments)
    assert result.stderr.count("\n") == 1                   # nothing measured or sampled first
