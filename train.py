"""Train the label-conditioned diffusion UNet (the series' train.py).

    python train.py --data ../shared/data/mnist-t10k        # how long it takes: README, "What you get"
    python train.py --resume                                 # continue an interrupted run
    torchrun --standalone --nproc_per_node=8 train.py ...    # 8 GPUs, 8 x --batch-size images per step

Each step (Ho et al. 2020, Algorithm 1): pick x_0 and a random t, noise it in closed form, and teach the
network to predict the noise: loss = || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t, label) ||^2.
Ctrl-C saves a resumable checkpoint (a second Ctrl-C quits at once; the last good file stays intact).
lora_finetune.py reuses train_step() and fit() from this file.
"""
import contextlib
import dataclasses
import hashlib
import math
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from config import (ModelConfig, Parser, TrainConfig, UserError, add_config_flags, apply_config_flags, atomic_save,
                    autocast_dtype, check_new_output, check_resume, config_from_dict, load_file, make_folder, number,
                    pick_device, run_main)
from dataset import Batches, data_inputs, load_images
from diffusion import Schedule, backward_denoise, forward_diffusion
from figures import save_grid, save_loss_curve, to_uint8
from unet import UNet, check_model_config, count_parameters, load_weights


def train_step(model, optimizer, sched, x0, labels, p_uncond, dtype=None, scaler=None, shard=(0, 1),
               min_snr_gamma=TrainConfig.min_snr_gamma, t_importance=TrainConfig.t_importance):
    """One optimizer step of DDPM's simplified loss (Ho et al. 2020, Algorithm 1, eq. 14); returns the loss
    as a 0-d tensor (fit reads them back ten at a time, READ_LOSS_EVERY). x0 (B,C,H,W) in [-1, 1], labels (B,).
    Beyond the blog: the target may be v instead of eps (v_target), and min_snr_gamma > 0 weights each image's
    error by its noise level (loss_weight), and t_importance > 0 draws the noise levels where that weight is
    (draw_noise_levels). With dtype (bf16 or fp16) the forward pass runs under
    torch.autocast; fp16 also needs a GradScaler against underflow.
    shard=(rank, world): under torchrun, x0 is this process's slice of the global batch (see fit)."""
    (rank, world), B, device = shard, x0.shape[0], x0.device
    # The random numbers are drawn for the GLOBAL batch (every process's generator is in the same state)
    # and each process keeps its slice: N processes then train exactly like one with N times the batch.
    mine = slice(rank * B, (rank + 1) * B)
    cfg = getattr(model, "module", model).cfg                             # (under torchrun model is DDP(UNet))
    t, weight = draw_noise_levels(sched, world * B, cfg.prediction, min_snr_gamma, t_importance, device)
    t, weight = t[mine], weight[mine]                                     # t ~ Uniform{0..T-1} in the blog
    # classifier-free guidance: sometimes train with the "no label" token instead of the label
    drop = (torch.rand(world * B, device=device) < p_uncond)[mine]
    labels = torch.where(drop, torch.full_like(labels, cfg.num_labels), labels)     # num_labels: "no label"
    eps = torch.randn(world * B, *x0.shape[1:], device=device)[mine]
    x_t, eps = forward_diffusion(sched, x0, t, eps)                      # x_t = sqrt(abar) x0 + sqrt(1-abar) eps
    with torch.autocast(x0.device.type, dtype=dtype, enabled=dtype is not None):
        pred = model(x_t, t, labels)
    target = eps if cfg.prediction == "eps" else v_target(sched, x0, eps, t)
    per_image = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))      # || target - net(x_t, t, y) ||^2, (B,)
    loss = (weight * per_image).mean()
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def fit(model, optimizer, scheduler, sched, batches, tcfg, progress, save, ema=None, time_budget=None,
        shard=(0, 1)):
    """The training loop shared by train.py and lora_finetune.py. Calls save() at each epoch's end
    and when stopping (max_steps, time budget, Ctrl-C). Returns why it stopped.
    Under torchrun (shard = (rank, world), world > 1) every process runs this loop on its slice of each
    batch, DDP averages the gradients, and only rank 0 shows progress and calls save()."""
    rank, world = shard
    device = next(model.parameters()).device
    dtype = autocast_dtype(tcfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    net = model
    if world > 1:   # torchrun: DDP all-reduces (averages) the gradients of all processes in backward()
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    start, epoch = time.time(), batches.epoch
    bar = tqdm(total=tcfg.max_steps, initial=progress.step, unit="step", dynamic_ncols=True, disable=rank > 0)
    reason, pending = "done", []                       # pending: losses not read back yet (see READ_LOSS_EVERY)
    with StopOnCtrlC() as ctrl_c, bar:                 # the bar is closed (its line ended) even on errors
        while progress.step < tcfg.max_steps:
            x0, labels = batches.next()
            pending.append(train_step(net, optimizer, sched, x0.to(device), labels.to(device), tcfg.p_uncond, dtype,
                                      scaler, shard, tcfg.min_snr_gamma, tcfg.t_importance))
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            progress.step += 1
            bar.update(1)
            stop = [ctrl_c.requested, time_budget is not None and time.time() - start > 60 * time_budget]
            epoch_ended, epoch = batches.epoch != epoch, batches.epoch
            # Under torchrun every process reads (and agrees on stopping) at the same steps; alone, at once.
            if not (len(pending) == READ_LOSS_EVERY or epoch_ended or progress.step == tcfg.max_steps
                    or (world == 1 and any(stop))):
                continue
            losses = torch.stack(pending).float()
            pending.clear()
            if world > 1:   # torchrun: log the mean loss of all processes; stop all together if any one asks
                sums = sum_over_processes(torch.cat([losses, torch.tensor(stop, dtype=torch.float32, device=device)]))
                losses, stop = sums[:-2] / world, (sums[-2:] > 0).tolist()
            losses = losses.tolist()
            bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
            if bad:
                raise UserError(f"loss became {losses[bad[0]]} at step {progress.step - len(losses) + bad[0] + 1}; "
                                f"stopped without saving it (the last good checkpoint is kept). Try a lower --lr.")
            progress.losses += losses
            bar.set_postfix(loss=f"{losses[-1]:.4f}", epoch=batches.epoch, lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if any(stop):
                reason = "interrupted" if stop[0] else "time budget"
                break
            if epoch_ended and rank == 0:                                   # an epoch ended: save
                save()
        if rank == 0:
            save()
    return reason


# ----------------------------------------------------------------------------- beyond the blog: EMA, LR schedule, Muon,
# Ctrl-C, the end-of-run figures, several processes (torchrun), checkpoints, the command line

# Reading a loss back (.item(), .tolist()) makes the CPU wait until the GPU has finished the step; reading ten
# at a time lets the CPU queue the next steps meanwhile. A NaN is still caught before anything is saved.
READ_LOSS_EVERY = 10


def v_target(sched, x0, eps, t):
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, section 4): the target when
    ModelConfig.prediction is "v". Unlike eps, it stays informative at t near T, where x_t is almost all noise."""
    abar = sched.alpha_bars.to(x0.device)[t].view(-1, 1, 1, 1)
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0


def loss_weight(sched, t, prediction, gamma):
    """Min-SNR-gamma weighting (Hang et al. 2023): weigh each image's error on x_0 by min(SNR_t, gamma), with
    SNR_t = abar_t / (1 - abar_t), so that the many nearly clean steps (huge SNR) stop dominating the gradient.
    In terms of the eps or v error this is min(SNR, gamma) / SNR or min(SNR, gamma) / (SNR + 1).
    gamma 0: weight 1, the blog's plain MSE."""
    if gamma == 0:
        return torch.ones(len(t), device=t.device)
    abar = sched.alpha_bars.to(t.device)[t]
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)


