"""lora_finetune.py from the command line: what the LoRA file holds, and that the base is never written."""
import torch

from conftest import (INTERRUPT_AFTER, LORA_RANK, check_ok, check_user_error, run_python, run_script,
                      sha256)
from lora import apply_lora_file, fingerprint, inject_lora, lora_layers, lora_state_dict, target_of, target_ranks
from unet import load_model


def tensors_in(obj, path=""):
    """Every (key path, tensor) anywhere inside a nested dict/list structure."""
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_in(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors_in(v, f"{path}/{i}")


def keys_in(obj):
    """Every dict key anywhere inside a nested structure."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from keys_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from keys_in(v)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_lora_file_holds_only_lora_tensors(lora_run, base_run):
    """The 'lora' dict holds exactly the A and B (and a conv's core M) of every adapted layer (rank as
    asked); the finished run's file holds no other tensor (no optimizer state); no key anywhere in the file
    is a base-model weight's name; and the file is much smaller than the base checkpoint."""
    f = load(lora_run["lora"])
    assert f["kind"] == "lora" and f["rank"] == LORA_RANK
    assert f["lora"], "no LoRA tensors saved"
    model, _ = load_model(str(base_run["ckpt"]), "ema")          # the layers and shapes its targets give
    assert f["layers"] == inject_lora(model, tuple(f["targets"]), LORA_RANK, f["alpha"])
    factors = {f"{name}.{factor}" for name, m in lora_layers(model).items() for factor in m.FACTORS}
    assert set(f["lora"]) == factors and all(k.endswith((".lora_a", ".lora_m", ".lora_b")) for k in factors)
    assert {k: v.shape for k, v in f["lora"].items()} == {k: v.shape for k, v in lora_state_dict(model).items()}
    assert {p for p, _ in tensors_in(f)} == {f"/lora/{k}" for k in f["lora"]}
    assert "optimizer" not in f and f["step"] == f["train_config"]["max_steps"] == len(f["losses"])

    base = torch.load(base_run["ckpt"], map_location="cpu", weights_only=True)
    base_names = set(base["model"]) | set(base["ema"])
    base_names |= {k.replace(".weight", ".base.weight") for k in base["model"]}     # names inside LoraLayer
    found = {str(k) for k in keys_in(f)} | {p.rsplit("/", 1)[-1] for p, _ in tensors_in(f)}
    assert not found & base_names, f"base weights in the LoRA file: {sorted(found & base_names)[:5]}"

    lora_numel = sum(t.numel() for t in f["lora"].values())
    base_numel = sum(t.numel() for t in base["model"].values())
    assert lora_numel < base_numel / 4      # rank 4 on a tiny model; the default's 3%: test_lora_controls.py
    assert lora_run["lora"].stat().st_size * 4 < base_run["ckpt"].stat().st_size


def test_lora_training_changed_b_and_applies_to_its_base(lora_run, base_run):
    """The saved B matrices have moved away from zero, and apply_lora_file accepts the file on its base."""
    f = torch.load(lora_run["lora"], map_location="cpu", weights_only=True)
    assert any(v.abs().max() > 0 for k, v in f["lora"].items() if k.endswith("lora_b"))
    model, _ = load_model(str(base_run["ckpt"]), "ema")
    assert f["base_fingerprint"] == fingerprint(model)
    apply_lora_file(model, str(lora_run["lora"]))
    layers = lora_layers(model)
    assert list(layers) == f["layers"]
    ranks = target_ranks(f["targets"], LORA_RANK)       # NAME:RANK targets (conv:4, context:4) keep their own
    assert {name: m.r for name, m in layers.items()} == {
        name: ranks[target_of(model, name, m.base, ranks)] for name, m in layers.items()}
    assert LORA_RANK in ranks.values()


def test_finetuning_leaves_base_checkpoint_bytes_unchanged(lora_run, base_run):
    """The base checkpoint's bytes hash the same before and after lora_finetune.py ran on it."""
    assert sha256(base_run["ckpt"]) == lora_run["base_hash_before"]


def test_finetune_refuses_to_write_over_the_base(base_run, image_folder, tmp_path):
    """--out pointing at the base checkpoint is refused before anything is written."""
    before = sha256(base_run["ckpt"])
    result = run_script("lora_finetune.py", "--base", base_run["ckpt"], "--out", base_run["ckpt"],
                        "--data", image_folder, "--out-dir", tmp_path, "--device", "cpu", "--max-steps", 1)
    check_user_error(result, "base")
    assert sha256(base_run["ckpt"]) == before


def test_interrupted_lora_run_keeps_its_state_and_resumes_exactly(lora_run, base_run, image_folder, tmp_path):
    """Ctrl-C after step 2 of 3: the file keeps the optimizer and data position; --resume then ends with
    exactly the LoRA tensors and losses of the uninterrupted run, in a file that again holds only LoRA
    tensors; a third --resume is refused (a finished run keeps nothing to continue) and leaves it as it is."""
    out = tmp_path / "lora.pt"
    flags = ["--base", base_run["ckpt"], "--data", image_folder, "--out", out, "--out-dir", tmp_path / "out",
             "--device", "cpu"]
    first = run_python(INTERRUPT_AFTER, "lora_finetune", 2, *flags, "--max-steps", 3, "--batch-size", 8,
                       "--warmup-steps", 1, "--lora-rank", LORA_RANK, "--lora-alpha", 4.0)
    assert first.returncode == 130, first.stderr[-2000:]
    partial = load(out)
    assert partial["step"] == 2 and {"optimizer", "scheduler", "batches", "rng"} <= set(partial)
    check_ok(run_script("lora_finetune.py", "--resume", *flags))
    resumed, straight = load(out), load(lora_run["lora"])
    assert "optimizer" not in resumed and resumed["losses"] == straight["losses"]
    assert resumed["lora"].keys() == straight["lora"].keys()
    for k, v in straight["lora"].items():
        assert torch.equal(resumed["lora"][k], v), k
    before = out.read_bytes()
    check_user_error(run_script("lora_finetune.py", "--resume", *flags), "lora.pt", "finished run", "--overwrite")
    assert out.read_bytes() == before
