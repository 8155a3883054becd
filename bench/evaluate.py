"""Score generated digits (or Fashion-MNIST items) with an independent classifier.

Usage (from the project root):

    python bench/evaluate.py SAMPLES.pt                      # MNIST, human-readable report
    python bench/evaluate.py SAMPLES.pt --domain fashion --json
    python bench/evaluate.py --export-train-split DIR        # the classifier's 8,000 digits, for train.py --data

SAMPLES.pt is a file written with
    torch.save({"images": uint8 (N,1,28,28) 0..255 white-on-black, "labels": int64 (N,)}, path)
where labels[i] is the class that sample i was *asked* to be.

Options: --domain mnist|fashion, --data-root (default ../shared/data),
--mnist-folder (default <data-root>/mnist-t10k, an ImageFolder of PNGs), --cache-dir
(default bench/.cache), --seed (data split, classifier training, floor draws), --threads
(torch threads, default 1), --retrain, --json (one JSON line instead of the report),
--export-train-split DIR (write the classifier-training split as PNGs instead of scoring).

This file deliberately imports nothing from the project, so it judges the generator from
the outside. The first run for a domain trains a small CNN (about a minute on one CPU
core) and caches it in --cache-dir; later runs take a few seconds.

Real data: MNIST here is only the 10,000-image test split (as PNGs): a fixed, seeded split
gives 8,000 images to train the classifier and 2,000 held out. (If that folder is missing
and torchvision's MNIST files exist under --data-root/MNIST/raw, its 60k train / 10k test
split is used instead.) Fashion-MNIST: train split (60k) trains, test split (10k) is held out.
A generator trained on the whole t10k folder has seen the 2,000 held-out digits; one trained on
the folder that --export-train-split writes has not, so its FD cannot come from remembering them.

What the numbers mean:
  accuracy    share of samples the classifier puts in the class they were asked for
              (overall and per requested label). Real held-out images score about
              classifier_heldout_accuracy, so that is the ceiling.
  fd          Frechet distance between the classifier's penultimate-layer features (128-d)
              of the samples and of all held-out real images (like FID, but with an
              MNIST-sized network instead of Inception). Lower is better.
  fd_floor    the same distance for N *real* images (N = number of samples, drawn from the
              classifier-training split with the same label mix as the samples) against
              the same held-out set, averaged over a few draws. FD is biased upwards for
              small N, so compare fd with this floor, not with 0.
  fd_ratio    fd / fd_floor: about 1 means "as close to the real data as real data is";
              a few means visibly off; tens or hundreds means noise or collapsed output.
  spread      how varied each label's samples are: the trace of their features' covariance over
              that of the held-out real images of the label, averaged over labels (per label
              too). Real images score about 1 (spread_floor, from the floor's draws); guidance
              pushes it below 1 (samples too alike), off-label or broken samples above 1.
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image  # comes with torchvision

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
DEFAULT_DATA_ROOT = PROJECT.parent / "shared" / "data"  # == ../shared/data from the project root
DEFAULT_CACHE_DIR = HERE / ".cache"
DOMAINS = ("mnist", "fashion")
CACHE_VERSION = 1  # bump when the classifier or the split changes, to invalidate old caches
FLOOR_DRAWS = 10


class UsageError(Exception):
    """A problem with the user's input (bad samples file, ...): exit code 2."""


class DataError(Exception):
    """The real data or cache could not be read: exit code 2, as for any bad input."""


