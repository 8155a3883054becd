"""Data that looks right but is not: odd label folder names, corrupt MNIST/Fashion-MNIST raw files, a named pipe
among the images, 16-bit and transparent PNGs, and an odd LoRA rank. Each wrong input is one line and exit 2
(or, for pictures that are only unusual, the right pixels). Nothing here downloads: the data is written into tmp_path."""
import gzip
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from config import UserError
from conftest import TRAIN_FLAGS, check_ok, check_user_error, run_script, write_image_folder
from dataset import load_images
from lora import target_ranks
from test_dataset import write_idx

ODD_LABELS = ["²", "99999999999999999999999"]       # both pass str.isdigit(); int() refuses one, torch the other


# ----------------------------------------------------------------------------- label folders

@pytest.mark.parametrize("name", ODD_LABELS)
def test_label_folder_that_is_not_a_usable_number(tmp_path, name):
    """A label folder named by a superscript digit or by a number past any model's labels is refused, named."""
    folder = write_image_folder(tmp_path / "d", per_label=1)
    (folder / name).mkdir()
    Image.new("L", (28, 28)).save(folder / name / "0.png")
    with pytest.raises(UserError, match=name):
        load_images(str(folder), None, 28)


def test_odd_label_folders_on_the_command_line(tmp_path):
    """dataset.py and train.py (which both load through dataset.load_images) end with one line, exit 2."""
    for i, name in enumerate(ODD_LABELS):
        folder = write_image_folder(tmp_path / f"d{i}", per_label=1)
        (folder / name).mkdir()
        Image.new("L", (28, 28)).save(folder / name / "0.png")
    check_user_error(run_script("dataset.py", "--data", tmp_path / "d0", "--out", tmp_path / "x.png"), "²")
    check_user_error(run_script("train.py", "--data", tmp_path / "d1", "--out", tmp_path / "m.pt",
                                "--out-dir", tmp_path / "out", "--max-steps", 1, *TRAIN_FLAGS), ODD_LABELS[1])
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "m.pt").exists()


def test_odd_lora_rank():
    """--lora-targets conv:² is refused like any other rank that is not a number in [1, 1024]."""
    with pytest.raises(UserError, match="conv:²"):
        target_ranks(["conv:²"], 1)


def test_odd_lora_rank_on_the_command_line(tmp_path):
    check_user_error(run_script("lora_finetune.py", "--lora-targets", "conv:²", "--out", tmp_path / "l.pt"),
                     "'conv:²'")


# ----------------------------------------------------------------------------- MNIST / Fashion-MNIST raw files

def fake_raw(root, n_images=5, n_labels=5):
    """root/FashionMNIST/raw with n_images 28x28 images and n_labels labels, gzipped like torchvision's."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    files = raw / "train-images-idx3-ubyte.gz", raw / "train-labels-idx1-ubyte.gz"
    write_idx(files[0], torch.zeros(n_images, 28, 28, dtype=torch.uint8))
    write_idx(files[1], torch.arange(n_labels, dtype=torch.uint8) % 10)
    return files


def spoil(files, how):
    images, labels = files
    if how == "empty":                                          # plain files of 0 bytes
        for f in files:
            f.write_bytes(b"")
            f.rename(str(f)[:-3])
    elif how == "truncated gz":
        images.write_bytes(images.read_bytes()[:len(images.read_bytes()) // 2])
    elif how == "text named .gz":
        images.write_text("not gzip\n")
    elif how == "truncated plain":                              # the header promises more images than follow
        data = gzip.decompress(images.read_bytes())
        images.unlink()
        open(str(images)[:-3], "wb").write(data[:-100])
        labels.rename(str(labels)[:-3])
    elif how == "swapped":
        a, b = images.read_bytes(), labels.read_bytes()
        images.write_bytes(b)
        labels.write_bytes(a)


@pytest.mark.parametrize("how,counts,names", [
    ("empty", (5, 5), "train-images-idx3-ubyte"),
    ("truncated gz", (5, 5), "train-images-idx3-ubyte.gz"),
    ("text named .gz", (5, 5), "train-images-idx3-ubyte.gz"),
    ("truncated plain", (5, 5), "train-images-idx3-ubyte"),
    ("swapped", (5, 5), "train-images-idx3-ubyte.gz"),
    ("more images than labels", (6, 3), "3 labels"),
    ("more labels than images", (3, 6), "6 labels"),
])
def test_corrupt_raw_files_are_one_line(tmp_path, monkeypatch, how, counts, names):
    """Raw IDX files that are empty, cut short, not gzip, swapped or of different lengths are refused naming
    the file (or the two counts), before a tensor is made of them; nothing is downloaded in their place."""
    monkeypatch.setitem(sys.modules, "torchvision", None)
    spoil(fake_raw(tmp_path, *counts), how)
    with pytest.raises(UserError, match=names):
        load_images("fashion-mnist", str(tmp_path), 28)


def test_corrupt_raw_file_on_the_command_line(tmp_path):
    spoil(fake_raw(tmp_path), "truncated gz")
    check_user_error(run_script("dataset.py", "--data", "fashion-mnist", "--data-root", tmp_path,
                                "--out", tmp_path / "x.png"), "train-images-idx3-ubyte.gz")


# ----------------------------------------------------------------------------- files in the label folders

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX thing")
def test_named_pipe_in_a_label_folder_is_skipped(tmp_path):
    """A FIFO named like an image would block the first read forever: it is skipped with the other non-images."""
    folder = write_image_folder(tmp_path / "d", per_label=1)
    os.mkfifo(folder / "0" / "pipe.png")
    result = check_ok(run_script("dataset.py", "--data", folder, "--out", tmp_path / "x.png", timeout=60))
    assert "skipped 1 file(s)" in result.stderr and "pipe.png" in result.stderr


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale PNG (Pillow's mode I;16) keeps its gray levels: 20000/65535 is 78/255, not 255."""
    (tmp_path / "d" / "0").mkdir(parents=True)
    pixels = np.full((28, 28), 20000, dtype=np.uint16)
    pixels[0, :2] = 0, 65535
    Image.fromarray(pixels).save(tmp_path / "d" / "0" / "a.png")
    images, _ = load_images(str(tmp_path / "d"), None, 28)
    assert images[0, 0, 5, 5] == 78 and images[0, 0, 0, :2].tolist() == [0, 255]


