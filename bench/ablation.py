"""Which training and sampling changes pay on OUR model? Trains each variant with train.py, samples the
same 1,000 digits (same seed) from each, and scores them with bench/evaluate.py.

    python bench/ablation.py --data ../shared/data/mnist-t10k              # every row (trains 17 models)
    python bench/ablation.py --data ../shared/data/mnist-t10k --jobs 2     # two trainings at a time, 1 thread each
    python bench/ablation.py --data ../shared/data/mnist-t10k --only default,adamw   # just these runs' rows

A run whose folder (bench/.ablation/NAME) already holds a finished model.pt and train.json is reused, so
an interrupted ablation continues where it stopped. train.json records the command and its wall-clock
time (with --jobs 2 each training shares the 2 cores with another: its time is not a quiet run's).

Rows: the new defaults (two training seeds), the previous default (2,400 steps; two seeds), the default before
it (2,400 steps with the noise levels drawn uniformly; two seeds) and a larger share of them drawn where the
loss weight is (two seeds), the default before that (AdamW for 3,000 steps, guidance 1; two seeds), the one
before that (min-SNR gamma 5, guidance 1.25; two seeds) with each of its training changes switched off alone,
each sampling change switched off alone on the default model, and the old defaults (eps-prediction and the
plain MSE of the blog, the Transformer block in every conv block, 3,400 steps of batch 128 with AdamW, DDIM-25
with guidance 1.5 at every step).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.evaluate import DataError, UsageError, load_classifier, names, score, writable_folder  # noqa: E402
from bench.knobs import Variant, sample  # noqa: E402
from config import Parser, UserError, claim_folder, number, run_main  # noqa: E402
from unet import load_model  # noqa: E402

# training variants: run name -> train.py flags on top of the defaults. The rows that switch one older change
# off were trained on an earlier default (2,400 steps; t drawn uniformly; AdamW for 3,000 steps; min-SNR gamma
# 5, sampled at w 1.25) and are compared with it.
STEPS_2400 = ["--max-steps", "2400"]
T_UNIFORM = ["--t-importance", "0"]
UNIFORM = [*STEPS_2400, *T_UNIFORM]
SHARE_08 = [*STEPS_2400, "--t-importance", "0.8"]
ADAMW = [*T_UNIFORM, "--optimizer", "adamw", "--max-steps", "3000"]
GAMMA_5 = [*ADAMW, "--min-snr-gamma", "5"]
TRAININGS = {
    "default": [],
    "default-seed1": ["--seed", "1"],
    "steps-2400": STEPS_2400,
    "steps-2400-seed1": [*STEPS_2400, "--seed", "1"],
    "uniform": UNIFORM,
    "uniform-seed1": [*UNIFORM, "--seed", "1"],
    "t-importance-0.8": SHARE_08,
    "t-importance-0.8-seed1": [*SHARE_08, "--seed", "1"],
    "adamw": ADAMW,
    "adamw-seed1": [*ADAMW, "--seed", "1"],
    "min-snr-5": GAMMA_5,
    "min-snr-5-seed1": [*GAMMA_5, "--seed", "1"],
    "no-min-snr": [*ADAMW, "--min-snr-gamma", "0"],
    "eps-prediction": [*GAMMA_5, "--prediction", "eps"],
    "attention-everywhere": [*GAMMA_5, "--attention-from", "0"],
    "batch-128": [*GAMMA_5, "--batch-size", "128", "--max-steps", "2600"],
    "blog-ddpm": ["--optimizer", "adamw", "--prediction", "eps", "--min-snr-gamma", "0", "--attention-from", "0",
                  "--batch-size", "128", "--max-steps", "3400"],
}
EVERY_STEP = (0, 10 ** 9)                                   # a guidance interval that holds every t
OLD_SAMPLING = Variant(sampler="ddim", steps=25, guidance=1.5, guidance_interval=EVERY_STEP)
# table rows: (change, variant, training run, sampling settings on top of SampleConfig's)
W1 = Variant(guidance=1.0)                                  # the AdamW models' default sampling
PREVIOUS = Variant(guidance=1.25)                           # the gamma-5 default's sampling
ROWS = [
    ("new defaults", "training seed 0", "default", Variant()),
    ("", "training seed 1", "default-seed1", Variant()),
    ("3,200 steps", "off: 2,400 (the previous default)", "steps-2400", Variant()),
    ("", "off, training seed 1", "steps-2400-seed1", Variant()),
    ("half the noise levels where the loss weight is (2,400 steps)", "off: all uniform (the default before)",
     "uniform", Variant()),
    ("", "off, training seed 1", "uniform-seed1", Variant()),
    ("", "0.8 of them", "t-importance-0.8", Variant()),
    ("", "0.8 of them, training seed 1", "t-importance-0.8-seed1", Variant()),
    ("Muon, 2,400 steps, w 0.8 (t uniform)", "off: AdamW, 3,000 steps, w 1 (the default before)", "adamw", W1),
    ("", "off, training seed 1", "adamw-seed1", W1),
    ("", "Muon, 2,400 steps, w 1", "uniform", W1),
    ("min-SNR gamma 1, w 1 (AdamW)", "off: gamma 5, w 1.25 (the default before that)", "min-snr-5", PREVIOUS),
    ("", "off, training seed 1", "min-snr-5-seed1", PREVIOUS),
    ("", "gamma 5, w 1", "min-snr-5", W1),
    ("", "gamma 1, w 1.25", "adamw", PREVIOUS),
    ("min-SNR loss weighting", "off (gamma 0), w 1", "no-min-snr", W1),
    ("", "off (gamma 0), w 1.25", "no-min-snr", PREVIOUS),
    ("batch 64, 3,000 steps", "off: batch 128, 2,600 steps (gamma 5, w 1.25)", "batch-128", PREVIOUS),
    ("v-prediction", "off: eps-prediction (gamma 5, w 1.25)", "eps-prediction", PREVIOUS),
    ("no Transformer block at 14x14", "off: in every block, the blog's (gamma 5, w 1.25)", "attention-everywhere",
     PREVIOUS),
    ("guidance interval", "off: the same w at every step", "default", Variant(guidance_interval=EVERY_STEP)),
    ("guidance weight", "w 0.6", "default", Variant(guidance=0.6)),
    ("", "w 0.9", "default", Variant(guidance=0.9)),
    ("DDIM with 12 steps", "off: 20 steps", "default", Variant(steps=20)),
    ("", "seed 1 model, 20 steps", "default-seed1", Variant(steps=20)),
    ("sampler", "DPM-Solver++(2M), 15 steps", "default", Variant(sampler="dpm++", steps=15)),
    ("old defaults", "eps, plain MSE, attention everywhere, 3,400 steps of 128 (AdamW); w 1.5 at every step",
     "blog-ddpm", OLD_SAMPLING),
]


def train(name, flags, args):
    """Train one variant into runs_dir/name unless it is already there; returns its train.json."""
    folder = Path(args.runs_dir) / name
    record = folder / "train.json"
    if record.is_file():
        try:
            return json.loads(record.read_text())
        except ValueError:                   # (not JSON): not what train() writes
            raise UserError(f"{record} is not a record this bench wrote; remove {folder} to train {name} again") from None
    claim_folder(folder, f"--runs-dir's {name}", ".ablation-run")   # train.py --overwrite replaces files there
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", args.data, "--out", str(folder / "model.pt"),
           "--out-dir", str(folder), "--overwrite", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1") if args.jobs > 1 else None
    print(f"training {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.time()
    with open(folder / "log.txt", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise UserError(f"training {name} failed (exit {done.returncode}); see {folder / 'log.txt'}")
    info = {"command": " ".join(["python", *cmd[1:]]), "seconds": round(time.time() - start, 1), "jobs": args.jobs}
    record.write_text(json.dumps(info))
    return info




def main():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mnist", help="passed to train.py (default: %(default)s)")
    parser.add_argument("--runs-dir", type=writable_folder, default=str(ROOT / "bench" / ".ablation"),
                        help="where the runs go")
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="trainings at a time")
    parser.add_argument("--per-label", type=number(int, "[1, 10000]"), default=100, help="samples per digit and row")
    parser.add_argument("--seed", type=number(int, "[0, 1e9]"), default=0, help="sampling seed, the same for every row")
    parser.add_argument("--only", type=names(TRAININGS), default=None,
                        help="comma-separated run names: train only these and print only their rows")
    args = parser.parse_args()
    needed = args.only or list(dict.fromkeys(run for _, _, run, _ in ROWS))
    with ThreadPoolExecutor(args.jobs) as pool:
        trained = dict(zip(needed, pool.map(lambda n: train(n, TRAININGS[n], args), needed)))
    try:
        classifier = load_classifier("mnist")
    except (UsageError, DataError) as e:
        raise UserError(f"evaluator: {e}") from None
    labels = torch.arange(10).repeat_interleave(args.per_label)
    print(f"{len(labels)} digits per row, sampling seed {args.seed}; classifier held-out accuracy "
          f"{classifier[1]['heldout_accuracy']:.1%}\n")
    print("| change | variant | accuracy | weakest digit | FD / floor | train s (jobs) | sampling s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    change, shown = "", ""
    for change_or_blank, name, run, variant in ROWS:
        change = change_or_blank or change                   # (a blank change continues the one above it)
        if run not in trained:
            continue
        model, _ = load_model(Path(args.runs_dir) / run / "model.pt")
        images, seconds = sample(model, variant, labels, args.seed, torch.device("cpu"))
        r = score(images, labels, classifier=classifier)
        label, worst = min(r["per_label"].items(), key=lambda kv: kv[1])
        print(f"| {'' if change == shown else change} | {name} | {r['accuracy']:.1%} | {label}: {worst:.0%} | "
              f"{r['fd_ratio']:.2f} | "
              f"{trained[run]['seconds']:.0f} ({trained[run]['jobs']}) | {seconds:.1f} |", flush=True)
        shown = change


if __name__ == "__main__":
    run_main(main)
