"""Training images: MNIST, Fashion-MNIST, or your own folder of labelled images (the series' dataset.py).

All images are decoded ONCE into a uint8 tensor (N,1,H,W) and batches are sliced from it. (The blog's
listing uses a Dataset that decodes a PIL image per item per epoch, which costs more than our model's step.)

    python dataset.py --data ../shared/data/mnist-t10k      # prints sizes, saves outputs/dataset.png
"""
import gzip
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image

from config import (LIMITS, Parser, UserError, check_new_output, make_folder, missing_folders, remove_if_empty, run_main,
                    within)
from figures import save_grid

NAMED = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def load_images(data, data_root, size, num_labels=None):
    """data: 'mnist', 'fashion-mnist' or a folder. Returns uint8 images (N,1,size,size), int64 labels (N,).
    With num_labels, a label the model does not know (>= num_labels) is refused."""
    if data in NAMED:
        images, labels = load_torchvision(data, data_root)
        images = fit_size(images, size)
    else:
        images, labels = load_folder(data, size)
    if num_labels is not None and int(labels.max()) >= num_labels:
        raise UserError(f"data has label {int(labels.max())}, the model knows 0..{num_labels - 1}")
    return images, labels


def to_model_range(images):
    """uint8 0..255 -> float -1..1, the range the diffusion model works in."""
    return images.float() / 127.5 - 1.0


class Batches:
    """Endless shuffled batches from in-memory tensors. Its state (epoch, position, RNG) goes in the
    checkpoint, so that a resumed run sees exactly the batches the interrupted one would have.

    shard=(rank, world) is for torchrun's `world` processes (train.py): all of them draw the same GLOBAL
    batch of world * batch_size images, exactly as one process with that batch size would, and each keeps
    its own contiguous slice. With the default (0, 1) the one process keeps the whole batch."""

    def __init__(self, images, labels, batch_size, seed, shard=(0, 1)):
        if batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        self.rank, self.world = shard
        if len(images) < self.world:
            raise UserError(f"{len(images)} images cannot be shared among {self.world} processes")
        self.images, self.labels = images, labels
        self.batch_size = min(batch_size, len(images) // self.world)      # per process
        self.global_batch = self.batch_size * self.world                   # = batch_size with one process
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, 0
        self.order = torch.randperm(len(images), generator=self.generator)

    def __len__(self):                                     # batches per epoch (the last partial one is dropped)
        return len(self.images) // self.global_batch

    def next(self):
        if self.pos + self.global_batch > len(self.images):
            self.epoch, self.pos = self.epoch + 1, 0
            self.order = torch.randperm(len(self.images), generator=self.generator)
        idx = self.order[self.pos:self.pos + self.global_batch]
        idx = idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]     # this process's slice
        self.pos += self.global_batch
        return to_model_range(self.images[idx]), self.labels[idx]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "order": self.order,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        """Continue where state_dict() was taken; a state that cannot be these images' is a ValueError."""
        n, order, pos = len(self.images), state["order"], state["pos"]
        if not (torch.is_tensor(order) and order.shape == (n,) and not order.is_floating_point()
                and 0 <= order.min() <= order.max() < n and type(pos) is int and 0 <= pos <= n):
            raise ValueError(f"its data order or position is not one of these {n:,d} images")
        self.generator.set_state(state["generator"])
        self.epoch, self.pos, self.order = int(state["epoch"]), pos, order


# ----------------------------------------------------------------------------- beyond the blog: files, folders, shards

IDX_MAGIC = {"images": 2051, "labels": 2049}      # bytes 0, 0, 8 (uint8), ndim: 3 (N, rows, cols) or 1 (N)


