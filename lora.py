"""LoRA: fine-tune a frozen model through small low-rank updates (blog part 11; Hu et al. 2021).

A frozen linear layer y = W x gets a trainable detour through rank r (Hu et al. 2021, eq. 3, with x as a row):

    y = W x + (x A B) * alpha / r        A (in, r) random,  B (r, out) zeros

so at the start the model is unchanged (B = 0) and only r * (in + out) numbers per layer train.
After training, the detour can be folded into W (merge_lora): W' = W + (A B)^T alpha / r, and the
model runs exactly as fast as before. (Our forward computes the same sum in that folded form, (W + dW) x,
which is faster for layers as small as ours; LoraLayer.forward says why.)

    python lora.py                                  # injects LoRA into a fresh UNet and prints what trains
    python lora.py --inspect lora.pt --base model.pt    # how big each layer's update is
"""
import copy
import hashlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from config import LIMITS, FinetuneConfig, ModelConfig, Parser, UserError, load_file, run_main, within
from unet import ConvBlock, UNet, check_finite, count_parameters, load_model


class LoraLayer(nn.Module):
    """Wraps a frozen nn.Linear `base` (W: in -> out) and adds the trainable detour x A B, times alpha / r."""
    FACTORS = ("lora_a", "lora_b")         # the trainable tensors, in the order product() takes them
    A_RANK_DIM, B_RANK_DIM = 1, 0          # which axis of lora_a / lora_b is r (apply_lora_files stacks along it)

    def __init__(self, base, r=FinetuneConfig.lora_rank, alpha=FinetuneConfig.lora_alpha):
        super().__init__()
        if r < 1:
            raise UserError(f"LoRA rank must be >= 1, got {r}")
        self.base, self.r, self.alpha = base, r, alpha
        for name, factor in zip(self.FACTORS, self.new_factors(base, r)):
            setattr(self, name, factor)    # self.lora_a, self.lora_b (and LoraConv2d's lora_m)
        self.scale = 1.0                   # set_lora_scale: 0 = base model only, 1 = adapter as trained
        self.merged = False                # True while delta_weight() is folded into base.weight
        self.unmerged_weight = None        # the original base.weight while merged (to undo exactly)

    def new_factors(self, base, r):
        a = nn.Parameter(torch.empty(base.in_features, r))           # A (in, r)
        b = nn.Parameter(torch.zeros(r, base.out_features))          # B (r, out): zero, so y = W x at first
        # Kaiming-uniform with fan_in = in_features, as nn.Linear initialises its own weight. (The blog's
        # listing calls kaiming_uniform_ on the (in, r) tensor, whose fan_in is then r.)
        nn.init.kaiming_uniform_(a.T, a=math.sqrt(5))
        return a, b

    def forward(self, x):                  # x (.., in) -> (.., out)
        if self.merged or self.scale == 0:  # merged: base.weight already holds W + dW
            return self.base(x)
        # W x + (x A B) alpha/r, computed as (W + dW) x: the same sum (a product distributes over +). The blog's
        # listing computes the detour beside W x, as written; for a layer of thousands of features that is the
        # cheap way, but ours have 32-256 and see every pixel of a batch, so two thin products and a sum over all
        # of them cost about what W x costs, and W + dW is one small matrix (README, "LoRA": a tenth to a fifth
        # less time a fine-tuning step). Gradients reach only A and B (W is frozen); merging stores this W + dW.
        return self.base_op(x, self.adapted_weight())

    def base_op(self, x, weight):
        """What the base layer computes, with another weight: here W x + bias."""
        return F.linear(x, weight, self.base.bias)

    @staticmethod
    def product(a, b):
        """(A B)^T: the update's shape is base.weight's (out, in)."""
        return (a @ b).T

    def delta_weight(self):
        """The update LoRA adds to base.weight: dW = (A B)^T alpha / r * scale, in fp32 even under autocast
        (bf16 would round it before it is added to W, and forward and merge would no longer agree)."""
        with torch.autocast(self.lora_b.device.type, enabled=False):
            return self.product(*(getattr(self, name) for name in self.FACTORS)) * (self.alpha / self.r * self.scale)

    def adapted_weight(self):
        """W + dW: what forward multiplies with, and what merge stores in base.weight."""
        return self.base.weight + self.delta_weight()

    @torch.no_grad()
    def merge(self):
        """W' = W + dW, the weight forward multiplies with, so the merged layer computes exactly what the
        unmerged one did, at any precision. Keeps W itself to undo: W + dW - dW is not always W again in
        floating point, a copy is."""
        weight = self.base.weight
        self.unmerged_weight = weight.detach().clone()
        weight.copy_(self.adapted_weight())
        self.merged = True


