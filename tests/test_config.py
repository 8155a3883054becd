"""config.py's shared helpers: atomic saving, loading project files, and config flags."""
import argparse
import dataclasses
import os
import platform
import stat

import pytest
import torch

import config
from config import (pick_device, ModelConfig, TrainConfig, UserError, add_config_flags, apply_config_flags,
                    atomic_save, config_from_dict, load_file)


def test_atomic_save_writes_and_leaves_no_temp_file(tmp_path):
    """atomic_save writes (and replaces) the file with the usual permissions and cleans up its temporary file."""
    path = tmp_path / "ckpt.pt"
    atomic_save({"kind": "model", "x": torch.arange(3)}, str(path))
    atomic_save({"kind": "model", "x": torch.arange(5)}, str(path))        # replaces the old file
    assert torch.load(path, weights_only=True)["x"].tolist() == [0, 1, 2, 3, 4]
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644     # not mkstemp's private 0600


def write_some_bytes(f, data):
    """What a torch.save that dies half-way leaves: some bytes in its target (a path or a file object)."""
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as handle:
            handle.write(data)
    else:
        f.write(data)
        f.flush()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_save_failure_keeps_previous_file(tmp_path, monkeypatch, exc):
    """If torch.save dies half-way (an error, or Ctrl-C), the previous file is byte-for-byte intact and
    no temporary file is left behind."""
    path = tmp_path / "ckpt.pt"
    atomic_save({"kind": "model", "x": torch.arange(3)}, str(path))
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        write_some_bytes(f, b"half a checkpoint")
        raise exc("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(exc):
        atomic_save({"kind": "model", "x": torch.arange(1000)}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_save_failure_without_previous_file_leaves_nothing(tmp_path, monkeypatch):
    """A failed first save leaves neither a partial file nor a temporary file."""
    def broken_save(obj, f, *args, **kwargs):
        write_some_bytes(f, b"partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError):
        atomic_save({"kind": "model"}, str(tmp_path / "new.pt"))
    assert os.listdir(tmp_path) == []


def test_atomic_save_into_missing_folder_is_a_user_error(tmp_path):
    """Saving into a folder that does not exist is a UserError, not an OSError."""
    with pytest.raises(UserError, match="does not exist"):
        atomic_save({}, str(tmp_path / "nope" / "ckpt.pt"))


def test_output_check_never_makes_the_file_it_checks(tmp_path, monkeypatch):
    """check_output_path tries writing under a hidden name of its own, never the checked name: under torchrun
    every process checks the same --out at once, and one's trial file once made another refuse it as
    "already there" (a CI failure). The trial name is as long as the file's, so a name too long still fails."""
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    for name in ["m.pt", "a" * 255]:
        config.check_output_path(str(tmp_path / name))
    assert len(opened) == 2 and str(tmp_path / "m.pt") not in opened
    assert [len(os.path.basename(p)) for p in opened] == [16, 255]
    assert os.listdir(tmp_path) == []                       # the trial files are gone
    with pytest.raises(UserError, match="too long"):
        config.check_output_path(str(tmp_path / ("a" * 256)))
    with pytest.raises(UserError, match="cannot end in"):
        config.check_output_path(str(tmp_path / "m.pt") + os.sep)
    (tmp_path / "m.pt").write_bytes(b"the user's")          # a file already there is checked and kept
    config.check_output_path(str(tmp_path / "m.pt"))
    assert os.listdir(tmp_path) == ["m.pt"] and (tmp_path / "m.pt").read_bytes() == b"the user's"


def test_load_file_refuses_bad_files(tmp_path):
    """Missing, text, truncated, wrong-kind and non-dict files, and a pipe, are UserErrors with a useful message."""
    good = tmp_path / "good.pt"
    torch.save({"kind": "model", **{key: {} for key in config.FILE_KEYS["model"]}, "w": torch.randn(100, 100)}, good)
    assert load_file(str(good), "model")["kind"] == "model"
    cut = tmp_path / "cut.pt"                          # the right kind, but not all a checkpoint holds
    torch.save({"kind": "model", "model": {}}, cut)
    folder = tmp_path / "folder.pt"
    folder.mkdir()

    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a checkpoint\n")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    lora = tmp_path / "lora.pt"
    torch.save({"kind": "lora"}, lora)
    a_list = tmp_path / "list.pt"
    torch.save([1, 2], a_list)
    cases = {tmp_path / "missing.pt": "not found", text: "not a readable", truncated: "not a readable",
             lora: "found: lora", a_list: "found: list", cut: "without model_config, ema, train_config",
             folder: "is a folder"}
    if hasattr(os, "mkfifo"):                               # (Windows has no named pipes)
        os.mkfifo(tmp_path / "pipe.pt")
        cases[tmp_path / "pipe.pt"] = "not a regular file"
    for path, fragment in cases.items():
        with pytest.raises(UserError) as e:
            load_file(str(path), "model")
        assert fragment in str(e.value) and str(path) in str(e.value)


def test_config_flags_round_trip():
    """Every config field gets a --flag; given flags override the defaults, tuples are comma-separated."""
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ModelConfig())
    add_config_flags(parser, TrainConfig(), only=("max_steps", "lr"))
    args = parser.parse_args(["--widths", "8,16", "--context-tokens", "3", "--beta-end", "0.03",
                              "--max-steps", "7"])
    m = apply_config_flags(ModelConfig(), args)
    assert m.widths == (8, 16) and m.context_tokens == 3 and m.beta_end == 0.03 and m.T == ModelConfig().T
    t = apply_config_flags(TrainConfig(), args)
    assert t.max_steps == 7 and t.lr == TrainConfig().lr
    with pytest.raises(SystemExit):                                  # refused by the parser itself
        parser.parse_args(["--widths", "8,x"])


def test_config_from_dict_restores_tuples_and_refuses_unknown_keys():
    """Checkpoint configs come back as dataclasses with tuples; unknown settings mean a foreign file."""
    d = {**dataclasses.asdict(ModelConfig()), "widths": [8, 16], "T": 50, "prediction": "v", "attention_from": 1}
    assert config_from_dict(ModelConfig, d) == ModelConfig(widths=(8, 16), T=50, prediction="v", attention_from=1)
    with pytest.raises(UserError, match="colour"):
        config_from_dict(ModelConfig, {"colour": "red"})


def test_a_file_from_before_v_prediction_and_min_snr_loads_as_trained():
    """A checkpoint saved before `prediction`, `min_snr_gamma`, `attention_from`, `optimizer` and `t_importance`
    existed was trained the blog's way (with AdamW, t drawn uniformly): loading it must not silently switch it to
    today's defaults (v, min-SNR, no attention at 14x14, Muon, the importance draw; a resumed run would load
    AdamW's state into Muon)."""
    assert ModelConfig().prediction == "v" and TrainConfig().min_snr_gamma > 0 and ModelConfig().attention_from == 1
    then = {k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k not in config.BEFORE_QUALITY}
    old = config_from_dict(ModelConfig, {**then, "T": 50})
    assert old.prediction == "eps" and old.attention_from == 0
    with pytest.raises(UserError, match="lacks the model settings T"):     # any other setting missing: refused
        config_from_dict(ModelConfig, {k: v for k, v in then.items() if k != "T"})
    assert config_from_dict(TrainConfig, {"lr": 1e-3}).min_snr_gamma == 0.0
    assert TrainConfig().t_importance > 0 and config_from_dict(TrainConfig, {"lr": 1e-3}).t_importance == 0.0
    assert TrainConfig().optimizer == "muon" and config_from_dict(TrainConfig, {"lr": 1e-3}).optimizer == "adamw"
    assert config_from_dict(TrainConfig, {"min_snr_gamma": 5.0}).min_snr_gamma == 5.0


def test_run_main_turns_user_error_into_exit_2(capsys):
    """run_main prints exactly 'error: ...' on stderr and exits with code 2."""
    def main():
        raise UserError("something is wrong")

    with pytest.raises(SystemExit) as e:
        config.run_main(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: something is wrong\n"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_settings_are_accepted_by_glibc():
    """run_main's malloc settings (config.keep_freed_memory): glibc answers 1 to each mallopt it accepts and 0
    to a value out of its range (e.g. an mmap threshold above 32 MiB), which would leave the default."""
    assert config.keep_freed_memory() is True


def test_pick_device_refuses_devices_that_are_not_there(monkeypatch):
    """A GPU index past the last, mps where there is none, a device type we do not run on: one-line errors."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1) and pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="has 2 cuda device"):
        pick_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("mps", "meta", "cpu:1"):
        with pytest.raises(UserError, match=f"--device {name}"):
            pick_device(name)


def test_an_output_inside_the_data_folder_is_refused(tmp_path):
    """A figure written with --overwrite (or a .png, which dataset.py/diffusion.py replace) still never lands
    on one of the images it reads: a path inside the --data folder is refused, and the image keeps its bytes."""
    folder = tmp_path / "digits" / "0"
    folder.mkdir(parents=True)
    image = folder / "a.png"
    image.write_bytes(b"not really a png")
    with pytest.raises(UserError, match="inside this command's --data"):
        config.check_new_output(str(image), None, True, inputs=[("--data", str(tmp_path / "digits"))])
    assert image.read_bytes() == b"not really a png"
    config.check_new_output(str(tmp_path / "figure.png"), None, True, inputs=[("--data", str(tmp_path / "digits"))])


def test_remove_if_empty_takes_back_only_empty_folders_subfolders_first(tmp_path):
    """What a refused run made is removed wherever it is still empty, whatever order the folders were made in;
    a folder holding a file stays (and so does the file)."""
    made = config.missing_folders(tmp_path / "a" / "b") + config.missing_folders(tmp_path / "a" / "b" / "c" / "d")
    made += config.missing_folders(tmp_path / "kept" / "e")
    for folder in made:
        os.makedirs(folder, exist_ok=True)
    (tmp_path / "kept" / "note.txt").write_text("mine")
    config.remove_if_empty(sorted(set(made)))            # parents before their subfolders
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept", "note.txt"]


def test_remove_if_empty_skips_a_folder_another_process_took_back_a_moment_ago(tmp_path, monkeypatch):
    """Under torchrun each process takes back the folders it made, the same ones: where another removes a folder
    between this one's look and its removal, nothing is raised, and the rest are still taken back."""
    made = config.missing_folders(tmp_path / "a" / "b")
    os.makedirs(tmp_path / "a" / "b")
    real_rmdir = os.rmdir

    def other_process_first(path, *args, **kwargs):
        if path == str(tmp_path / "a" / "b"):
            real_rmdir(path)                                # the other process, a moment earlier
        real_rmdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "rmdir", other_process_first)
    config.remove_if_empty(made)
    assert list(tmp_path.iterdir()) == []


def test_run_main_takes_back_only_the_folders_of_its_own_run(tmp_path):
    """run_main removes, on a UserError, the empty folders make_folder made in that run; one made earlier in the
    same process (a run that finished) stays."""
    config.make_folder(str(tmp_path / "earlier"))

    def main():
        config.make_folder(str(tmp_path / "now" / "deeper"))
        raise UserError("wrong input")

    with pytest.raises(SystemExit):
        config.run_main(main)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]