def draw_noise_levels(sched, n, prediction, gamma, share, device):
    """n noise levels t, and the loss weight of each. The blog draws t ~ Uniform{0..T-1} (share 0), and min-SNR
    then weighs each image by loss_weight(t); with gamma 1 on the linear schedule that weight is under a tenth of
    its peak for t < 67 and t > 541, so over half of each batch carries a twentieth of the loss. share > 0 draws
    that share of the levels in proportion to the weight (importance sampling, as Nichol & Dhariwal 2021, section
    3.3, do for their L_vlb): t ~ p(t) = (1 - share) / T + share * w(t) / sum(w), each image weighed by
    w(t) / (T p(t)), which leaves the expected loss, E_p[w / (T p) l] = E_uniform[w l], as it was, with less
    variance."""
    if share == 0 or gamma == 0:                                          # (gamma 0: every level weighs 1)
        t = torch.randint(0, sched.T, (n,), device=device)                 # t ~ Uniform{0..T-1}
        return t, loss_weight(sched, t, prediction, gamma)
    w = loss_weight(sched, torch.arange(sched.T, device=device), prediction, gamma)
    p = (1 - share) / sched.T + share * w / w.sum()
    t = torch.multinomial(p, n, replacement=True)
    return t, w[t] / (sched.T * p[t])