def write_then_rename(path, write):
    """write(tmp) beside path, then rename tmp over path, so that an interrupted write leaves the old file (or
    none) rather than half of one; the folder is made if missing. The bench scripts' caches and downloads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:                     # (a folder where the file goes, a full disk): one line, no .tmp left
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- samples

def validate_samples(images, labels, num_classes=10):
    """Raise UsageError unless images is uint8 (N,1,28,28) and labels int64 (N,) in range."""
    if not isinstance(images, torch.Tensor):
        raise UsageError(f"'images' must be a torch tensor, got {type(images).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise UsageError(f"'labels' must be a torch tensor, got {type(labels).__name__}")
    if images.dtype != torch.uint8:
        raise UsageError(f"'images' must have dtype torch.uint8 (0..255), got {images.dtype}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise UsageError(f"'images' must have shape (N, 1, 28, 28), got {tuple(images.shape)}")
    if labels.dtype != torch.int64:
        raise UsageError(f"'labels' must have dtype torch.int64, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise UsageError(f"'labels' must have shape ({images.shape[0]},) to match 'images', "
                         f"got {tuple(labels.shape)}")
    n = images.shape[0]
    if n < 2:
        raise UsageError(f"need at least 2 samples to estimate a covariance, got {n}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UsageError(f"'labels' must be in 0..{num_classes - 1}, "
                         f"got values {int(labels.min())}..{int(labels.max())}")


def load_samples(path):
    """Load and validate a samples file. Returns (images uint8 (N,1,28,28), labels int64 (N,)).
    Raises UsageError with a one-line message on any problem."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"samples file not found: {path}")
    if not path.is_file():
        raise UsageError(f"{path} is not a samples file: a folder, device or pipe, not a regular file")
    try:
        with warnings.catch_warnings():     # (torch warns about some foreign pickles before refusing them)
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, pickled objects, truncated, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"could not read {path} with torch.load(weights_only=True) (not a "
                         f"torch.save'd dict of tensors?): "
                         f"{type(e).__name__}{': ' + msg[:200] if msg else ''}")
    if not isinstance(obj, dict):
        raise UsageError(f"{path} must hold a dict with keys 'images' and 'labels', "
                         f"got {type(obj).__name__}")
    missing = [k for k in ("images", "labels") if k not in obj]
    if missing:
        raise UsageError(f"{path} is missing key(s) {missing}; found keys {sorted(map(str, obj))}")
    validate_samples(obj["images"], obj["labels"])
    return obj["images"].contiguous(), obj["labels"].contiguous()


# ----------------------------------------------------------------------------- real data

def _read_idx(path):
    """Read an IDX file (MNIST's format), plain or .gz, into a uint8 tensor."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except Exception as e:  # a .gz cut short (EOFError), not gzip at all (BadGzipFile), damaged inside (zlib.error)
        raise DataError(f"{path} cannot be read: cut short or damaged ({type(e).__name__})") from None
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise DataError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != 4 + 4 * ndim + math.prod(shape):
        raise DataError(f"{path} is cut short or damaged: its header says shape {tuple(shape)}, which "
                        f"{len(raw):,d} bytes do not hold")
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8)
    return data.reshape(shape).clone()


def _idx_split(folder, prefix):
    """(images uint8 (N,1,28,28), labels int64 (N,)) from <folder>/<prefix>-{images,labels}..."""
    out = []
    for kind, dims in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)):
        plain = Path(folder) / f"{prefix}-{kind}"
        gz = Path(str(plain) + ".gz")
        path = plain if plain.is_file() else gz
        if not path.is_file():
            raise DataError(f"missing {plain}[.gz]")
        t = _read_idx(path)
        if t.dim() != dims:
            raise DataError(f"{path}: expected {dims} dims, got shape {tuple(t.shape)}")
        out.append(t)
    images, labels = out
    if len(images) != len(labels):
        raise DataError(f"{folder}: its {prefix} files hold {len(images):,d} images and {len(labels):,d} labels")
    if images.shape[1:] != (28, 28) or len(labels) and labels.max() > 9:   # (the classifiers read 28x28, 10 classes)
        raise DataError(f"{folder}: its {prefix} files hold images of {tuple(images.shape[1:])} and labels up to "
                        f"{int(labels.max()) if len(labels) else None}; expected 28x28 images and labels 0..9")
    return images.unsqueeze(1).contiguous(), labels.long()


def _fingerprint(folder):
    """A hash of the name, size and modification time of every file under folder: cheap (no image is read),
    and another one when an image is replaced, added or removed, so that a cache of the old images goes stale."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _load_png_folder(folder, cache_dir, fingerprint=None):
    """All images of an ImageFolder of 28x28 PNGs (folders 0..9) as one uint8 tensor, cached (keyed by the
    folder and its _fingerprint). Files that cannot be read as images are skipped with one warning, as
    dataset.py does for train.py --data (this file imports nothing from the project, so not its loader)."""
    folder = Path(folder).resolve()
    fingerprint = fingerprint or _fingerprint(folder)
    cache = Path(cache_dir) / "mnist_folder_uint8.pt"
    if cache.is_file():
        try:
            c = torch.load(cache, map_location="cpu", weights_only=True)
            if c.get("source") == str(folder) and c.get("fingerprint") == fingerprint:
                return c["images"], c["labels"]
        except Exception:
            pass  # unreadable cache: rebuild it
    classes = sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: d.name)
    if [d.name for d in classes] != [str(i) for i in range(10)]:
        raise DataError(f"{folder}: expected subfolders 0..9, found {[d.name for d in classes]}")
    images, labels, skipped = [], [], []
    for d in classes:
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp") or not f.is_file():    # (a named pipe: hangs)
                continue
            try:
                with Image.open(f) as im:
                    if im.mode.startswith(("I", "F")):     # convert("L") clips 16-bit and float pixels: refuse them
                        raise DataError(f"{f}: {im.mode} pixels (16/32-bit); the evaluator reads 8-bit images")
                    im = im.convert("L")
                    if im.size != (28, 28):
                        im = im.resize((28, 28), Image.BILINEAR)
                    images.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8))
            except (OSError, ValueError, Image.DecompressionBombError):    # not an image after all
                skipped.append(f"{d.name}/{f.name}")
                continue
            labels.append(int(d.name))
    if skipped:
        print(f"warning: {folder}: skipped {len(skipped)} file(s) that are not images: "
              f"{', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}", file=sys.stderr)
    if not images:
        raise DataError(f"{folder}: no images found")
    images = torch.stack(images).reshape(-1, 1, 28, 28)
    labels = torch.tensor(labels, dtype=torch.int64)
    write_then_rename(cache, lambda tmp: torch.save(
        {"images": images, "labels": labels, "source": str(folder), "fingerprint": fingerprint}, tmp))
    return images, labels


