"""Does each sampling knob help? Every variant samples the same digits from the same seed, then is
scored by bench/evaluate.py, so the rows differ only in the knob.

    python bench/knobs.py --checkpoint model.pt                 # 50 per label = 500 digits per variant
    python bench/knobs.py --checkpoint model.pt --with-ddpm     # also DDPM-1000 (slow)

The knobs, each against the same baseline (config.SampleConfig, EMA weights: what denoise.py does):
  classifier-free guidance   the default w vs 0 (off)
  EMA weights                EMA vs the raw weights of the last training step
  sampler steps              DDIM with 8 / 10 / 12 / 15 / 20 / 50 steps (and DDPM with all T, --with-ddpm)
  guidance weight            w = 1 / default / 2
(bench/ablation.py trains models too, and compares the training changes; it samples with Variant and sample.)

How to read a row (see bench/evaluate.py): accuracy = share of samples the independent classifier
reads as the label they were asked for (its ceiling is the classifier's held-out accuracy, printed
above the table); FD = Frechet distance between the classifier's features of the samples and of real
held-out digits, lower is better; FD floor = the same distance for as many REAL digits, so FD / floor
near 1 means "as close to the data as real digits are". seconds = sampling time only. Rows that
appear in several groups (the baseline) are sampled once and repeated.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.evaluate import DataError, UsageError, load_classifier, score, writable_folder  # noqa: E402
from config import LIMITS, Parser, SampleConfig, UserError, autocast_dtype, number, pick_device, run_main  # noqa: E402
from diffusion import Schedule, backward_denoise  # noqa: E402
from figures import to_uint8  # noqa: E402
from unet import load_model  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of sampling; the defaults are the baseline (what denoise.py does)."""
    weights: str = "ema"
    sampler: str = SampleConfig.sampler
    steps: int = SampleConfig.steps
    guidance: float = SampleConfig.guidance
    guidance_interval: tuple = SampleConfig.guidance_interval

    def __str__(self):
        lo, hi = self.guidance_interval
        return f"{self.sampler.upper()}-{self.steps}, guidance {self.guidance:g} for t in [{lo}, {hi}], {self.weights} weights"


BASE = Variant()


def knob_groups(T, with_ddpm):
    """[(knob, [(row name, Variant), ...]), ...]: each group compares one knob against the baseline."""
    steps = [(f"DDIM-{n}", Variant(steps=n)) for n in (8, 10, 12, 15, 20, 50) if n <= T]
    if with_ddpm:
        steps.append((f"DDPM-{T}", Variant(sampler="ddpm", steps=T)))
    default = f"guidance {BASE.guidance:g}"
    return [("classifier-free guidance", [("guidance 0 (off)", Variant(guidance=0.0)), (default, BASE)]),
            ("EMA weights", [("raw weights", Variant(weights="raw")), ("EMA weights", BASE)]),
            (f"sampler steps ({default})", steps),
            ("guidance weight w", [(f"guidance {w:g}", Variant(guidance=float(w))) for w in (1, BASE.guidance, 2)])]


def check_bench_model(cfg, steps, path):
    """Refuse (one line, before any work) a model the bench cannot sample as it does: the ten digits 0..9, with
    up to `steps` steps (its rows are fixed step counts, so they are not capped at the model's T)."""
    if cfg.num_labels != 10:
        raise UserError(f"{path} is a model of num_labels={cfg.num_labels}; the bench samples the ten digits 0..9 "
                        "(num_labels=10)")
    if cfg.T < steps:
        raise UserError(f"{path} is a model of T={cfg.T} diffusion steps; the bench samples with up to {steps} "
                        f"steps, so it needs T >= {steps}")


