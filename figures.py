"""Writing pictures, for every script's demo: image grids, the denoising figure and GIF, the loss curve.

Not a part of the blog series: its scripts draw with plt.show(); ours write PNG and GIF files (atomically),
so they run without a screen. This file imports only config.py, so every core file may use it.

    python figures.py      # draws a grid of noise fading into a square, and a made-up loss curve, into outputs/
"""
import os

import matplotlib
import torch
from PIL import Image

from config import Parser, atomic_write, make_folder, run_main

matplotlib.use("Agg")                                    # files only, no window
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def to_uint8(x):
    """Model range [-1, 1] -> pixels 0..255 (uint8), white digit on black."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images, nrow, padding=2, pad_value=64):
    """uint8 images (N,1,H,W) -> one uint8 picture (H', W'): nrow images a row, each framed by `padding` pixels
    of grey level pad_value. (What torchvision.utils.make_grid draws for N > 1; importing torchvision costs every
    script 2-3 s at start, more than drawing 100 digits, so only a download imports it: dataset.py.)"""
    n, _, h, w = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)                                                   # ceil(n / cols)
    grid = torch.full((rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value, dtype=images.dtype)
    for i, image in enumerate(images):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[top:top + h, left:left + w] = image[0]
    return grid


def save_figure(fig, path):
    """Write a matplotlib figure as PNG, atomically."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)


def save_grid(images, path, nrow, row_names=None):
    """uint8 images (N,1,H,W) -> one PNG, nrow images per row; {title: images} -> the panels side by side."""
    panels = images if isinstance(images, dict) else {"": images}
    grids = [make_grid(x, nrow) for x in panels.values()]
    rows = (len(next(iter(panels.values()))) + nrow - 1) // nrow
    fig, axes = plt.subplots(1, len(grids), figsize=(len(grids) * (nrow * 0.45 + 0.6), rows * 0.45 + 0.2
                                                     + 0.3 * any(panels)), squeeze=False)
    for ax, title, grid in zip(axes[0], panels, grids):
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        if row_names is None:
            ax.axis("off")
        else:
            ax.set_xticks([])
            ax.set_yticks([grid.shape[0] / rows * (i + 0.5) for i in range(rows)], row_names, fontsize=8)
    save_figure(fig, path)


def save_process_figure(columns, labels, path, column_names):
    """The blog's denoising figure: one row per sample, columns = images in [-1, 1] along the steps.
    (The blog draws one subplot per image; one image with labelled rows and columns draws in a tenth of the time.)"""
    n, k = len(labels), len(columns)
    rows = torch.stack([to_uint8(images[:n]) for images in columns], dim=1).flatten(0, 1)   # (n*k, 1, H, W), row by row
    grid = make_grid(rows, nrow=k)
    fig, ax = plt.subplots(figsize=(k * 0.8, n * 0.8 + 0.3))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([grid.shape[1] / k * (j + 0.5) for j in range(k)], column_names, fontsize=7)
    ax.set_yticks([grid.shape[0] / n * (i + 0.5) for i in range(n)], [str(int(y)) for y in labels], fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    save_figure(fig, path)


def save_animation(frames, path, scale=4):
    """Frames of images in [-1, 1] (each (n,1,H,W)) -> an animated GIF, one image per sample in a row;
    the last frame is held longer so the result can be seen."""
    pictures = []
    for imgs in frames:
        grid = make_grid(to_uint8(imgs), nrow=len(imgs), padding=1, pad_value=0)      # (H', W')
        pictures.append(Image.fromarray(grid.numpy()).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                                             Image.NEAREST))
    atomic_write(path, lambda tmp: pictures[0].save(tmp, format="GIF", save_all=True, duration=80, loop=0,
                                                    append_images=pictures[1:] + [pictures[-1]] * 10))


def save_loss_curve(losses, path):
    """The per-step loss and its running mean, on a log scale."""
    losses = torch.tensor(losses)
    k = max(1, len(losses) // 100)                                    # smooth over ~1% of the run
    smooth = losses[: len(losses) // k * k].view(-1, k).mean(1)
    fig = plt.figure(figsize=(6, 3.5))
    plt.plot(range(len(losses)), losses, alpha=0.25, label="per step")
    plt.plot([k * (i + 0.5) for i in range(len(smooth))], smooth, label=f"mean of {k} steps")
    plt.yscale("log")
    plt.xlabel("step")
    plt.ylabel("loss (train_step: weighted MSE)")
    plt.legend()
    save_figure(fig, path)


def main():
    parser = Parser(description="Draw the two figures every training run ends with, from made-up data.")
    parser.add_argument("--out-dir", default="outputs", help="folder for figures_grid.png and figures_loss.png")
    out_dir = parser.parse_args().out_dir
    names = ["figures_grid.png", "figures_loss.png"]
    make_folder(out_dir, names)
    square = -torch.ones(1, 28, 28)
    square[:, 8:20, 8:20] = 1
    fade = torch.linspace(0, 1, 10).view(-1, 1, 1, 1)                     # 0: all noise .. 1: the square
    g = torch.Generator().manual_seed(0)
    save_grid(to_uint8(fade * square + (1 - fade) * torch.randn(10, 1, 28, 28, generator=g)),
              os.path.join(out_dir, names[0]), nrow=10)
    save_loss_curve((0.02 + 0.5 / torch.arange(1, 1001) * (1 + 0.3 * torch.randn(1000, generator=g).abs())).tolist(),
                    os.path.join(out_dir, names[1]))
    print(f"saved {', '.join(os.path.join(out_dir, n) for n in names)}")


if __name__ == "__main__":
    run_main(main)