def data_folders(data_root=None, mnist_folder=None):
    """The folders load_real reads: Fashion-MNIST's raw files, the MNIST image folder, MNIST's raw files. Resolved,
    so that `source` (the cached classifier's key) names the data alike however the path is written (../shared/data
    or /work/shared/data): otherwise each spelling retrains the classifier over the other's cache."""
    data_root = Path(data_root if data_root is not None else DEFAULT_DATA_ROOT).resolve()
    folder = Path(mnist_folder).resolve() if mnist_folder is not None else data_root / "mnist-t10k"
    return data_root / "FashionMNIST" / "raw", folder, data_root / "MNIST" / "raw"


def load_real(domain, data_root=None, mnist_folder=None, cache_dir=None, seed=0):
    """Real images split into a classifier-training part and a held-out part.
    Returns dict(train_x, train_y, held_x, held_y, source) with uint8 images (N,1,28,28)."""
    raw, folder, tv_raw = data_folders(data_root, mnist_folder)
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    if domain == "fashion":
        tx, ty = _idx_split(raw, "train")
        hx, hy = _idx_split(raw, "t10k")
        return dict(train_x=tx, train_y=ty, held_x=hx, held_y=hy,
                    source=f"FashionMNIST {raw} (train 60k -> classifier, test 10k -> held out)")
    if domain != "mnist":
        raise UsageError(f"unknown domain {domain!r}, expected one of {DOMAINS}")
    if mnist_folder is None and not folder.is_dir() and tv_raw.is_dir():
        tx, ty = _idx_split(tv_raw, "train")
        hx, hy = _idx_split(tv_raw, "t10k")
        return dict(train_x=tx, train_y=ty, held_x=hx, held_y=hy,
                    source=f"MNIST {tv_raw} (train 60k -> classifier, test 10k -> held out)")
    if not folder.is_dir():
        raise DataError(f"MNIST folder not found: {folder} (pass --mnist-folder or --data-root)")
    fingerprint = _fingerprint(folder)           # in `source`: other images in the folder, another classifier
    x, y = _load_png_folder(folder, cache_dir, fingerprint)
    # Fixed, seeded split: 80% trains the classifier, 20% is held out (8,000 / 2,000 for t10k).
    g = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(len(x), generator=g)
    n_held = len(x) // 5
    held, train = perm[:n_held], perm[n_held:]
    return dict(train_x=x[train], train_y=y[train], held_x=x[held], held_y=y[held],
                source=f"MNIST folder {folder} (contents {fingerprint}; {len(train)} -> classifier, "
                       f"{n_held} -> held out)")


