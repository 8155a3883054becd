"""Every default of the project in one place (one home for each knob), plus the few helpers all scripts share.

The blog keeps its settings as module-level constants (IMAGE_SIZE, T, ...). We keep them in dataclasses
instead, because a checkpoint must remember the settings it was trained with:
- ModelConfig: everything needed to rebuild the network and its noise schedule (saved in checkpoints).
- TrainConfig: how to train it (also saved, so that --resume continues with the same settings).
- FinetuneConfig: TrainConfig's fields with fine-tuning's defaults, plus LoRA's rank, alpha and targets.
- SampleConfig: how denoise.py samples and draws by default.
Scripts override the fields they use with command-line flags of the same names; functions take their defaults here.

    python config.py      # prints the defaults and the device that would be used
"""
import argparse
import ctypes
import dataclasses
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class ModelConfig:
    image_size: int = 28           # MNIST's native size; for another, MNIST is padded/cropped, a folder's images resized
    in_channels: int = 1           # grayscale
    num_labels: int = 10           # digits 0..9; index num_labels is the learned "no label" token
    # DDPM noise schedule (Ho et al. 2020, section 4): beta_t rises linearly from beta_start to beta_end over T steps
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # What the network predicts. The blog's listing: the noise eps. Ours: v = sqrt(abar) eps - sqrt(1 - abar) x_0
    # (Salimans & Ho 2022, section 4), well scaled at both ends of the schedule (README, "Quality per CPU-minute").
    prediction: str = "v"          # "eps" restores the blog's choice
    # UNet. The blog's listing uses channels 64..1024 at 48x48. Ours first folds each 2x2 patch of pixels
    # into 4 channels (28x28x1 -> 14x14x4, a lossless stand-in for Stable Diffusion's autoencoder latent),
    # then works at 14x14 and 7x7 (README, "Speed and memory", for what that buys).
    patch: int = 2
    widths: tuple = (32, 64)       # channels at each resolution: 14x14, 7x7
    time_dim: int = 128            # size of the sinusoidal time embedding after its MLP
    context_tokens: int = 4        # the label becomes this many tokens; >= 2 so attention has a choice
    context_dim: int = 64          # size of each context token
    heads: int = 4                 # attention heads in each cross-attention
    ff_mult: int = 2               # feed-forward hidden size = ff_mult * width
    # The blog's listing puts the Transformer block in every conv block. Ours skips it at the first level(s), where
    # a step spent a third of its time attending 196 pixels per image to the label: SDXL does the same at its highest
    # resolution (Podell et al. 2023, section 2.1). The label still enters at 7x7 and in the middle block.
    attention_from: int = 1        # first level (0 = 14x14, 1 = 7x7) whose blocks carry it; 0 restores the blog's


@dataclass
class TrainConfig:
    # A step's cost grows with the batch; its value, for this small model, less: 3,000 steps of 64 drew digits as
    # well as 2,600 of 128 in three quarters of the time (README, "Quality per CPU-minute").
    batch_size: int = 64
    lr: float = 2e-3
    # Muon (train.Muon) on the weight matrices, AdamW on the rest: 2,400 steps draw as AdamW's 3,000 did (sampled
    # at guidance 0.8 for AdamW's 1), in 9.5-16% less time; "adamw" (with 3,000 steps) is an earlier default
    # (README, "Quality per CPU-minute").
    optimizer: str = "muon"
    warmup_steps: int = 200        # linear LR warm-up, then cosine decay to 0 at max_steps
    # training length in optimizer steps (independent of the data size). Where AdamW had stopped gaining by 3,000,
    # Muon's 3,200 drew the asked-for digit more often than its 2,400 (the previous default), as close to real
    # ones, in about a quarter more time (README, "Quality per CPU-minute").
    max_steps: int = 3200
    p_uncond: float = 0.1          # chance to drop the label (classifier-free guidance needs it)
    # loss weight min(SNR_t, gamma) / (SNR_t + 1) (Hang et al. 2023); 0 = the blog's plain MSE. The paper's gamma 5
    # drew worse than 1 on our model, which also needs less guidance then (README, "Quality per CPU-minute").
    min_snr_gamma: float = 1.0
    # share of each batch's noise levels drawn where that weight is, the rest uniformly (train.draw_noise_levels):
    # 0.5 drew the asked-for digit more often, as close to real ones, at the same cost (README, "Quality per
    # CPU-minute"); 0 = the blog's uniform draw
    t_importance: float = 0.5
    ema_decay: float = 0.999       # EMA of the weights, warmed up as min(decay, (1+n)/(10+n))
    seed: int = 0
    precision: str = "auto"        # auto: bf16 autocast where the hardware has it natively, else fp32