def inject_lora(model, targets=FinetuneConfig.lora_targets, r=FinetuneConfig.lora_rank,
                alpha=FinetuneConfig.lora_alpha):
    """Wrap every layer that one of `targets` covers (see TARGETS) in a LoRA layer; returns their full
    names. (The blog's inject_lora takes one layer at a time and handles nn.Linear only.)"""
    ranks = target_ranks(targets, r)                 # {target: its rank}, r unless it says NAME:RANK
    covered = {name: target_of(model, name, m, ranks) for name, m in model.named_modules()}
    names = [name for name, target in covered.items() if target in ranks]
    if not names:
        raise UserError(f"no layer of this model is covered by {', '.join(targets) or 'no targets'}")
    for name in names:
        rank = ranks[covered[name]]
        wrap_layer(model, name, rank, alpha * rank / r)   # alpha / r: the same scale for every target
    return names


def is_lora_tensor(name):
    """LoRA's own tensors are named lora_*: lora_a, lora_b (and a conv's lora_m)."""
    return name.rsplit(".", 1)[-1].startswith("lora_")


def mark_only_lora_trainable(model):
    """requires_grad = True for LoRA's A and B, False for everything else. (The blog's listing has it
    inverted: it freezes A and B and trains the base.)"""
    for name, p in model.named_parameters():
        p.requires_grad = is_lora_tensor(name)
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(model):
    """Only the LoRA tensors, e.g. {'down.0.transformer.attn.Wq.lora_a': ..., ...}."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_lora_tensor(k)}


def merge_lora(model):
    """Fold every LoRA layer into its base weight: W' = W + (A B)^T alpha / r * scale, the weight its forward
    multiplied with, so the merged model computes exactly what the unmerged one did. The
    LoRA layers stay in place, marked merged (they then just call base), so that unmerge_lora can undo
    it; merging twice is refused. (The blog's listing loops `for name, layer in model`, which crashes.)"""
    layers = lora_layers(model)
    if any(m.merged for m in layers.values()):
        raise UserError("LoRA is already merged into the weights; merging again would add it twice "
                        "(unmerge_lora first)")
    for m in layers.values():
        m.merge()
    return list(layers)


# ----------------------------------------------------------------------------- beyond the blog: conv layers, more
# targets, LoRA+, strict loading, scale, unmerging, LoRA files, several adapters at once, the script

# The names --lora-targets understands: the attention projections Wq, Wk, Wv, Wo; "ff", the two nn.Linear of
# each Transformer block's feed-forward (ff.0, ff.2); "conv", every nn.Conv2d of a ConvBlock (conv1, conv2, skip);
# "context", the label embedding (LabelContext.embed: what each label's tokens say); "time", the nn.Linear of each
# ConvBlock that turns the time embedding into one bias per channel (ConvBlock.time: how a block reacts to each
# noise level); "outer", the convs of the first level's blocks (down.0, up.0: the 14x14 ones, which draw the finest
# detail), taken from "conv" where both are named. NAME:RANK gives a target its own rank (e.g. conv:4,outer:8); its
# alpha follows, so that alpha / r is the same for every target.
TARGETS = ("Wq", "Wk", "Wv", "Wo", "ff", "conv", "outer", "context", "time")


class LoraConv2d(LoraLayer):
    """Wraps a frozen nn.Conv2d `base` (k x k, in -> out) and adds a small bottleneck beside it:
    y = base(x) + B(M(A(x))) alpha / r, with A a 1x1 conv in -> r, M a k x k conv r -> r (base's stride and
    padding) and B a 1x1 conv r -> out starting at zero. 1x1, k x k, 1x1 convs in a row are one k x k conv,
    so it merges like LoraLayer (and forward computes it as one conv with W + dW):
    dW[o, i] = sum B[o, r] M[r, s] A[s, i] (a Tucker-2 decomposition of dW,
    as LyCORIS's LoCon offers for convs). r (in + out) + r^2 k^2 numbers train, where a k x k A would take
    r (in k^2 + out): at r = 4 a 64 -> 64 conv trains 656 numbers, about what a k x k A takes at r = 1 (640)."""
    FACTORS = ("lora_a", "lora_m", "lora_b")
    A_RANK_DIM, B_RANK_DIM = 0, 1

    def new_factors(self, base, r):
        if base.groups != 1 or base.padding_mode != "zeros":
            raise UserError("LoraConv2d handles plain convolutions only (groups=1, zero padding)")
        a = nn.Parameter(torch.empty(r, base.in_channels, 1, 1))                   # A (r, in, 1, 1)
        m = nn.Parameter(torch.empty(r, r, *base.kernel_size))                     # M (r, r, k, k)
        b = nn.Parameter(torch.zeros(base.out_channels, r, 1, 1))                  # B (out, r, 1, 1)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))   # fan_in = in (A) and r k k (M), as nn.Conv2d does
        nn.init.kaiming_uniform_(m, a=math.sqrt(5))
        return a, m, b

    def base_op(self, x, weight):          # x (B, in, H, W) -> (B, out, H', W'), with weight W + dW
        base = self.base
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation)

    @staticmethod
    def product(a, m, b):
        """dW[o, i] = sum_rs B[o, r] M[r, s] A[s, i]: (out, in, k, k), base.weight's shape. (A zero pad
        of x is a zero pad of A x, so padding M's input is padding the input.)"""
        return torch.einsum("or,rskl,si->oikl", b[:, :, 0, 0], m, a[:, :, 0, 0])


