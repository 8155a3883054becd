"""Every script's --help works and documents every flag the script defines."""
import argparse
import dataclasses
import importlib

import pytest

from config import ModelConfig
from conftest import check_ok, run_script

SCRIPTS = ["train.py", "lora_finetune.py", "denoise.py", "diffusion.py", "dataset.py"]


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def defined_flags(script, monkeypatch):
    """The option strings the script's parser really defines: run its argument parsing in-process with
    ArgumentParser.parse_args replaced by a hook that hands back the parser."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(script[:-3])
    entry = getattr(module, "parse_args", None) or module.main
    with pytest.raises(_Captured) as e:
        entry()
    return {s for action in e.value.parser._actions for s in action.option_strings}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_mentions_every_flag(script, monkeypatch):
    """`python SCRIPT --help` exits 0 and its text names every option the parser defines."""
    flags = defined_flags(script, monkeypatch)
    assert "--help" in flags and len(flags) > 3
    result = check_ok(run_script(script, "--help"))
    missing = sorted(f for f in flags if f not in result.stdout)
    assert not missing, f"{script} --help does not mention {missing}"
    assert result.stdout.startswith("usage:")


def test_train_has_a_flag_for_every_model_setting(monkeypatch):
    """train.py exposes every ModelConfig field, plus the training settings."""
    flags = defined_flags("train.py", monkeypatch)
    for f in dataclasses.fields(ModelConfig):
        assert "--" + f.name.replace("_", "-") in flags
    for name in ("--batch-size", "--lr", "--max-steps", "--seed", "--resume", "--out", "--data"):
        assert name in flags


def test_lora_finetune_has_lora_flags(monkeypatch):
    """lora_finetune.py exposes the LoRA settings and its input/output files."""
    flags = defined_flags("lora_finetune.py", monkeypatch)
    for name in ("--lora-rank", "--lora-alpha", "--lora-targets", "--base", "--out", "--resume"):
        assert name in flags