@dataclass
class FinetuneConfig(TrainConfig):
    """lora_finetune.py: training's settings, shorter, with LoRA's own learning rate (README, "Digits to
    clothing", for the measurements behind lr and full_lr), and what LoRA adapts."""
    batch_size: int = 128          # (the LoRA measurements were made at this batch)
    max_steps: int = 1000
    lr: float = 5e-3               # A's (and a conv's M's); B's is lora_b_lr_ratio times this
    warmup_steps: int = 50
    optimizer: str = "adamw"       # LoRA's A and B (LoRA+'s two lrs) and --full train with AdamW
    lora_rank: int = 1             # r
    lora_alpha: float = 1.0        # the update is scaled by alpha / r
    lora_b_lr_ratio: float = 16.0  # LoRA+ (Hayou et al. 2024): B learns at 16 x A's lr; 1 = one lr for both
    # The blog's listing adapts Wq, Wk, Wv only (--targets Wq,Wk,Wv): enough to re-weigh what the model already
    # draws, not to draw something new. Rank 1 on the attention, feed-forward and time-embedding layers, rank 4
    # on the convs (which draw the shapes; their bottleneck, lora.LoraConv2d, makes rank 4 cheap) and on the label
    # embedding learnt Fashion-MNIST best within 3% of the parameters (README, "Digits to clothing"); lora.TARGETS
    # lists every name, NAME:RANK gives one its own rank.
    lora_targets: tuple = ("Wq", "Wk", "Wv", "Wo", "ff", "conv:4", "context:4", "time")
    full_lr: ClassVar[float] = 3e-3             # --full (every weight trains) uses this lr instead


@dataclass
class SampleConfig:
    """denoise.py's defaults, measured on the default model (README, "Quality per CPU-minute")."""
    sampler: str = "ddim"          # ddpm (the blog's, all T steps), ddim or dpm++ (DPM-Solver++(2M))
    steps: int = 12                # for ddim and dpm++ (12 drew as well as 20 on six models, in 43% less time)
    guidance: float = 0.8          # classifier-free guidance weight w (0 = off); AdamW's models drew best at 1
    guidance_interval: tuple = (100, 600)   # guide only while lo <= t <= hi (Kynkaanniemi et al. 2024); 0,999 = always
    eta: float = 0.0               # DDIM's noise: 0 = deterministic, 1 = DDPM-like
    gif_frames: int = 40           # snapshots kept along the way for the GIF
    figure_columns: int = 10       # denoising steps shown in the PNG figure, after the pure noise


# ----------------------------------------------------------------------------- beyond the blog: shared helpers

# What each setting's flag accepts, shown in --help and checked before any work: an interval ("(" and ")" leave
# the end out; a tuple setting's every item) or the words it may be. Model shapes are checked by unet.check_model_config.
LIMITS = {"image_size": "[1, 512]", "in_channels": "[1, 1]", "num_labels": "[1, 1000]", "T": "[1, 1e5]",
          "beta_start": "(0, 1)", "beta_end": "(0, 1)", "prediction": ("eps", "v"), "patch": "[1, 8]",
          "widths": "[1, 2048]", "time_dim": "[2, 4096]", "context_tokens": "[1, 256]", "context_dim": "[1, 4096]",
          "heads": "[1, 256]", "ff_mult": "[1, 16]", "attention_from": "[0, 8]", "batch_size": "[1, 4096]", "lr": "(0, 10]",
          "warmup_steps": "[0, 1e9]", "max_steps": "[1, 1e9]", "p_uncond": "[0, 1)", "min_snr_gamma": "[0, 1e6]",
          "t_importance": "[0, 1]", "ema_decay": "[0, 1)", "optimizer": ("muon", "adamw"), "seed": "[0, 1e18]",
          "precision": ("auto", "fp32", "bf16", "fp16"),
          "lora_rank": "[1, 1024]", "lora_alpha": "(0, 1e6]", "lora_b_lr_ratio": "(0, 1e4]", "steps": "[1, 1e5]",
          "guidance": "[0, 100]", "guidance_interval": "[0, 1e5]", "eta": "[0, 1]"}


