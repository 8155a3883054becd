"""figures.py: the pictures every script writes, and its own demo (python figures.py)."""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import check_ok, check_user_error, run_python, run_script
from figures import make_grid


def test_demo_draws_its_two_figures(tmp_path):
    result = check_ok(run_script("figures.py", "--out-dir", tmp_path / "out"))
    assert "saved" in result.stdout
    for name in ("figures_grid.png", "figures_loss.png"):
        with Image.open(tmp_path / "out" / name) as img:
            assert img.format == "PNG" and min(img.size) > 50, name
            assert np.asarray(img.convert("L")).std() > 10, name          # something drawn, not a blank page


def test_demo_refuses_a_file_as_its_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    check_user_error(run_script("figures.py", "--out-dir", tmp_path / "notes.txt"), "is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("n, nrow, padding, pad_value", [(10, 10, 2, 64), (7, 3, 2, 64), (12, 5, 1, 0), (2, 8, 0, 9)])
def test_make_grid_draws_what_torchvision_draws(n, nrow, padding, pad_value):
    images = torch.randint(0, 256, (n, 1, 6, 5), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    theirs = torchvision.utils.make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)[0]
    assert torch.equal(make_grid(images, nrow, padding, pad_value), theirs)


def test_the_scripts_start_without_importing_torchvision():
    """Importing torchvision costs seconds (it loads torch._dynamo); only a download needs it."""
    result = check_ok(run_python("import sys, train, lora_finetune, denoise; print('torchvision' in sys.modules)"))
    assert result.stdout.split() == ["False"], result.stdout