def read_idx(path, kind):
    """Read an IDX file (the MNIST file format, optionally gzipped) of `kind` ("images" or "labels") into a
    uint8 tensor; one that is not of that kind, or holds more or fewer bytes than its header says, is refused."""
    try:
        with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except Exception as e:  # a .gz cut short (EOFError), not gzip at all (BadGzipFile), damaged inside (zlib.error)
        raise UserError(f"{path} cannot be read: cut short or damaged ({type(e).__name__}); "
                        f"replace it with a good copy") from None
    magic, ndim = int.from_bytes(data[:4], "big"), IDX_MAGIC[kind] & 0xFF
    if magic != IDX_MAGIC[kind]:                    # also an empty file, or images and labels swapped
        raise UserError(f"{path} ({len(data):,d} bytes) is not an IDX {kind} file: it starts with {magic}, "
                        f"not {IDX_MAGIC[kind]} (2051: images, 2049: labels)")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != 4 + 4 * ndim + torch.Size(shape).numel():
        raise UserError(f"{path} is cut short or damaged: its header says {kind} of shape {tuple(shape)}, "
                        f"which {len(data):,d} bytes do not hold")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(shape)


def data_inputs(data, data_root):
    """What a run reads as its data, [(flag, path)], for config.check_not_input: the --data folder, or the raw
    files of a named dataset under --data-root (a figure or checkpoint written over them would lose them)."""
    if data in NAMED:
        return [("--data-root", os.path.join(data_root, NAMED[data], "raw"))]
    return [("--data", data)]


def load_torchvision(name, root):
    """MNIST or Fashion-MNIST's 60,000 training images. Files already in root/NAME/raw (gzipped or
    not) are read as they are; otherwise torchvision downloads them into root."""
    raw = os.path.join(root, NAMED[name], "raw")
    for suffix in ("", ".gz"):
        files = [os.path.join(raw, f"train-{kind}-idx{n}-ubyte{suffix}") for kind, n in (("images", 3), ("labels", 1))]
        if all(os.path.isfile(f) for f in files):
            images, labels = read_idx(files[0], "images"), read_idx(files[1], "labels")
            if len(images) != len(labels) or not len(images):       # (mismatched labels would train silently)
                raise UserError(f"{raw}: its train-*{suffix} files hold {len(images):,d} images and "
                                f"{len(labels):,d} labels; they must be as many, and at least one")
            return images.unsqueeze(1).contiguous(), labels.long()
    # Imported here, where a download needs it, and not at the top: importing torchvision costs 2-3 s (it loads
    # torch._dynamo), which every script would pay at start even with the files on disk.
    import torchvision
    cls = getattr(torchvision.datasets, NAMED[name])
    new_folders = missing_folders(raw)                      # the folders a download would make
    try:
        ds = cls(root=root, train=True, download=True)
    except Exception as e:  # offline: torchvision raises RuntimeError/URLError after its retries
        remove_if_empty(new_folders)              # those the failed download made, if it left them empty
        raise UserError(f"could not load or download {NAMED[name]} into {root} ({type(e).__name__}): {raw} holds "
                        f"no train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]; connect to the internet "
                        f"once, point --data-root at a copy, or pass --data FOLDER with one subfolder of images "
                        f"per label") from None
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()           # (N,1,28,28) uint8, (N,)


def load_folder(path, size):
    """A folder with one subfolder per label, named 0, 1, ... (torchvision's ImageFolder layout).
    Images are made grayscale and resized to size x size."""
    if not os.path.isdir(path):
        raise UserError(f"--data {path}: no such folder (expected mnist, fashion-mnist or a folder)")
    subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    # isdecimal, not isdigit: '²' is a digit that int() refuses. Label d needs a model of d + 1 labels, which
    # config.LIMITS bounds (and torch.tensor overflows past 2**63).
    bad = [d for d in subdirs if not d.isdecimal() or not within(LIMITS["num_labels"], int(d) + 1)]
    if not subdirs or bad:
        raise UserError(f"--data {path}: expected subfolders named by label (0, 1, ...), "
                        f"found {', '.join(bad[:3]) if bad else 'none'}")
    images, labels, skipped = [], [], []
    for d in subdirs:
        folder = os.path.join(path, d)
        for name in sorted(os.listdir(folder)):
            file = os.path.join(folder, name)
            try:
                if not os.path.isfile(file):        # regular files only: a named pipe's open() would wait forever
                    raise OSError(f"{file} is not a regular file")
                with Image.open(file) as img:
                    img = grayscale(img).resize((size, size), Image.BILINEAR)
                    images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8))
            except (OSError, ValueError, Image.DecompressionBombError):    # not an image (a README, a folder): skip
                skipped.append(os.path.join(d, name))
                continue
            labels.append(int(d))
    if skipped:
        print(f"warning: --data {path}: skipped {len(skipped)} file(s) that are not images: "
              f"{', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}", file=sys.stderr)
    if not images:
        raise UserError(f"--data {path}: no readable images in its label folders")
    return torch.stack(images).view(-1, 1, size, size), torch.tensor(labels)