class LoraEmbedding(LoraLayer):
    """Wraps a frozen nn.Embedding `base` (num rows of dim): row i gets A[i] B alpha / r, A (num, r) random,
    B (r, dim) zeros: an embedding is a linear layer applied to one-hot rows, so this is LoraLayer on those
    rows (as loralib's Embedding). r (num + dim) numbers train."""

    def new_factors(self, base, r):
        a = nn.Parameter(torch.randn(base.num_embeddings, r))            # A (num, r)
        b = nn.Parameter(torch.zeros(r, base.embedding_dim))             # B (r, dim): zero, so unchanged at first
        return a, b

    def base_op(self, x, weight):          # x (..) indices -> (.., dim): rows of W + dW
        return F.embedding(x, weight)

    @staticmethod
    def product(a, b):
        """A B: (num, dim), base.weight's shape (an embedding stores rows, a linear layer columns)."""
        return a @ b


def lora_plus_groups(model, lr, b_lr_ratio):
    """The optimizer's parameter groups for LoRA+ (Hayou et al. 2024): B at b_lr_ratio x lr, A (and a conv's
    core M) at lr. B starts at zero and A random, so with one lr the update A B grows mostly through B's
    small steps; LoRA+ shows that a B lr well above A's (they suggest 16) learns faster and better."""
    tensors = {name: p for name, p in model.named_parameters() if is_lora_tensor(name)}
    b = [p for name, p in tensors.items() if name.endswith(".lora_b")]
    rest = [p for name, p in tensors.items() if not name.endswith(".lora_b")]
    return [{"params": rest, "lr": lr}, {"params": b, "lr": lr * b_lr_ratio}]


