"""A stricter reader of generated clothing: a deeper classifier that learned from images no fine-tuning saw.

    python bench/strict_reader.py SAMPLES.pt                  # reader seed 0, one table
    python bench/strict_reader.py SAMPLES.pt --seeds 0,1 --json

bench/evaluate.py --domain fashion reads clothing with a small network (three convolutions and a 128-d layer)
after two passes over Fashion-MNIST's 60,000 training images, the very images `lora_finetune.py --data
fashion-mnist` learns from. It reads about 91% of real held-out clothing right, and it forgives what a stronger
network does not: the speckled texture that an adapter leaves on its clothing and full fine-tuning smooths away
(README, "Digits to clothing"). This reader is built otherwise: five 3x3 convolutions in three stages, global
average pooling, horizontal flips besides shifts, 20 passes. It learns only from the 10,000 images of
Fashion-MNIST's test split, which no fine-tuning here trains on, and its ceiling is how it reads the first 10,000
training images. It is trained once per seed (about 7 minutes on one core) and cached in --cache-dir. Like
bench/evaluate.py (the one file it imports), it imports nothing from the project.
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import (DEFAULT_CACHE_DIR, OneLineParser, cached_reader, check_labels_covered,  # noqa: E402
                      fit_classifier, load_real, run_classifier, second_reader_main)

EPOCHS = 20
CEILING_IMAGES = 10_000                         # the first training images: the reader's real-data ceiling


class StrictReader(nn.Module):
    """28 -> 14 -> 7 in three stages of 3x3 convs (32, 32 | 64, 64 | 128), global average pooling, 10 logits."""

    def __init__(self, num_classes=10):
        super().__init__()

        def convs(*widths):
            layers = []
            for cin, cout in zip(widths, widths[1:]):
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            return layers

        self.body = nn.Sequential(*convs(1, 32, 32), nn.MaxPool2d(2), *convs(32, 64, 64), nn.MaxPool2d(2),
                                  *convs(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, num_classes))

    def forward(self, x):
        """x: float images in [-1, 1], (B,1,28,28). Returns (logits, features), as evaluate.Classifier does."""
        features = self.body(x)
        return self.head(features), features


def train_reader(x, y, seed, epochs=EPOCHS):
    """evaluate.py's training loop with this reader's own settings: more weight decay, a higher peak learning
    rate, and half of each batch flipped left-right."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return fit_classifier(StrictReader(), x, y, g, epochs, weight_decay=5e-4, max_lr=4e-3, flip=True,
                          name="strict reader")


def load_reader(real, seed, cache_dir, epochs=EPOCHS):
    """The reader of this seed, trained on real["held_x"] (Fashion-MNIST's test split) on first use and cached by
    the images' hash, the seed and the epochs."""
    x, y = real["held_x"], real["held_y"]
    return cached_reader("strict_reader", x, y, seed, cache_dir, StrictReader, lambda: train_reader(x, y, seed, epochs),
                         f"strict reader on {len(x):,d} images", salt=f"{epochs}")


def score(images, labels, real, seed, cache_dir=DEFAULT_CACHE_DIR, epochs=EPOCHS):
    """One seed's reading: accuracy (overall and per label asked for) and the ceiling on real training images."""
    check_labels_covered(labels, real["held_y"])
    reader = load_reader(real, seed, cache_dir, epochs)
    read = lambda x: run_classifier(reader, x)[0].argmax(1)   # noqa: E731
    hit = (read(images) == labels).float()
    ceiling = (read(real["train_x"][:CEILING_IMAGES]) == real["train_y"][:CEILING_IMAGES]).float().mean().item()
    return dict(seed=seed, n=len(images), ceiling=ceiling, accuracy=hit.mean().item(),
                per_label={int(c): hit[labels == c].mean().item() for c in labels.unique()})


def format_table(rows):
    lines = [f"{rows[0]['n']} samples read by the strict reader (ceiling: how it reads real training images)",
             "seed  ceiling  accuracy  weakest"]
    for r in rows:
        weak = min(r["per_label"], key=r["per_label"].get)
        lines.append(f"{r['seed']:4d}  {r['ceiling']:7.2%}  {r['accuracy']:8.2%}  {weak}: {r['per_label'][weak]:4.0%}")
    mean = lambda key: sum(r[key] for r in rows) / len(rows)   # noqa: E731
    lines.append(f"mean  {mean('ceiling'):7.2%}  {mean('accuracy'):8.2%}")
    return "\n".join(lines)


def main(argv=None):
    p = OneLineParser(description="Score generated Fashion-MNIST items with a deeper classifier trained on "
                      "Fashion-MNIST's test split, which no fine-tuning here learns from.")
    p.add_argument("--data-root", default=None, help="as bench/evaluate.py: where FashionMNIST/raw is")

    def read(images, labels, a):
        real = load_real("fashion", a.data_root)
        return [score(images, labels, real, s, a.cache_dir) for s in a.seeds]
    return second_reader_main(p, argv, read, format_table)


if __name__ == "__main__":
    sys.exit(main())