def number(kind, bounds):
    """An argparse type: a `kind` (int or float) in the interval `bounds` ("[1, 1e9]", "(0, 10]"); nan, inf,
    and anything outside are refused as one line (Parser)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not within(bounds, value):
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} in {bounds}, "
                                             f"got {text or repr(text)}")
        return value
    return parse


def within(bounds, value):
    """Whether the number `value` lies in the interval `bounds` ("[1, 1e9]", "(0, 10]"); nan never does."""
    lo, hi = (float(v) for v in bounds[1:-1].split(","))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    above = (lo < value) if bounds[0] == "(" else (lo <= value)
    return above and ((value < hi) if bounds[-1] == ")" else (value <= hi))


def numbers(kind, bounds):
    """An argparse type: comma-separated numbers, each as number(kind, bounds) checks it; returns a tuple."""
    return lambda text: tuple(number(kind, bounds)(v) for v in text.split(",") if v)


class Parser(argparse.ArgumentParser):
    """argparse with each flag's default in --help, and its own errors (a value out of range, an unknown flag)
    reported as every other wrong input is: one line `error: ...` on stderr, exit code 2."""

    def __init__(self, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs):
        super().__init__(formatter_class=formatter_class, **kwargs)

    def error(self, message):
        print("error: " + re.sub(r"^argument (\S+): ", r"\1: ", message), file=sys.stderr)
        sys.exit(2)


class UserError(Exception):
    """A mistake in the user's input: reported as one line, never as a traceback."""


def run_main(main):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit code 2."""
    keep_freed_memory()
    MADE_FOLDERS.clear()                       # the record is this run's: a folder an earlier run made stays
    try:
        main()
    except UserError as e:
        remove_if_empty(MADE_FOLDERS)          # a wrong input leaves no folder behind that the run made for nothing
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:                  # a second Ctrl-C: quit at once (files are written atomically)
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def keep_freed_memory():
    """Each training step frees and allocates again the same few MiB of activations. glibc's malloc gives
    such blocks back to the kernel when freed and maps fresh zero-filled pages on the next request: with
    its defaults a step of the default model at batch 128 took 225-230 ms on our machine, with these settings
    170-180 ms (the whole train.py of 2,600 such steps: 9.0 -> 7.9 minutes), the same numbers. (PyTorch's CPU performance guide
    suggests jemalloc or tcmalloc for the same reason; this needs no extra library.) Returns whether glibc
    took the settings: elsewhere than Linux with glibc it does nothing and returns False."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3      # glibc's malloc.h
    settings = {M_MMAP_THRESHOLD: 32 << 20,     # blocks under 32 MiB come from the heap, not fresh pages,
                M_TRIM_THRESHOLD: 1 << 30,      # freed memory stays in the process (up to 1 GiB) for reuse,
                M_TOP_PAD: 64 << 20}            # and the heap grows 64 MiB at a time
    return all([libc.mallopt(option, value) == 1 for option, value in settings.items()])   # 1: accepted


def check_resume(saved, requested):
    """A resumed run keeps the settings it started with: its LR schedule and data order depend on them."""
    changed = [f"{f.name} ({getattr(saved, f.name)} -> {getattr(requested, f.name)})"
               for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(requested, f.name)]
    if changed:
        raise UserError(f"--resume keeps the run's settings, but these differ: {', '.join(changed)}")


def autocast_dtype(precision, device):
    """The dtype for torch.autocast, or None for plain fp32. 'auto' picks bf16 where the hardware computes
    it natively (CUDA, AVX512-BF16 CPUs); elsewhere bf16 is emulated and slower, so auto stays fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if device.type == "cpu" and native else None
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in choices:
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return choices[precision]


def pick_device(name="auto"):
    """cuda, then mps (Apple), then cpu, unless the user names one."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a device (try auto, cpu, cuda or mps)") from None
        have = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
        if (device.index or 0) >= have.get(device.type, 0):            # a GPU past the last, mps without it, ...
            raise UserError(f"--device {name}: this machine has {have.get(device.type) or 'no'} {device.type} "
                            f"device(s) (try auto or cpu)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# files saved without these fields were trained the blog's way, or (optimizer) before Muon
BEFORE_QUALITY = {"prediction": "eps", "min_snr_gamma": 0.0, "attention_from": 0, "optimizer": "adamw",
                  "t_importance": 0.0}


def config_from_dict(cls, d):
    """Rebuild a config dataclass from a checkpoint's dict; unknown keys mean a foreign file. A setting
    the file lacks was made before it existed: the file was trained the blog's way (BEFORE_QUALITY)."""
    if not isinstance(d, dict):
        raise UserError(f"checkpoint's settings are a {type(d).__name__}, not a table of settings")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"checkpoint has settings this code does not know: {', '.join(map(str, unknown))}")
    missing = sorted(names - set(d) - set(BEFORE_QUALITY))
    if cls is ModelConfig and missing:          # today's default would silently build another network
        raise UserError(f"checkpoint lacks the model settings {', '.join(missing)}: not saved by this project")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in {**BEFORE_QUALITY, **d}.items() if k in names}
    for name, value in d.items():                  # a hand-edited or foreign file: the flags' own limits apply
        limit, default = LIMITS.get(name), getattr(cls, name)
        values = value if isinstance(value, tuple) else (value,)
        whole = type(default[0] if isinstance(default, tuple) else default) is int     # a count or a shape
        fits = (lambda v: v in limit) if isinstance(limit, tuple) else (lambda v: limit is None or within(limit, v))
        if not all(fits(v) and (type(v) is int or not whole) for v in values):
            shown = limit if isinstance(limit, str) else " or ".join(limit)
            raise UserError(f"checkpoint setting {name} = {value!r} is outside what it may be "
                            f"({'an integer in ' if whole else ''}{shown})")
    return cls(**d)