def lora_layers(model):
    """{full name: layer} of every LoRA layer in the model, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def check_lora_targets(targets):
    target_ranks(targets, 1)


def target_ranks(targets, r):
    """--lora-targets items, NAME or NAME:RANK, as {name: rank}; r where no rank is given."""
    ranks, unknown = {}, []
    for item in targets:
        name, colon, rank = item.partition(":")
        # isdecimal, not isdigit: '²' is a digit that int() refuses
        ranked = rank.isdecimal() and within(LIMITS["lora_rank"], int(rank))
        if name not in TARGETS or name in ranks or (colon and not ranked):
            unknown.append(item)                    # (a name given twice would leave its rank ambiguous)
        ranks[name] = int(rank) if rank.isdecimal() else r
    if unknown or not targets:
        raise UserError(f"unknown or repeated LoRA target {', '.join(map(repr, unknown)) or '(none given)'}; valid: "
                        f"{', '.join(TARGETS)}, each optionally with :RANK in {LIMITS['lora_rank']} (e.g. conv:2)")
    return ranks


def target_of(model, name, module, named):
    """The --lora-targets name that covers this layer, or None; a conv of an outer block is "outer" if `named`
    holds it, else "conv"."""
    parts = name.split(".")
    in_block = isinstance(model.get_submodule(".".join(parts[:-1])), ConvBlock)   # a ConvBlock's own layer
    if type(module) is nn.Linear:
        if parts[-1] in ("Wq", "Wk", "Wv", "Wo"):
            return parts[-1]
        if len(parts) > 1 and parts[-2] == "ff":                 # ff.0 and ff.2 inside a TransformerBlock
            return "ff"
        if in_block and parts[-1] == "time":
            return "time"
    if type(module) is nn.Conv2d and in_block:
        return "outer" if parts[0] in ("down", "up") and parts[1] == "0" and "outer" in named else "conv"
    if type(module) is nn.Embedding:
        return "context"
    return None


def wrap_layer(model, name, r, alpha):
    """Replace the layer `name` by a LoRA layer around it: LoraLayer for nn.Linear, LoraConv2d for nn.Conv2d,
    LoraEmbedding for nn.Embedding."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    base = getattr(parent, child)
    kinds = {nn.Linear: LoraLayer, nn.Conv2d: LoraConv2d, nn.Embedding: LoraEmbedding}
    if type(base) not in kinds:
        raise UserError(f"cannot put LoRA on {name}: it is a {type(base).__name__} "
                        "(already adapted, or not a linear/conv layer)")
    layer = kinds[type(base)](base, r, alpha).to(base.weight.device)
    setattr(parent, child, layer)
    return layer


def load_lora_state_dict(model, state):
    """Strict load: every LoRA tensor of the model must be in `state` with the right shape, and
    nothing else may be. (The blog's listing wraps its load in try/except: pass, hiding any mismatch.)"""
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


def set_lora_scale(model, scale):
    """How much of the adapters to use: 0 = the base model exactly, 1 = as trained, in between = a blend
    (dW is linear in scale), above 1 = exaggerated."""
    if not scale >= 0:
        raise UserError(f"LoRA scale must be >= 0, got {scale}")
    for name, m in lora_layers(model).items():
        if m.merged:
            raise UserError(f"{name} is merged; unmerge_lora before changing the scale")
        m.scale = scale


def unmerge_lora(model):
    """Undo merge_lora: every base weight is again exactly what it was before merging."""
    layers = {name: m for name, m in lora_layers(model).items() if m.merged}
    if not layers:
        raise UserError("no merged LoRA layer to unmerge")
    with torch.no_grad():
        for m in layers.values():                    # W' -> W: the copy kept by merge()
            m.base.weight.copy_(m.unmerged_weight)
            m.unmerged_weight, m.merged = None, False
    return list(layers)


def unwrap_lora(model):
    """After merge_lora: replace each LoRA layer by its (merged) base layer. The model is then a plain
    UNet again, as fast as the original, but the merge can no longer be undone."""
    layers = lora_layers(model)
    if not all(m.merged for m in layers.values()):
        raise UserError("merge_lora before unwrap_lora (an unmerged adapter would be lost)")
    for name, m in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.base)
    return list(layers)


