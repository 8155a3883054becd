"""Issue 15: every flag of every script, given each value a new user might try: nan, inf, -1, 0, a huge
number and an empty string. Each case must end either with exit 0 and a sane result, or with exit 2 and
one `error:` line (the last on stderr); never a traceback, and no input file may change.

The flags are read from each script's --help, so a flag added later is swept too. Speed: the cases run in
test_bad_inputs.py's fork server (torch imported once). train.py and lora_finetune.py stop where their
training would start (the case then counts as accepted: every check ran before), and bench/evaluate.py
where it would load its classifier; the others run for real on the tests' tiny model and data.
"""
import contextlib
import hashlib
import io
import re
import runpy
import shutil
import sys

import pytest
import torch

from conftest import ROOT, TRAIN_FLAGS, check_user_error
from test_bad_inputs import cli, inputs, snapshot  # noqa: F401  (fixtures)

VALUES = ["nan", "inf", "-1", "0", "1000000000000", ""]

# Each script's arguments when a case does not replace them ({in}: the shared inputs, read only; the
# case runs in its own empty folder, so relative outputs land there).
SCRIPTS = {
    "train.py": ["--data", "{in}/digits", "--out", "m.pt", "--out-dir", "out", "--max-steps", "2", *TRAIN_FLAGS],
    "lora_finetune.py": ["--base", "{in}/model.pt", "--data", "{in}/digits", "--out", "l.pt", "--out-dir", "out",
                         "--max-steps", "2", "--batch-size", "8", "--device", "cpu"],
    "denoise.py": ["--checkpoint", "{in}/model.pt", "--labels", "0,1", "--steps", "2", "--out-dir", "out",
                   "--save-samples", "s.pt", "--device", "cpu"],
    "lora.py": ["--inspect", "{in}/lora.pt"],
    "dataset.py": ["--data", "{in}/digits", "--out", "d.png"],
    "diffusion.py": ["--data", "{in}/digits", "--out", "f.png"],
    "figures.py": ["--out-dir", "out"],
    "bench/evaluate.py": ["{in}/samples.pt"],
}

HARNESS = r'''
import importlib.util, os, runpy, sys
import diffusion
root, script, work, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
os.chdir(work)
def accepted(*args, **kwargs):                  # where the slow work would begin: every check has passed
    print("sweep: accepted")
    sys.exit(0)
if script in ("train.py", "lora_finetune.py"):
    diffusion.Schedule.from_config = accepted   # the last call before the training loop
sys.argv = [script] + argv
if script == "bench/evaluate.py":
    spec = importlib.util.spec_from_file_location("evaluate", os.path.join(root, script))
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    evaluate.load_classifier = accepted
    sys.exit(evaluate.main(argv))
runpy.run_path(os.path.join(root, script), run_name="__main__")
'''


def value_flags(script):
    """The flags of `script` that take a value, as its --help lists them (run in this process: cheap)."""
    out, argv = io.StringIO(), sys.argv
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit:
        pass
    finally:
        sys.argv = argv
    return sorted(set(re.findall(r"(--[A-Za-z][\w-]*) [A-Z{]", out.getvalue())))


FLAGS = {script: value_flags(script) for script in SCRIPTS}
CASES = [(script, flag, value) for script, flags in FLAGS.items() for flag in flags for value in VALUES]


def test_the_sweep_covers_every_script_and_its_numeric_flags():
    assert len(CASES) > 400, len(CASES)
    for flag in ("--lr", "--epochs", "--time-budget", "--widths", "--image-size", "--lora-rank", "--rank"):
        assert flag in FLAGS["train.py"] + FLAGS["lora_finetune.py"], flag
    for flag in ("--per-label", "--guidance", "--guidance-interval", "--eta", "--steps", "--seed", "--lora-scale"):
        assert flag in FLAGS["denoise.py"], flag
    assert {"--index", "--seed"} <= set(FLAGS["diffusion.py"]) and {"--seed", "--threads"} <= set(FLAGS["bench/evaluate.py"])


@pytest.fixture(scope="module")
def sweep_inputs(inputs, tmp_path_factory):
    """The shared inputs, plus a samples file for bench/evaluate.py; returns (folder, its snapshot)."""
    d = tmp_path_factory.mktemp("sweep") / "in"
    shutil.copytree(inputs, d)
    torch.save({"images": torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8),
                "labels": torch.arange(20) % 10}, d / "samples.pt")
    return d, snapshot(d)


def argv_for(script, flag, value, folder):
    """SCRIPTS[script] with `flag` set to `value` (replacing its default there, or added)."""
    args = [a.replace("{in}", str(folder)) for a in SCRIPTS[script]]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.mark.parametrize("script,flag,value", [pytest.param(*c, id=f"{c[0]} {c[1]} {c[2]!r}") for c in CASES])