class EMA(AveragedModel):
    """EMA of the weights, theta_ema = d theta_ema + (1 - d) theta, with the decay warmed up as
    d_n = min(decay, (1 + n) / (10 + n)): a fixed 0.999 over a short CPU run would keep averaging
    in the untrained start. One foreach lerp updates every tensor at once (AveragedModel's own update
    runs a Python loop over them); its saved state is AveragedModel's ("module." weights, n_averaged)."""

    def __init__(self, model, decay):
        super().__init__(model, use_buffers=True)
        self.decay, self.count = decay, None      # count: n_averaged kept on the host (reading a GPU tensor waits)
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "count", None))

    @torch.no_grad()
    def update_parameters(self, model):
        if self.count is None:                                          # read once, after creation or loading
            self.count = int(self.n_averaged)
        n = self.count
        d = min(self.decay, (1 + n) / (10 + n)) if n else 0.0          # the first update copies, as AveragedModel's
        mine, theirs = ([p for p in [*m.parameters(), *m.buffers()] if p.is_floating_point()]
                        for m in (self.module, model))
        torch._foreach_lerp_(mine, theirs, 1.0 - d)                    # ema += (1 - d) (theta - ema)
        self.n_averaged += 1
        self.count += 1


def lr_schedule(optimizer, warmup, total):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` steps."""
    warmup = max(1, min(warmup, total - 1))
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))],
        milestones=[warmup])


def adamw(params, lr, device, weight_decay=0.01):
    """AdamW, fused into one kernel per step where PyTorch has that (CPU and CUDA): same maths, fewer launches."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))


def make_optimizer(model, tcfg, device):
    """train.py's optimizer: TrainConfig.optimizer, "muon" (below) or "adamw" over every weight. The blog's listing
    trains with Adam; Muon draws as well in 2,400 steps as AdamW in 3,000 (README, "Quality per CPU-minute")."""
    if tcfg.optimizer == "muon":
        return Muon(model.named_parameters(), tcfg.lr, device)
    return adamw(model.parameters(), tcfg.lr, device)


NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)       # Jordan et al. 2024's quintic: singular values -> about [0.7, 1.2]


def orthogonalize(batches, steps=5):
    """About U V^T for each matrix G = U S V^T in a list of batches (n, a, b): every singular value of
    X = G / ||G|| (all <= 1; X read as a x b with a <= b, transposed where G is tall) is pushed towards 1 by the
    Newton-Schulz iteration
        X <- c1 X + c2 (X X^T) X + c3 (X X^T)^2 X                                      (NEWTON_SCHULZ)
    As written it costs a^2 b a step. X stays Q X_0 with Q (a x a) a polynomial in S = X_0 X_0^T, so we iterate
    on Q alone, Q <- c1 Q + (c2 M + c3 M^2) Q with M = Q S Q^T = X X^T, at a^3 a step (b is up to 9a for a conv),
    and multiply by X_0 once at the end. Gram matrices of similar size share one batched iteration: padded with
    zeros to the next power of two, which leaves their own entries exact."""
    c1, c2, c3 = NEWTON_SCHULZ
    tall = [G.shape[1] > G.shape[2] for G in batches]
    X = [(G.mT if t else G) / (G.norm(dim=(1, 2), keepdim=True) + 1e-7) for G, t in zip(batches, tall)]
    S = [x @ x.mT for x in X]
    by_size = {}
    for i, s in enumerate(S):
        by_size.setdefault(1 << (s.shape[-1] - 1).bit_length(), []).append(i)
    Q = [None] * len(S)
    for size, members in by_size.items():
        padded = torch.cat([F.pad(S[i], (0, size - S[i].shape[-1]) * 2) for i in members])
        q = torch.eye(size, dtype=padded.dtype, device=padded.device).expand_as(padded)
        for _ in range(steps):
            M = q @ padded @ q.mT
            q = c1 * q + (c2 * M + c3 * M @ M) @ q
        for i, block in zip(members, q.split([len(S[i]) for i in members])):
            Q[i] = block[:, :S[i].shape[-1], :S[i].shape[-1]]
    return [(q @ x).mT if t else q @ x for q, x, t in zip(Q, X, tall)]


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for the hidden weight matrices, AdamW for the rest, as its authors use it.
    A matrix W (a conv's kernel read as out x in*k*k) moves by -lr 0.2 sqrt(max(out, in*k*k)) orthogonalize(u),
    u the Nesterov momentum of its gradient: every direction of the update gets the same size, where Adam's
    follows the gradient's few large ones. The factor 0.2 sqrt(.) gives the step AdamW's RMS (Liu et al. 2025,
    "Muon is scalable for LLM training"), so one lr and schedule serve both groups. Biases, norms, the label
    embedding and the first and last convs (stem, head) take PyTorch's AdamW step; decoupled weight decay for all.
    param_groups holds both groups, so that an LR scheduler and a GradScaler see every parameter."""

    def __init__(self, named_parameters, lr, device, weight_decay=0.01, momentum=0.95):
        hidden, rest = [], []
        for name, p in named_parameters:
            (hidden if p.ndim >= 2 and not name.startswith(("context.", "stem.", "head.")) else rest).append(p)
        super().__init__([{"params": hidden}, {"params": rest}],
                         dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.adamw = adamw(rest, lr, device, weight_decay)
        self.same_shape = {}                            # one batched Newton-Schulz per shape
        for p in hidden:
            self.same_shape.setdefault(p.shape, []).append(p)
            self.state[p]["momentum"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure=None):
        group = self.param_groups[0]
        self.adamw.param_groups[0]["lr"] = self.param_groups[1]["lr"]       # (the scheduler sets ours)
        self.adamw.step()
        mu, updates, moving = group["momentum"], [], []
        for shape, ps in self.same_shape.items():
            ps = [p for p in ps if p.grad is not None]                          # (as torch's optimizers do)
            if not ps:
                continue
            moving.append((shape, ps))
            grads = [p.grad for p in ps]
            bufs = [self.state[p]["momentum"] for p in ps]
            torch._foreach_lerp_(bufs, grads, 1 - mu)                           # m <- mu m + (1 - mu) g
            u = torch.stack(torch._foreach_lerp(grads, bufs, mu))               # Nesterov: u = g + mu (m - g)
            updates.append(u.reshape(len(ps), shape[0], -1))                    # (n, out, in*k*k)
        for (shape, ps), o in zip(moving, orthogonalize(updates)):
            out, fan_in = o.shape[1:]
            torch._foreach_mul_(ps, 1 - group["lr"] * group["weight_decay"])    # decoupled weight decay
            torch._foreach_add_(ps, [d.reshape(shape) for d in o.unbind()],
                                alpha=-group["lr"] * 0.2 * math.sqrt(max(out, fan_in)))

    def state_dict(self):
        return {**super().state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.adamw.load_state_dict(state_dict.pop("adamw"))
        check_buffer_shapes(self.adamw)         # (its own momentum buffers: load_optimizer_state checks them)
        super().load_state_dict(state_dict)


class StopOnCtrlC:
    """First Ctrl-C asks the loop to stop after this step (and save); a second one quits at once."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)            # the next Ctrl-C raises
        print("\nCtrl-C: stopping after this step and saving (Ctrl-C again to quit at once)", flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


@dataclasses.dataclass
class Progress:
    """What a run has done so far; saved in checkpoints so a resumed run continues exactly."""
    step: int = 0
    losses: list = dataclasses.field(default_factory=list)


def figure_names(prefix):
    """The figures finish_run writes into --out-dir: a sample grid and the loss curve."""
    return f"{prefix}_samples.png", f"{prefix}_loss.png"


def finish_run(reason, model, sched, losses, out_dir, prefix, seed, is_main=True):
    """After fit(): exit with 130 if Ctrl-C stopped the run, else save a sample grid and the loss curve
    (under torchrun only rank 0 does, is_main)."""
    if reason == "interrupted":
        raise SystemExit(130)                                  # the shell's code for "stopped by Ctrl-C"
    if not is_main:
        return
    model.eval()
    grid, curve = (os.path.join(out_dir, name) for name in figure_names(prefix))
    labels = torch.arange(model.cfg.num_labels).repeat_interleave(8)              # 8 of every label, SampleConfig's sampler
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    x, _ = backward_denoise(model, sched, labels, generator=g)
    save_grid(to_uint8(x).cpu(), grid, nrow=8, row_names=[str(k) for k in range(model.cfg.num_labels)])
    save_loss_curve(losses, curve)
    print(f"saved {grid} and {curve}")


# Several processes (torchrun).
# `torchrun --nproc_per_node=N train.py ...` starts N copies of this script (one per GPU) and gives each its
# RANK (0..N-1), the WORLD_SIZE N and its LOCAL_RANK (its GPU on this machine) in environment variables.
# Plain `python train.py` sets none of them: one process, rank 0 of 1, and the code below does nothing.

def setup_distributed(device_name):
    """Returns (rank, world, device). Under torchrun: one GPU per process, joined by NCCL (or gloo on CPUs)."""
    world, device = int(os.environ.get("WORLD_SIZE", 1)), pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"torchrun runs on --device cuda or cpu, not {device}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return int(os.environ["RANK"]), world, device


@contextlib.contextmanager
def rank_0_first(rank, world):
    """Under torchrun: the `with` block runs in rank 0 first, then in the other processes. For loading the data,
    so that rank 0 alone downloads it (N processes downloading into one folder at once write over each other's
    files) and the others read what it wrote. Where it fails in rank 0, the others then fail alike."""
    if rank > 0:
        dist.barrier()                  # wait for rank 0 ...
    try:
        yield
    finally:
        if rank == 0 and world > 1:
            dist.barrier()              # ... to come here, done or failed


def sum_over_processes(values):
    """values summed element by element over all processes (each process gets the sums)."""
    dist.all_reduce(values)
    return values


def end_distributed(world):
    """Under torchrun: wait until every process, rank 0 writing its checkpoint included, got here; then
    leave. (torchrun stops all processes as soon as one exits with an error code, e.g. 130 after Ctrl-C.)"""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def training_state(optimizer, scheduler, batches, progress, tcfg):
    """The part of a checkpoint that lets --resume continue exactly (lora_finetune.py saves it too)."""
    return {"train_config": dataclasses.asdict(tcfg), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "batches": batches.state_dict(),
            "rng": {"cpu": torch.get_rng_state(),            # the random generators, for exact resumes
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "step": progress.step, "epoch": batches.epoch, "losses": progress.losses,
            "world_size": batches.world, "data": data_fingerprint(batches)}


def data_fingerprint(batches):
    """How many images a run learns from, and a short hash of them and their labels: --resume refuses other data
    (the saved data order indexes these very images)."""
    h = hashlib.sha256(batches.images.contiguous().numpy().tobytes())
    h.update(batches.labels.contiguous().numpy().tobytes())
    return f"{len(batches.images):,d} images, hash {h.hexdigest()[:12]}"


def restore_training_state(state, optimizer, scheduler, batches, max_steps):
    world = state.get("world_size", 1)
    if world != batches.world:      # the global batch, hence the data order, depends on the number of processes
        raise UserError(f"--resume: this run was trained by {world} process(es), resume it with the same number "
                        f"(torchrun --nproc_per_node={world}, or plain python for 1), not {batches.world}")
    now = data_fingerprint(batches)
    if state.get("data", now) != now:
        raise UserError(f"--resume: --data gives other images ({now}) than this run learnt from "
                        f"({state['data']}); resume with the same --data")

    def rng(saved):
        torch.set_rng_state(saved["cpu"])
        if saved["cuda"] and torch.cuda.is_available():
            if world == 1:
                torch.cuda.set_rng_state_all(saved["cuda"])
            else:   # torchrun: every GPU continues from rank 0's GPU's generator (all of them drew the same numbers)
                torch.cuda.set_rng_state(saved["cuda"][0])          # (the current device: this process's)

    # A damaged part would fail inside PyTorch's loaders (KeyError, RuntimeError, ...), or only steps later: each is
    # loaded and checked here, and a failure is one line that names the part.
    for part, load in (("optimizer", lambda saved: load_optimizer_state(optimizer, saved)),
                       ("scheduler", scheduler.load_state_dict), ("batches", batches.load_state_dict), ("rng", rng),
                       ("step", lambda step: check_step(step, max_steps)), ("losses", check_losses)):
        try:
            load(state[part])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            detail = (str(e).splitlines() or [""])[0][:120]
            raise UserError(f"--resume: the saved {part} state does not fit this run ({type(e).__name__}: {detail}); "
                            "the file is damaged, or not saved by this project: --overwrite starts over") from None
    return Progress(state["step"], state["losses"])


def load_optimizer_state(optimizer, saved):
    """optimizer.load_state_dict, and a check it does not make: every saved buffer (Adam's moments, Muon's
    momentum) has its weight's shape (a wrong one would fail only at the next step)."""
    optimizer.load_state_dict(saved)
    check_buffer_shapes(optimizer)


def check_buffer_shapes(optimizer):
    for p, buffers in optimizer.state.items():
        for name, v in buffers.items():
            if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                raise ValueError(f"{name} {tuple(v.shape)} for a weight of {tuple(p.shape)}")


def check_step(step, max_steps):
    if type(step) is not int or not 0 <= step <= max_steps:
        raise ValueError(f"step {step!r}, not an integer from 0 to --max-steps {max_steps}")


def check_losses(losses):
    if not isinstance(losses, list) or not all(isinstance(v, float) for v in losses):
        raise TypeError("not a list of numbers")


def checkpoint_dict(model, ema, optimizer, scheduler, batches, progress, tcfg):
    return {"kind": "model", "model_config": dataclasses.asdict(model.cfg),
            "model": model.state_dict(), "ema": ema.state_dict(),
            **training_state(optimizer, scheduler, batches, progress, tcfg)}


def run_parser(description, out, out_help):
    """The command line train.py and lora_finetune.py share; each adds its own settings to it."""
    parser = Parser(description=description)
    parser.add_argument("--data", default="mnist", help="mnist, fashion-mnist, or a folder with one subfolder per label")
    parser.add_argument("--data-root", default="./data", help="where torchvision datasets are (or are downloaded to)")
    parser.add_argument("--out", default=out, help=out_help)
    parser.add_argument("--out-dir", default="outputs", help="folder for the sample grid and loss curve")
    parser.add_argument("--resume", action="store_true", help="continue from --out")
    parser.add_argument("--overwrite", action="store_true", help="start over even if --out exists")
    parser.add_argument("--epochs", type=number(int, "[1, 1e6]"), default=None,
                        help="passes over the data (overrides --max-steps), in [1, 1e6]")
    parser.add_argument("--time-budget", type=number(float, "(0, 1e6]"), default=None,
                        help="stop cleanly after this many minutes, in (0, 1e6]")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device name")
    return parser


def parse_args():
    parser = run_parser(__doc__.split("\n")[0], "model.pt", "checkpoint file (written atomically)")
    add_config_flags(parser.add_argument_group("model (ignored with --resume: the checkpoint's own config is used)"),
                     ModelConfig())
    add_config_flags(parser.add_argument_group("training"), TrainConfig())
    return parser.parse_args()


def resolve_train_config(args, defaults, n_images, saved=None, world=1):
    """The run's TrainConfig: the defaults, or a resumed run's own settings, plus the user's flags (their
    ranges checked by the parser, config.LIMITS).
    --epochs N becomes max_steps = N batches-per-epoch (batches of world * batch_size images under torchrun)."""
    tcfg = apply_config_flags(saved or defaults, args)
    if args.epochs is not None:
        global_batch = max(1, min(tcfg.batch_size * world, n_images))
        tcfg = dataclasses.replace(tcfg, max_steps=args.epochs * (n_images // global_batch))
    if saved is not None:
        check_resume(saved, tcfg)
    return tcfg


def main():
    args = parse_args()
    inputs = data_inputs(args.data, args.data_root)
    check_new_output(args.out, args.resume, args.overwrite, inputs)
    make_folder(args.out_dir, figure_names("train"), [("--out", args.out)], inputs)
    rank, world, device = setup_distributed(args.device)     # torchrun: this is process `rank` of `world`
    is_main = rank == 0                                       # only the main process prints and writes files
    ckpt = load_file(args.out, "model") if args.resume else None
    mcfg = config_from_dict(ModelConfig, ckpt["model_config"]) if ckpt else apply_config_flags(ModelConfig(), args)
    check_model_config(mcfg)                       # before the (slow) data loading
    with rank_0_first(rank, world):                          # torchrun: one download, not N at once
        images, labels = load_images(args.data, args.data_root, mcfg.image_size, mcfg.num_labels)
    saved = None
    if ckpt:     # (checkpoints saved before the LoRA settings moved to FinetuneConfig also hold lora_* keys)
        saved = config_from_dict(TrainConfig, {k: v for k, v in ckpt["train_config"].items() if not k.startswith("lora_")})
    tcfg = resolve_train_config(args, TrainConfig(), len(images), saved, world)

    torch.manual_seed(tcfg.seed)                              # the same in every process: the same weights
    model = UNet(mcfg).to(device)
    batches = Batches(images, labels, tcfg.batch_size, tcfg.seed, shard=(rank, world))
    ema = EMA(model, tcfg.ema_decay)
    optimizer = make_optimizer(model, tcfg, device)
    scheduler = lr_schedule(optimizer, tcfg.warmup_steps, tcfg.max_steps)
    progress = Progress()
    if ckpt:
        load_weights(model, ckpt["model"], args.out)
        load_weights(ema, ckpt["ema"], args.out)
        progress = restore_training_state(ckpt, optimizer, scheduler, batches, tcfg.max_steps)
        if is_main:
            print(f"resuming {args.out} at step {progress.step}/{tcfg.max_steps}")
    if is_main:
        per_process = f" ({world} processes x {batches.batch_size})" if world > 1 else ""
        print(f"{len(images)} images, {len(batches)} batches of {batches.global_batch}{per_process} per epoch, "
              f"{count_parameters(model):,d} parameters, device {device}, "
              f"autocast {autocast_dtype(tcfg.precision, device) or 'off (fp32)'}")

    def save():
        atomic_save(checkpoint_dict(model, ema, optimizer, scheduler, batches, progress, tcfg), args.out)

    sched = Schedule.from_config(mcfg)
    t0 = time.time()
    reason = fit(model, optimizer, scheduler, sched, batches, tcfg, progress, save, ema, args.time_budget,
                 shard=(rank, world))
    end_distributed(world)                                    # torchrun: wait for rank 0's checkpoint, then leave
    if is_main:
        minutes = (time.time() - t0) / 60
        print(f"{reason}: step {progress.step}, epoch {batches.epoch}, {minutes:.1f} min; saved {args.out}")
    finish_run(reason, ema.module, sched, progress.losses, args.out_dir, "train", tcfg.seed, is_main)


if __name__ == "__main__":
    run_main(main)
