"""Issue 5, "Nothing lost, no tracebacks": every wrong input, through the real command line.

Each case of CASES runs one script with one wrong input and must end with exit code 2, a last stderr
line "error: ..." (the only one) that names the problem, no traceback, and every file that existed
before still there with the same bytes, and nothing new (no half-written output, no .tmp-* file).

Speed: a fresh `python train.py` spends ~1.5 s of CPU importing torch before it reads its flags, which
times ~80 cases would break this file's 60 s budget. So the cases run through a small fork server:
one interpreter imports torch and the project once, then forks a child per case that runs the script
as `python SCRIPT ARGS` would (as __main__ with its own argv, stdout, stderr and exit code).
test_bad_input_in_a_fresh_interpreter runs a few cases as plain processes too.
"""
import hashlib
import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT, TRAIN_FLAGS, _env, check_ok, check_user_error, run_python, run_script, write_image_folder

# ----------------------------------------------------------------------------- the cases
# (id, script, args, fragments the error line must contain). {in} is a fresh copy of the inputs
# made by the `inputs` fixture (model.pt and lora.pt are the session's real files); {tmp} is the
# case's own folder. The args are added to DEFAULTS[script], replacing a default flag of the same name.

FILES = [("missing", "nope.pt", "{} file"), ("empty", "empty.pt", "is empty (0 bytes), not a {}"),
         ("truncated", "truncated.pt", "is not a readable {}"), ("text", "notes.txt", "is not a readable {}")]

# Train checkpoints with one part of their training state damaged, written as damaged_NAME.pt by `inputs`:
# {NAME: (the part its error names, the damage)}. Muon's optimizer keeps a momentum per matrix and an AdamW inside.
DAMAGED = {
    "optimizer": ("optimizer", lambda c: c.update(optimizer={})),
    "moment": ("optimizer", lambda c: next(v for v in c["optimizer"]["state"].values()
                                           if v["momentum"].dim()).update(momentum=torch.zeros(3))),
    "adamw_moment": ("optimizer", lambda c: next(iter(c["optimizer"]["adamw"]["state"].values())).update(
        exp_avg=torch.zeros(3))),
    "scheduler": ("scheduler", lambda c: c.update(scheduler={"foo": 1})),
    "no_batches": ("batches", lambda c: c.pop("batches")),
    "order": ("batches", lambda c: c["batches"].update(order=c["batches"]["order"] + 1000)),
    "rng": ("rng", lambda c: c["rng"].update(cpu=torch.zeros(5, dtype=torch.uint8))),
    "step": ("step", lambda c: c.update(step=-3)),
    "step_past_end": ("step", lambda c: c.update(step=100)),
    "losses": ("losses", lambda c: c.update(losses="abc")),
    "ema": ("ema", lambda c: c["ema"].pop("module.head.2.bias")),
}