def export_train_split(out_dir, data_root=None, mnist_folder=None, cache_dir=None, seed=0):
    """Write the classifier-training split as an ImageFolder of PNGs (out_dir/<label>/<i>.png) for
    `train.py --data out_dir`. A generator trained on it has never seen the held-out digits that FD compares
    its samples with, so its distance cannot come from remembering them. Written into a temporary folder
    beside out_dir and renamed at the end: an interrupted export leaves no half-filled out_dir."""
    out = Path(out_dir)
    # (os.path's exists and isdir answer False where the name cannot even be looked up, e.g. too long:
    # then writing below fails, and says why)
    if os.path.exists(out) and not (os.path.isdir(out) and not any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder; name a new one (nothing was written)")
    if not os.path.isdir(out.parent):
        raise UsageError(f"{out.parent} is not a folder (nothing was written)")
    real = load_real("mnist", data_root, mnist_folder, cache_dir, seed)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        for i, (image, label) in enumerate(zip(real["train_x"], real["train_y"].tolist())):
            (tmp / str(label)).mkdir(exist_ok=True)
            Image.fromarray(image[0].numpy()).save(tmp / str(label) / f"{i:05d}.png")
        if out.exists():
            out.rmdir()                                    # (empty, checked above)
        os.replace(tmp, out)
    except OSError as e:                                   # a name too long, a full disk, no permission
        raise UsageError(f"cannot write {out}: {e.strerror or e} (nothing was written)") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)         # (gone after the rename)
    return len(real["train_x"]), real["source"]


# ----------------------------------------------------------------------------- classifier

class Classifier(nn.Module):
    """Small CNN: 28 -> 14 -> 7 with conv blocks, a 128-d feature layer, then 10 logits."""

    feature_dim = 128

    def __init__(self, num_classes=10):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(1, 32), nn.MaxPool2d(2),         # 14x14
            *block(32, 64), nn.MaxPool2d(2),        # 7x7
            *block(64, 64),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, self.feature_dim), nn.ReLU(),   # penultimate features
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x):
        """x: float images in [-1, 1], (B,1,28,28). Returns (logits, features)."""
        feats = self.body(x)
        return self.head(self.dropout(feats)), feats


def to_float(images_uint8):
    return images_uint8.float().div(127.5).sub(1.0)


def _random_shift(x, max_shift, generator):
    """Shift each image by a random (dx, dy) of up to max_shift pixels (bilinear, zero fill)."""
    b = x.shape[0]
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * max_shift * (2.0 / x.shape[-1])
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # padding value: background is -1 in [-1, 1] scaling, so shift in [0, 2] space
    return F.grid_sample(x + 1.0, grid, align_corners=False, padding_mode="zeros") - 1.0


@torch.no_grad()
def run_classifier(model, images_uint8, batch_size=1000):
    """Returns (logits (N,10), features (N,128)) for uint8 images, model in eval mode."""
    model.eval()
    logits, feats = [], []
    for i in range(0, len(images_uint8), batch_size):
        lo, fe = model(to_float(images_uint8[i:i + batch_size]))
        logits.append(lo)
        feats.append(fe)
    return torch.cat(logits), torch.cat(feats)


def train_classifier(train_x, train_y, domain, seed=0, verbose=True):
    """A few epochs of Adam with a one-cycle learning rate and random shifts of up to 2 px."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Classifier()
    # Epochs chosen so both domains take about a minute on one core.
    epochs = 8 if len(train_x) <= 20000 else 2
    return fit_classifier(model, train_x, train_y, g, epochs, weight_decay=1e-4, max_lr=3e-3,
                          name=domain if verbose else None)


def fit_classifier(model, train_x, train_y, g, epochs, weight_decay, max_lr, flip=False, name=None):
    """Train `model` (returning (logits, features)) for `epochs` passes of AdamW at batch 128 with a one-cycle
    learning rate, each batch shifted by up to 2 px (and with flip=True, half of it flipped left-right), g
    drawing the order, shifts and flips; prints each epoch to stderr under [name] unless name is None.
    train_classifier and bench/strict_reader.py's reader both train through it."""
    batch_size = 128
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.2)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=g)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            x = _random_shift(to_float(train_x[idx]), 2.0, g)
            if flip:
                flipped = (torch.rand(len(idx), generator=g) < 0.5).view(-1, 1, 1, 1)
                x = torch.where(flipped, x.flip(-1), x)
            y = train_y[idx]
            logits, _ = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            total += len(idx)
        if name is not None:
            print(f"  [{name}] epoch {epoch + 1}/{epochs}: loss {loss_sum / total:.3f}, "
                  f"train acc {correct / total:.3f}, {time.time() - t0:.0f}s", file=sys.stderr)
    model.eval()
    return model


