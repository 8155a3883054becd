"""Sample digits from a trained model, optionally with a LoRA adapter, and plot the denoising (blog part 11).

    python denoise.py                              # outputs/denoise_process.png and outputs/samples.png
    python denoise.py --labels 3,3,7 --per-label 4 --sampler ddpm
    python denoise.py --lora lora.pt --merge       # fold the adapter into the weights first
    python denoise.py --lora lora.pt --lora-scale 0.5            # half of the adapter's update
    python denoise.py --lora a.pt:0.7 --lora b.pt:0.5            # two adapters, weighted
    python denoise.py --lora lora.pt --compare     # outputs/compare.png: base | LoRA | merged, same seed
    python denoise.py --per-label 100 --save-samples s.pt      # for bench/evaluate.py
"""
import os
import sys
import time

import torch
from PIL import Image
from tqdm import tqdm

from config import (LIMITS, Parser, SampleConfig, UserError, atomic_save, autocast_dtype, check_new_output, make_folder,
                    number, numbers, pick_device, run_main, within)
from diffusion import Schedule, backward_denoise, guidance_at, sampler_timesteps
from figures import save_animation, save_grid, save_process_figure, to_uint8
from lora import apply_lora_files, merge_lora, set_lora_scale
from unet import load_model


def main():
    """The blog's steps: load the trained model, put the LoRA adapter in (and merge it), denoise from pure
    noise, and draw the process. Beyond it: several adapters, --lora-scale, --compare, the GIF, --save-samples."""
    args = parse_args()                                       # (also checks the flags before any work)
    device = pick_device(args.device)
    dtype = autocast_dtype(args.precision, device)
    model, _ = load_model(args.checkpoint, args.weights, device)
    labels = torch.tensor(parse_labels(args.labels, model.cfg.num_labels)).repeat_interleave(args.per_label)
    if len(labels) > MAX_SAMPLES:
        raise UserError(f"{len(labels):,d} samples asked for; at most {MAX_SAMPLES:,d} in one run")
    first = [labels.tolist().index(k) for k in dict.fromkeys(labels.tolist())]   # one row per label
    if args.adapters:
        files = apply_lora_files(model, args.adapters)       # inject_lora + load the A, B of every file
        set_lora_scale(model, args.lora_scale)
        if args.merge:
            merge_lora(model)
        print("LoRA " + ", ".join(f"{path} x{w:g} (r={f['rank']}, {','.join(f['targets'])})"
                                  for (path, w), f in zip(args.adapters, files))
              + f"; scale {args.lora_scale:g}{', merged' if args.merge else ''}")
    sched = Schedule.from_config(model.cfg)
    ts = sampler_timesteps(sched.T, args.sampler, args.steps)
    if args.guidance > 0 and not any(guidance_at(t, args.guidance, args.guidance_interval) for t in ts):
        print(f"warning: --guidance-interval {','.join(map(str, args.guidance_interval))} holds none of the steps "
              f"this sampler takes on this model (T={sched.T}; the default interval is for T=1000): no step is guided",
              file=sys.stderr)

    start = time.time()
    x, snapshots = sample_as_asked(model, sched, labels, args, device, dtype, SampleConfig.gif_frames, first)
    seconds = time.time() - start
    images = to_uint8(x).cpu()
    total = snapshots[-1][0]
    print(f"sampled {len(labels)} images with {args.sampler} ({total} steps, guidance {args.guidance}, "
          f"{str(dtype or 'fp32').replace('torch.bfloat16', 'bf16').replace('torch.float16', 'fp16')}) in {seconds:.1f} s")

    columns = process_columns(snapshots)
    process = os.path.join(args.out_dir, FIGURES["process"])
    save_process_figure([imgs for _, imgs in columns], labels[first], process,
                        ["noise"] + [f"{n}/{total}" for n, _ in columns[1:]])
    animation = os.path.join(args.out_dir, FIGURES["animation"])
    save_animation([imgs for _, imgs in snapshots], animation)
    grid = os.path.join(args.out_dir, FIGURES["grid"])
    per_row = min(args.per_label, 20)                         # the grid shows at most 20 of each label, 2,000 in all
    shown = [i for i in range(len(images)) if i % args.per_label < per_row][:2000]
    nrow = per_row if len(first) > 1 else min(len(shown), 10)
    save_grid(images[shown], grid, nrow=nrow)
    print(f"saved {process}, {animation} and {grid}")
    if args.save_samples:
        atomic_save({"images": images, "labels": labels}, args.save_samples)
        print(f"saved {len(images)} samples to {args.save_samples}")
    if args.compare:
        compare = os.path.join(args.out_dir, FIGURES["compare"])
        panels = compare_base_lora_merged(model, sched, x, labels, args, device, dtype)
        save_grid({title: imgs[shown] for title, imgs in panels.items()}, compare, nrow=nrow)
        print(f"saved {compare}")
    if args.show:
        for path in (process, grid):
            Image.open(path).show()                           # the system's image viewer


