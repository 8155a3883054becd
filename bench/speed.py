"""How fast and how big is our model, next to the tutorial's configuration, on THIS machine?

    python bench/speed.py                  # the full benchmark (see --help); prints markdown tables
    python bench/speed.py --quick          # a smoke test with tiny step counts (numbers are not meaningful)

Everything is measured in one run on one machine, so compare the ratios, not the seconds. Shared
machines are noisy, so the configurations are measured in interleaved rounds (A B C, A B C, ...)
and each table shows the median round, with the fastest and slowest round in brackets.

1. Training: images per second of train.train_step (train.py's optimizer, fixed random batch, warm-up steps
   not counted) for our default model (with TrainConfig().precision, as `python train.py` runs it), the
   same model with AdamW instead of Muon on its weight matrices, the same model laid out as before
   channels-last (usual NCHW layout, plain GroupNorm), the same model in fp32, and the tutorial's UNet shape
   (48x48 pixels, no patching, widths 64..1024, one context token) built by our own unet.py, in fp32 at the
   tutorial's batch of 64, with AdamW. Images/s make the batch sizes comparable; "x tutorial" is the speed-up
   (target: >= 20x).
2. Sampling 100 digits (10 per label) with diffusion.backward_denoise at denoise.py's precision: DDPM-1000,
   DDIM-50, DDIM-50 with guidance 2, denoise.py's default sampler and the same with 20 steps; guidance
   applies on config.SampleConfig's interval, one batched forward of 200 per guided step (samplers,
   network_calls). Random weights unless --checkpoint: the cost does not depend on the weights. Then
   the whole CLI, `python denoise.py --per-label 10`, against a bare `python -c "import torch,
   matplotlib.pyplot"` (the libraries it imports; torchvision only where a download needs it): their
   difference is what our code adds on top of importing the libraries (target: <= 5 s).
   With --parts lora: the default sampler (config.SampleConfig, precision auto) for the base model, for the
   model with a LoRA adapter (unmerged: every adapted layer computes W + dW at each call), and for the same
   adapter merged into the weights, once with the blog's targets (Wq,Wk,Wv, rank 4) and once with the
   default adapter (config.FinetuneConfig). Target: merged costs what the base costs. Then
   lora_finetune.py's training step (train.train_step at FinetuneConfig's batch and precision, fixed random
   batch) with every weight trained (--full), with each adapter, and with the default adapter computed as
   the blog's listing computes a LoRA layer, the detour beside the base layer (detour_forward).
3. Peak memory: peak resident set size (Linux VmHWM) of a fresh Python process that builds the model
   and its optimizer and runs a few training steps; the baseline process only imports torch and the project.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.evaluate import names  # noqa: E402
from bench.knobs import check_bench_model  # noqa: E402
from config import (LIMITS, FinetuneConfig, ModelConfig, Parser, SampleConfig, TrainConfig, atomic_save,  # noqa: E402
                    UserError, autocast_dtype, number, pick_device, run_main)
from dataset import Batches  # noqa: E402
from diffusion import Schedule, backward_denoise, guidance_at, timesteps  # noqa: E402
from lora import (LoraConv2d, LoraEmbedding, inject_lora, lora_layers, mark_only_lora_trainable,  # noqa: E402
                  merge_lora)
from lora_finetune import finetune_defaults, finetune_optimizer  # noqa: E402
from train import Progress, checkpoint_dict, lr_schedule, make_optimizer, EMA, train_step  # noqa: E402
from unet import GroupNorm32, UNet, check_model_config, count_parameters, load_model  # noqa: E402

# The tutorial's UNet shape, built with our blocks: 48x48 pixels directly, five levels, one token.
TUTORIAL = ModelConfig(image_size=48, patch=1, widths=(64, 128, 256, 512, 1024), context_tokens=1)
TUTORIAL_BATCH = 64
BARE_IMPORTS = "import torch, matplotlib.pyplot"

# How much to measure. --quick only checks that everything runs.
FULL = dict(train_rounds=5, train_steps=10, warmup_steps=3, sample_rounds=3, per_label=10, cli_runs=3,
            memory_steps=3)
QUICK = dict(train_rounds=2, train_steps=2, warmup_steps=1, sample_rounds=1, per_label=1, cli_runs=1,
             memory_steps=1)


def log(message):
    print(message, file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn, calls, device):
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def interleaved_seconds(jobs, rounds, device):
    """jobs: {name: (fn, calls per round)}. Runs every job once per round, in turn, so that a slow
    spell of the machine hits all of them. Returns {name: [seconds per call, one per round]}."""
    times = {name: [] for name in jobs}
    for r in range(rounds):
        for name, (fn, calls) in jobs.items():
            times[name].append(seconds_per_call(fn, calls, device))
            log(f"  round {r + 1}/{rounds}  {name}: {times[name][-1]:.3f} s")
    return times


def summary(seconds):
    """Median and range of a list of timings."""
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "all": seconds}


def precision_name(dtype):
    return str(dtype).replace("torch.", "") if dtype else "fp32"


def fmt_range(s, digits=3):
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


# ----------------------------------------------------------------------------- 1. training speed

def before_channels_last(model):
    """The model as this project ran it before the channels-last layout: conv weights in the usual (NCHW)
    order and plain GroupNorm (which under autocast then takes bf16 input). Same weights, same numbers."""
    for m in model.modules():
        if isinstance(m, GroupNorm32):
            m.__class__ = torch.nn.GroupNorm
    return model.to(memory_format=torch.contiguous_format)


def make_train_step(cfg, batch_size, dtype, device, before, optimizer_name):
    """A fresh seeded UNet(cfg) with train.py's optimizer (train.make_optimizer: "muon" or "adamw"), and a
    function doing one train_step on a fixed random batch; before=True: the same model laid out as before
    channels-last (before_channels_last)."""
    check_model_config(cfg)
    torch.manual_seed(0)
    model = UNet(cfg).to(device)
    if before:
        before_channels_last(model)
    tcfg = dataclasses.replace(TrainConfig(), optimizer=optimizer_name)
    optimizer = make_optimizer(model, tcfg, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    sched = Schedule.from_config(cfg)
    x0, labels = fixed_batch(cfg, batch_size, device)
    step = lambda: train_step(model, optimizer, sched, x0, labels, tcfg.p_uncond, dtype, scaler)  # noqa: E731
    return model, step


def fixed_batch(cfg, batch_size, device):
    """A random batch (images in [-1, 1], labels) that every timed step of one setup reuses."""
    x0 = torch.rand(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    return x0, torch.randint(0, cfg.num_labels, (batch_size,), device=device)


def training_setups(batch_size, device):
    """[(name, config, batch size, autocast dtype, laid out as before channels-last, optimizer)] for the training
    measurements. The tutorial's shape trains with AdamW (the blog's listing: Adam)."""
    tcfg = TrainConfig()
    dtype = autocast_dtype(tcfg.precision, device)
    return [("default", ModelConfig(), batch_size, dtype, False, tcfg.optimizer),
            ("default, AdamW", ModelConfig(), batch_size, dtype, False, "adamw"),
            ("default, before channels-last", ModelConfig(), batch_size, dtype, True, tcfg.optimizer),
            ("default fp32", ModelConfig(), batch_size, None, False, tcfg.optimizer),
            ("tutorial", TUTORIAL, TUTORIAL_BATCH, None, False, "adamw")]


def measure_training(plan, batch_size, device):
    jobs, rows = {}, []
    for name, cfg, batch, dtype, before, optimizer in training_setups(batch_size, device):
        model, step = make_train_step(cfg, batch, dtype, device, before, optimizer)
        tutorial = cfg is TUTORIAL
        warmup = 1 if tutorial else plan["warmup_steps"]      # the tutorial shape is slow: few steps
        log(f"training: {name}, {warmup} warm-up step(s)")
        for _ in range(warmup):
            step()
        jobs[name] = (step, 1 if tutorial else plan["train_steps"])
        rows.append(dict(name=name, params=count_parameters(model), batch=batch,
                         precision=precision_name(dtype), steps_per_round=jobs[name][1]))
    times = interleaved_seconds(jobs, plan["train_rounds"], device)
    for row in rows:
        row["s_per_step"] = summary(times[row["name"]])
        row["images_per_s"] = row["batch"] / row["s_per_step"]["median"]
    tutorial = rows[-1]["images_per_s"]
    for row in rows:
        row["x_tutorial"] = row["images_per_s"] / tutorial
    return rows


# ----------------------------------------------------------------------------- 2. sampling speed

def write_random_checkpoint(path, cfg=ModelConfig()):
    """A checkpoint with random weights in exactly the format train.py writes (enough for denoise.py)."""
    torch.manual_seed(0)
    model, tcfg = UNet(cfg), TrainConfig()
    ema = EMA(model, tcfg.ema_decay)
    optimizer = make_optimizer(model, tcfg, torch.device("cpu"))
    scheduler = lr_schedule(optimizer, tcfg.warmup_steps, tcfg.max_steps)
    images = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    batches = Batches(images, torch.arange(8) % 10, tcfg.batch_size, tcfg.seed)
    atomic_save(checkpoint_dict(model, ema, optimizer, scheduler, batches, Progress(), tcfg), path)


def samplers(T):
    """[(name, sampler, steps, guidance)] to time: DDPM walks all T steps (T = 1000 by default); guidance
    applies on SampleConfig's interval only. The last two: denoise.py's default, and it with 20 steps."""
    lo, hi = SampleConfig.guidance_interval
    w, n = SampleConfig.guidance, min(SampleConfig.steps, T)
    return [(f"DDPM-{T}, guidance 0", "ddpm", T, 0.0),
            ("DDIM-50, guidance 0", "ddim", 50, 0.0),
            (f"DDIM-50, guidance 2 on [{lo}, {hi}]", "ddim", 50, 2.0),
            (f"DDIM-{n}, guidance {w:g} on [{lo}, {hi}] (denoise.py's default)", "ddim", n, w),
            (f"DDIM-20, guidance {w:g} on [{lo}, {hi}] (the previous default)", "ddim", min(20, T), w)]


def network_calls(T, steps, guidance, batch):
    """'calls x batch' of one sampling run: a guided step is one call on 2 x batch (label and no label)."""
    guided = sum(guidance_at(t, guidance) != 0 for t in timesteps(T, steps))
    return " + ".join(f"{n} x {b}" for n, b in ((steps - guided, batch), (guided, 2 * batch)) if n)


def measure_sampling(plan, checkpoint, device):
    model, _ = load_model(checkpoint, "ema", device)
    sched = Schedule.from_config(model.cfg)
    labels = torch.arange(model.cfg.num_labels).repeat_interleave(plan["per_label"])

    dtype = autocast_dtype("auto", device)                             # denoise.py's precision

    def sampler(kind, steps, guidance):
        g = torch.Generator(device=device).manual_seed(0)
        return lambda: backward_denoise(model, sched, labels, kind, steps, 0.0, guidance, generator=g, dtype=dtype)

    sampler("ddim", 2, 2.0)()                                           # warm-up
    jobs = {name: (sampler(kind, steps, guidance), 1) for name, kind, steps, guidance in samplers(sched.T)}
    log(f"sampling {len(labels)} digits")
    times = interleaved_seconds(jobs, plan["sample_rounds"], device)
    rows = []
    for name, kind, steps, guidance in samplers(sched.T):
        rows.append(dict(name=name, forwards=network_calls(sched.T, steps, guidance, len(labels)),
                         seconds=summary(times[name])))
    for row in rows:
        row["x_ddpm"] = rows[0]["seconds"]["median"] / row["seconds"]["median"]
    return rows, len(labels), precision_name(dtype)


def lora_setups():
    """[(name, targets, rank)] of the adapters whose sampling cost is measured."""
    return [("Wq,Wk,Wv r=4", ("Wq", "Wk", "Wv"), 4),
            ("the default adapter", FinetuneConfig.lora_targets, FinetuneConfig.lora_rank)]


def measure_lora_sampling(plan, checkpoint, device):
    """Sampling time of base | LoRA unmerged | LoRA merged, the adapters with random non-zero B (a zero B
    costs the same: W + dW is computed either way)."""
    models = {"base": load_model(checkpoint, "ema", device)[0]}
    for name, targets, r in lora_setups():
        for merged in (False, True):
            model = load_model(checkpoint, "ema", device)[0]
            inject_lora(model, targets, r, float(r))
            torch.manual_seed(0)
            with torch.no_grad():
                for m in lora_layers(model).values():
                    m.lora_b.normal_(0, 0.01)
            if merged:
                merge_lora(model)
            models[f"{name}, {'merged' if merged else 'unmerged'}"] = model
    sched = Schedule.from_config(models["base"].cfg)
    labels = torch.arange(10).repeat_interleave(plan["per_label"])
    dtype = autocast_dtype("auto", device)

    def sampler(model, steps=SampleConfig.steps):
        g = torch.Generator(device=device).manual_seed(0)
        return lambda: backward_denoise(model, sched, labels, "ddim", steps, 0.0, SampleConfig.guidance,
                                        generator=g, dtype=dtype)

    for model in models.values():
        sampler(model, 2)()                                              # warm-up
    log(f"LoRA sampling {len(labels)} digits")
    times = interleaved_seconds({name: (sampler(m), 1) for name, m in models.items()}, plan["sample_rounds"], device)
    base = statistics.median(times["base"])
    return [dict(name=name, seconds=summary(t), x_base=statistics.median(t) / base) for name, t in times.items()], \
        precision_name(dtype)


def detour_forward(layer, x):
    """A LoRA layer computed as the blog's listing computes it, the detour beside the base layer: W x + (x A B)
    alpha/r; for a conv base(x) + B(M(A(x))) alpha/r, for an embedding W[i] + A[i] B alpha/r. The same sum as
    lora.py's (W + dW) x (tests/test_lora.py checks it), kept here to time the two side by side."""
    s = layer.alpha / layer.r * layer.scale
    if isinstance(layer, LoraConv2d):
        b = layer.base
        h = F.conv2d(F.conv2d(x, layer.lora_a), layer.lora_m, None, b.stride, b.padding, b.dilation)
        return b(x) + F.conv2d(h, layer.lora_b) * s
    if isinstance(layer, LoraEmbedding):
        return layer.base(x) + F.embedding(x, layer.lora_a) @ layer.lora_b * s
    return layer.base(x) + x @ layer.lora_a @ layer.lora_b * s


