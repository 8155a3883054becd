"""Wrong inputs end with exit code 2 and one 'error: ...' line on stderr, never a traceback."""
import pytest
import torch

from conftest import check_user_error, run_script


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, base_run, lora_run):
    """Broken or mismatched files made from the session's real checkpoint and LoRA file."""
    d = tmp_path_factory.mktemp("bad")
    base_bytes = base_run["ckpt"].read_bytes()
    (d / "truncated.pt").write_bytes(base_bytes[: len(base_bytes) // 2])
    (d / "notes.txt").write_text("this is a text file, not a checkpoint\n")

    lora = torch.load(lora_run["lora"], map_location="cpu", weights_only=True)
    lora["rank"] = lora["rank"] + 2          # claims rank 4; its tensors are rank 2; same base fingerprint
    torch.save(lora, d / "lora_other_rank.pt")

    other = torch.load(base_run["ckpt"], map_location="cpu", weights_only=True)
    for state, prefix in ((other["model"], ""), (other["ema"], "module.")):
        state[prefix + "head.2.bias"] += 0.01    # "another base model": a slightly different network
    torch.save(other, d / "other_base.pt")
    return d


def denoise(base_run, tmp_path, *args):
    defaults = {"--checkpoint": base_run["ckpt"], "--labels": "0", "--steps": 2}
    flags = dict(zip(args[::2], args[1::2]))
    merged = {**defaults, **flags}
    argv = [x for kv in merged.items() for x in kv]
    return run_script("denoise.py", *argv, "--out-dir", tmp_path / "out", "--device", "cpu")


def test_missing_checkpoint(base_run, tmp_path):
    """A --checkpoint that does not exist is named in the error."""
    check_user_error(denoise(base_run, tmp_path, "--checkpoint", tmp_path / "nope.pt"), "not found", "nope.pt")


def test_truncated_checkpoint(base_run, bad_inputs, tmp_path):
    """Half a checkpoint (an interrupted copy) is refused, not a traceback from torch.load."""
    check_user_error(denoise(base_run, tmp_path, "--checkpoint", bad_inputs / "truncated.pt"),
                     "truncated.pt", "not a readable model file")


def test_text_file_as_checkpoint(base_run, bad_inputs, tmp_path):
    """A file that is not a torch file at all is refused."""
    check_user_error(denoise(base_run, tmp_path, "--checkpoint", bad_inputs / "notes.txt"),
                     "notes.txt", "not a readable model file")


def test_lora_file_as_checkpoint(base_run, lora_run, tmp_path):
    """A LoRA file passed where a model checkpoint is expected is recognised as the wrong kind."""
    check_user_error(denoise(base_run, tmp_path, "--checkpoint", lora_run["lora"]), "not a model file")


def test_lora_of_another_rank(base_run, bad_inputs, tmp_path):
    """A LoRA file whose tensors do not have the rank it declares: refused, naming the wrong shape."""
    msg = check_user_error(denoise(base_run, tmp_path, "--lora", bad_inputs / "lora_other_rank.pt"),
                           "wrong shape")
    assert ".lora_" in msg


def test_lora_trained_on_another_base(base_run, lora_run, bad_inputs, tmp_path):
    """A LoRA file on a base whose weights differ from its fingerprint is refused by denoise.py."""
    check_user_error(denoise(base_run, tmp_path, "--checkpoint", bad_inputs / "other_base.pt",
                             "--lora", lora_run["lora"]), "another base model")


@pytest.mark.parametrize("labels,fragment", [("10", "0..9"), ("x", "expected numbers"), ("3,-1", "0..9")])
def test_bad_labels(base_run, tmp_path, labels, fragment):
    """Labels outside 0..9, or not numbers, are refused."""
    check_user_error(denoise(base_run, tmp_path, "--labels", labels), "--labels", fragment)


def test_finetune_with_missing_base(image_folder, tmp_path):
    """lora_finetune.py without its base checkpoint stops before writing anything."""
    result = run_script("lora_finetune.py", "--base", tmp_path / "nope.pt", "--data", image_folder,
                        "--out", tmp_path / "lora.pt", "--out-dir", tmp_path, "--device", "cpu")
    check_user_error(result, "not found")
    assert not (tmp_path / "lora.pt").exists()