def test_transparent_png(tmp_path):
    """RGBA: transparent pixels show MNIST's black background; a shape drawn only in the alpha channel (the
    colour the same everywhere) is taken as the ink, white on black; an opaque image is plain grayscale."""
    (tmp_path / "d" / "0").mkdir(parents=True)
    square = np.zeros((28, 28), dtype=np.uint8)
    square[10:20, 10:20] = 255
    for name, rgb in (("black_ink", 0), ("white_ink", 255)):           # one colour everywhere, the shape in alpha
        rgba = np.dstack([np.full((28, 28, 3), rgb, np.uint8), square])
        Image.fromarray(rgba, "RGBA").save(tmp_path / "d" / "0" / f"{name}.png")
    opaque = np.dstack([np.full((28, 28, 3), 100, np.uint8), np.full((28, 28), 255, np.uint8)])
    opaque[:14, :, 0] = 200
    Image.fromarray(opaque, "RGBA").save(tmp_path / "d" / "0" / "opaque.png")
    images, _ = load_images(str(tmp_path / "d"), None, 28)
    for i in (0, 2):                                                     # sorted: black_ink, opaque, white_ink
        assert torch.equal(images[i, 0], torch.from_numpy(square)), i
    expected = np.asarray(Image.fromarray(opaque[..., :3], "RGB").convert("L"))
    assert torch.equal(images[1, 0], torch.from_numpy(expected.copy()))


def test_float_tiff_pixels(tmp_path):
    """32-bit float images (Pillow's mode F, e.g. TIFF): 0..1 is scaled to 0..255 (convert("L") alone read it
    as black), 0..255 is kept (rounded), and any other range (or nan) is one line naming the file."""
    (tmp_path / "d" / "0").mkdir(parents=True)
    ramp = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(28, 28)
    Image.fromarray(ramp, "F").save(tmp_path / "d" / "0" / "a_unit.tif")
    Image.fromarray(ramp * 255, "F").save(tmp_path / "d" / "0" / "b_bytes.tif")
    images, _ = load_images(str(tmp_path / "d"), None, 28)
    expected = torch.from_numpy(np.round(ramp * 255).astype(np.uint8))
    assert (images[0, 0].int() - expected.int()).abs().max() <= 1 and images[0, 0].max() == 255
    assert (images[1, 0].int() - expected.int()).abs().max() <= 1
    for bad in (ramp - 0.5, np.full((28, 28), np.nan, np.float32)):
        Image.fromarray(bad, "F").save(tmp_path / "d" / "0" / "c_bad.tif")
        with pytest.raises(UserError, match="c_bad.tif holds floating-point pixels"):
            load_images(str(tmp_path / "d"), None, 28)


def test_32_bit_integer_tiff_pixels(tmp_path):
    """32-bit integer images (Pillow's mode I, e.g. a numpy int32 array saved as TIFF): 0..255 is kept (it was
    read as 16-bit, so 255 became 1, a black digit), 0..65535 is scaled as 16-bit, and any other range is one
    line naming the file."""
    (tmp_path / "d" / "0").mkdir(parents=True)
    ramp = np.arange(28 * 28, dtype=np.int32).reshape(28, 28) % 256
    Image.fromarray(ramp, "I").save(tmp_path / "d" / "0" / "a_bytes.tif")
    Image.fromarray(ramp * 257, "I").save(tmp_path / "d" / "0" / "b_words.tif")
    images, _ = load_images(str(tmp_path / "d"), None, 28)
    assert torch.equal(images[0, 0], torch.from_numpy(ramp.astype(np.uint8)))
    assert torch.equal(images[1, 0], torch.from_numpy(ramp.astype(np.uint8)))
    for bad in (ramp - 1, ramp + 65536):
        Image.fromarray(bad, "I").save(tmp_path / "d" / "0" / "c_bad.tif")
        with pytest.raises(UserError, match="c_bad.tif holds integer pixels"):
            load_images(str(tmp_path / "d"), None, 28)