def fingerprint(model):
    """A short hash of a model's weights, stored in LoRA files to recognise the base they were made for.
    LoRA tensors are skipped and a LoRA layer's 'X.base.weight' counts as 'X.weight', so an injected
    (unmerged) model has its base's fingerprint; a merged one has not: its weights changed."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if is_lora_tensor(name):
            continue
        h.update(name.replace(".base.", ".").encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes() if tensor.dtype != torch.bfloat16
                 else tensor.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def lora_file_dict(model, names, r, alpha, targets, base_fingerprint, extra=None):
    """What lora_finetune.py saves: the LoRA tensors and what is needed to apply them safely."""
    return {"kind": "lora", "rank": r, "alpha": alpha, "targets": list(targets), "layers": names,
            "base_fingerprint": base_fingerprint, "lora": lora_state_dict(model), **(extra or {})}


def check_base_fingerprint(f, path, base_print, base_name="this checkpoint"):
    """Refuse a LoRA file (or --full checkpoint) `f` made on another base model than the one at hand."""
    if f.get("base_fingerprint") != base_print:
        raise UserError(f"{path} was trained on another base model than {base_name}, or on its other weights "
                        f"(--weights ema or raw) (fingerprint {f.get('base_fingerprint')}, this base is {base_print})")


def load_lora_file(path):
    """load_file(path, "lora"), refusing a rank, alpha or tensors that no adapter could have."""
    f = load_file(path, "lora")
    if type(f["rank"]) is not int or not within(LIMITS["lora_rank"], f["rank"]) \
            or not within(LIMITS["lora_alpha"], f["alpha"]) or not isinstance(f["lora"], dict):
        raise UserError(f"{path} holds rank {f['rank']!r} and alpha {f['alpha']!r}: not an adapter lora_finetune.py "
                        f"writes (rank in {LIMITS['lora_rank']}, alpha in {LIMITS['lora_alpha']})")
    if not all(isinstance(f[key], (list, tuple)) and all(isinstance(n, str) for n in f[key])
               for key in ("layers", "targets")):
        raise UserError(f"{path} lists its layers or targets in a form lora_finetune.py does not write")
    check_lora_targets(f["targets"])
    check_finite(f["lora"], path)
    return f


def apply_lora_file(model, path):
    """Check that the LoRA file at `path` was made for this base model, inject LoRA with the file's
    rank, alpha and targets, and load its weights. Returns the file's dict."""
    f = load_lora_file(path)
    check_base_fingerprint(f, path, fingerprint(model))
    names = inject_lora(model, tuple(f["targets"]), f["rank"], f["alpha"])
    if names != list(f["layers"]):
        raise UserError(f"{path} adapts other layers than its targets {f['targets']} cover in this model")
    load_lora_state_dict(model, f["lora"])
    return f


def apply_lora_files(model, adapters):
    """Load several adapters at once, adapters = [(path, weight), ...]; returns the files' dicts.

    Each layer gets ONE LoRA branch whose rank is the sum of the adapters' ranks, because a sum of
    low-rank updates is a low-rank update with the factors stacked along r:

        sum_i w_i (A_i B_i)^T alpha_i / r_i  =  ([A_1 ... A_n] [c_1 B_1; ...; c_n B_n])^T,  c_i = w_i alpha_i / r_i

    so the combined layer has alpha = r (alpha / r = 1), and scale, merge_lora and unmerge_lora work
    for it exactly as for one adapter. (A conv stacks A's output channels and B's input channels, and
    puts the cores M on the diagonal of its core.)"""
    probes, files = [], []
    for path, weight in adapters:           # every check of apply_lora_file, on a throwaway copy
        probe = copy.deepcopy(model)
        files.append(apply_lora_file(probe, path))
        probes.append((lora_layers(probe), weight))
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    names = sorted({name for layers, _ in probes for name in layers}, key=position.get)
    for name in names:
        parts = [(layers[name], w) for layers, w in probes if name in layers]
        r = sum(m.r for m, _ in parts)
        layer = wrap_layer(model, name, r, alpha=float(r))
        with torch.no_grad():
            layer.lora_a.copy_(torch.cat([m.lora_a for m, _ in parts], dim=layer.A_RANK_DIM))
            layer.lora_b.copy_(torch.cat([m.lora_b * (w * m.alpha / m.r) for m, w in parts], dim=layer.B_RANK_DIM))
            if isinstance(layer, LoraConv2d):   # the cores M block-diagonally: each mixes only its own r channels
                layer.lora_m.zero_()
                start = 0
                for m, _ in parts:
                    layer.lora_m[start:start + m.r, start:start + m.r] = m.lora_m
                    start += m.r
    return files