def sample(model, variant, labels, seed, device):
    """Sample one image per label with a fresh generator seeded `seed`, in denoise.py's default precision.
    Returns (uint8 images, seconds)."""
    sched = Schedule.from_config(model.cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    x, _ = backward_denoise(model, sched, labels, variant.sampler, variant.steps, 0.0, variant.guidance,
                            generator=g, guidance_interval=variant.guidance_interval,
                            dtype=autocast_dtype("auto", device))        # the precision denoise.py samples in
    if device.type == "cuda":
        torch.cuda.synchronize()
    return to_uint8(x).cpu(), time.perf_counter() - start


def evaluate_variants(models, variants, labels, seed, classifier, device):
    """{Variant: scores} for each distinct variant, sampled and scored once."""
    results = {}
    for v in dict.fromkeys(variants):
        print(f"sampling {len(labels)} digits: {v}", file=sys.stderr, flush=True)
        images, seconds = sample(models[v.weights], v, labels, seed, device)
        r = score(images, labels.cpu(), classifier=classifier)
        results[v] = dict(accuracy=r["accuracy"], fd=r["fd"], fd_floor=r["fd_floor"], fd_ratio=r["fd_ratio"],
                          seconds=round(seconds, 2))
        print(f"  accuracy {r['accuracy']:.2%}, FD {r['fd']:.2f} ({r['fd_ratio']}x floor), {seconds:.1f} s",
              file=sys.stderr, flush=True)
    return results


def markdown(groups, results, header):
    out = [header, "", "| knob | variant | accuracy | FD | FD floor | FD / floor | sampling s |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for knob, rows in groups:
        for i, (name, v) in enumerate(rows):
            r = results[v]
            out.append(f"| {knob if i == 0 else ''} | {name} | {r['accuracy']:.1%} | {r['fd']:.2f} | "
                       f"{r['fd_floor']:.2f} | {r['fd_ratio'] or float('nan'):.2f} | {r['seconds']:.1f} |")
    return "\n".join(out)


def parse_args():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", default="model.pt", help="model file written by train.py (default: %(default)s)")
    add("--per-label", type=number(int, "[1, 1e5]"), default=50,
        help="samples per digit, per variant, in [1, 1e5] (default: %(default)s)")
    add("--seed", type=number(int, LIMITS["seed"]), default=0,
        help=f"sampling seed, the same for every variant, in {LIMITS['seed']} (default: %(default)s)")
    add("--with-ddpm", action="store_true", help="also sample with DDPM over all T steps (slow)")
    add("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device name (default: auto)")
    add("--threads", type=number(int, "[1, 1024]"), default=None,
        help="torch.set_num_threads, in [1, 1024] (default: torch's own default)")
    add("--data-root", default=None, help="passed to the evaluator (default: ../shared/data)")
    add("--mnist-folder", default=None,
        help="passed to the evaluator: ImageFolder of real MNIST PNGs (default: <data-root>/mnist-t10k)")
    add("--cache-dir", type=writable_folder, default=None, help="passed to the evaluator (default: bench/.cache)")
    add("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    models = {w: load_model(args.checkpoint, w, device)[0] for w in ("ema", "raw")}
    T = models["ema"].cfg.T
    if models["ema"].cfg.image_size != 28 or models["ema"].cfg.in_channels != 1:
        raise UserError("the evaluator scores 28x28 grayscale digits; this checkpoint makes other images")
    check_bench_model(models["ema"].cfg, BASE.steps, args.checkpoint)    # (the baseline's steps: the most)
    groups = knob_groups(T, args.with_ddpm)
    labels = torch.arange(10).repeat_interleave(args.per_label)
    try:            # (score refuses samples of a label the real digits lack, e.g. an empty 9/ in --mnist-folder)
        classifier = load_classifier("mnist", args.data_root, args.mnist_folder, args.cache_dir)
        results = evaluate_variants(models, [v for _, rows in groups for _, v in rows], labels, args.seed,
                                    classifier, device)
    except (UsageError, DataError) as e:
        raise UserError(f"evaluator: {e}") from None
    if args.json:
        rows = [dict(knob=knob, name=name, **dataclasses.asdict(v), **results[v])
                for knob, variants in groups for name, v in variants]
        print(json.dumps({"checkpoint": args.checkpoint, "n": len(labels), "seed": args.seed,
                          "classifier_heldout_accuracy": classifier[1]["heldout_accuracy"], "rows": rows}, indent=1))
    else:
        header = (f"{args.checkpoint}: {len(labels)} digits per variant ({args.per_label} per label), seed "
                  f"{args.seed}, on {device}; classifier held-out accuracy (the ceiling): "
                  f"{classifier[1]['heldout_accuracy']:.1%}")
        print(markdown(groups, results, header))


if __name__ == "__main__":
    run_main(main)
