"""Fine-tune a trained model with LoRA: only the low-rank A, B matrices train (blog part 11).

    python lora_finetune.py --data ../shared/data/mnist-t10k     # reads model.pt, writes lora.pt
    python lora_finetune.py --lora-targets Wq,Wk,Wv,Wo,ff,conv     # adapt more than the attention
    python lora_finetune.py --full --out full.pt                  # for comparison: train ALL weights

The base checkpoint is only read, never written. The LoRA file holds the LoRA tensors, the rank, alpha and
target layers, and a fingerprint of the base weights (so it is refused on another base); while a run is
unfinished, also the optimizer and data position for --resume. --full writes a model checkpoint as train.py does.
"""
import dataclasses
import time

import torch

from config import (FinetuneConfig, UserError, add_config_flags, atomic_save, check_new_output,
                    config_from_dict, load_file, make_folder, run_main)
from dataset import Batches, data_inputs, load_images
from diffusion import Schedule
from lora import (check_base_fingerprint, check_lora_targets, fingerprint, inject_lora, load_lora_state_dict, lora_file_dict,
                  lora_plus_groups, mark_only_lora_trainable)
from train import (EMA, Progress, adamw, checkpoint_dict, end_distributed, figure_names, finish_run, fit, lr_schedule,
                   rank_0_first, resolve_train_config, restore_training_state, run_parser, setup_distributed, training_state)
from unet import count_parameters, load_model, load_weights


def main():
    """The blog's steps: load the trained base, inject LoRA, train only A and B, save only A and B.
    Beyond it: --full for comparison, --resume, and torchrun's several processes."""
    args = parse_args()                                       # (also checks the files before any work)
    rank, world, device = setup_distributed(args.device)     # torchrun: this is process `rank` of `world`
    is_main = rank == 0                                       # only the main process prints and writes files
    model, _ = load_model(args.base, args.weights, device)
    base_print = fingerprint(model)
    state = load_file(args.out, "model" if args.full else "lora") if args.resume else None
    if state:
        check_base_fingerprint(state, args.out, base_print, args.base)
    with rank_0_first(rank, world):                          # torchrun: one download, not N at once
        images, labels = load_images(args.data, args.data_root, model.cfg.image_size, model.cfg.num_labels)
    saved = config_from_dict(FinetuneConfig, state["train_config"]) if state else None
    tcfg = resolve_train_config(args, finetune_defaults(args.full), len(images), saved, world)
    torch.manual_seed(tcfg.seed)                              # the same in every process: the same LoRA weights
    batches = Batches(images, labels, tcfg.batch_size, tcfg.seed, shard=(rank, world))

    ema = None
    if args.full:          # every weight trains, and an EMA of them is kept as train.py does
        params = list(model.parameters())
        ema = EMA(model, tcfg.ema_decay)
        what = "full fine-tune (every base parameter)"
    else:                  # only the LoRA A and B train
        names = inject_lora(model, tcfg.lora_targets, tcfg.lora_rank, tcfg.lora_alpha)
        params = mark_only_lora_trainable(model)
        what = (f"LoRA r={tcfg.lora_rank} alpha={tcfg.lora_alpha} on {len(names)} layers "
                f"({', '.join(tcfg.lora_targets)}), B's lr {tcfg.lora_b_lr_ratio:g} x A's")
    model.train()
    optimizer = finetune_optimizer(model, params, tcfg, args.full, device)
    scheduler = lr_schedule(optimizer, tcfg.warmup_steps, tcfg.max_steps)
    progress = Progress()
    if state:
        if args.full:
            load_weights(model, state["model"], args.out)
            load_weights(ema, state["ema"], args.out)
        else:
            load_lora_state_dict(model, state["lora"])
        if "optimizer" not in state:
            raise UserError(f"{args.out} is a finished run (step {state['step']} of {tcfg.max_steps}), it keeps no "
                            "training state to continue: --overwrite starts over, or choose another --out")
        progress = restore_training_state(state, optimizer, scheduler, batches, tcfg.max_steps)
        if is_main:
            print(f"resuming {args.out} at step {progress.step}/{tcfg.max_steps}")
    n_train = sum(p.numel() for p in params)
    n_total = count_parameters(model)
    if is_main:
        print(f"{what}: training {n_train:,d} of {n_total:,d} parameters ({100 * n_train / n_total:.2f}%)"
              + (f", {world} processes" if world > 1 else ""))

    def save():
        if args.full:      # a model checkpoint as train.py writes it, plus where it came from
            atomic_save({**checkpoint_dict(model, ema, optimizer, scheduler, batches, progress, tcfg),
                         "base_fingerprint": base_print}, args.out)
        else:
            if progress.step < tcfg.max_steps:    # unfinished: also what --resume needs
                extra = training_state(optimizer, scheduler, batches, progress, tcfg)
            else:                                 # finished: only what sampling needs (finished runs are not resumed)
                extra = {"train_config": dataclasses.asdict(tcfg), "step": progress.step, "losses": progress.losses}
            atomic_save(lora_file_dict(model, names, tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_targets, base_print,
                                       extra), args.out)

    sched = Schedule.from_config(model.cfg)
    t0, first_step = time.time(), progress.step
    reason = fit(model, optimizer, scheduler, sched, batches, tcfg, progress, save, ema, args.time_budget,
                 shard=(rank, world))
    end_distributed(world)                                    # torchrun: wait for rank 0's file, then leave
    if is_main:
        seconds = time.time() - t0
        per_step = seconds / max(1, progress.step - first_step)
        print(f"{reason}: step {progress.step}, {seconds / 60:.1f} min ({per_step:.3f} s/step); saved {args.out}")
    finish_run(reason, ema.module if args.full else model, sched, progress.losses, args.out_dir,
               "full" if args.full else "lora", tcfg.seed, is_main)