def check_output_path(path):
    """Refuse early, before any work, to write where writing would fail: into a folder that does not exist, over
    a folder, under a name too long, or into a folder that cannot be written to. It is tried with a file made and
    removed at once, under a random hidden name at least as long as the file's (a name too long fails alike), never
    the name itself: torchrun's processes all check the same --out at the same moment, and one's trial file
    must not look to another like a file that is already there."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {path}: folder {folder} does not exist")
    if os.path.isdir(os.path.abspath(path)):                # ("" is the current folder)
        raise UserError(f"cannot write {path or repr(path)}: it is a folder, give a file name")
    if not os.path.basename(path):
        raise UserError(f"cannot write {path}: a file name cannot end in {os.sep}")
    size = max(len(os.path.basename(path)), 16)
    probe = os.path.join(folder, (".tmp-" + os.urandom(size).hex())[:size])
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


MADE_FOLDERS = []   # the folders make_folder created in this process (see run_main)


def missing_folders(path):
    """The folders that making `path` would create, deepest first."""
    folders, folder = [], os.path.abspath(path or ".")
    while not os.path.isdir(folder):
        folders.append(folder)
        folder = os.path.dirname(folder)
    return folders


def remove_if_empty(folders):
    """Remove each of `folders` that is still an empty folder (what a run that stopped early made), subfolders first.
    (Under torchrun every process made them and takes them back: one may find a folder gone a moment ago.)"""
    for folder in sorted(folders, key=len, reverse=True):     # a folder's path is longer than its parent's
        try:
            os.rmdir(folder)                                    # (only an empty folder can be removed)
        except OSError:                                         # not empty, not a folder, or already gone
            pass


def make_folder(path, files=(), outputs=(), inputs=(), flag="--out-dir"):
    """os.makedirs for --out-dir (named `flag` in messages), refusing clearly, before any work: a file in the
    way, a folder that cannot be made, or one of the `files` the run will write there (its figures) that could
    not be written, is one of the run's own `outputs` ([(flag, path)]: a checkpoint, saved samples) or would
    land on or among its `inputs` (check_not_input)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")
    for out_flag, out in outputs:
        if os.path.realpath(out) == os.path.realpath(path or "."):
            raise UserError(f"{out_flag} {out} is {flag}, the folder for the figures: give {out_flag} a file name")
    for name in files:                                      # (before the folder is made: it may be among them)
        check_not_input(os.path.join(path, name), inputs)
    MADE_FOLDERS.extend(missing_folders(path))
    try:
        os.makedirs(path or ".", exist_ok=True)             # "": the current folder
    except OSError as e:
        raise UserError(f"cannot make {flag} {path}: {e.strerror}") from None
    for name in files:
        figure = os.path.join(path, name)
        for out_flag, out in outputs:
            if os.path.realpath(out) == os.path.realpath(figure):
                raise UserError(f"{out_flag} {out} is where this run writes its figure {name}: choose another name")
        check_output_path(figure)


def check_not_input(path, inputs):
    """Refuse to write `path` over one of a command's inputs ([(flag, path)]) or into a folder of inputs (--data:
    a figure written among the images would be learnt from next time)."""
    for flag, p in inputs:
        real = os.path.realpath(p)                   # (through links: a link to the folder is the folder)
        inside = os.path.isdir(p) and os.path.commonpath([os.path.realpath(path), real]) == real
        if inside or (os.path.exists(path) and os.path.exists(p) and os.path.samefile(path, p)):
            raise UserError(f"{path} is {'inside ' if inside else ''}this command's {flag} (an input); "
                            "choose another file to write")