CASES = [
    # unreadable files, and files of the other kind
    *[(f"denoise-checkpoint-{k}", "denoise.py", ["--checkpoint", f"{{in}}/{f}"], [f, m.format("model")])
      for k, f, m in FILES],
    ("denoise-checkpoint-is-lora", "denoise.py", ["--checkpoint", "{in}/lora.pt"], ["lora.pt", "not a model file"]),
    *[(f"denoise-lora-{k}", "denoise.py", ["--lora", f"{{in}}/{f}"], [f, m.format("lora")]) for k, f, m in FILES],
    ("denoise-lora-is-model", "denoise.py", ["--lora", "{in}/model.pt"], ["model.pt", "not a lora file"]),
    *[(f"finetune-base-{k}", "lora_finetune.py", ["--base", f"{{in}}/{f}"], [f, m.format("model")])
      for k, f, m in FILES],
    ("finetune-base-is-lora", "lora_finetune.py", ["--base", "{in}/lora.pt"], ["lora.pt", "not a model file"]),
    *[(f"train-resume-{k}", "train.py --resume", ["--out", f"{{in}}/{f}"], [f, m.format("model")])
      for k, f, m in FILES],
    ("train-resume-is-lora", "train.py --resume", ["--out", "{in}/lora.pt"], ["lora.pt", "not a model file"]),
    ("finetune-resume-missing", "lora_finetune.py --resume", ["--out", "{in}/nope.pt"], ["nope.pt", "not found"]),
    ("finetune-resume-is-model", "lora_finetune.py --resume", ["--out", "{in}/other_base.pt"],
     ["other_base.pt", "not a lora file"]),
    # LoRA files that do not go with this base or these settings
    ("finetune-resume-other-rank", "lora_finetune.py --resume", ["--out", "{in}/lora.pt", "--lora-rank", "3"],
     ["--resume", "lora_rank (2 -> 3)"]),
    ("denoise-lora-tensors-do-not-fit", "denoise.py", ["--lora", "{in}/lora_rank4_tensors_rank2.pt"],
     ["do not fit", "wrong shape", ".lora_"]),
    ("finetune-resume-tensors-do-not-fit", "lora_finetune.py --resume", ["--out", "{in}/lora_rank4_tensors_rank2.pt"],
     ["do not fit", "wrong shape", ".lora_"]),
    ("finetune-resume-other-targets", "lora_finetune.py --resume",
     ["--out", "{in}/lora_wq.pt", "--lora-targets", "Wq,Wk,Wv"], ["--resume", "lora_targets"]),
    ("finetune-resume-finished", "lora_finetune.py --resume", ["--out", "{in}/lora.pt"],
     ["lora.pt", "finished run", "--overwrite"]),
    ("finetune-unknown-target", "lora_finetune.py", ["--lora-targets", "Wx"], ["Wx"]),
    ("finetune-unknown-target-short-flag", "lora_finetune.py", ["--targets", "Wq,Wx", "--rank", "2"], ["Wx"]),
    ("denoise-lora-other-base", "denoise.py", ["--checkpoint", "{in}/other_base.pt", "--lora", "{in}/lora.pt"],
     ["lora.pt", "another base model"]),
    ("finetune-resume-other-base", "lora_finetune.py --resume", ["--base", "{in}/other_base.pt", "--out", "{in}/lora.pt"],
     ["lora.pt", "another base model"]),
    # checkpoints whose config does not go with their weights, or this code
    ("denoise-config-widths-do-not-fit", "denoise.py", ["--checkpoint", "{in}/wide.pt"], ["wide.pt", "does not fit"]),
    ("train-resume-config-widths-do-not-fit", "train.py --resume", ["--out", "{in}/wide.pt"], ["wide.pt", "does not fit"]),
    ("denoise-config-unknown-key", "denoise.py", ["--checkpoint", "{in}/unknown_key.pt"], ["dropout"]),
    ("finetune-config-unknown-key", "lora_finetune.py", ["--base", "{in}/unknown_key.pt"], ["dropout"]),
    # labels
    ("labels-10", "denoise.py", ["--labels", "10"], ["--labels", "0..9"]),
    ("labels-minus-1", "denoise.py", ["--labels", "-1"], ["--labels", "0..9"]),
    ("labels-3,-1", "denoise.py", ["--labels", "3,-1"], ["--labels", "0..9"]),
    ("labels-x", "denoise.py", ["--labels", "x"], ["--labels", "expected numbers"]),
    ("labels-empty", "denoise.py", ["--labels", ""], ["--labels", "expected numbers"]),
    # sampling settings
    ("steps-0", "denoise.py", ["--steps", "0"], ["--steps", "got 0"]),
    ("steps-above-T", "denoise.py", ["--steps", "51"], ["--steps", "T=50"]),
    ("ddpm-steps-not-T", "denoise.py", ["--sampler", "ddpm", "--steps", "10"], ["DDPM", "T=50"]),
    ("guidance-negative", "denoise.py", ["--guidance", "-1"], ["--guidance"]),
    ("per-label-0", "denoise.py", ["--per-label", "0"], ["--per-label"]),
    ("per-label-negative", "denoise.py", ["--per-label", "-2"], ["--per-label"]),
    ("eta-above-1", "denoise.py", ["--eta", "1.5"], ["--eta"]),
    ("eta-negative", "denoise.py", ["--eta", "-0.1"], ["--eta"]),
    ("denoise-compare-no-lora", "denoise.py", ["--compare"], ["--compare", "--lora"]),
    ("denoise-compare-and-merge", "denoise.py", ["--lora", "{in}/lora.pt", "--compare", "--merge"],
     ["--compare", "--merge"]),
    ("denoise-device-unknown", "denoise.py", ["--device", "gpu0"], ["--device", "gpu0"]),
    # issue 15: nan, inf, out of range, shapes a layer refuses, devices that are not there, inputs as outputs
    ("guidance-nan", "denoise.py", ["--guidance", "nan"], ["--guidance", "[0, 100]", "got nan"]),
    ("eta-inf", "denoise.py", ["--eta", "inf"], ["--eta", "got inf"]),
    ("lora-weight-inf", "denoise.py", ["--lora", "{in}/lora.pt:inf"], ["--lora", "weight"]),
    ("per-label-huge", "denoise.py", ["--per-label", "100000000"], ["--per-label", "1e5"]),
    ("samples-over-the-limit", "denoise.py", ["--labels", "0-9", "--per-label", "10001"], ["100,010", "100,000"]),
    ("denoise-device-no-such-gpu", "denoise.py", ["--device", "cuda:99"], ["--device cuda:99", "cuda device"]),
    ("denoise-save-samples-over-its-lora", "denoise.py", ["--lora", "{in}/lora.pt", "--save-samples", "{in}/lora.pt",
                                                          "--overwrite"], ["lora.pt", "--lora (an input)"]),
    ("denoise-save-samples-exists", "denoise.py", ["--save-samples", "{in}/notes.txt"], ["already exists", "--overwrite"]),
    ("lr-nan", "train.py", ["--lr", "nan"], ["--lr", "got nan"]),
    ("image-size-0", "train.py", ["--image-size", "0"], ["--image-size", "got 0"]),
    ("widths-groupnorm", "train.py", ["--widths", "12,24"], ["GroupNorm", "12, 24"]),
    ("prediction-unknown", "train.py", ["--prediction", "x0"], ["--prediction", "x0"]),
    ("optimizer-unknown", "train.py", ["--optimizer", "sgd"], ["--optimizer", "sgd", "muon"]),
    ("in-channels-3", "train.py", ["--in-channels", "3"], ["--in-channels", "[1, 1]"]),
    ("unknown-flag", "train.py", ["--learning-rate", "0.1"], ["unrecognized", "--learning-rate"]),
    ("finetune-out-is-base", "lora_finetune.py", ["--out", "{in}/model.pt", "--overwrite"], ["model.pt", "--base"]),
    ("dataset-out-not-a-figure", "dataset.py", ["--out", "{in}/model.pt"], ["model.pt", "already exists"]),
    ("evaluate-threads-0", "bench/evaluate.py", ["--threads", "0"], ["--threads", "got 0"]),
    # training settings
    ("batch-size-0", "train.py", ["--batch-size", "0"], ["--batch-size"]),
    ("batch-size-negative", "train.py", ["--batch-size", "-8"], ["--batch-size"]),
    ("lr-0", "train.py", ["--lr", "0"], ["--lr"]),
    ("lr-negative", "train.py", ["--lr", "-0.001"], ["--lr"]),
    ("max-steps-0", "train.py", ["--max-steps", "0"], ["--max-steps"]),
    ("epochs-0", "train.py", ["--epochs", "0"], ["--epochs"]),
    ("time-budget-0", "train.py", ["--time-budget", "0"], ["--time-budget"]),
    ("time-budget-negative", "train.py", ["--time-budget", "-5"], ["--time-budget"]),
    ("precision-unknown", "train.py", ["--precision", "fp8"], ["--precision", "fp8"]),
    ("warmup-negative", "train.py", ["--warmup-steps", "-1"], ["--warmup-steps"]),
    ("p-uncond-1", "train.py", ["--p-uncond", "1"], ["--p-uncond"]),
    ("lora-rank-0", "lora_finetune.py", ["--lora-rank", "0"], ["--lora-rank"]),
    ("lora-alpha-0", "lora_finetune.py", ["--lora-alpha", "0"], ["--lora-alpha"]),
    ("lora-alpha-negative", "lora_finetune.py", ["--lora-alpha", "-4"], ["--lora-alpha"]),
    # model shape
    ("widths-do-not-halve", "train.py", ["--widths", "8,16,32"], ["halve evenly", "patch 2"]),
    ("widths-not-numbers", "train.py", ["--widths", "8,wide"], ["--widths"]),
    ("widths-empty", "train.py", ["--widths", ""], ["at least one width"]),
    ("schedule-leaves-no-signal", "train.py", ["--beta-start", "0.5", "--beta-end", "0.999999"],
     ["noise schedule", "leaves nothing of the image", "--beta-start"]),
    ("patch-0", "train.py", ["--patch", "0"], ["--patch", "[1, 8]", "got 0"]),
    ("heads-do-not-divide", "train.py", ["--heads", "3"], ["heads=3"]),
    # --data
    ("data-missing", "train.py", ["--data", "{in}/nope"], ["--data", "no such folder"]),
    ("data-empty-folder", "train.py", ["--data", "{in}/empty"], ["--data", "found none"]),
    ("data-not-label-folders", "train.py", ["--data", "{in}/pets"], ["--data", "cats, dogs"]),
    ("data-no-images", "train.py", ["--data", "{in}/no_images"], ["--data", "no readable images"]),
    ("data-label-10", "train.py", ["--data", "{in}/label_10"], ["label 10", "0..9"]),
    ("finetune-data-label-10", "lora_finetune.py", ["--data", "{in}/label_10"], ["label 10", "0..9"]),
    ("finetune-data-not-label-folders", "lora_finetune.py", ["--data", "{in}/pets"], ["--data", "cats, dogs"]),
    # outputs: refused before any work
    ("train-out-no-folder", "train.py", ["--out", "{tmp}/nofolder/m.pt"], ["nofolder", "does not exist"]),
    ("train-out-is-folder", "train.py", ["--out", "{in}"], ["is a folder"]),
    ("train-out-dir-is-file", "train.py", ["--out-dir", "{in}/notes.txt"], ["notes.txt", "not a folder"]),
    ("finetune-out-no-folder", "lora_finetune.py", ["--out", "{tmp}/nofolder/lora.pt"], ["nofolder", "does not exist"]),
    ("denoise-save-samples-no-folder", "denoise.py", ["--save-samples", "{tmp}/nofolder/s.pt"],
     ["nofolder", "does not exist"]),
    # a new run does not replace a checkpoint or LoRA file the user already has
    ("train-out-exists", "train.py", ["--out", "{in}/model.pt"], ["already exists", "--resume", "--overwrite"]),
    ("finetune-out-exists", "lora_finetune.py", ["--out", "{in}/lora.pt"], ["already exists", "--overwrite"]),
    # outputs that a run's own figures would replace, or that cannot be written: refused before any work
    ("train-out-is-a-figure", "train.py", ["--out", "{tmp}/train_samples.png"], ["--out", "figure train_samples.png"]),
    ("finetune-out-is-a-figure", "lora_finetune.py", ["--out", "{tmp}/lora_loss.png"], ["figure lora_loss.png"]),
    ("denoise-save-samples-is-a-figure", "denoise.py", ["--save-samples", "{tmp}/samples.png"],
     ["--save-samples", "figure samples.png"]),
    ("denoise-save-samples-is-compare-figure", "denoise.py",
     ["--lora", "{in}/lora.pt", "--compare", "--save-samples", "{tmp}/compare.png"], ["figure compare.png"]),
    ("train-out-is-out-dir", "train.py", ["--out", "{tmp}/same", "--out-dir", "{tmp}/same"], ["--out", "is --out-dir"]),
    ("train-out-name-too-long", "train.py", ["--out", "{tmp}/" + "a" * 300 + ".pt"], ["cannot write", "too long"]),
    ("denoise-save-samples-name-too-long", "denoise.py", ["--save-samples", "{tmp}/" + "s" * 300 + ".pt"],
     ["cannot write", "too long"]),
    ("train-out-dir-below-a-file", "train.py", ["--out-dir", "{in}/notes.txt/figures"],
     ["cannot make --out-dir", "notes.txt/figures"]),
    ("denoise-figure-name-is-a-folder", "denoise.py", ["--out-dir", "{in}/figures"], ["samples.png", "is a folder"]),
    ("diffusion-out-below-a-file", "diffusion.py", ["--out", "{in}/notes.txt/x.png"], ["notes.txt", "not a folder"]),
    ("dataset-out-below-a-file", "dataset.py", ["--out", "{in}/notes.txt/x.png"], ["notes.txt", "not a folder"]),
    # the inputs a command reads are never written over, --overwrite or not: a named dataset's raw files under
    # --data-root, and --data reached through a link
    *[(f"{script.split('.')[0]}-out-over-a-raw-file", script,
       ["--data", "fashion-mnist", "--data-root", "{in}/root", "--out", "{in}/root/FashionMNIST/raw/train-images-idx3-ubyte.gz",
        "--overwrite"], ["train-images-idx3-ubyte.gz", "inside this command's --data-root"])
      for script in ("dataset.py", "diffusion.py", "train.py")],
    ("finetune-out-dir-among-raw-files", "lora_finetune.py",
     ["--data", "fashion-mnist", "--data-root", "{in}/root", "--out-dir", "{in}/root/FashionMNIST/raw"],
     ["inside this command's --data-root"]),
    ("dataset-out-into-data-through-a-link", "dataset.py", ["--out", "{in}/digits_link/0/x.png"],
     ["digits_link/0/x.png", "inside this command's --data"]),
    # --resume: only the run's own data, and not with --overwrite
    ("train-resume-and-overwrite", "train.py --resume", ["--out", "{in}/model.pt", "--overwrite"],
     ["--resume", "--overwrite"]),
    ("train-resume-other-data", "train.py --resume", ["--out", "{in}/model.pt", "--data", "{in}/other_digits"],
     ["--resume", "other images", "same --data"]),
    ("train-resume-fewer-images", "train.py --resume", ["--out", "{in}/model.pt", "--data", "{in}/few_digits"],
     ["--resume", "other images", "10 images"]),
    # --resume from a file whose training state is damaged: one line naming the part (each failed in PyTorch's own
    # loaders with a traceback, or at the next step)
    *[(f"train-resume-damaged-{name}", "train.py --resume", ["--out", f"{{in}}/damaged_{name}.pt"],
       ["--resume", f"saved {part} state", "--overwrite"]) for name, (part, _) in DAMAGED.items() if part != "ema"],
    ("train-resume-damaged-ema", "train.py --resume", ["--out", "{in}/damaged_ema.pt"], ["damaged_ema.pt", "does not fit"]),
    # files of the right kind whose contents no run writes
    ("denoise-checkpoint-nan", "denoise.py", ["--checkpoint", "{in}/nan.pt"], ["nan.pt", "not finite"]),
    ("denoise-checkpoint-overflows", "denoise.py", ["--checkpoint", "{in}/huge.pt", "--precision", "fp32"],
     ["sampling overflowed", "nan or inf"]),      # (finite weights whose images would be saved black)
    ("denoise-lora-nan", "denoise.py", ["--lora", "{in}/lora_nan.pt"], ["lora_nan.pt", "not finite"]),
    ("denoise-lora-rank-0", "denoise.py", ["--lora", "{in}/lora_rank0.pt"], ["lora_rank0.pt", "rank 0"]),
    ("inspect-lora-alpha-nan", "lora.py", ["--inspect", "{in}/lora_alpha_nan.pt"], ["lora_alpha_nan.pt", "alpha nan"]),
    ("denoise-checkpoint-without-ema", "denoise.py", ["--checkpoint", "{in}/no_ema.pt"], ["no_ema.pt", "without ema"]),
    ("denoise-config-prediction-x0", "denoise.py", ["--checkpoint", "{in}/x0.pt"], ["prediction", "'x0'"]),
    ("denoise-checkpoint-is-a-folder", "denoise.py", ["--checkpoint", "{in}/digits"], ["digits", "is a folder"]),
    ("inspect-weights-without-base", "lora.py", ["--inspect", "{in}/lora.pt", "--weights", "raw"],
     ["--weights", "--base"]),
    # round 2: figures among the training images, flags that would be ignored, files cut or of other types
    ("train-out-dir-inside-data", "train.py", ["--out-dir", "{in}/digits/0"], ["inside this command's --data"]),
    ("finetune-out-dir-inside-data", "lora_finetune.py", ["--out-dir", "{in}/digits"], ["inside this command's --data"]),
    ("lora-weight-huge", "denoise.py", ["--lora", "{in}/lora.pt:1e30"], ["--lora", "[0, 100]"]),
    ("labels-range-going-down", "denoise.py", ["--labels", "3,9-0"], ["9-0", "goes up"]),
    ("eta-with-dpm", "denoise.py", ["--sampler", "dpm++", "--eta", "1"], ["--eta", "dpm++"]),
    ("denoise-config-without-T", "denoise.py", ["--checkpoint", "{in}/no_T.pt"], ["lacks the model settings T"]),
    ("denoise-config-T-not-an-integer", "denoise.py", ["--checkpoint", "{in}/T_float.pt"], ["T = 50.0", "integer"]),
    ("denoise-config-not-a-table", "denoise.py", ["--checkpoint", "{in}/config_list.pt"], ["not a table of settings"]),
    ("denoise-weights-not-a-table", "denoise.py", ["--checkpoint", "{in}/model_int.pt", "--weights", "raw"],
     ["not a table of tensors"]),
    ("denoise-lora-other-weights", "denoise.py", ["--lora", "{in}/lora.pt", "--weights", "raw"],
     ["--weights ema or raw"]),
    ("inspect-lora-tensors-do-not-fit", "lora.py", ["--inspect", "{in}/lora_bad_shape.pt"], ["do not fit each other"]),
    ("inspect-lora-target-unknown", "lora.py", ["--inspect", "{in}/lora_wz.pt"], ["'Wz'"]),
    ("train-time-dim-odd", "train.py", ["--time-dim", "3"], ["an even time_dim", "got 2, 8, 3"]),
    ("unet-demo-unknown-flag", "unet.py", ["--bogus"], ["unrecognized", "--bogus"]),
    ("config-demo-unknown-flag", "config.py", ["--widths", "8"], ["unrecognized", "--widths"]),
]

