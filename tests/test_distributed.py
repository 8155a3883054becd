"""train.py under torchrun (DistributedDataParallel), on the CPU with the gloo backend.

Two processes with --batch-size 4 each must train like ONE process with --batch-size 8: Batches gives
each process its half of the same global batch, train_step draws t, the label drop and the noise for
the global batch and keeps its half, and DDP averages the two gradients (= the gradient of the mean
loss over all 8 images, since both halves are the same size).
"""
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from config import UserError
from conftest import LORA_RANK, ROOT, TINY_FLAGS, _env, check_ok, run_script
from dataset import Batches
from train import restore_training_state

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this PyTorch")

STEPS = 4
# Widths 16,32 instead of the tiny 8,16: with 8 channels, GroupNorm(8) has one channel per group and cancels
# a per-channel constant, so conv1's bias and the time embedding's Linear get an exactly-zero true gradient.
# Their computed gradient is float round-off, which Adam (update ~ g / sqrt(g^2)) turns into steps of
# +-lr: a sign that depends on the order of float additions, i.e. a 1e-3 difference that says nothing
# about DDP. fp32, because bf16 autocast would round that same order-of-additions noise to 3 digits.
# T=10 only to make the sample grid each finished run draws cheap (most of a run's time at T=50).
FLAGS = [*TINY_FLAGS, "--widths", "16,32", "--T", "10", "--warmup-steps", "2", "--seed", "0", "--device", "cpu",
         "--precision", "fp32", "--max-steps", STEPS]

# Runs train.py under torchrun; after fit() returns, each rank saves its own copy of the weights to
# DUMP.rank<N>. With INTERRUPT_AFTER > 0, rank 1 alone gets a real SIGINT (Ctrl-C) after that step.
# The processes read their losses back, and agree on stopping, every READ_LOSS_EVERY steps: 3 here.
# Loading the data takes rank 0 a second longer (a download), and rank 1 writes to DUMP.rank1-load whether
# rank 0 had finished loading when rank 1 began.
WRAPPER = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import torch
import train
dump, interrupt_after, rank = sys.argv[1], int(sys.argv[2]), int(os.environ["RANK"])
original_fit, original_step, original_load, calls = train.fit, train.train_step, train.load_images, [0]
def load_images(*args, **kwargs):
    if rank == 1:
        with open(f"{{dump}}.rank1-load", "w") as f:
            f.write("after rank 0" if os.path.exists(f"{{dump}}.rank0-loaded") else "with rank 0")
    loaded = original_load(*args, **kwargs)
    if rank == 0:
        time.sleep(1)
        open(f"{{dump}}.rank0-loaded", "w").close()
    return loaded
train.load_images = load_images
def fit(model, *args, **kwargs):
    reason = original_fit(model, *args, **kwargs)
    torch.save(model.state_dict(), f"{{dump}}.rank{{rank}}")
    return reason
def train_step(*args, **kwargs):
    loss = original_step(*args, **kwargs)
    calls[0] += 1
    if rank == 1 and calls[0] == interrupt_after:
        os.kill(os.getpid(), signal.SIGINT)
    return loss
