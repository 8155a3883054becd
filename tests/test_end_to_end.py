"""The whole pipeline at toy size: train.py -> lora_finetune.py -> denoise.py --lora --merge."""
import torch
from PIL import Image

from conftest import check_ok, run_script


def assert_png(path):
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 10 and img.height > 10


def test_train_lora_denoise_pipeline(base_run, lora_run, tmp_path):
    """Every stage writes its files; denoise.py saves the requested labels as uint8 (N,1,28,28) samples."""
    assert base_run["ckpt"].is_file() and lora_run["lora"].is_file()
    assert_png(base_run["out_dir"] / "train_samples.png")
    assert_png(base_run["out_dir"] / "train_loss.png")
    assert_png(lora_run["out_dir"] / "lora_samples.png")
    assert_png(lora_run["out_dir"] / "lora_loss.png")

    samples = tmp_path / "samples.pt"
    out = tmp_path / "out"
    result = check_ok(run_script("denoise.py", "--checkpoint", base_run["ckpt"], "--lora", lora_run["lora"],
                                 "--merge", "--labels", "3,7", "--per-label", 2, "--steps", 5,
                                 "--out-dir", out, "--save-samples", samples, "--device", "cpu"))
    assert "sampled 4 images" in result.stdout
    assert_png(out / "denoise_process.png")
    assert_png(out / "samples.png")
    with Image.open(out / "denoise_process.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames > 2            # the animated denoising process

    s = torch.load(samples, map_location="cpu", weights_only=True)
    assert s["images"].dtype == torch.uint8 and s["images"].shape == (4, 1, 28, 28)
    assert s["labels"].dtype == torch.int64 and s["labels"].tolist() == [3, 3, 7, 7]
    assert s["images"].float().std() > 0                   # not a blank image