def load_classifier(domain="mnist", data_root=None, mnist_folder=None, cache_dir=None, seed=0,
                    retrain=False, verbose=True, labels=None):
    """The domain's classifier, trained on first use and cached in cache_dir. labels: the samples' labels, if
    known, checked against the real data before any training (check_labels_covered).

    Returns (model, info) where model is a Classifier in eval mode and info is a dict with
    heldout_accuracy, heldout_features (float64 (M,128)), train_features (float32, one row per
    classifier-training image), source, train_seconds, and the real data itself
    (train_x, train_y, held_x, held_y)."""
    if domain not in DOMAINS:
        raise UsageError(f"unknown domain {domain!r}, expected one of {DOMAINS}")
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    real = load_real(domain, data_root, mnist_folder, cache_dir, seed)
    if labels is not None:
        check_labels_covered(labels, real["train_y"])
    # One file per data source, so that reading with the t10k folder and with --data-root's training split keeps
    # both classifiers, where one name for both would retrain each over the other at every switch.
    source_key = hashlib.sha256(real["source"].encode()).hexdigest()[:8]
    path = cache_dir / f"classifier_{domain}_seed{seed}_{source_key}.pt"
    model = Classifier()
    info = None
    if path.is_file() and not retrain:
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            if ck.get("version") == CACHE_VERSION and ck.get("source") == real["source"]:
                model.load_state_dict(ck["state_dict"])
                info = dict(heldout_accuracy=float(ck["heldout_accuracy"]),
                            heldout_features=ck["heldout_features"].double(),
                            train_features=ck.get("train_features"),
                            train_seconds=float(ck["train_seconds"]), cached=True)
            elif verbose:
                print(f"  cached classifier {path} is stale; retraining", file=sys.stderr)
        except Exception as e:
            if verbose:
                print(f"  could not read {path} ({type(e).__name__}); retraining", file=sys.stderr)
    if info is None:
        if verbose:
            print(f"  training the {domain} classifier on {len(real['train_x'])} images "
                  f"(once; cached in {path})", file=sys.stderr)
        t0 = time.time()
        model = train_classifier(real["train_x"], real["train_y"], domain, seed, verbose)
        train_seconds = time.time() - t0
        logits, feats = run_classifier(model, real["held_x"])
        acc = (logits.argmax(1) == real["held_y"]).float().mean().item()
        info = dict(heldout_accuracy=acc, heldout_features=feats.double(), train_features=None,
                    train_seconds=train_seconds, cached=False)
        if verbose:
            print(f"  held-out accuracy {acc:.4f} after {train_seconds:.0f}s", file=sys.stderr)
    if info["train_features"] is None:
        # Features of the whole classifier-training split, for drawing the FD floor cheaply.
        info["train_features"] = run_classifier(model, real["train_x"])[1]
        write_then_rename(path, lambda tmp: torch.save(
            dict(version=CACHE_VERSION, source=real["source"], state_dict=model.state_dict(),
                 heldout_accuracy=info["heldout_accuracy"], heldout_features=info["heldout_features"].float(),
                 train_features=info["train_features"].float(), train_seconds=info["train_seconds"]), tmp))
    model.eval()
    info.update(real)
    return model, info


# ----------------------------------------------------------------------------- Frechet distance

def _sqrtm_psd(mat):
    """Square root of a symmetric positive semi-definite matrix via eigh (negative eigs -> 0)."""
    vals, vecs = torch.linalg.eigh((mat + mat.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance_from_stats(mu1, s1, mu2, s2):
    """Frechet distance between Gaussians N(mu1, S1) and N(mu2, S2):

        FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

    Tr((S1 S2)^{1/2}) is computed as Tr((sqrt(S1) S2 sqrt(S1))^{1/2}): the two matrices are
    similar (same eigenvalues), and the second is symmetric PSD, so eigvalsh is stable and
    rounding noise (tiny negative eigenvalues) is clipped to 0. Works for singular S1, S2
    (fewer samples than feature dimensions)."""
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, s1, s2))
    root1 = _sqrtm_psd(s1)
    m = root1 @ s2 @ root1
    eig = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
    tr_covmean = eig.sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return max(float(fd), 0.0)