DEFAULTS = {
    "denoise.py": ["--checkpoint", "{in}/model.pt", "--labels", "0", "--steps", "2"],
    "train.py": ["--data", "{in}/digits", "--out", "{tmp}/m.pt", "--max-steps", "2", *TRAIN_FLAGS],
    "train.py --resume": ["--data", "{in}/digits"],
    "lora_finetune.py": ["--base", "{in}/model.pt", "--data", "{in}/digits", "--out", "{tmp}/lora.pt",
                         "--max-steps", "2", "--batch-size", "8"],
    "lora_finetune.py --resume": ["--base", "{in}/model.pt", "--data", "{in}/digits"],
    "dataset.py": ["--data", "{in}/digits"],
    "bench/evaluate.py": ["{in}/notes.txt"],
    "diffusion.py": ["--data", "{in}/digits"],
    "lora.py": [],
    "unet.py": [],
    "config.py": [],
}


def command(script, args, inputs, tmp):
    """[script, *argv]: the script's defaults with the case's flags replacing (or adding to) them."""
    def pairs(argv):                        # {"--flag": value, "--switch": None}
        flags, i = {}, 0
        while i < len(argv):
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            flags[argv[i]] = argv[i + 1] if has_value else None
            i += 2 if has_value else 1
        return flags
    flags = {**pairs(DEFAULTS[script]), **pairs(args)}
    if script.split()[0] in ("train.py", "lora_finetune.py", "denoise.py"):
        flags.setdefault("--out-dir", "{tmp}")
        flags.setdefault("--device", "cpu")
    argv = script.split() + [x for k, v in flags.items() for x in ([k] if v is None else [k, v])]
    return [a.replace("{in}", str(inputs)).replace("{tmp}", str(tmp)) for a in argv]


