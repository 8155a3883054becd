"""LoRA: fine-tune a frozen model through small low-rank updates (blog part 11).

A frozen linear layer y = W x gets a trainable detour through rank r:

    y = W x + (x A B) * alpha / r        A (in, r) random,  B (r, out) zeros

so at the start the model is unchanged (B = 0) and only r * (in + out) numbers per layer train.
After training, the detour can be folded into W (merge_lora): W' = W + (A B)^T alpha / r, and the
model runs exactly as fast as before.

    python lora.py          # injects LoRA into a fresh UNet and prints what trains
"""
import hashlib
import math

import torch
from torch import nn

from config import UserError, load_file


class LoraLayer(nn.Module):
    """Wraps a frozen nn.Linear `base`; output = base(x) + (x @ A @ B) * alpha / r * scale."""

    def __init__(self, base: nn.Linear, r, alpha):
        super().__init__()
        if r < 1:
            raise UserError(f"LoRA rank must be >= 1, got {r}")
        self.base, self.r, self.alpha = base, r, alpha
        self.scale = 1.0                                     # 0 = base model only, 1 = adapter as trained
        self.lora_a = nn.Parameter(torch.empty(base.in_features, r))
        self.lora_b = nn.Parameter(torch.zeros(r, base.out_features))
        # Kaiming-uniform with fan_in = in_features, as nn.Linear initialises its own weight. (The
        # tutorial called kaiming_uniform_ on the (in, r) tensor, whose fan_in is then r.)
        nn.init.kaiming_uniform_(self.lora_a.T, a=math.sqrt(5))

    def delta_weight(self):
        """The update LoRA adds to base.weight (out, in): (A B)^T * alpha / r * scale."""
        return (self.lora_a @ self.lora_b).T * (self.alpha / self.r * self.scale)

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a @ self.lora_b) * (self.alpha / self.r * self.scale)


def inject_lora(model, targets=("Wq", "Wk", "Wv"), r=4, alpha=4.0):
    """Replace every nn.Linear whose own name is in `targets` by a LoraLayer wrapping it.
    Returns the replaced layers' full names. (The tutorial's inject_lora took one layer at a time.)"""
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.split(".")[-1] in targets]
    if not names:
        raise UserError(f"no nn.Linear layer is named {', '.join(targets)}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoraLayer(getattr(parent, child), r, alpha))
    return names


def mark_only_lora_trainable(model):
    """requires_grad = True for LoRA's A and B, False for everything else. (The tutorial had it inverted.)"""
    for name, p in model.named_parameters():
        p.requires_grad = name.split(".")[-1] in ("lora_a", "lora_b")
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(model):
    """Only the LoRA tensors, e.g. {'down.0.transformer.attn.Wq.lora_a': ..., ...}."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.split(".")[-1] in ("lora_a", "lora_b")}


def load_lora_state_dict(model, state):
    """Strict load: every LoRA tensor of the model must be in `state` with the right shape, and
    nothing else may be. (The tutorial wrapped its load in try/except: pass, hiding any mismatch.)"""
    own = lora_state_dict(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    for problem, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" (+{len(keys) - 2} more)" if len(keys) > 2 else ""
            raise UserError(f"LoRA weights do not fit this model: {problem}: {', '.join(keys[:2])}{more}")
    model.load_state_dict(state, strict=False)


def merge_lora(model):
    """Fold every LoraLayer into a plain nn.Linear with W' = W + (A B)^T alpha / r (computed in fp32).
    (The tutorial looped `for name, layer in model`, which crashes.)"""
    merged = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name in merged:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = getattr(parent, child)
        with torch.no_grad():
            weight = lora.base.weight.float() + lora.delta_weight().float()
            lora.base.weight.copy_(weight.to(lora.base.weight.dtype))
        setattr(parent, child, lora.base)
    return merged


def fingerprint(model):
    """A short hash of a model's weights, stored in LoRA files to recognise the base they were made for."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.split(".")[-1] in ("lora_a", "lora_b"):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes() if tensor.dtype != torch.bfloat16
                 else tensor.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def lora_file_dict(model, names, r, alpha, targets, base_fingerprint, extra=None):
    """What lora_finetune.py saves: the LoRA tensors and what is needed to apply them safely."""
    return {"kind": "lora", "rank": r, "alpha": alpha, "targets": list(targets), "layers": names,
            "base_fingerprint": base_fingerprint, "lora": lora_state_dict(model), **(extra or {})}


def apply_lora_file(model, path):
    """Check that the LoRA file at `path` was made for this base model, inject LoRA with the file's
    rank, alpha and targets, and load its weights. Returns the file's dict."""
    f = load_file(path, "lora")
    base = fingerprint(model)
    if f["base_fingerprint"] != base:
        raise UserError(f"{path} was trained on another base model (fingerprint {f['base_fingerprint']}, "
                        f"this checkpoint is {base})")
    inject_lora(model, tuple(f["targets"]), f["rank"], f["alpha"])
    load_lora_state_dict(model, f["lora"])
    return f


if __name__ == "__main__":
    from config import ModelConfig, TrainConfig
    from unet import UNet, count_parameters
    tc = TrainConfig()
    model = UNet(ModelConfig())
    x = torch.randn(4, 1, 28, 28)
    t, labels = torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    before = model(x, t, labels)
    names = inject_lora(model, tc.lora_targets, tc.lora_rank, tc.lora_alpha)
    trainable = mark_only_lora_trainable(model)
    print(f"LoRA (r={tc.lora_rank}, alpha={tc.lora_alpha}) injected into {len(names)} layers, e.g. {names[0]}")
    print(f"trainable {sum(p.numel() for p in trainable):,d} of {count_parameters(model):,d} parameters")
    print(f"fresh LoRA changes the output by {(model(x, t, labels) - before).abs().max():.1e} (B = 0)")