def feature_stats(feats):
    """Mean and (unbiased) covariance of features (N, D)."""
    feats = feats.double()
    mu = feats.mean(0)
    centered = feats - mu
    cov = centered.T @ centered / max(len(feats) - 1, 1)
    return mu, cov


def frechet_distance(feats1, feats2):
    """Frechet distance between the Gaussian fits of two feature sets (N1, D) and (N2, D)."""
    return frechet_distance_from_stats(*feature_stats(feats1), *feature_stats(feats2))


# ----------------------------------------------------------------------------- scoring

def label_traces(feats, labels):
    """{label: tr(cov) of that label's features}, the total variance of each label (labels with under 2 left out)."""
    return {int(c): float(feats[labels == c].double().var(0).sum()) for c in labels.unique().tolist()
            if (labels == c).sum() > 1}


def within_label_spread(feats, labels, ref_traces):
    """How varied each label's samples are against real images of that label: tr(cov) of the label's
    features over the reference's (ref_traces, from label_traces), per label ({label: ratio}; labels with
    under 2 samples, or none or no spread in the reference, are left out). 1: as varied as real images;
    below 1: too alike (guidance narrows each label); above 1: too scattered (samples of other labels, or
    broken ones). FD mixes this with how far the means lie apart; this says which way the spread is off."""
    return {c: round(trace / ref_traces[c], 3) for c, trace in label_traces(feats, labels).items() if ref_traces.get(c)}


def mean_spread(ratios):
    return round(sum(ratios.values()) / len(ratios), 3) if ratios else None


def check_labels_covered(labels, real_labels):
    """Every label the samples hold needs real images of it to score them against (an empty label folder in
    --mnist-folder, say, has none)."""
    missing = sorted(set(labels.tolist()) - set(real_labels.tolist()))
    if missing:
        raise DataError(f"the samples hold label {missing[0]} but the real images have none of it (to score them "
                        f"against): give real images of every label the samples hold")


def _draw_like(labels, pool_labels, generator):
    """Indices into the pool with the same label counts as `labels` (without replacement when
    the pool has enough of a label, with replacement otherwise). Returns (idx, replaced)."""
    idx, replaced = [], False
    for c in labels.unique().tolist():
        need = int((labels == c).sum())
        have = (pool_labels == c).nonzero().squeeze(1)
        if len(have) >= need:
            pick = have[torch.randperm(len(have), generator=generator)[:need]]
        else:
            pick = have[torch.randint(len(have), (need,), generator=generator)]
            replaced = True
        idx.append(pick)
    return torch.cat(idx), replaced


def score(images_uint8, labels, domain="mnist", data_root=None, mnist_folder=None, cache_dir=None,
          seed=0, classifier=None, verbose=False):
    """Score samples. images_uint8: uint8 (N,1,28,28) white-on-black; labels: int64 (N,) the
    requested classes. classifier: optional (model, info) from load_classifier, to avoid
    reloading when scoring several sets. Returns a dict with n, accuracy, per_label,
    fd, fd_floor, fd_ratio, classifier_heldout_accuracy, domain (+ a few extras)."""
    validate_samples(images_uint8, labels)
    if classifier is None:
        classifier = load_classifier(domain, data_root, mnist_folder, cache_dir, seed,
                                     verbose=verbose, labels=labels)
    model, info = classifier
    check_labels_covered(labels, info["train_y"])
    n = len(images_uint8)
    logits, feats = run_classifier(model, images_uint8)
    pred = logits.argmax(1)
    hit = (pred == labels).float()
    per_label = {int(c): round(hit[labels == c].mean().item(), 4) for c in labels.unique().tolist()}

    held = info["heldout_features"]
    mu_h, s_h = feature_stats(held)
    fd = frechet_distance_from_stats(*feature_stats(feats), mu_h, s_h)
    held_traces = label_traces(held, info["held_y"])
    spread = within_label_spread(feats, labels, held_traces)

    # Floor: N real images (same label mix) from the classifier-training split vs the same
    # held-out reference, averaged over a few seeded draws.
    g = torch.Generator().manual_seed(seed + 12345)
    floors, floor_spreads, replaced = [], [], False
    for _ in range(FLOOR_DRAWS):
        idx, rep = _draw_like(labels, info["train_y"], g)
        replaced |= rep
        f_real = info["train_features"][idx]
        floors.append(frechet_distance_from_stats(*feature_stats(f_real), mu_h, s_h))
        if spread:   # (the draws hold the samples' labels, so they have a spread wherever the samples do)
            floor_spreads.append(mean_spread(within_label_spread(f_real, info["train_y"][idx], held_traces)))
    floors_t = torch.tensor(floors)
    fd_floor = floors_t.mean().item()
    return dict(
        n=n,
        accuracy=round(hit.mean().item(), 4),
        per_label=per_label,
        fd=round(fd, 4),
        fd_floor=round(fd_floor, 4),
        fd_ratio=round(fd / fd_floor, 3) if fd_floor > 0 else None,
        spread=mean_spread(spread),
        spread_per_label=spread,
        spread_floor=round(sum(floor_spreads) / FLOOR_DRAWS, 3) if spread else None,
        classifier_heldout_accuracy=round(info["heldout_accuracy"], 4),
        domain=domain,
        fd_floor_std=round(floors_t.std().item(), 4),
        fd_reference_n=len(held),
        floor_with_replacement=replaced,
        data_source=info["source"],
    )