# ----------------------------------------------------------------------------- the inputs

@pytest.fixture(scope="module")
def inputs(tmp_path_factory, base_run, lora_run, image_folder):
    """Broken or mismatched files made from the session's real checkpoint and LoRA file, and data folders."""
    d = tmp_path_factory.mktemp("inputs")
    shutil.copy(base_run["ckpt"], d / "model.pt")
    shutil.copy(lora_run["lora"], d / "lora.pt")
    shutil.copytree(image_folder, d / "digits")
    base_bytes = base_run["ckpt"].read_bytes()
    (d / "empty.pt").write_bytes(b"")
    (d / "truncated.pt").write_bytes(base_bytes[: len(base_bytes) // 2])      # an interrupted copy
    (d / "notes.txt").write_text("this is a text file, not a checkpoint\n")

    def load(path):
        return torch.load(path, map_location="cpu", weights_only=True)

    lora = load(lora_run["lora"])                     # rank 2
    lora["rank"] = lora["train_config"]["lora_rank"] = 4
    torch.save(lora, d / "lora_rank4_tensors_rank2.pt")
    lora = load(lora_run["lora"])
    lora["targets"] = lora["train_config"]["lora_targets"] = ["Wq"]
    lora["layers"] = [name for name in lora["layers"] if name.endswith("Wq")]
    lora["lora"] = {k: v for k, v in lora["lora"].items() if ".Wq." in k}
    torch.save(lora, d / "lora_wq.pt")                 # as if made with --lora-targets Wq

    ckpt = load(base_run["ckpt"])
    for state, prefix in ((ckpt["model"], ""), (ckpt["ema"], "module.")):
        state[prefix + "head.2.bias"] += 0.01          # "another base model": a slightly different network
    torch.save(ckpt, d / "other_base.pt")
    ckpt = load(base_run["ckpt"])
    ckpt["model_config"]["widths"] = [8, 24]           # its weights are for (8, 16)
    torch.save(ckpt, d / "wide.pt")
    ckpt = load(base_run["ckpt"])
    ckpt["model_config"]["dropout"] = 0.1              # a setting this code does not have
    torch.save(ckpt, d / "unknown_key.pt")

    ckpt = load(base_run["ckpt"])
    ckpt["ema"]["module.head.2.weight"][0] = float("nan")     # a run that diverged
    torch.save(ckpt, d / "nan.pt")
    ckpt = load(base_run["ckpt"])
    for v in ckpt["ema"].values():
        if v.is_floating_point():
            v *= 1e15                                       # finite, but the network overflows
    torch.save(ckpt, d / "huge.pt")
    ckpt = load(base_run["ckpt"])
    del ckpt["ema"]
    torch.save(ckpt, d / "no_ema.pt")
    ckpt = load(base_run["ckpt"])
    ckpt["model_config"]["prediction"] = "x0"                  # not one of eps, v
    torch.save(ckpt, d / "x0.pt")
    for name, key, value in (("lora_nan", None, None), ("lora_rank0", "rank", 0),
                             ("lora_alpha_nan", "alpha", float("nan"))):
        lora = load(lora_run["lora"])
        if key is None:
            next(iter(lora["lora"].values()))[0] = float("nan")    # a fine-tuning run that diverged
        else:
            lora[key] = value
        torch.save(lora, d / f"{name}.pt")
    for name, change in (("no_T", lambda c: c["model_config"].pop("T")),
                         ("T_float", lambda c: c["model_config"].update(T=50.0)),
                         ("config_list", lambda c: c.update(model_config=[1, 2])),
                         ("model_int", lambda c: c.update(model=5))):
        ckpt = load(base_run["ckpt"])
        change(ckpt)
        torch.save(ckpt, d / f"{name}.pt")
    lora = load(lora_run["lora"])
    first_a = next(k for k in lora["lora"] if k.endswith("lora_a"))
    lora["lora"][first_a] = torch.zeros(lora["lora"][first_a].shape[0], 3)      # A of rank 3 beside B of rank 2
    torch.save(lora, d / "lora_bad_shape.pt")
    lora = load(lora_run["lora"])
    lora["targets"] = ["Wz"]
    torch.save(lora, d / "lora_wz.pt")
    for name, (_, change) in DAMAGED.items():
        ckpt = load(base_run["ckpt"])
        change(ckpt)
        torch.save(ckpt, d / f"damaged_{name}.pt")
    (d / "root" / "FashionMNIST" / "raw").mkdir(parents=True)       # (refused before anything reads them)
    (d / "root" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"the user's images")
    (d / "digits_link").symlink_to("digits")                     # (relative: the copy of each case links to its own)
    write_image_folder(d / "other_digits", seed=1)           # as many images as digits/, other ones
    write_image_folder(d / "few_digits", per_label=1)
    (d / "figures" / "samples.png").mkdir(parents=True)      # a folder where denoise.py writes a figure

    (d / "empty").mkdir()
    for name in ("cats", "dogs"):                                # subfolders that are not labels
        (d / "pets" / name).mkdir(parents=True)
        Image.new("L", (28, 28)).save(d / "pets" / name / "0.png")
    for label in range(10):
        (d / "no_images" / str(label)).mkdir(parents=True)
    (d / "no_images" / "0" / "README.txt").write_text("images go here\n")
    write_image_folder(d / "label_10", per_label=1)
    (d / "label_10" / "9").rename(d / "label_10" / "10")
    return d


def snapshot(folder):
    """Every path under folder: a file's sha256, or 'dir'."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------------------- the fork server

SERVER = r'''
import json, os, runpy, signal, sys, traceback
sys.path.insert(0, os.getcwd())
import torch, config, dataset, diffusion, unet, lora, train, denoise, lora_finetune   # imported once
import torch._dynamo   # torch.optim.Optimizer imports it when the first optimizer is built (1-3 s): once here too
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:                                       # the child: `python SCRIPT ARGS`, or `python -c CODE ARGS`
        signal.alarm(req["timeout"])
        for fd, name in ((1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = [req["script"] or "-c"] + req["args"]
        code = 0
        try:
            if req["script"]:
                runpy.run_path(req["script"], run_name="__main__")
            else:
                exec(compile(req["code"], "<string>", "exec"), {"__name__": "__main__"})
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:                          # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
'''


class ForkServer:
    def __init__(self, folder):
        self.folder, self.n = folder, 0
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, script=None, *args, code=None, timeout=120):
        """Like conftest.run_script(script, *args), or run_python(code, *args) when code is given."""
        self.n += 1
        out, err = self.folder / f"{self.n}.out", self.folder / f"{self.n}.err"
        request = {"script": script and str(ROOT / script), "code": code, "args": list(map(str, args)),
                   "stdout": str(out), "stderr": str(err), "timeout": timeout}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the fork server died (see its stderr)"
        rc = json.loads(reply)["rc"]
        return subprocess.CompletedProcess([script or "-c", *args], rc, out.read_text(), err.read_text())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class FreshProcesses:
    """Where forking a process that imported torch is not safe (Windows, macOS): one interpreter per case."""

    def run(self, script=None, *args, code=None, timeout=120):
        return run_python(code, *args, timeout=timeout) if code else run_script(script, *args, timeout=timeout)

    def close(self):
        pass


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("cli")) if sys.platform == "linux" else FreshProcesses()
    yield server
    server.close()


def run_case(cli, inputs, tmp_path, script, args):
    """Copy the inputs into tmp_path, run the case, and return (result, snapshot before, after)."""
    shutil.copytree(inputs, tmp_path / "in", symlinks=True)
    before = snapshot(tmp_path)
    result = cli.run(*command(script, args, tmp_path / "in", tmp_path))
    return result, before, snapshot(tmp_path)


# ----------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("script,args,fragments", [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_bad_input(cli, inputs, tmp_path, script, args, fragments):
    """Exit code 2, one clear 'error:' line last on stderr, no traceback, no file changed or added."""
    result, before, after = run_case(cli, inputs, tmp_path, script, args)
    check_user_error(result, *fragments)
    assert "Traceback" not in result.stdout
    assert after == before, "files changed: " + ", ".join(
        sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)))
    if "loss became" not in fragments:                 # (that case trains a step before its loss blows up)
        assert result.stdout == "" and "step/s" not in result.stderr, "refused only after work had started"


# The loss blows up (no flag in its range does that to the tiny model any more, so train_step is made to):
# stopped, naming the step; the checkpoint already at --out keeps its bytes.
NAN_LOSS = """
import sys
import torch
import train
train.train_step = lambda *args, **kwargs: torch.tensor(float("nan"))
sys.argv = ["train.py"] + sys.argv[1:]
train.run_main(train.main)
"""


def test_loss_not_finite_stops_and_keeps_the_checkpoint(cli, inputs, tmp_path):
    shutil.copytree(inputs, tmp_path / "in", symlinks=True)
    before = snapshot(tmp_path)
    _, *argv = command("train.py", ["--out", "{in}/model.pt", "--max-steps", "3", "--overwrite"], tmp_path / "in", tmp_path)
    check_user_error(cli.run(None, *argv, code=NAN_LOSS), "loss became nan", "at step 1", "--lr")
    assert snapshot(tmp_path) == before


def test_a_refused_first_run_leaves_no_folder_behind(tmp_path):
    """A newcomer's first `python train.py`, refused (here: data it cannot read), in a folder with no outputs/
    yet: one line, exit 2, and no outputs/ left behind; nor the folders a deeper --out-dir made, while the
    (empty) folder the user had stays."""
    (tmp_path / "mine").mkdir()
    for out_dir in ([], ["--out-dir", "mine/new/figures"]):
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", "nope", *out_dir], cwd=tmp_path,
                                env=_env(), capture_output=True, text=True, timeout=120)
        check_user_error(result, "--data nope")
    assert [p.name for p in tmp_path.rglob("*")] == ["mine"]


@pytest.mark.parametrize("case", ["denoise-checkpoint-truncated", "finetune-resume-other-base", "train-out-no-folder"])
def test_bad_input_in_a_fresh_interpreter(inputs, tmp_path, case):
    """The same one-line error from a plain `python SCRIPT ARGS`, as a user runs it (not through the fork server)."""
    script, args, fragments = next(c[1:] for c in CASES if c[0] == case)
    shutil.copytree(inputs, tmp_path / "in", symlinks=True)
    check_user_error(run_script(*command(script, args, tmp_path / "in", tmp_path)), *fragments)


# Runs train.py with a first Ctrl-C (a real SIGINT) after step 1, so that it stops and saves, and a second
# one at the given moment: right after the first ("step"), or once the new checkpoint is written to its
# temporary file but not yet renamed over the old one ("save").
SECOND_CTRL_C = """
import os, signal, sys, time
import torch
import train
when, calls, original_step, original_save = sys.argv[1], [0], train.train_step, torch.save
def train_step(*args, **kwargs):
    loss = original_step(*args, **kwargs)
    calls[0] += 1
    if calls[0] == 1:
        os.kill(os.getpid(), signal.SIGINT)
        if when == "step":
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGINT)
    return loss
def save(obj, f, *args, **kwargs):
    original_save(obj, f, *args, **kwargs)
    print("written to", f, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
train.train_step, torch.save = train_step, save
sys.argv = ["train.py"] + sys.argv[2:]
train.run_main(train.main)
"""


@pytest.mark.parametrize("when", ["step", "save"])
def test_second_ctrl_c_quits_at_once_and_keeps_the_old_checkpoint(cli, inputs, tmp_path, when):
    """A second Ctrl-C, during the step or while the new checkpoint is being written: exit 130 at once,
    no traceback, the checkpoint already at --out keeps its bytes, and no .tmp-* file is left behind."""
    shutil.copytree(inputs, tmp_path / "in", symlinks=True)
    ckpt = tmp_path / "in" / "model.pt"
    before = snapshot(tmp_path)
    _, *argv = command("train.py", ["--out", str(ckpt), "--max-steps", "6", "--overwrite"], tmp_path / "in", tmp_path)
    result = cli.run(None, when, *argv, code=SECOND_CTRL_C)
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1] == "interrupted"
    assert ("written to" in result.stdout) == (when == "save")
    assert snapshot(tmp_path) == before                          # no .tmp-* left, model.pt unchanged
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["kind"] == "model"


def test_a_foreign_pickle_is_refused_in_one_line(cli, tmp_path):
    """A file pickled without torch: torch.load warns about its protocol before refusing it, and that warning
    must not come out beside the one error line (denoise.py, and bench/evaluate.py for a samples file)."""
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"kind": "model", "images": [1, 2]}, protocol=4))
    for script, args in (("denoise.py", ["--checkpoint", path, "--out-dir", tmp_path]), ("bench/evaluate.py", [path])):
        result = cli.run(script, *args)
        check_user_error(result, "plain.pt")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_guidance_interval_past_the_models_steps_is_said(cli, inputs, tmp_path):
    """The default interval (t in 100..600) holds no step of a model with T = 50, nor 10..40 any of 2 steps (t = 49,
    0): sampling is unguided, and denoise.py says so instead of leaving it silent; an interval that holds a step
    is not warned about."""
    base = ["--checkpoint", inputs / "model.pt", "--labels", "0", "--steps", "2", "--out-dir", tmp_path,
            "--device", "cpu"]
    warned = cli.run("denoise.py", *base)
    check_ok(warned)
    assert "warning: --guidance-interval 100,600 holds none of the steps" in warned.stderr and "T=50" in warned.stderr
    between = cli.run("denoise.py", *base, "--guidance-interval", "10,40")         # 2 steps: t = 49 and 0 only
    assert "warning: --guidance-interval 10,40 holds none" in check_ok(between).stderr
    quiet = cli.run("denoise.py", *base, "--guidance-interval", "0,49")
    check_ok(quiet)
    assert "warning" not in quiet.stderr