# ----------------------------------------------------------------------------- beyond the blog: sampling as asked,
# the figure's columns, --compare, the command line

MAX_SAMPLES, CHUNK = 100_000, 1000
LORA_SCALES = "[0, 100]"           # what --lora-scale and each --lora FILE:WEIGHT may be
# The files main writes into --out-dir (compare.png with --compare only); parse_args checks them before any work.
FIGURES = {"process": "denoise_process.png", "animation": "denoise_process.gif", "grid": "samples.png",
           "compare": "compare.png"}


def sample_as_asked(model, sched, labels, args, device, dtype, keep=0, rows=(0,)):
    """backward_denoise with the command line's sampler, steps, eta, guidance and seed (a fresh generator,
    so every call starts from the same noise), CHUNK images at a time (one call for up to CHUNK: the same images
    as always). Returns (images in [-1, 1] on the CPU, snapshots of the images at `rows` only)."""
    g = torch.Generator(device=device).manual_seed(args.seed)
    xs, snapshots = [], []
    for start in tqdm(range(0, len(labels), CHUNK), unit="chunk", disable=len(labels) <= CHUNK):
        mine = [r - start for r in rows if start <= r < start + CHUNK]
        x, snaps = backward_denoise(model, sched, labels[start:start + CHUNK], args.sampler, args.steps, args.eta,
                                    args.guidance, generator=g, keep=keep if mine else 0, dtype=dtype,
                                    guidance_interval=args.guidance_interval)
        xs.append(x.cpu())
        if snaps:
            snaps = [(n, imgs[mine]) for n, imgs in snaps]
            snapshots = [(n, torch.cat([a, b])) for (n, a), (_, b) in zip(snapshots, snaps)] if snapshots else snaps
    return torch.cat(xs), snapshots


def process_columns(snapshots, n=SampleConfig.figure_columns):
    """The snapshots the PNG figure shows: the pure noise and n evenly spaced ones after it, the last
    being the finished image (whatever the sampler and step count)."""
    picks = torch.linspace(0, len(snapshots) - 1, min(n, len(snapshots) - 1) + 1).round().long().tolist()
    return [snapshots[i] for i in picks]


def compare_base_lora_merged(model, sched, x_lora, labels, args, device, dtype):
    """Sample again with the same seed and labels: the base checkpoint without any LoRA layer, and
    `model` after merge_lora. x_lora: what `model` (unmerged) drew. Returns {title: uint8 images}."""
    base, _ = load_model(args.checkpoint, args.weights, device)
    x_base, _ = sample_as_asked(base, sched, labels, args, device, dtype)
    merge_lora(model)                                        # W' = W + dW in every adapted layer
    x_merged, _ = sample_as_asked(model, sched, labels, args, device, dtype)
    difference = (x_lora - x_merged).abs().max().item()          # 0: both multiply by the same W + dW
    print(f"same seed, pixels in [-1, 1]: LoRA vs merged differ by at most {difference:.1e}; "
          f"base vs LoRA by {(x_lora - x_base).abs().max().item():.2f}")
    return {"base": to_uint8(x_base).cpu(), f"LoRA (scale {args.lora_scale:g})": to_uint8(x_lora).cpu(),
            "LoRA merged": to_uint8(x_merged).cpu()}


def parse_labels(text, num_labels):
    """'0-9' -> [0..9]; '3,3,7' -> [3, 3, 7]; ranges and single labels can be mixed."""
    labels = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-")
                if int(hi) < int(lo):
                    raise UserError(f"--labels {text!r}: a range goes up, LO-HI (got {part.strip()})")
                labels += list(range(int(lo), min(int(hi), num_labels) + 1))     # (not 10**9 of them)
            else:
                labels.append(int(part))
    except ValueError:
        raise UserError(f"--labels {text!r}: expected numbers like 0-9 or 3,3,7") from None
    bad = [k for k in labels if not 0 <= k < num_labels]
    if not labels or bad:
        raise UserError(f"--labels {text!r}: labels must be in 0..{num_labels - 1}")
    return labels


def parse_lora_arg(text):
    """'a.pt:0.7' -> ('a.pt', 0.7); 'a.pt' -> ('a.pt', 1.0). A ':' followed by no number is part of the path."""
    path, sep, weight = text.rpartition(":")
    try:
        value = float(weight) if sep and path else None
    except ValueError:
        value = None
    if value is None:
        return text, 1.0
    if not within(LORA_SCALES, value):
        raise UserError(f"--lora {text}: the weight must be in {LORA_SCALES}, as --lora-scale, got {weight}")
    return path, value


