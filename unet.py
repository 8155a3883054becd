"""A label-conditioned UNet in the style of Stable Diffusion's, sized for a CPU (blog part 9; the series' unet.py).

    x_t (B,1,28,28), t (B,), label (B,)  ->  the noise eps (B,1,28,28) in the blog; v by default here (config.py)

Stable Diffusion's UNet is a diffusion UNet whose conv blocks each carry a Transformer block: the
image features (queries) attend to a sequence of conditioning tokens (keys and values). Here the
conditioning is the digit's label, turned into a short sequence of learned tokens.

    python unet.py        # prints each stage's shape and the parameter counts
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from config import ModelConfig, Parser, UserError, config_from_dict, load_file
from diffusion import Schedule, check_signal_left


def sinusoidal_embedding(t, dim):
    """Transformer position encoding applied to the timestep: t (B,) -> (B, dim).
    emb[2i] = sin(t / 10000^(2i/dim)), emb[2i+1] = cos(t / 10000^(2i/dim))"""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]                         # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)                # (B, dim)


class LabelContext(nn.Module):
    """label (B,) -> context (B, tokens, context_dim), the 'text' the image attends to.

    Departs from the blog's listing, which uses ONE token: softmax over one key is always 1, so Wq and Wk
    got exactly zero gradient (and LoRA on them did nothing). Each label owns `tokens` learned vectors,
    so attention has something to choose between. Index num_labels is a learned "no label" token
    sequence, used to train and sample with classifier-free guidance."""

    def __init__(self, num_labels, tokens, dim):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.embed = nn.Embedding(num_labels + 1, tokens * dim)

    def forward(self, labels):
        return self.embed(labels).view(-1, self.tokens, self.dim)         # (B, tokens, dim)


class CrossAttention(nn.Module):
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V with Q = x Wq, K = ctx Wk, V = ctx Wv."""

    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.Wq = nn.Linear(dim, dim, bias=False)          # the blog's names: LoRA targets these
        self.Wk = nn.Linear(context_dim, dim, bias=False)
        self.Wv = nn.Linear(context_dim, dim, bias=False)
        self.Wo = nn.Linear(dim, dim)                      # output projection back to the residual

    def forward(self, x, ctx):                             # x (B,N,C), ctx (B,M,Cc)
        B, N, C = x.shape
        h = self.heads
        q = self.Wq(x).view(B, N, h, C // h).transpose(1, 2)               # (B,h,N,d)
        k = self.Wk(ctx).view(B, -1, h, C // h).transpose(1, 2)            # (B,h,M,d)
        v = self.Wv(ctx).view(B, -1, h, C // h).transpose(1, 2)            # (B,h,M,d)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(C // h)).softmax(-1)   # (B,h,N,M)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)                  # (B,N,C)
        return self.Wo(out)


class TransformerBlock(nn.Module):
    """x = x + CrossAttn(LN(x), ctx);  x = x + FF(LN(x))   (pre-norm residual blocks)."""

    def __init__(self, dim, context_dim, heads, ff_mult):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, context_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, x, ctx):                             # x (B,C,H,W)
        B, C, H, W = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(B, H * W, C)   # (B, H*W, C): one token per pixel
        tokens = tokens + self.attn(self.norm1(tokens), ctx)
        tokens = tokens + self.ff(self.norm2(tokens))
        return tokens.reshape(B, H, W, C).permute(0, 3, 1, 2)


class GroupNorm32(nn.GroupNorm):
    """nn.GroupNorm on an fp32 copy of x (as OpenAI's guided-diffusion does). Beyond the blog, for speed: under
    CPU autocast GroupNorm otherwise runs on bf16 input, and its channels-last bf16 kernel made a training step
    slower than the whole channels-last gain (UNet.__init__)."""

    def forward(self, x):
        return super().forward(x.float())


class ConvBlock(nn.Module):
    """The blog's ConvBlock, as a residual block: two 3x3 convs with the time embedding added in
    between, then the Transformer block that brings in the label (the Stable Diffusion change of blog part 9)."""

    def __init__(self, cin, cout, cfg, attend=True):
        super().__init__()
        self.norm1 = GroupNorm32(min(8, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(cfg.time_dim, cout)          # time embedding -> one bias per channel
        self.norm2 = GroupNorm32(min(8, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        # attend=False (ours, at 14x14 by default; see UNet) leaves the block a plain residual conv block
        self.transformer = TransformerBlock(cout, cfg.context_dim, cfg.heads, cfg.ff_mult) if attend else None

    def forward(self, x, t_emb, ctx):                      # x (B,cin,H,W) -> (B,cout,H,W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(t_emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        h = self.skip(x) + h
        return h if self.transformer is None else self.transformer(h, ctx)


class UNet(nn.Module):
    """With the default widths (32, 64):

        x_t (1,28,28) -> unshuffle (4,14,14) -> stem (32,14,14) -> down[0] ────────────── skip ─┐
                                  pool (32,7,7) -> down[1] (64,7,7) ── skip ─┐               │
                                                   mid (64,7,7) -> concat -> up[1] (32,7,7)  │
                                                   upsample (32,14,14) -> concat ─> up[0] (32,14,14)
        head (4,14,14) -> shuffle -> v or eps (1,28,28)

    Every down, mid and up block is a ConvBlock; in the blog's UNet each carries its Transformer block
    (cross-attention to the label). Ours leaves it out of the 14x14 blocks (ModelConfig.attention_from,
    as SDXL does at its highest resolution): there it cost a third of a training step, and the label
    still enters at 7x7 and in the middle. The blog's UNet works on 48x48 pixels directly; folding 2x2
    pixels into channels (PixelUnshuffle, a lossless 'latent') makes every layer 4x cheaper at the same width.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        w = cfg.widths
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU(),
                                      nn.Linear(cfg.time_dim, cfg.time_dim))
        self.context = LabelContext(cfg.num_labels, cfg.context_tokens, cfg.context_dim)
        p = cfg.patch
        self.stem = nn.Sequential(nn.PixelUnshuffle(p), nn.Conv2d(cfg.in_channels * p * p, w[0], 3, padding=1))
        attend = [i >= cfg.attention_from for i in range(len(w))]     # which levels carry the Transformer block
        self.down = nn.ModuleList(ConvBlock(w[max(i - 1, 0)], w[i], cfg, attend[i]) for i in range(len(w)))
        self.mid = ConvBlock(w[-1], w[-1], cfg)
        self.up = nn.ModuleList(ConvBlock(2 * w[i], w[max(i - 1, 0)], cfg, attend[i]) for i in range(len(w)))
        self.head = nn.Sequential(GroupNorm32(min(8, w[0]), w[0]), nn.SiLU(), nn.Conv2d(w[0], cfg.in_channels * p * p, 3, padding=1), nn.PixelShuffle(p))
        # Beyond the blog, for speed: conv weights stored channels-last (NHWC), so the activations follow and
        # oneDNN's convolutions skip their layout conversions: the same numbers, a step at batch 128 10% faster.
        self.to(memory_format=torch.channels_last)

    def forward(self, x, t, labels):                       # x (B,1,H,W), t (B,), labels (B,)
        t_emb = self.time_mlp(sinusoidal_embedding(t, self.cfg.time_dim))   # (B, time_dim)
        ctx = self.context(labels)                                           # (B, tokens, context_dim)
        h = self.stem(x)                                                     # (B, w0, 14, 14)
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                h = F.avg_pool2d(h, 2)                                       # 14 -> 7
            h = block(h, t_emb, ctx)
            skips.append(h)
        h = self.mid(h, t_emb, ctx)
        for i in reversed(range(len(self.up))):
            h = self.up[i](torch.cat([h, skips[i]], dim=1), t_emb, ctx)
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")         # 7 -> 14
        return self.head(h)                                                  # (B, 1, 28, 28)


# ----------------------------------------------------------------------------- beyond the blog: checks, loading, demo

def check_model_config(cfg):
    """Settings that cannot build a working UNet are refused with a clear message."""
    if cfg.patch < 1 or not cfg.widths:
        raise UserError(f"need patch >= 1 and at least one width (got patch {cfg.patch}, widths {cfg.widths})")
    size = cfg.image_size // cfg.patch                            # resolution of the first level
    if cfg.image_size % cfg.patch or size % 2 ** (len(cfg.widths) - 1):
        raise UserError(f"image_size {cfg.image_size} / patch {cfg.patch} must halve evenly "
                        f"{len(cfg.widths) - 1} times for widths {cfg.widths}")
    bad = [w for w in cfg.widths if w < 1 or w % cfg.heads or w % min(8, w)]      # min(8, w): GroupNorm's groups
    if cfg.heads < 1 or bad:
        raise UserError(f"every width must be a positive multiple of heads={cfg.heads}, and of 8 above 8 "
                        f"(GroupNorm's 8 groups) (got {cfg.widths})")
    if cfg.context_tokens < 1 or cfg.context_dim < 1 or cfg.time_dim < 2 or cfg.time_dim % 2:
        raise UserError(f"need context_tokens >= 1, context_dim >= 1 and an even time_dim >= 2 (got "
                        f"{cfg.context_tokens}, {cfg.context_dim}, {cfg.time_dim})")
    if not 0 < cfg.beta_start < cfg.beta_end < 1 or cfg.T < 1:
        raise UserError(f"need 0 < beta_start < beta_end < 1 and T >= 1 (got {cfg.beta_start}, {cfg.beta_end}, {cfg.T})")
    check_signal_left(Schedule(cfg.T, cfg.beta_start, cfg.beta_end))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def load_model(path, weights="ema", device="cpu"):
    """Rebuild a UNet from a checkpoint's own config and load its EMA (default) or raw weights."""
    ckpt = load_file(path, "model")
    model = UNet(config_from_dict(ModelConfig, ckpt["model_config"]))
    state = ckpt["model"]
    if weights == "ema":  # AveragedModel's state: "module."-prefixed weights plus its n_averaged counter
        state = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    load_weights(model, state, path)
    return model.to(device).eval(), ckpt


def load_weights(model, state, path):
    """model.load_state_dict(state), with a one-line error when the file's weights do not fit, or are not all
    finite numbers (a run that diverged, or a damaged file, would draw black or grey noise)."""
    if not isinstance(state, dict):
        raise UserError(f"{path} holds its weights as a {type(state).__name__}, not a table of tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        problem = str(e).splitlines()[1].strip()
        raise UserError(f"{path} does not fit the model its config describes: "
                        f"{problem[:200] + ' ...' if len(problem) > 200 else problem}") from None
    check_finite(state, path)


def check_finite(tensors, path):
    """Refuse a file whose weights ({name: tensor}) hold nan or inf."""
    if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise UserError(f"{path} holds weights that are not tensors: not saved by this project")
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(f"{path} holds weights that are not finite numbers (nan or inf), in {bad[0]}{more}: "
                        "a run that diverged, or a damaged file")


if __name__ == "__main__":
    Parser(description=__doc__.split("\n")[0]).parse_args()      # no flags: --help, and any other is refused
    cfg = ModelConfig()
    model = UNet(cfg)
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.tensor([0, cfg.T - 1])
    labels = torch.tensor([3, 7])
    print(f"input x_t {tuple(x.shape)}, t {tuple(t.shape)}, labels {tuple(labels.shape)}")
    for n, m in model.named_modules():
        if n in ("stem", "mid", "head") or n.count(".") == 1 and n.startswith(("down.", "up.")):
            m.register_forward_hook(lambda m, i, o, n=n: print(f"  {n:10s} -> {tuple(o.shape)}"))
    out = model(x, t, labels)
    print(f"output {cfg.prediction} {tuple(out.shape)}")
    for name, part in [("time MLP", model.time_mlp), ("label context", model.context),
                       ("down path", model.down), ("middle", model.mid), ("up path", model.up)]:
        print(f"{name:14s} {count_parameters(part):>10,d} parameters")
    attn = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[-2] in ("Wq", "Wk", "Wv"))
    print(f"{'total':14s} {count_parameters(model):>10,d} parameters ({attn:,d} in Wq/Wk/Wv)")