def finetune_step(checkpoint, device, targets=None, r=None, detour=False):
    """lora_finetune.py's optimizer and train_step on a fixed random batch of FinetuneConfig's size: every
    weight trains (targets None: --full) or an adapter on `targets` at rank r (LoRA+ groups); detour=True
    computes its layers with detour_forward. Returns (trainable parameters, step function, autocast dtype)."""
    model, _ = load_model(checkpoint, "ema", device)
    full = targets is None
    tcfg = finetune_defaults(full)
    if full:
        params = list(model.parameters())
    else:
        inject_lora(model, targets, r, float(r))
        params = mark_only_lora_trainable(model)
        for layer in lora_layers(model).values() if detour else ():
            layer.forward = types.MethodType(detour_forward, layer)     # shadows the class's forward
    optimizer = finetune_optimizer(model, params, tcfg, full, device)
    model.train()
    sched, dtype = Schedule.from_config(model.cfg), autocast_dtype(tcfg.precision, device)
    torch.manual_seed(0)
    x0, labels = fixed_batch(model.cfg, tcfg.batch_size, device)
    step = lambda: train_step(model, optimizer, sched, x0, labels, tcfg.p_uncond, dtype)  # noqa: E731
    return sum(p.numel() for p in params), step, dtype


def measure_lora_training(plan, checkpoint, device):
    """Seconds per fine-tuning step: --full, each adapter of lora_setups, and the default adapter as a detour."""
    default = lora_setups()[-1]
    setups = [("full fine-tuning (--full)", None, None, False)] + [(n, t, r, False) for n, t, r in lora_setups()] \
        + [(f"{default[0]}, computed as a detour beside W x (the blog's form)", default[1], default[2], True)]
    jobs, rows = {}, []
    for name, targets, r, detour in setups:
        n_train, step, dtype = finetune_step(checkpoint, device, targets, r, detour)
        for _ in range(plan["warmup_steps"]):
            step()
        jobs[name] = (step, plan["train_steps"])
        rows.append(dict(name=name, trains=n_train))
    log(f"LoRA fine-tuning steps, batch {FinetuneConfig.batch_size}")
    times = interleaved_seconds(jobs, plan["train_rounds"], device)
    full = statistics.median(times[rows[0]["name"]])
    for row in rows:
        row["s_per_step"] = summary(times[row["name"]])
        row["x_full"] = row["s_per_step"]["median"] / full
    return rows, precision_name(dtype)


