"""The Fashion-MNIST LoRA demo, measured: LoRA with several targets and ranks against full fine-tuning.

    python bench/lora_fashion.py --base model.pt                  # the README's table (~40 min on 2 cores)
    python bench/lora_fashion.py --base model.pt --runs base,full,default
    python bench/lora_fashion.py --base model.pt --runs default,full --classifier-seeds 0,1,2   # 3 classifiers
    python bench/lora_fashion.py --base model.pt --runs default,full --strict-seeds 0   # + the strict reader
    python bench/lora_fashion.py --base model.pt --quick          # smoke test (numbers not meaningful)

Every run starts from the same digit model (--base) and trains on Fashion-MNIST with the same steps,
batch, learning-rate schedule and seed, through the project's own commands, one after the other:

    python lora_finetune.py --data fashion-mnist --max-steps N [--full | --lora-targets T --lora-rank R ...]
    python denoise.py [--lora FILE | --checkpoint FULL.pt] --per-label 100 --save-samples S.pt
    python bench/evaluate.py S.pt --domain fashion

and reports: trainable parameters, the size of the file that fine-tuning wrote (the adapter for LoRA,
a model checkpoint for --full) next to the base checkpoint's, the fine-tuning command's wall time and
peak memory (the child's max RSS), its training time per step, and the evaluator's accuracy and
FD / floor, with the accuracy as a share of full fine-tuning's. "base" is the digit model itself, sampled
with Fashion labels (the "before"). With --classifier-seeds 0,1,2 every run's samples are also scored by the
evaluator's classifiers of those seeds (bench/evaluate.py --seed N: trained from other random starts on the
same images), and a second table gives each one's accuracy and share of full fine-tuning's: an adapter
chosen with one classifier can read worse under another. With --strict-seeds 0 they are also read by
bench/strict_reader.py (a deeper classifier that learned from Fashion-MNIST's test split, which no fine-tuning
sees), in a table of its own: it reads an adapter's speckled clothing worse than the evaluator's classifiers
do (README, "A stricter reader"). Then it writes two figures into --figures:
lora_fashion.png (same seed: base | each LoRA run | full) and lora_compare.png (denoise.py --compare
at the default precision for the most accurate LoRA run: base | LoRA | merged).

Runs go one at a time: on a 2-core machine anything running beside them changes the times.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.evaluate import names, writable_folder  # noqa: E402
from config import LIMITS, FinetuneConfig, Parser, UserError, claim_folder, number, numbers, run_main  # noqa: E402

# name: lora_finetune.py flags (beyond the shared ones in fine_tune). The blog's targets first, then what
# each of the default's three choices buys: LoRA+ (B's lr 16 x A's), rank 4 on the convs' bottleneck, and the
# time-embedding layers; and outer-r8, a candidate not yet the default (README, "Digits to clothing").
RUNS = {
    "base": None,                                            # no fine-tuning: the digit model as it is
    "full": ["--full"],                                      # every weight, at full fine-tuning's lr 3e-3
    "qkv-r4": ["--lora-targets", "Wq,Wk,Wv", "--lora-rank", "4", "--lora-alpha", "4"],   # the blog's targets
    "one-lr": ["--lora-b-lr-ratio", "1", "--lr", "1e-2"],   # the default targets, one lr for A and B (plain LoRA)
    "conv-r1": ["--lora-targets", "Wq,Wk,Wv,Wo,ff,conv,context:4,time"],   # rank 1 on the convs too
    "no-time": ["--lora-targets", "Wq,Wk,Wv,Wo,ff,conv:4,context:4"],   # the time-embedding layers left out
    "outer-r8": ["--lora-targets", "Wq,Wk,Wv,Wo,ff,conv:4,outer:8,context:4,time"],   # rank 8 on the 14x14 convs
    "default": [],                                           # Wq..ff and time at rank 1, conv:4, context:4, LoRA+
    "default-seed1": ["--seed", "1"],                        # the same, fine-tuned from seed 1 (sampled with --seed)
}


def log(message):
    print(message, file=sys.stderr, flush=True)


def run_child(cmd, log_path):
    """Run cmd in the repo root with its output in log_path, after the command itself; returns (wall seconds,
    peak RSS MiB). A failure is one line: the child's last line and the log's name."""
    start = time.perf_counter()
    with open(log_path, "w") as out:
        print(" ".join(map(str, cmd)), file=out, flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)            # this child's own resource usage
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode:
        last = Path(log_path).read_text().strip().splitlines()[-1].removeprefix("error: ")
        raise UserError(f"{cmd[1]} failed (exit {proc.returncode}: {last}); see {log_path}")
    return seconds, usage.ru_maxrss / 1024                   # Linux reports KiB


def fine_tune(name, flags, args, work):
    """lora_finetune.py for one run; returns its row of figures and the file it wrote."""
    out = work / f"{name}.pt"
    cmd = [sys.executable, "lora_finetune.py", "--base", args.base, "--data", "fashion-mnist",
           "--data-root", args.data_root, "--out", str(out), "--out-dir", str(work / name), "--overwrite",
           "--max-steps", str(args.steps), "--seed", str(args.seed), *flags]
    log(f"{name}: fine-tuning ({' '.join(flags)})")
    wall, rss = run_child(cmd, work / f"{name}.finetune.log")
    text = (work / f"{name}.finetune.log").read_text()
    trained = re.search(r"training ([\d,]+) of ([\d,]+) parameters", text)
    per_step = re.search(r"\(([\d.]+) s/step\)", text)
    return out, dict(trainable=int(trained.group(1).replace(",", "")), total=int(trained.group(2).replace(",", "")),
                     file_bytes=out.stat().st_size, wall_s=wall, peak_rss_mib=rss,
                     s_per_step=float(per_step.group(1)))


def sample_and_score(name, weights, args, work, per_label):
    """denoise.py with the run's weights, then bench/evaluate.py --domain fashion with each of --classifier-seeds
    and bench/strict_reader.py with each of --strict-seeds; returns ({"classifier" or "strict": {seed: its
    JSON}}, the samples file)."""
    samples = work / f"{name}.samples.pt"
    cmd = [sys.executable, "denoise.py", "--per-label", str(per_label), "--seed", str(args.seed),
           "--out-dir", str(work / name / "denoise"), "--save-samples", str(samples), "--overwrite", *weights]
    run_child(cmd, work / f"{name}.denoise.log")
    readers = {"classifier": (args.classifier_seeds, ["bench/evaluate.py", "--domain", "fashion", "--seed"]),
               "strict": (args.strict_seeds, ["bench/strict_reader.py", "--seeds"])}
    scores = {}
    for reader, (seeds, script) in readers.items():
        scores[reader] = {}
        for seed in seeds:
            log_path = work / f"{name}.{Path(script[0]).stem}-seed{seed}.log"
            run_child([sys.executable, *script, str(seed), str(samples), "--data-root", args.data_root, "--json"],
                      log_path)
            scores[reader][seed] = json.loads(log_path.read_text().strip().splitlines()[-1])
    return scores, samples


def markdown(rows, base_bytes, args):
    full = next((r for r in rows if r["name"] == "full"), None)
    out = [f"Fashion-MNIST from the digit model {args.base}: {args.steps} steps, batch {FinetuneConfig.batch_size}, "
           f"seed {args.seed}; {args.per_label} samples per label scored by bench/evaluate.py --domain fashion "
           f"--seed {args.classifier_seeds[0]}.", "",
           "| run | lora_finetune.py flags | trains (of the base's) | file (vs base) | s/step | wall | peak RSS | accuracy "
           "| of full's | FD / floor |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = f"{100 * r['accuracy'] / full['accuracy']:.0f}%" if full and r["name"] != "full" else "-"
        if "trainable" in r:
            base_params = r["total"] - (0 if "--full" in r["flags"] else r["trainable"])   # without LoRA's own
            trained = f"{r['trainable']:,d} ({100 * r['trainable'] / base_params:.1f}%)"
            size = f"{r['file_bytes'] / 1024:.0f} KiB ({100 * r['file_bytes'] / base_bytes:.1f}%)"
            timing = f"{r['s_per_step']:.3f} | {r['wall_s']:.0f} s | {r['peak_rss_mib']:.0f} MiB"
        else:
            trained, size, timing = "-", f"{base_bytes / 1024:.0f} KiB (the base)", "- | - | -"
        flags = "(not fine-tuned)" if r["flags"] is None else f"`{' '.join(r['flags']) or '(defaults)'}`"
        out.append(f"| {r['name']} | {flags} | {trained} | {size} | {timing} | "
                   f"{100 * r['accuracy']:.1f}% | {share} | {r['fd_ratio']:.1f}x |")
    if len(args.classifier_seeds) > 1:
        out += share_table(rows, full, "classifier", args.classifier_seeds,
                           "the evaluator's classifier of each seed (bench/evaluate.py --seed N)")
    if args.strict_seeds:
        out += share_table(rows, full, "strict", args.strict_seeds,
                           "the strict reader of each seed (bench/strict_reader.py --seeds N)")
    return "\n".join(out)


def share_table(rows, full, reader, seeds, what):
    """A table of each run's accuracy under every seed of one reader, with its share of full fine-tuning's."""
    out = ["", f"Accuracy (and of full's) under {what}:", "",
           "| run | " + " | ".join(f"{reader} {s}" for s in seeds) + " | of full's, mean |",
           "|---|" + "---:|" * (len(seeds) + 1)]
    for r in rows:
        accuracies = [r[reader][s] for s in seeds]
        if full and r["name"] != "full":
            shares = [a / full[reader][s] for a, s in zip(accuracies, seeds)]
            cells = [f"{100 * a:.1f}% ({100 * q:.0f}%)" for a, q in zip(accuracies, shares)]
            mean = f"{100 * sum(shares) / len(shares):.1f}%"
        else:
            cells, mean = [f"{100 * a:.1f}%" for a in accuracies], "-"
        out.append(f"| {r['name']} | " + " | ".join(cells) + f" | {mean} |")
    return out


def save_figures(rows, samples, lora_files, args, work):
    """lora_fashion.png: the first 6 samples of each label for every run (same seed); lora_compare.png:
    denoise.py --compare with the most accurate LoRA run."""
    from figures import save_grid
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    panels = {}
    for r in sorted(rows, key=lambda r: {"base": 0, "full": 2}.get(r["name"], 1)):     # base, LoRA runs, full
        s = torch.load(samples[r["name"]], weights_only=True)
        keep = torch.cat([torch.nonzero(s["labels"] == k)[:6, 0] for k in range(10)])
        panels[f"{r['name']}: {100 * r['accuracy']:.0f}%"] = s["images"][keep]
    save_grid(panels, str(figures / "lora_fashion.png"), nrow=6)
    if lora_files:
        best = max((r for r in rows if r["name"] in lora_files), key=lambda r: r["accuracy"])["name"]
        path = lora_files[best]
        run_child([sys.executable, "denoise.py", "--checkpoint", args.base, "--lora", str(path), "--compare",
                   "--per-label", "4", "--seed", str(args.seed),
                   "--out-dir", str(work / "compare")], work / "compare.log")
        os.replace(work / "compare" / "compare.png", figures / "lora_compare.png")
        log((work / "compare.log").read_text().strip().splitlines()[-2])
    log(f"figures in {figures}")


def main():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="model.pt", help="digit model from train.py (read only)")
    parser.add_argument("--data-root", default="../shared/data", help="where FashionMNIST/ is")
    parser.add_argument("--runs", type=names(RUNS), default=",".join(RUNS), help=f"which of {', '.join(RUNS)}")
    parser.add_argument("--steps", type=number(int, LIMITS["max_steps"]), default=None,
                        help=f"fine-tuning steps of every run (default {FinetuneConfig.max_steps}, 3 with --quick)")
    parser.add_argument("--per-label", type=number(int, "[1, 1e5]"), default=None,
                        help="samples per label to score (default 100, 2 with --quick)")
    parser.add_argument("--seed", type=number(int, LIMITS["seed"]), default=0)
    parser.add_argument("--classifier-seeds", type=numbers(int, "[0, 2147483647]"), default=(0,),
                        help="score with the evaluator's classifier of each of these seeds (e.g. 0,1,2; the first "
                        "fills the main table)")
    parser.add_argument("--strict-seeds", type=numbers(int, "[0, 2147483647]"), default=(),
                        help="also score with bench/strict_reader.py of each of these seeds (e.g. 0; trained once, "
                        "about 7 minutes on one core, then cached)")
    # The bench owns --work: a run again in the same folder redoes every file there (its children are given
    # --overwrite), as a user who runs a benchmark again expects, rather than mixing old files with new ones;
    # a folder that holds files the bench did not write is refused (main).
    parser.add_argument("--work", type=writable_folder, default="bench/.lora_fashion",
                        help="folder for the runs' files and logs, new or empty (a run again replaces them)")
    parser.add_argument("--figures", type=writable_folder, default="bench/figures", help="where the two figures go")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 3 steps, 2 samples per label, unless --steps or --per-label says otherwise")
    args = parser.parse_args()
    if not os.path.isfile(args.base):
        raise UserError(f"--base {args.base}: " + ("is a folder, not a model file" if os.path.isdir(args.base)
                                                   else "not found (train one with python train.py)"))
    if not args.classifier_seeds or len(set(args.classifier_seeds)) < len(args.classifier_seeds):
        raise UserError(f"--classifier-seeds: give each seed once, e.g. 0,1,2 (got {args.classifier_seeds or 'none'})")
    if len(set(args.strict_seeds)) < len(args.strict_seeds):
        raise UserError(f"--strict-seeds: give each seed once, e.g. 0,1 (got {args.strict_seeds})")
    if args.steps is None:                    # (an explicit --steps or --per-label wins over --quick's)
        args.steps = 3 if args.quick else FinetuneConfig.max_steps
    if args.per_label is None:
        args.per_label = 2 if args.quick else 100
    args.base = os.path.abspath(args.base)
    work = Path(claim_folder(args.work, "--work", ".lora_fashion-work"))     # its children replace files there
    rows, samples, lora_files = [], {}, {}
    for name in args.runs:
        flags = RUNS[name]
        row = {"name": name, "flags": flags}
        weights = ["--checkpoint", args.base]
        if flags is not None:
            out, figures = fine_tune(name, flags, args, work)
            row.update(figures)
            if "--full" in flags:
                weights = ["--checkpoint", str(out)]
            else:
                weights += ["--lora", str(out)]
                lora_files[name] = out
        scores, samples[name] = sample_and_score(name, weights, args, work, args.per_label)
        first = scores["classifier"][args.classifier_seeds[0]]
        row.update(accuracy=first["accuracy"], fd_ratio=first["fd_ratio"],
                   **{reader: {s: score["accuracy"] for s, score in by_seed.items()} for reader, by_seed in scores.items()})
        rows.append(row)
        log(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'flags'})}")
    print(markdown(rows, os.path.getsize(args.base), args))
    save_figures(rows, samples, lora_files, args, work)


if __name__ == "__main__":
    run_main(main)