train.fit, train.train_step, train.READ_LOSS_EVERY = fit, train_step, 3
sys.argv = ["train.py"] + sys.argv[3:]
train.run_main(train.main)
"""


def two_process_run(script, *args, timeout=180):
    """python -m torch.distributed.run --standalone --nproc_per_node=2 SCRIPT ARGS..., in the repo root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def torchrun(tmp_path, dump, *args, interrupt_after=0, timeout=180):
    """train.py through WRAPPER, in 2 processes (two_process_run)."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT)))
    return two_process_run(wrapper, dump, interrupt_after, *args, timeout=timeout)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, image_folder):
    """One 2-process run: batch 4 per process, 4 steps."""
    work = tmp_path_factory.mktemp("ddp")
    result = torchrun(work, work / "weights", "--data", image_folder, "--out", work / "m.pt",
                      "--out-dir", work / "out", "--batch-size", 4, *FLAGS)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return {"work": work, "ckpt": work / "m.pt", "result": result}


@needs_gloo
def test_both_ranks_end_with_identical_weights(two_processes):
    """DDP keeps the replicas in step: after training, rank 0's and rank 1's weights are bit-identical,
    and the checkpoint (written by rank 0 only) holds them under the plain UNet names (no "module.")."""
    work = two_processes["work"]
    rank0, rank1 = load(work / "weights.rank0"), load(work / "weights.rank1")
    assert rank0.keys() == rank1.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"{k} differs between the ranks"
    ckpt = load(two_processes["ckpt"])
    assert ckpt["step"] == STEPS and ckpt["world_size"] == 2 and ckpt["train_config"]["batch_size"] == 4
    assert ckpt["model"].keys() == rank0.keys() and not any(k.startswith("module.") for k in ckpt["model"])
    assert all(torch.equal(ckpt["model"][k], rank0[k]) for k in rank0)
    out = two_processes["result"].stdout
    assert out.count("saved ") == 2 and "2 processes x 4" in out          # one process prints, not two
    assert (work / "out" / "train_samples.png").is_file()


@needs_gloo
def test_only_rank_0_loads_the_data_until_it_has_it(two_processes):
    """The other processes load the data once rank 0 has: with --data mnist on a new machine, rank 0 alone
    downloads it, where N processes downloading into one folder at once would write over each other."""
    assert (two_processes["work"] / "weights.rank1-load").read_text() == "after rank 0"


@needs_gloo
def test_data_rank_0_cannot_load_is_the_same_error_line_in_every_process(tmp_path):
    """Where rank 0 cannot load the data (here: files in --data-root that are not MNIST's), the process waiting
    for it then fails alike: each process that gets as far prints the same one `error:` line, and none a traceback."""
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"not an IDX file")
    result = torchrun(tmp_path, tmp_path / "weights", "--data", "mnist", "--data-root", tmp_path / "root",
                      "--out", tmp_path / "m.pt", "--out-dir", tmp_path / "out", *FLAGS)
    errors = {line for line in result.stderr.splitlines() if line.startswith("error: ")}
    assert result.returncode != 0 and len(errors) == 1 and "not an IDX images file" in errors.pop(), result.stderr
    assert "train.py\", line" not in result.stderr and "terminate called" not in result.stderr, result.stderr
    assert not (tmp_path / "m.pt").exists()


def test_two_processes_train_like_one_with_the_global_batch(two_processes, image_folder, tmp_path):
    """2 processes x batch 4 == 1 process x batch 8, same seed: the same images, t, label drops and noise,
    so the only difference is the order of float additions (each rank sums its 4 images' gradients and
    the all-reduce adds the two sums; one process sums all 8 at once). That moves fp32 gradients by
    ~1e-7 relative, and Adam's g / sqrt(v) passes it on as ~1e-7 of each step of size lr (2e-3); measured:
    a max weight difference of 1e-6 to 2e-6 after 4 steps. atol 2e-5 leaves 10x headroom and is still 100x
    smaller than one Adam step, so a wrong shard, wrong noise or a missing gradient average would fail it."""
    one = tmp_path / "one.pt"
    check_ok(run_script("train.py", "--data", image_folder, "--out", one, "--out-dir", tmp_path / "out",
                        "--batch-size", 8, *FLAGS))
    a, b = load(one), load(two_processes["ckpt"])
    assert a["model"].keys() == b["model"].keys()
    worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    print(f"max |w(2 processes) - w(1 process)| = {worst:.2e}")
    assert worst < 2e-5, worst
    # rank 0 logs the loss averaged over both ranks: the mean over the global batch, as one process does
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
    assert b["losses"][0] == pytest.approx(a["losses"][0], rel=1e-6)     # step 1: the very same weights
    assert b["batches"]["pos"] == a["batches"]["pos"] and torch.equal(b["batches"]["order"], a["batches"]["order"])


@needs_gloo
def test_ctrl_c_in_one_rank_stops_both_and_resume_is_exact(two_processes, image_folder, tmp_path):
    """Ctrl-C reaching only rank 1 after step 2 stops BOTH ranks at the next step where they read their losses
    (3; no hang); rank 0 saves, and a 2-process --resume then ends with exactly the weights and losses of the
    uninterrupted 2-process run."""
    ckpt, args = tmp_path / "m.pt", ["--data", image_folder, "--out-dir", tmp_path / "out"]
    first = torchrun(tmp_path, tmp_path / "w", *args, "--out", ckpt, "--batch-size", 4, *FLAGS, interrupt_after=2)
    assert first.returncode != 0 and "interrupted" in first.stdout, first.stderr[-3000:]
    assert load(ckpt)["step"] == 3
    again = torchrun(tmp_path, tmp_path / "w", *args, "--out", ckpt, "--resume", "--device", "cpu")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed, straight = load(ckpt), load(two_processes["ckpt"])
    assert resumed["step"] == STEPS and resumed["losses"] == straight["losses"]
    for k in straight["model"]:
        assert torch.equal(resumed["model"][k], straight["model"][k]), k


@needs_gloo
def test_lora_finetune_under_torchrun_writes_the_adapter_of_one_process(two_processes, image_folder, tmp_path):
    """lora_finetune.py under torchrun, 2 processes of batch 4, writes the adapter that one process of batch 8
    writes, to float round-off (on the 2-process base, whose widths 16,32 leave no zero-gradient layer: FLAGS)."""
    args = ["--base", two_processes["ckpt"], "--data", image_folder, "--max-steps", 3, "--warmup-steps", 1,
            "--lora-rank", LORA_RANK, "--device", "cpu", "--precision", "fp32"]
    check_ok(run_script("lora_finetune.py", *args, "--batch-size", 8, "--out", tmp_path / "one.pt",
                        "--out-dir", tmp_path / "out1"))
    result = two_process_run("lora_finetune.py", *args, "--batch-size", 4, "--out", tmp_path / "two.pt",
                             "--out-dir", tmp_path / "out2")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = load(tmp_path / "one.pt")["lora"], load(tmp_path / "two.pt")["lora"]
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)


def test_resume_refuses_another_number_of_processes():
    """The global batch (and so the data order) depends on the number of processes: a checkpoint written
    by 2 processes cannot be resumed by 1, and the message says how to resume it."""
    images, labels = torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.arange(10)
    with pytest.raises(UserError, match="nproc_per_node=2"):
        restore_training_state({"world_size": 2}, None, None, Batches(images, labels, 4, seed=0), 10)


@pytest.mark.parametrize("n,batch_size", [(24, 4), (25, 4), (7, 2)])
def test_shards_put_together_are_the_single_process_batches(n, batch_size):
    """Batches with shard=(rank, 2) and batch B: rank 0's batch followed by rank 1's is exactly the batch a
    single process with batch 2B gets, over several epochs; the state_dict (saved by rank 0) is the same."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()
    labels = torch.arange(n)
    one = Batches(images, labels, 2 * batch_size, seed=5)
    ranks = [Batches(images, labels, batch_size, seed=5, shard=(r, 2)) for r in range(2)]
    assert len(ranks[0]) == len(one)
    for _ in range(3 * len(one) + 1):
        expected = one.next()[1].tolist()
        got = [y for b in ranks for y in b.next()[1].tolist()]
        assert got == expected
    state, one_state = ranks[0].state_dict(), one.state_dict()
    assert state["epoch"] == one_state["epoch"] and state["pos"] == one_state["pos"]
    assert torch.equal(state["order"], one_state["order"])


def test_too_few_images_for_the_processes():
    """Fewer images than processes cannot give every process a batch: a UserError."""
    images, labels = torch.zeros(1, 1, 28, 28, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)
    with pytest.raises(UserError, match="processes"):
        Batches(images, labels, 4, seed=0, shard=(0, 2))