def wall_seconds(cmd, env):
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:                  # one line: the child's own last line (its `error: ...`)
        last = (done.stderr.strip().splitlines() or ["no message"])[-1].removeprefix("error: ")
        what = os.path.basename(cmd[1]) if cmd[1].endswith(".py") else "python " + cmd[1]     # (or the bare imports)
        raise UserError(f"{what} failed (exit {done.returncode}): {last}")
    return time.perf_counter() - start


def measure_cli(plan, checkpoint, device, env):
    """Wall time of the sampling CLI and of bare library imports, alternating, median of each."""
    with tempfile.TemporaryDirectory() as out_dir:
        cli = [sys.executable, "denoise.py", "--per-label", str(plan["per_label"]), "--checkpoint",
               str(checkpoint), "--out-dir", out_dir, "--device", device.type]
        bare = [sys.executable, "-c", BARE_IMPORTS]
        times = {"cli": [], "bare": []}
        for r in range(plan["cli_runs"]):
            times["bare"].append(wall_seconds(bare, env))
            times["cli"].append(wall_seconds(cli, env))
            log(f"  run {r + 1}/{plan['cli_runs']}: bare imports {times['bare'][-1]:.1f} s, "
                f"denoise.py {times['cli'][-1]:.1f} s")
    cli_s, bare_s = summary(times["cli"]), summary(times["bare"])
    command = f"python denoise.py --per-label {plan['per_label']} --checkpoint FILE --out-dir TMP"
    return dict(command=command, cli=cli_s, bare=bare_s,
                difference=cli_s["median"] - bare_s["median"])