def grayscale(img):
    """A PIL image as 8-bit grayscale (mode L). convert("L") alone clips 16-bit pixels at 255 and drops alpha."""
    if img.mode.startswith("I"):            # integers: 16-bit (I;16, or I as older Pillow opens 16-bit PNGs), 32-bit
        lo, hi = img.convert("I").getextrema()
        if not 0 <= lo <= hi <= 65535:
            raise UserError(f"{getattr(img, 'filename', 'an image')} holds integer pixels from {lo} to {hi}; "
                            "expected 0..255 or 0..65535")
        scale = 1 if hi <= 255 else 1 / 257   # 8-bit values in a wider type as they are; 16-bit: 65535 -> 255
        return img.convert("I").point(lambda v: v * scale + 0.5).convert("L")        # (+ 0.5: rounded)
    if img.mode == "F":                     # 32-bit float pixels (TIFF): convert("L") would read 0..1 as black
        lo, hi = img.getextrema()
        if not 0 <= lo <= hi <= 255:        # (nan fails every comparison)
            raise UserError(f"{getattr(img, 'filename', 'an image')} holds floating-point pixels from {lo:g} to "
                            f"{hi:g}; expected 0..1 or 0..255")
        scale = 255 if hi <= 1 else 1
        return img.point(lambda v: v * scale + 0.5).convert("L")
    if "A" in img.getbands() or "transparency" in img.info:
        # A transparent pixel shows what lies behind it, and behind an MNIST digit is black: composite onto black
        # (convert("L") would show whatever colour the transparent pixels store, often white). A shape drawn in
        # the alpha channel alone (one colour everywhere) would vanish if that colour were black: alpha is its ink.
        rgba = img.convert("RGBA")
        *colour, alpha = rgba.getextrema()                              # (min, max) of R, G, B and of A
        if all(lo == hi for lo, hi in colour) and alpha[0] < alpha[1]:
            return rgba.getchannel("A")
        return Image.alpha_composite(Image.new("RGBA", img.size, "black"), rgba).convert("L")
    return img.convert("L")


def fit_size(images, size):
    """Pad (black) or center-crop MNIST-style data to size x size: a resize round trip would blur digits."""
    h = images.shape[-1]
    if h < size:
        p = (size - h) // 2
        return F.pad(images, (p, size - h - p, p, size - h - p))
    if h > size:
        c = (h - size) // 2
        return images[..., c:c + size, c:c + size]
    return images


def main():
    parser = Parser(description="Load a data set once and show a few images per label.")
    parser.add_argument("--data", default="mnist", help="mnist, fashion-mnist, or a folder with one subfolder per label")
    parser.add_argument("--data-root", default="./data", help="where torchvision datasets are (or are downloaded to)")
    parser.add_argument("--out", default="outputs/dataset.png", help="PNG file to write (an existing PNG is replaced)")
    parser.add_argument("--overwrite", action="store_true", help="let --out replace an existing file that is not a .png")
    args = parser.parse_args()
    make_folder(os.path.dirname(args.out), flag="--out's folder")
    check_new_output(args.out, None, args.overwrite or args.out.lower().endswith(".png"),   # a figure, or asked
                     inputs=data_inputs(args.data, args.data_root))
    images, labels = load_images(args.data, args.data_root, 28)
    counts = torch.bincount(labels).tolist()
    print(f"{len(images)} images {tuple(images.shape[1:])} {images.dtype}, "
          f"{images.numel() / 2**20:.1f} MiB in memory; per label: {counts}")
    rows = [images[labels == k][:8] for k in range(len(counts))]
    save_grid(torch.cat(rows), args.out, nrow=8)
    print(f"saved {args.out}")


if __name__ == "__main__":
    run_main(main)
