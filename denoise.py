"""Sample digits from a trained model, optionally with a LoRA adapter, and plot the denoising (blog part 11).

    python denoise.py                              # outputs/denoise_process.png and outputs/samples.png
    python denoise.py --labels 3,3,7 --per-label 4 --sampler ddpm
    python denoise.py --lora lora.pt --merge       # fold the adapter into the weights first
    python denoise.py --lora lora.pt --lora-scale 0.5            # half of the adapter's update
    python denoise.py --lora a.pt:0.7 --lora b.pt:0.5            # two adapters, weighted
    python denoise.py --lora lora.pt --compare     # outputs/compare.png: base | LoRA | merged, same seed
    python denoise.py --per-label 100 --save-samples s.pt      # for bench/evaluate.py
"""
import argparse
import os
import time

import torch

from config import (SampleConfig, UserError, atomic_save, atomic_write, autocast_dtype, check_output_path, make_folder,
                    pick_device, run_main)
from diffusion import Schedule, backward_denoise, to_uint8

GIF_FRAMES = 40             # snapshots kept along the way: every 4th is a column of the PNG figure


# ----------------------------------------------------------------------------- pictures

def save_figure(fig, path):
    """Write a matplotlib figure as PNG, atomically."""
    import matplotlib.pyplot as plt
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)


def save_grid(images, path, nrow, row_names=None):
    """uint8 images (N,1,H,W) -> one PNG, nrow images per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchvision
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=64)   # (3, H', W')
    rows = (len(images) + nrow - 1) // nrow
    fig = plt.figure(figsize=(nrow * 0.45 + 0.6, rows * 0.45 + 0.2))
    plt.imshow(grid[0], cmap="gray", vmin=0, vmax=255)
    if row_names is not None:
        step = grid.shape[1] / rows
        plt.yticks([step * (i + 0.5) for i in range(rows)], row_names, fontsize=8)
        plt.xticks([])
    else:
        plt.axis("off")
    save_figure(fig, path)


def save_side_by_side(panels, path, nrow):
    """{title: uint8 images (N,1,H,W)} -> one PNG with the panels' grids next to each other."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchvision
    grids = [torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=64)[0] for images in panels.values()]
    height, width = grids[0].shape
    fig, axes = plt.subplots(1, len(grids), figsize=(len(grids) * (width / 60 + 0.2), height / 60 + 0.5), squeeze=False)
    for ax, title, grid in zip(axes[0], panels, grids):
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    save_figure(fig, path)