# ----------------------------------------------------------------------------- 3. peak memory

def peak_rss_mib():
    """This process's peak resident set size so far. Linux: VmHWM of /proc/self/status, because
    ru_maxrss there also counts the parent's peak from before the fork+exec that started us."""
    if os.path.isfile("/proc/self/status"):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 10                      # kB -> MiB
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss           # macOS: bytes, since exec
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def memory_child(name, steps, batch_size, device):
    """Runs inside the child process: train `steps` steps of setup `name` (or nothing, for the
    baseline) and print the peak RSS as the last line of stdout."""
    for setup_name, cfg, batch, dtype, before, optimizer in training_setups(batch_size, device):
        if setup_name == name:
            _, step = make_train_step(cfg, batch, dtype, device, before, optimizer)
            for _ in range(steps):
                step()
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


PARTS = ("training", "sampling", "lora", "cli", "memory")
MEMORY_RUNS = ("baseline", "default", "tutorial")


def measure_memory(plan, args, device, env):
    setups = {n: (b, d) for n, _, b, d, _, _ in training_setups(args.batch_size, device)}
    rows = []
    for name in MEMORY_RUNS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name, "--batch-size",
               str(args.batch_size), "--device", str(device)] + (["--quick"] if args.quick else [])
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        log(f"memory: {name}")
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"memory run {name} failed:\n{done.stderr[-2000:]}")
        peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]
        if name == "baseline":
            rows.append(dict(name=name, steps=0, batch=None, precision=None, peak_rss_mib=peak))
        else:
            batch, dtype = setups[name]
            rows.append(dict(name=name, steps=plan["memory_steps"], batch=batch, precision=precision_name(dtype),
                             peak_rss_mib=peak))
    return rows


