"""train.py from the command line: what a checkpoint holds, load_model(), and exact resuming."""
import pytest
import torch

from config import UserError
from conftest import INTERRUPT_AFTER, TRAIN_FLAGS, TRAIN_STEPS, check_ok, run_python, run_script, tiny_config
from unet import load_model


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs by {(a[k].float() - b[k].float()).abs().max()}"


def test_checkpoint_contents(base_run):
    """The checkpoint records its configs, step, losses and every piece of state a resume needs."""
    ckpt = load(base_run["ckpt"])
    assert ckpt["kind"] == "model"
    assert ckpt["step"] == TRAIN_STEPS and len(ckpt["losses"]) == TRAIN_STEPS
    assert all(loss > 0 for loss in ckpt["losses"])
    assert tuple(ckpt["model_config"]["widths"]) == (8, 16) and ckpt["model_config"]["T"] == 50
    assert ckpt["train_config"]["max_steps"] == TRAIN_STEPS and ckpt["train_config"]["batch_size"] == 8
    for key in ("model", "ema", "optimizer", "scheduler", "batches", "rng"):
        assert key in ckpt, key
    assert ckpt["batches"]["epoch"] == ckpt["epoch"] >= 1          # 3 batches per epoch: crossed one


def test_load_model_gives_the_saved_weights(base_run):
    """load_model rebuilds the UNet from the checkpoint's own config and loads exactly its raw or EMA weights."""
    ckpt = load(base_run["ckpt"])
    raw, _ = load_model(str(base_run["ckpt"]), "raw")
    assert raw.cfg == tiny_config() and not raw.training
    assert_same_tensors(raw.state_dict(), ckpt["model"], "raw")
    ema, _ = load_model(str(base_run["ckpt"]), "ema")
    expected = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert_same_tensors(ema.state_dict(), expected, "ema")
    assert any(not torch.equal(raw.state_dict()[k], ema.state_dict()[k]) for k in expected)


def test_load_model_refuses_weights_that_do_not_fit_the_config(base_run, tmp_path):
    """A checkpoint whose config does not match its tensors is a UserError, not a load_state_dict traceback."""
    ckpt = load(base_run["ckpt"])
    ckpt["model_config"]["widths"] = [8, 24]
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    with pytest.raises(UserError, match="does not fit"):
        load_model(str(bad), "raw")


def test_resume_after_ctrl_c_equals_uninterrupted_run(base_run, image_folder, tmp_path):
    """Ctrl-C after step 3 of 6 saves a checkpoint and exits 130; --resume then finishes with exactly the
    weights, EMA and losses of the uninterrupted 6-step run (RNG, batch order, optimizer, LR schedule)."""
    ckpt = tmp_path / "m.pt"
    first = run_python(INTERRUPT_AFTER, "train", 3, "--data", image_folder, "--out", ckpt,
                       "--out-dir", tmp_path / "out", "--max-steps", TRAIN_STEPS, *TRAIN_FLAGS)
    assert first.returncode == 130, first.stderr[-2000:]          # the shell's code for Ctrl-C
    assert "interrupted" in first.stdout and "Traceback" not in first.stderr
    assert load(ckpt)["step"] == 3
    check_ok(run_script("train.py", "--resume", "--data", image_folder, "--out", ckpt,
                        "--out-dir", tmp_path / "out", "--device", "cpu"))
    resumed, straight = load(ckpt), load(base_run["ckpt"])
    assert resumed["step"] == straight["step"] == TRAIN_STEPS
    assert resumed["losses"] == straight["losses"]
    assert_same_tensors(resumed["model"], straight["model"], "model")
    assert_same_tensors(resumed["ema"], straight["ema"], "ema")


def test_resume_refuses_changed_settings(base_run, image_folder, tmp_path):
    """--resume keeps the run's own settings: the LR schedule and batch order depend on max_steps and
    batch_size, so asking for other values is refused with one clear line, and the checkpoint is untouched."""
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(base_run["ckpt"].read_bytes())
    before = ckpt.read_bytes()
    result = run_script("train.py", "--resume", "--max-steps", TRAIN_STEPS + 3, "--batch-size", 4,
                        "--data", image_folder, "--out", ckpt, "--out-dir", tmp_path / "out", "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
    assert "max_steps" in result.stderr and "batch_size" in result.stderr
    assert ckpt.read_bytes() == before