def check_new_output(path, resume, overwrite, inputs=()):
    """Before any work: a run never writes over one of its inputs ([(flag, path), ...]), nor over a file the user
    already has unless asked (--overwrite; resume=None for commands without --resume)."""
    if resume and overwrite:
        raise UserError("--resume continues --out and --overwrite starts it over: give one of them")
    check_output_path(path)
    check_not_input(path, inputs)
    if not resume and not overwrite and os.path.exists(path):
        raise UserError(f"{path} already exists: {'--resume continues it, ' if resume is not None else ''}"
                        f"--overwrite replaces it, or choose another file name")


def claim_folder(folder, flag, marker):
    """A folder whose files a bench's runs replace (--overwrite): taken only if it is new, empty, or holds the
    `marker` file an earlier run of that bench left there, never over a user's own files; marked then."""
    real = os.path.realpath(folder)
    if os.path.isdir(real) and os.listdir(real) and not os.path.isfile(os.path.join(real, marker)):
        raise UserError(f"{flag} {folder} holds files this bench did not write (it has no {marker}): "
                        "give a new or empty folder")
    os.makedirs(real, exist_ok=True)
    open(os.path.join(real, marker), "a").close()
    return real


def atomic_write(path, write):
    """Call write(tmp) on a temporary file beside `path`, then rename it to `path`: a crash or a second
    Ctrl-C while writing leaves the previous file as it was (the blog's listing writes a .tmp file and renames it too)."""
    check_output_path(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                               suffix=os.path.splitext(path)[1] or ".tmp")     # (torch.save refuses ".tmp-x")
    os.close(fd)
    os.chmod(tmp, 0o644)                                    # mkstemp makes 0600; give the usual mode
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    """torch.save, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# What every file of each kind holds (train.checkpoint_dict and lora.lora_file_dict write them).
FILE_KEYS = {"model": ("model_config", "model", "ema", "train_config"),
             "lora": ("rank", "alpha", "targets", "layers", "base_fingerprint", "lora")}


def load_file(path, kind):
    """Load a checkpoint ("model") or LoRA ("lora") file saved by this project, with weights_only=True
    (the blog's listing pickles whole modules, which PyTorch >= 2.6 refuses to load by default)."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a {kind} file")
    if not os.path.exists(path):
        raise UserError(f"{kind} file {path} not found")
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a regular file (a device, pipe or socket), not a {kind} file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty (0 bytes), not a {kind} file")
    try:
        with warnings.catch_warnings():     # (torch warns about some foreign pickles before refusing them)
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file at all
        raise UserError(f"{path} is not a readable {kind} file: cut short, or not saved by "
                        f"this project ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        found = obj.get("kind") if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path} is not a {kind} file made by this project (found: {found})")
    missing = [key for key in FILE_KEYS[kind] if key not in obj]
    if missing:
        raise UserError(f"{path} is a {kind} file without {', '.join(missing)}: cut down, or not saved by this project")
    return obj


def add_config_flags(parser, cfg, only=None, aliases=None):
    """One --flag per dataclass field (optionally only those named), defaulting to None = keep cfg, accepting
    what LIMITS allows; aliases = {field: "--other-name"} adds a second spelling. Each help names cfg's value; its
    '%(default).0s' prints nothing but keeps ArgumentDefaultsHelpFormatter from adding '(default: None)'."""
    for f in dataclasses.fields(cfg):
        if only is not None and f.name not in only:
            continue
        default, limit = getattr(cfg, f.name), LIMITS.get(f.name)
        flag = ["--" + f.name.replace("_", "-")] + ([aliases[f.name]] if aliases and f.name in aliases else [])
        listed = isinstance(default, tuple)
        kind = type(default[0] if listed else default)
        bounded = isinstance(limit, str)
        shown = f"comma-separated (default: {','.join(map(str, default))})" if listed else f"(default: {default})"
        kind = (numbers if listed else number)(kind, limit) if bounded else \
            (lambda text: tuple(v for v in text.split(",") if v)) if listed else kind
        parser.add_argument(*flag, type=kind, default=None, choices=None if bounded else limit,
                            help=shown + (f", in {limit}" if bounded else "") + "%(default).0s")


def apply_config_flags(cfg, args):
    """Copy the flags the user gave onto cfg (fields with value None were not given)."""
    changes = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})


if __name__ == "__main__":
    Parser(description=__doc__.split("\n")[0]).parse_args()      # no flags: --help, and any other is refused
    for cfg in (ModelConfig(), TrainConfig(), FinetuneConfig(), SampleConfig()):
        print(type(cfg).__name__)
        extra = {"full_lr (--full)": cfg.full_lr} if isinstance(cfg, FinetuneConfig) else {}
        for k, v in (dataclasses.asdict(cfg) | extra).items():
            print(f"  {k:16s} {v}")
    print("device:", pick_device())