def finetune_defaults(full):
    """FinetuneConfig, with full fine-tuning's own lr for --full."""
    return FinetuneConfig(lr=FinetuneConfig.full_lr) if full else FinetuneConfig()


def finetune_optimizer(model, params, tcfg, full, device):
    """AdamW over every weight (--full) or LoRA+'s groups (B at lora_b_lr_ratio x A's lr). No weight decay in
    either mode: it would pull the trained base weights (or A) towards zero."""
    groups = params if full else lora_plus_groups(model, tcfg.lr, tcfg.lora_b_lr_ratio)
    return adamw(groups, tcfg.lr, device, weight_decay=0.0)


# ----------------------------------------------------------------------------- beyond the blog: the command line

def parse_args():
    parser = run_parser(__doc__.split("\n")[0], None, "LoRA file (written atomically); default lora.pt, or full.pt with --full")
    parser.add_argument("--base", default="model.pt", help="base checkpoint written by train.py (read only)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which base weights to adapt")
    parser.add_argument("--full", action="store_true",
                        help=f"fine-tune ALL base parameters instead of LoRA (--lora-* ignored, --lr default "
                        f"{FinetuneConfig.full_lr:g}) and write a model checkpoint like train.py's, for comparison")
    group = parser.add_argument_group("fine-tuning")
    add_config_flags(group, FinetuneConfig(),
                     only=("batch_size", "lr", "warmup_steps", "max_steps", "p_uncond", "seed", "precision",
                           "lora_rank", "lora_alpha", "lora_b_lr_ratio", "lora_targets"),
                     aliases={"lora_rank": "--rank", "lora_alpha": "--alpha", "lora_targets": "--targets"})
    args = parser.parse_args()
    if args.out is None:
        args.out = "full.pt" if args.full else "lora.pt"
    inputs = [("--base", args.base), *data_inputs(args.data, args.data_root)]
    check_new_output(args.out, args.resume, args.overwrite, inputs)
    if args.lora_targets is not None:
        check_lora_targets(args.lora_targets)                 # before loading any data
    make_folder(args.out_dir, figure_names("full" if args.full else "lora"), [("--out", args.out)], inputs)
    return args



if __name__ == "__main__":
    run_main(main)