# ----------------------------------------------------------------------------- report

def markdown(results):
    out = [f"Machine: {results['machine']}", ""]
    if "training" in results:
        out += ["| training | parameters | batch | precision | s/step: median (range) | images/s | x tutorial |",
                "|---|---:|---:|---|---:|---:|---:|"]
        for r in results["training"]:
            out.append(f"| {r['name']} | {r['params'] / 1e6:.2f} M | {r['batch']} | {r['precision']} | "
                       f"{fmt_range(r['s_per_step'])} | {r['images_per_s']:.0f} | {r['x_tutorial']:.1f}x |")
        out += ["", f"Training: median of {results['plan']['train_rounds']} interleaved rounds "
                    "(each round: the default models take several steps, the tutorial shape one); "
                    "warm-up steps not counted. Target: default >= 20x tutorial.", ""]
    if "sampling" in results:
        out += [f"| sampling {results['sampled_digits']} digits | network calls x batch | "
                "seconds: median (range) | x faster than DDPM |", "|---|---|---:|---:|"]
        for r in results["sampling"]:
            out.append(f"| {r['name']} | {r['forwards']} | {fmt_range(r['seconds'], 2)} | {r['x_ddpm']:.0f}x |")
        out += ["", f"Sampling: diffusion.backward_denoise in {results['sampling_precision']} (denoise.py's precision), "
                    f"{results['weights']}, median of {results['plan']['sample_rounds']} interleaved rounds.", ""]
    if "lora" in results:
        out += [f"| sampling {10 * results['plan']['per_label']} digits, DDIM-{SampleConfig.steps}, guidance "
                f"{SampleConfig.guidance:g}, {results['lora_precision']} | seconds: median (range) | x base |",
                "|---|---:|---:|"]
        for r in results["lora"]:
            out.append(f"| {r['name']} | {fmt_range(r['seconds'], 2)} | {r['x_base']:.2f} |")
        out += ["", f"LoRA: median of {results['plan']['sample_rounds']} interleaved rounds; target: merged = base.", "",
                f"| fine-tuning step, batch {FinetuneConfig.batch_size}, {results['lora_training_precision']} | trains | "
                "s/step: median (range) | x full fine-tuning |", "|---|---:|---:|---:|"]
        for r in results["lora_training"]:
            out.append(f"| {r['name']} | {r['trains']:,d} | {fmt_range(r['s_per_step'])} | {r['x_full']:.2f} |")
        out += ["", f"Fine-tuning: train.train_step (full fine-tuning's EMA update not counted), median of "
                    f"{results['plan']['train_rounds']} interleaved rounds of {results['plan']['train_steps']} steps.", ""]
    if "cli" in results:
        c = results["cli"]
        out += ["| end to end (wall clock) | seconds: median (range) |", "|---|---:|",
                f"| `{c['command']}` | {fmt_range(c['cli'], 1)} |",
                f"| `python -c \"{BARE_IMPORTS}\"` | {fmt_range(c['bare'], 1)} |",
                f"| **difference: what our code adds** | **{c['difference']:.1f}** |",
                "", f"CLI: {results['plan']['cli_runs']} runs of each, alternating; "
                    "target: difference <= 5 s.", ""]
    if "memory" in results:
        out += ["| peak memory (RSS) | training steps | batch | precision | peak RSS (MiB) |",
                "|---|---:|---:|---|---:|"]
        for r in results["memory"]:
            out.append(f"| {r['name']} | {r['steps']} | {r['batch'] or '-'} | {r['precision'] or '-'} | "
                       f"{r['peak_rss_mib']:.0f} |")
        out += ["", "Memory: peak resident set size (VmHWM) of a fresh Python process that builds the model "
                    "and its optimizer and runs the steps on a fixed random batch; baseline = the same process "
                    "without a model (Python + torch + the project's imports)."]
    return "\n".join(out)