def inspect(path, base_path=None, weights="ema"):
    """Print, per adapted layer in model order, ||dW||_F of its update dW = (A B)^T alpha / r (and
    relative to ||W||_F of the base layer with --base), then the totals."""
    f = load_lora_file(path)
    base = load_model(base_path, weights)[0] if base_path else None
    if base is not None:
        check_base_fingerprint(f, path, fingerprint(base), f"{base_path} ({weights} weights)")
    deltas = {}                                              # every layer's dW, before printing any
    for layer in f["layers"]:
        a = f["lora"].get(f"{layer}.lora_a")
        is_conv = a is not None and a.dim() == 4
        kind = LoraConv2d if is_conv else LoraEmbedding if layer.endswith(".embed") else LoraLayer
        missing = [name for name in kind.FACTORS if f"{layer}.{name}" not in f["lora"]]
        if missing:    # e.g. a conv adapter saved before LoraConv2d had its core lora_m
            raise UserError(f"{path} has no {layer}.{missing[0]}: not a LoRA file of this version of lora.py")
        factors = (f["lora"][f"{layer}.{name}"].float() for name in kind.FACTORS)
        try:
            deltas[layer] = kind.product(*factors) * (f["alpha"] / f["rank"])    # alpha / r: the same for every target
        except RuntimeError:                     # (apply_lora_file checks the shapes against a model; here, each other)
            raise UserError(f"{path}: the tensors of {layer} do not fit each other (a damaged file)") from None
    print(f"{path}: rank {f['rank']}, alpha {f['alpha']}, targets {','.join(f['targets'])}, "
          f"{len(f['layers'])} layers")
    print(f"{'layer':40s} {'dW shape':>18s} {'||dW||':>9s}" + (f" {'||W||':>9s} {'||dW||/||W||':>13s}" if base else ""))
    total_sq = 0.0
    for layer, delta in deltas.items():
        norm = delta.norm().item()                           # Frobenius: sqrt(sum of squares)
        total_sq += norm ** 2
        line = f"{layer:40s} {str(tuple(delta.shape)):>18s} {norm:9.4f}"
        if base is not None:
            w = base.get_submodule(layer).weight.float().norm().item()
            line += f" {w:9.4f} {100 * norm / w:12.3f}%"
        print(line)
    n = sum(t.numel() for t in f["lora"].values())
    print(f"total: {len(f['layers'])} layers, {n:,d} LoRA parameters, ||dW|| over all layers "
          f"{math.sqrt(total_sq):.4f}, file {os.path.getsize(path) / 1024:.1f} KiB")


def demo():
    tc = FinetuneConfig()
    model = UNet(ModelConfig())
    x = torch.randn(4, 1, 28, 28)
    t, labels = torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    before = model(x, t, labels)
    names = inject_lora(model, tc.lora_targets, tc.lora_rank, tc.lora_alpha)
    trainable = mark_only_lora_trainable(model)
    print(f"LoRA (r={tc.lora_rank}, alpha={tc.lora_alpha}) injected into {len(names)} layers, e.g. {names[0]}")
    print(f"trainable {sum(p.numel() for p in trainable):,d} of {count_parameters(model):,d} parameters")
    print(f"fresh LoRA changes the output by {(model(x, t, labels) - before).abs().max():.1e} (B = 0)")
    print(f"--lora-targets can name any of {', '.join(TARGETS)} (see TARGETS in lora.py)")


def main():
    parser = Parser(description="Without flags: a small LoRA demo on a fresh UNet. "
                    "With --inspect: the size of each layer's update in a LoRA file.")
    parser.add_argument("--inspect", metavar="FILE", help="LoRA file written by lora_finetune.py")
    parser.add_argument("--base", default=None, help="base checkpoint, to show ||dW|| relative to ||W||")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which base weights (with --base)")
    args = parser.parse_args()
    if args.weights != "ema" and not args.base:
        raise UserError("--weights chooses which weights of --base to read: give --base too")
    if args.inspect is not None:
        inspect(args.inspect, args.base, args.weights)
    elif args.base:
        raise UserError("--base goes with --inspect FILE")
    else:
        demo()


if __name__ == "__main__":
    run_main(main)