def test_flag_value(cli, sweep_inputs, tmp_path, script, flag, value):  # noqa: F811
    folder, before = sweep_inputs
    argv = argv_for(script, flag, value, folder)
    result = cli.run(None, str(ROOT), script, str(tmp_path), *argv, code=HARNESS)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert result.returncode in (0, 2), f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert snapshot(folder) == before, "an input file changed"
    if result.returncode == 2:
        check_user_error(result)
        assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".out", ".err")], \
            "refused, but wrote a file"
        return
    if script in ("train.py", "lora_finetune.py", "bench/evaluate.py"):
        assert "sweep: accepted" in result.stdout
    elif script == "denoise.py":             # sane samples: not blank, and a figure beside them
        samples = torch.load(tmp_path / argv[argv.index("--save-samples") + 1], weights_only=True)
        assert samples["images"].float().std() > 5 and len(samples["images"]) >= 1
        assert (tmp_path / argv[argv.index("--out-dir") + 1] / "samples.png").stat().st_size > 0
    elif script == "lora.py":
        assert "total:" in result.stdout
    elif script == "figures.py":
        assert (tmp_path / argv[argv.index("--out-dir") + 1] / "figures_grid.png").stat().st_size > 0
    else:
        assert (tmp_path / argv[argv.index("--out") + 1]).stat().st_size > 0


def test_save_samples_never_replaces_an_input_or_an_existing_file(cli, sweep_inputs, tmp_path):  # noqa: F811
    """denoise.py --lora l.pt --save-samples l.pt: refused (it is an input, --overwrite or not); an existing
    file needs --overwrite."""
    folder, before = sweep_inputs
    lora = str(folder / "lora.pt")
    base = SCRIPTS["denoise.py"][:-4]
    for extra in ([], ["--overwrite"]):
        result = cli.run(None, str(ROOT), "denoise.py", str(tmp_path), *[a.replace("{in}", str(folder)) for a in base],
                         "--lora", lora, "--save-samples", lora, *extra, code=HARNESS)
        assert "is this command's --lora (an input)" in check_user_error(result)
    assert snapshot(folder) == before
    (tmp_path / "s.pt").write_bytes(b"mine")
    argv = argv_for("denoise.py", "--device", "cpu", folder)
    assert "--overwrite" in check_user_error(cli.run(None, str(ROOT), "denoise.py", str(tmp_path), *argv, code=HARNESS))
    assert (tmp_path / "s.pt").read_bytes() == b"mine"
    assert cli.run(None, str(ROOT), "denoise.py", str(tmp_path), *argv, "--overwrite", code=HARNESS).returncode == 0
    assert hashlib.sha256((tmp_path / "s.pt").read_bytes()).hexdigest() != hashlib.sha256(b"mine").hexdigest()


def test_large_requests_are_sampled_in_chunks(tiny_model, monkeypatch):
    """denoise.sample_as_asked: up to CHUNK images in one call, exactly as backward_denoise draws them; more
    in CHUNK-sized calls that continue the same generator, with snapshots of the figure's rows only."""
    import argparse
    import denoise
    from diffusion import Schedule, backward_denoise
    tiny_model.eval()
    sched = Schedule.from_config(tiny_model.cfg)
    args = argparse.Namespace(seed=3, sampler="ddim", steps=3, eta=0.5, guidance=1.0, guidance_interval=(0, 49))
    labels = torch.arange(7) % 10
    x, snaps = denoise.sample_as_asked(tiny_model, sched, labels, args, "cpu", None, keep=4, rows=[0, 5])
    g = torch.Generator().manual_seed(3)
    x_one, snaps_one = backward_denoise(tiny_model, sched, labels, "ddim", 3, 0.5, 1.0, generator=g, keep=4,
                                        guidance_interval=(0, 49))
    assert torch.equal(x, x_one) and [n for n, _ in snaps] == [n for n, _ in snaps_one]
    assert all(torch.equal(a, b[[0, 5]]) for (_, a), (_, b) in zip(snaps, snaps_one))
    monkeypatch.setattr(denoise, "CHUNK", 3)
    x3, snaps3 = denoise.sample_as_asked(tiny_model, sched, labels, args, "cpu", None, keep=4, rows=[0, 5])
    g = torch.Generator().manual_seed(3)
    parts = [backward_denoise(tiny_model, sched, labels[i:i + 3], "ddim", 3, 0.5, 1.0, generator=g, keep=4,
                              guidance_interval=(0, 49)) for i in (0, 3, 6)]
    assert torch.equal(x3, torch.cat([p[0] for p in parts])) and torch.isfinite(x3).all()
    assert [n for n, _ in snaps3] == [n for n, _ in snaps_one]
    assert all(torch.equal(s, torch.cat([a[[0]], b[[2]]])) for (_, s), (_, a), (_, b) in
               zip(snaps3, parts[0][1], parts[1][1]))