def machine_summary(device):
    cpu = "unknown CPU"
    if os.path.isfile("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    if device.type == "cuda":
        cpu = torch.cuda.get_device_name()
    return f"{cpu}, device {device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def parse_args():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1-2 rounds of 1-2 steps, 10 digits, 1 CLI run (numbers not meaningful)")
    parser.add_argument("--checkpoint", default=None,
                        help="model file from train.py for the sampling and CLI timings "
                             "(default: a random-weight checkpoint written to a temporary folder)")
    parser.add_argument("--threads", type=number(int, "[1, 1024]"), default=None,
                        help="torch.set_num_threads here and OMP_NUM_THREADS for the subprocesses, in [1, 1024] "
                             "(default: torch's own default)")
    parser.add_argument("--batch-size", type=number(int, LIMITS["batch_size"]), default=TrainConfig().batch_size,
                        help=f"training batch of the default model, in {LIMITS['batch_size']} (default: %(default)s; "
                             f"the tutorial shape always uses {TUTORIAL_BATCH}, as the tutorial did)")
    parser.add_argument("--device", default="cpu", help="torch device to measure on (default: %(default)s)")
    parser.add_argument("--parts", type=names(PARTS), default=",".join(PARTS),
                        help="comma-separated subset of what to measure (default: all: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--memory-child", default=None, choices=MEMORY_RUNS,
                        help="internal, used by the memory part: run one peak-memory measurement in "
                             "this process and print it as JSON")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    device = pick_device(args.device)
    if args.memory_child:
        return memory_child(args.memory_child, plan["memory_steps"], args.batch_size, device)
    parts = set(args.parts)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    if args.checkpoint and parts & {"sampling", "lora", "cli"}:    # read (and checked) before any measuring
        check_bench_model(load_model(args.checkpoint)[0].cfg, 50 if "sampling" in parts else SampleConfig.steps,
                          args.checkpoint)                          # (sampling's DDIM-50)
    results = {"machine": machine_summary(device), "plan": plan}
    if "training" in parts:
        results["training"] = measure_training(plan, args.batch_size, device)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint and os.path.abspath(args.checkpoint)    # the CLI runs in the repo root
        if checkpoint is None and parts & {"sampling", "lora", "cli"}:
            checkpoint = os.path.join(tmp, "random.pt")
            write_random_checkpoint(checkpoint)
        results["weights"] = f"EMA weights of {checkpoint}" if args.checkpoint else "random weights"
        if "sampling" in parts:
            results["sampling"], results["sampled_digits"], results["sampling_precision"] = \
                measure_sampling(plan, checkpoint, device)
        if "lora" in parts:
            results["lora"], results["lora_precision"] = measure_lora_sampling(plan, checkpoint, device)
            results["lora_training"], results["lora_training_precision"] = \
                measure_lora_training(plan, checkpoint, device)
        if "cli" in parts:
            log("end to end: denoise.py vs bare imports")
            results["cli"] = measure_cli(plan, checkpoint, device, env)
    if "memory" in parts:
        results["memory"] = measure_memory(plan, args, device, env)
    print(json.dumps(results, indent=1) if args.json else markdown(results))


if __name__ == "__main__":
    run_main(main)