def format_report(r):
    lines = [
        f"domain {r['domain']}: {r['n']} samples   (real data: {r['data_source']})",
        f"classifier held-out accuracy {r['classifier_heldout_accuracy']:.2%}  (ceiling for the accuracy below)",
        f"accuracy (classified as the requested label): {r['accuracy']:.2%}",
        "  per label: " + "  ".join(f"{k}:{v:.0%}" for k, v in sorted(r["per_label"].items())),
        f"FD   samples vs {r['fd_reference_n']} held-out real:           {r['fd']:.3f}",
        f"floor {r['n']} real train-split images (same labels) vs the same held-out set: "
        f"{r['fd_floor']:.3f} +- {r['fd_floor_std']:.3f} (mean of {FLOOR_DRAWS} draws)",
        f"FD / floor: {r['fd_ratio'] if r['fd_ratio'] is None else format(r['fd_ratio'], '.2f')}"
        "   (about 1 = as good as real data; lower FD is better)",
    ]
    if r["spread"] is not None:
        lines += [f"spread within each label, samples / held-out real: {r['spread']:.2f} (real train-split images: "
                  f"{r['spread_floor']:.2f}; below 1 = too alike, above = too scattered)",
                  "  per label: " + "  ".join(f"{k}:{v:.2f}" for k, v in sorted(r["spread_per_label"].items()))]
    if r["floor_with_replacement"]:
        lines.append("note: some labels had fewer real images than samples; the floor drew them "
                     "with replacement (repeats make the floor a bit higher, the ratio a bit flattering)")
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: ...`, exit code 2 (like every other wrong input here)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def whole(lo, hi):
    """An argparse type: an integer in lo..hi (nan, inf and anything else refused)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in {lo}..{hi}, got {text or repr(text)}")
        return value
    return parse


def writable_folder(text):
    """An argparse type: a folder to write into, made later if missing; refused (one line) when it, or the
    nearest part of its path that exists, is a file or cannot be written to (tried with a file made and removed
    at once, as config.check_output_path does). The bench scripts share it for their folder flags."""
    path = os.path.abspath(text)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".tmp-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write into {path}: {e.strerror}") from None
    return text


def second_reader_main(p, argv, read, format_table, seeds=(0,)):
    """The command line that bench/outsider.py and bench/strict_reader.py share, after their own flags: the
    samples file, --seeds, --cache-dir, --threads and --json; then read(images, labels, args) -> one row per
    seed, printed as format_table(rows) or one JSON line each. A UsageError or DataError is one line, exit 2."""
    p.add_argument("samples", help="torch.save'd dict {'images': uint8 (N,1,28,28), 'labels': int64 (N,)}")
    p.add_argument("--seeds", type=lambda s: [whole(0, 2**31 - 1)(v) for v in s.split(",")], default=list(seeds),
                   help=f"classifier seeds, comma-separated (default {','.join(map(str, seeds))})")
    p.add_argument("--cache-dir", type=writable_folder, default=DEFAULT_CACHE_DIR, help=f"default {DEFAULT_CACHE_DIR}")
    p.add_argument("--threads", type=whole(1, 1024), default=1, help="torch threads, in 1..1024 (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON line per seed instead of the table")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        rows = read(*load_samples(a.samples), a)
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(json.dumps(r) for r in rows) if a.json else format_table(rows))
    return 0


def cached_reader(prefix, x, y, seed, cache_dir, build, train, what, salt=""):
    """A second reader (bench/outsider.py's, bench/strict_reader.py's), trained once per images, labels, seed and
    salt and cached in cache_dir as PREFIX_<hash>_seedN.pt: build() makes the untrained network to load into,
    train() the trained one. Returned in eval mode."""
    key = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes() + salt.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{prefix}_{key}_seed{seed}.pt"
    if path.is_file():
        model = build()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        print(f"  training the {what} (once; cached in {path})", file=sys.stderr)
        model = train()
        write_then_rename(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return model.eval()


def names(known):
    """An argparse type: comma-separated names, each one of `known` (at least one); a list, each name once."""
    def parse(text):
        chosen = [n for n in text.split(",") if n]
        unknown = [n for n in chosen if n not in known]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"{'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
                                             f"choose from {', '.join(known)}")
        return list(dict.fromkeys(chosen))
    return parse


def main(argv=None):
    p = OneLineParser(description="Score generated 28x28 samples with an independent "
                      "classifier: label accuracy and Frechet distance vs real data.")
    p.add_argument("samples", nargs="?", help="torch.save'd dict {'images': uint8 (N,1,28,28), 'labels': int64 (N,)}")
    p.add_argument("--domain", choices=DOMAINS, default="mnist")
    p.add_argument("--data-root", default=None, help=f"default {DEFAULT_DATA_ROOT} (../shared/data)")
    p.add_argument("--mnist-folder", default=None, help="ImageFolder of MNIST PNGs "
                   "(default <data-root>/mnist-t10k)")
    p.add_argument("--cache-dir", type=writable_folder, default=None, help=f"default {DEFAULT_CACHE_DIR}")
    p.add_argument("--seed", type=whole(0, 2**31 - 1), default=0, help="in 0..2**31-1 (default 0)")
    p.add_argument("--threads", type=whole(1, 1024), default=1, help="torch threads, in 1..1024 (default 1)")
    p.add_argument("--retrain", action="store_true", help="ignore a cached classifier")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the report")
    p.add_argument("--export-train-split", metavar="DIR", help="instead of scoring: write the digits the "
                   "classifier trains on (MNIST) as a new folder of PNGs, to train a generator on with "
                   "train.py --data DIR (then the held-out digits are new to it too)")
    a = p.parse_args(argv)
    if (a.samples is None) == (a.export_train_split is None):
        p.error("give a samples file to score, or --export-train-split DIR (not both)")
    if a.export_train_split is not None and a.domain != "mnist":
        p.error("--export-train-split is for --domain mnist (Fashion-MNIST's own train split is the one to use)")
    if a.mnist_folder is not None and a.domain != "mnist":
        p.error("--mnist-folder is for --domain mnist (Fashion-MNIST is read from --data-root)")
    for flag, out in (("--export-train-split", a.export_train_split), ("--cache-dir", a.cache_dir)):
        inside = [f for f in data_folders(a.data_root, a.mnist_folder)
                  if out is not None and f.is_dir() and Path(os.path.realpath(out)).is_relative_to(f)]
        if inside:              # (files written among the digits would be read as digits, or change their key)
            p.error(f"{flag} {out} is inside {inside[0]}, data this command reads; choose a folder outside it")
    torch.set_num_threads(a.threads)
    try:
        if a.export_train_split is not None:
            n, source = export_train_split(a.export_train_split, a.data_root, a.mnist_folder, a.cache_dir, a.seed)
            print(f"wrote {n} digits to {a.export_train_split} ({source}); train on them with "
                  f"train.py --data {a.export_train_split}")
            return 0
        images, labels = load_samples(a.samples)
        clf = load_classifier(a.domain, a.data_root, a.mnist_folder, a.cache_dir, a.seed,
                              retrain=a.retrain, verbose=True, labels=labels)
        r = score(images, labels, a.domain, seed=a.seed, classifier=clf)
    except (UsageError, DataError) as e:        # bad input either way: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r) if a.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
