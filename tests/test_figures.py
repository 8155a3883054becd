"""figures.py: the pictures every script writes, and its own demo (python figures.py)."""
import numpy as np
from PIL import Image

from conftest import check_ok, check_user_error, run_script


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