def parse_args():
    parser = Parser(description="Sample from a trained model and plot the denoising steps.")
    parser.add_argument("--checkpoint", default="model.pt", help="base model written by train.py")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA or raw weights")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                        help="LoRA file written by lora_finetune.py, optionally with a weight (default 1); "
                        "repeat to combine adapters: their updates add up, each times its weight")
    parser.add_argument("--lora-scale", type=number(float, LORA_SCALES), default=1.0,
                        help="multiplies every adapter's update: 0 = base model exactly, 1 = as trained; in [0, 100]")
    parser.add_argument("--merge", action="store_true", help="merge the LoRA weights into the base layers first")
    parser.add_argument("--compare", action="store_true",
                        help="with --lora: sample the same seed and labels with the base model alone, with the "
                        "adapter, and with the adapter merged; save compare.png with the three side by side")
    parser.add_argument("--labels", default="0-9", help="labels to draw, e.g. 0-9 or 3,3,7")
    parser.add_argument("--per-label", type=number(int, "[1, 1e5]"), default=1,
                        help=f"samples per label, in [1, 1e5]; at most {MAX_SAMPLES:,d} in all, sampled {CHUNK:,d} at a time")
    parser.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++"), default=SampleConfig.sampler,
                        help="ddpm (the blog's: all T steps), ddim, or dpm++ (DPM-Solver++(2M))")
    parser.add_argument("--steps", type=number(int, LIMITS["steps"]), default=None,
                        help=f"denoising steps, in 1..T (default: T for ddpm, {SampleConfig.steps} for ddim and dpm++)")
    parser.add_argument("--eta", type=number(float, LIMITS["eta"]), default=SampleConfig.eta,
                        help=f"DDIM noise: 0 = deterministic, 1 = DDPM-like; in {LIMITS['eta']}")
    parser.add_argument("--guidance", type=number(float, LIMITS["guidance"]), default=SampleConfig.guidance,
                        help=f"classifier-free guidance weight w (0 = off), in {LIMITS['guidance']}")
    parser.add_argument("--guidance-interval", type=numbers(int, LIMITS["guidance_interval"]),
                        default=SampleConfig.guidance_interval, metavar="LO,HI",
                        help="guide only the steps with LO <= t <= HI (0,999: every step)")
    parser.add_argument("--seed", type=number(int, LIMITS["seed"]), default=0, help=f"random seed, in {LIMITS['seed']}")
    parser.add_argument("--out-dir", default="outputs", help="folder for the PNG files")
    parser.add_argument("--save-samples", default=None, metavar="FILE.pt",
                        help="also save {'images': uint8 (N,1,H,W), 'labels': int64 (N,)}")
    parser.add_argument("--overwrite", action="store_true", help="let --save-samples replace an existing file")
    parser.add_argument("--show", action="store_true", help="also open the figures in the image viewer")
    parser.add_argument("--precision", default="auto", choices=LIMITS["precision"],
                        help="auto (bf16 autocast where the hardware has it, else fp32), fp32, bf16 or fp16")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device name")
    args = parser.parse_args()
    if len(args.guidance_interval) != 2 or args.guidance_interval[0] > args.guidance_interval[1]:
        raise UserError(f"--guidance-interval: expected two timesteps LO,HI with LO <= HI, "
                        f"got {','.join(map(str, args.guidance_interval)) or 'none'}")
    if (args.merge or args.compare) and not args.lora:
        raise UserError(f"{'--merge' if args.merge else '--compare'} needs --lora FILE")
    if args.merge and args.compare:
        raise UserError("--compare samples the merged model itself; leave out --merge")
    if args.lora_scale != 1.0 and not args.lora:
        raise UserError("--lora-scale needs --lora FILE")
    if args.eta != SampleConfig.eta and args.sampler != "ddim":
        raise UserError(f"--eta is DDIM's noise; the {args.sampler} sampler has none (use --sampler ddim)")
    args.adapters = [parse_lora_arg(text) for text in args.lora]
    if args.save_samples is not None:                         # never over the model or an adapter it reads
        check_new_output(args.save_samples, None, args.overwrite,
                         [("--checkpoint", args.checkpoint), *(("--lora", p) for p, _ in args.adapters)])
    make_folder(args.out_dir, [name for what, name in FIGURES.items() if what != "compare" or args.compare],
                [("--save-samples", args.save_samples)] if args.save_samples else [])
    return args


if __name__ == "__main__":
    run_main(main)