def save_process_figure(snapshots, labels, path, step_names):
    """The tutorial's figure: one row per sample, columns = the image along the denoising steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, k = len(labels), len(snapshots)
    fig, axes = plt.subplots(n, k, figsize=(k * 0.8, n * 0.8), squeeze=False)
    for j, snap in enumerate(snapshots):
        for i in range(n):
            axes[i, j].imshow(to_uint8(snap[i, 0]), cmap="gray", vmin=0, vmax=255)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(step_names[j], fontsize=7)
            if j == 0:
                axes[i, j].set_ylabel(str(int(labels[i])), fontsize=8, rotation=0, labelpad=8)
    save_figure(fig, path)


def save_animation(frames, path, scale=4):
    """Frames of images in [-1, 1] (each (n,1,H,W)) -> an animated GIF, one image per sample in a row.
    Pillow comes with torchvision; the last frame is held longer so the result can be seen."""
    import torchvision
    from PIL import Image
    pictures = []
    for imgs in frames:
        grid = torchvision.utils.make_grid(to_uint8(imgs), nrow=len(imgs), padding=1)[0]   # (H', W')
        pictures.append(Image.fromarray(grid.numpy()).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                                             Image.NEAREST))
    atomic_write(path, lambda tmp: pictures[0].save(tmp, format="GIF", save_all=True, duration=80, loop=0,
                                                    append_images=pictures[1:] + [pictures[-1]] * 10))


def save_loss_curve(losses, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    losses = torch.tensor(losses)
    k = max(1, len(losses) // 100)                                    # smooth over ~1% of the run
    smooth = losses[: len(losses) // k * k].view(-1, k).mean(1)
    fig = plt.figure(figsize=(6, 3.5))
    plt.plot(range(len(losses)), losses, alpha=0.25, label="per step")
    plt.plot([k * (i + 0.5) for i in range(len(smooth))], smooth, label=f"mean of {k} steps")
    plt.yscale("log")
    plt.xlabel("step")
    plt.ylabel("MSE(eps, eps_theta)")
    plt.legend()
    save_figure(fig, path)


def save_sample_grid(model, sched, path, seed=0, per_label=8, **sampling):
    """Sample per_label images of every label and save them as a grid (one row per label)."""
    labels = torch.arange(model.cfg.num_labels).repeat_interleave(per_label)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    defaults = {"sampler": SampleConfig.sampler, "guidance": SampleConfig.guidance}
    x, _ = backward_denoise(model, sched, labels, generator=g, **(defaults | sampling))
    save_grid(to_uint8(x).cpu(), path, nrow=per_label, row_names=[str(k) for k in range(model.cfg.num_labels)])


# ----------------------------------------------------------------------------- the script

def sample_as_asked(model, sched, labels, args, device, dtype, keep=0):
    """backward_denoise with the command line's sampler, steps, eta, guidance and seed (a fresh generator,
    so every call starts from the same noise). Returns (images in [-1, 1], snapshots)."""
    g = torch.Generator(device=device).manual_seed(args.seed)
    return backward_denoise(model, sched, labels, args.sampler, args.steps, args.eta, args.guidance,
                            generator=g, keep=keep, dtype=dtype)


def compare_base_lora_merged(model, sched, x_lora, labels, args, device, dtype):
    """Sample again with the same seed and labels: the base checkpoint without any LoRA layer, and
    `model` after merge_lora. x_lora: what `model` (unmerged) drew. Returns {title: uint8 images}."""
    from lora import merge_lora
    from train import load_model
    base, _ = load_model(args.checkpoint, args.weights, device)
    x_base, _ = sample_as_asked(base, sched, labels, args, device, dtype)
    merge_lora(model)                                        # W' = W + dW in every adapted layer
    x_merged, _ = sample_as_asked(model, sched, labels, args, device, dtype)
    difference = (x_lora - x_merged).abs().max().item()
    note = "" if dtype is None else \
        f" ({str(dtype).replace('torch.', '')} rounds W + dW; --precision fp32 shows the merge is exact)"
    print(f"same seed, pixels in [-1, 1]: LoRA vs merged differ by at most {difference:.1e}{note}; "
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
                labels += list(range(int(lo), int(hi) + 1))
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
    if not value >= 0:
        raise UserError(f"--lora {text}: the weight must be >= 0, got {weight}")
    return path, value


def parse_args():
    parser = argparse.ArgumentParser(description="Sample from a trained model and plot the denoising steps.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default="model.pt", help="base model written by train.py")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA or raw weights")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                        help="LoRA file written by lora_finetune.py, optionally with a weight (default 1); "
                        "repeat to combine adapters: their updates add up, each times its weight")
    parser.add_argument("--lora-scale", type=float, default=1.0,
                        help="multiplies every adapter's update: 0 = base model exactly, 1 = as trained")
    parser.add_argument("--merge", action="store_true", help="merge the LoRA weights into the base layers first")
    parser.add_argument("--compare", action="store_true",
                        help="with --lora: sample the same seed and labels with the base model alone, with the "
                        "adapter, and with the adapter merged; save compare.png with the three side by side")
    parser.add_argument("--labels", default="0-9", help="labels to draw, e.g. 0-9 or 3,3,7")
    parser.add_argument("--per-label", type=int, default=1, help="samples per label")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default=SampleConfig.sampler, help="DDPM (T steps) or DDIM")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"denoising steps (default: T for ddpm, {SampleConfig.ddim_steps} for ddim)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 = deterministic, 1 = DDPM-like")
    parser.add_argument("--guidance", type=float, default=SampleConfig.guidance,
                        help="classifier-free guidance weight w (0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out-dir", default="outputs", help="folder for the PNG files")
    parser.add_argument("--save-samples", default=None, metavar="FILE.pt",
                        help="also save {'images': uint8 (N,1,H,W), 'labels': int64 (N,)}")
    parser.add_argument("--show", action="store_true", help="also open the figures in a window")
    parser.add_argument("--precision", default="auto",
                        help="auto (bf16 autocast where the hardware has it, else fp32), fp32, bf16 or fp16")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device name")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.per_label < 1:
        raise UserError(f"--per-label must be positive, got {args.per_label}")
    if args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")
    if not 0 <= args.eta <= 1:
        raise UserError(f"--eta must be in [0, 1], got {args.eta}")
    if (args.merge or args.compare) and not args.lora:
        raise UserError(f"{'--merge' if args.merge else '--compare'} needs --lora FILE")
    if args.merge and args.compare:
        raise UserError("--compare samples the merged model itself; leave out --merge")
    if not args.lora_scale >= 0:
        raise UserError(f"--lora-scale must be >= 0, got {args.lora_scale}")
    if args.lora_scale != 1.0 and not args.lora:
        raise UserError("--lora-scale needs --lora FILE")
    adapters = [parse_lora_arg(text) for text in args.lora]
    make_folder(args.out_dir)
    if args.save_samples:
        check_output_path(args.save_samples)
    from train import load_model
    device = pick_device(args.device)
    dtype = autocast_dtype(args.precision, device)            # refuses an unknown --precision before any work
    model, ckpt = load_model(args.checkpoint, args.weights, device)
    labels = torch.tensor(parse_labels(args.labels, model.cfg.num_labels)).repeat_interleave(args.per_label)
    if adapters:
        from lora import apply_lora_files, merge_lora, set_lora_scale
        files = apply_lora_files(model, adapters)
        set_lora_scale(model, args.lora_scale)
        if args.merge:
            merge_lora(model)
        print("LoRA " + ", ".join(f"{path} x{w:g} (r={f['rank']}, {','.join(f['targets'])})"
                                  for (path, w), f in zip(adapters, files))
              + f"; scale {args.lora_scale:g}{', merged' if args.merge else ''}")
    sched = Schedule.from_config(model.cfg)

    start = time.time()
    x, snapshots = sample_as_asked(model, sched, labels, args, device, dtype, keep=GIF_FRAMES)
    seconds = time.time() - start
    images = to_uint8(x).cpu()
    total = snapshots[-1][0]
    print(f"sampled {len(labels)} images with {args.sampler} ({total} steps, guidance {args.guidance}) "
          f"in {seconds:.1f} s")

    first = [labels.tolist().index(k) for k in dict.fromkeys(labels.tolist())]   # one row per label
    columns = snapshots[::GIF_FRAMES // 10]                                       # noise + 10 steps
    process = os.path.join(args.out_dir, "denoise_process.png")
    save_process_figure([imgs[first] for _, imgs in columns], labels[first], process,
                        ["noise"] + [f"{n}/{total}" for n, _ in columns[1:]])
    animation = os.path.join(args.out_dir, "denoise_process.gif")
    save_animation([imgs[first] for _, imgs in snapshots], animation)
    grid = os.path.join(args.out_dir, "samples.png")
    save_grid(images, grid, nrow=args.per_label if len(first) > 1 else min(len(images), 10))
    print(f"saved {process}, {animation} and {grid}")
    if args.save_samples:
        atomic_save({"images": images, "labels": labels}, args.save_samples)
        print(f"saved {len(images)} samples to {args.save_samples}")
    if args.compare:
        compare = os.path.join(args.out_dir, "compare.png")
        panels = compare_base_lora_merged(model, sched, x, labels, args, device, dtype)
        save_side_by_side(panels, compare, nrow=args.per_label if len(first) > 1 else min(len(images), 10))
        print(f"saved {compare}")
    if args.show:
        import matplotlib.pyplot as plt
        from PIL import Image
        for path in (process, grid):
            plt.figure()
            plt.imshow(Image.open(path))
            plt.axis("off")
        plt.show()


if __name__ == "__main__":
    run_main(main)
