"""One home for each default (config.py): functions and command lines take theirs from it, and a flag given
on the command line reaches the run's config. Also: the denoising figure ends on the finished image."""
import inspect
import sys

import pytest
import torch

import denoise
import lora_finetune
import train
from config import FinetuneConfig, ModelConfig, SampleConfig, apply_config_flags
from conftest import tiny_config
from diffusion import Schedule, backward_denoise, ddim_step, predict_noise
from lora import inject_lora
from unet import UNet


def defaults(function):
    return {k: p.default for k, p in inspect.signature(function).parameters.items()}


def test_functions_take_their_defaults_from_config():
    d = defaults(backward_denoise)
    assert (d["sampler"], d["eta"], d["guidance"]) == (SampleConfig.sampler, SampleConfig.eta, SampleConfig.guidance)
    assert defaults(ddim_step)["eta"] == SampleConfig.eta and defaults(predict_noise)["guidance"] == SampleConfig.guidance
    d = defaults(inject_lora)
    assert (d["targets"], d["r"], d["alpha"]) == (FinetuneConfig.lora_targets, FinetuneConfig.lora_rank,
                                                  FinetuneConfig.lora_alpha)


def parse(module, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", *map(str, argv)])
    return module.parse_args()


def test_denoise_command_line_defaults_are_sample_config(monkeypatch, tmp_path):
    args = parse(denoise, monkeypatch, "--out-dir", tmp_path)
    assert (args.sampler, args.guidance, args.eta) == (SampleConfig.sampler, SampleConfig.guidance, SampleConfig.eta)


def test_train_flags_reach_the_model_and_training_config(monkeypatch):
    args = parse(train, monkeypatch, "--widths", "8,16", "--T", 50, "--heads", 2, "--lr", 0.5, "--seed", 3)
    assert apply_config_flags(ModelConfig(), args) == ModelConfig(widths=(8, 16), T=50, heads=2)
    tcfg = train.resolve_train_config(args, train.TrainConfig(), n_images=100)
    assert (tcfg.lr, tcfg.seed, tcfg.max_steps) == (0.5, 3, train.TrainConfig().max_steps)


@pytest.mark.parametrize("full", [False, True])
def test_finetune_defaults_and_short_flag_names(monkeypatch, tmp_path, full):
    """lora_finetune.py starts from FinetuneConfig (full_lr with --full); --rank/--alpha/--targets are the
    --lora-* flags under short names."""
    files = ["--base", tmp_path / "base.pt", "--out", tmp_path / "out.pt", "--out-dir", tmp_path / "out"]
    args = parse(lora_finetune, monkeypatch, *files, *(["--full"] if full else []))
    start = FinetuneConfig(lr=FinetuneConfig.full_lr) if full else FinetuneConfig()
    assert lora_finetune.resolve_train_config(args, start, n_images=100) == start
    args = parse(lora_finetune, monkeypatch, *files, "--rank", 3, "--alpha", 6, "--targets", "Wq,ff")
    tcfg = lora_finetune.resolve_train_config(args, FinetuneConfig(), n_images=100)
    assert (tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_targets) == (3, 6.0, ("Wq", "ff"))


@pytest.mark.parametrize("sampler,steps", [("ddim", None), ("ddim", 7), ("ddpm", None), ("ddim", 50)])
def test_denoise_figure_ends_on_the_finished_image(sampler, steps):
    """The PNG figure's columns (denoise.process_columns of the GIF's snapshots) start with the pure noise
    and end with the image backward_denoise returns, for any sampler and step count."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    x, snapshots = backward_denoise(model, Schedule.from_config(cfg), torch.arange(3), sampler, steps,
                                    generator=torch.Generator().manual_seed(0), keep=SampleConfig.gif_frames)
    columns = denoise.process_columns(snapshots)
    total = steps or (cfg.T if sampler == "ddpm" else SampleConfig.steps)
    assert len(columns) == 1 + min(SampleConfig.figure_columns, total)
    assert columns[0][0] == 0 and columns[-1][0] == total
    assert torch.equal(columns[-1][1], x.cpu())
    assert [n for n, _ in columns] == sorted({n for n, _ in columns})
