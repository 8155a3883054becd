"""The diffusion process: noising in closed form, and the reverse (denoising) steps (the series' diffusion.py).

DDPM (Ho et al. 2020) with a linear beta schedule over T = 1000 steps; the network predicts the noise.
Beyond the blog: DDIM (Song et al. 2021) and DPM-Solver++ (Lu et al. 2022) reuse the same trained network
with fewer, larger steps; the network may predict v instead of eps; guidance can be limited to an interval.

    python diffusion.py --data ../shared/data/mnist-t10k    # saves outputs/forward_diffusion.png
"""
import os

import torch

from config import LIMITS, ModelConfig, Parser, SampleConfig, UserError, check_new_output, make_folder, number, run_main
from dataset import data_inputs, load_images, to_model_range
from figures import save_process_figure


class Schedule:
    """The noise schedule's constants, each a tensor of length T (index t = 0..T-1)."""

    def __init__(self, T, beta_start, beta_end):
        self.T = T
        self.betas = torch.linspace(beta_start, beta_end, T)              # beta_t
        self.alphas = 1.0 - self.betas                                      # alpha_t = 1 - beta_t
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)                 # abar_t = prod_{s<=t} alpha_s
        # abar_{t-1}, with abar_{-1} = 1 (no noise before the first step)
        self.alpha_bars_prev = torch.cat([torch.ones(1), self.alpha_bars[:-1]])
        # variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 7):  beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
        self.posterior_variance = self.betas * (1 - self.alpha_bars_prev) / (1 - self.alpha_bars)

    @classmethod
    def from_config(cls, cfg: ModelConfig):
        return cls(cfg.T, cfg.beta_start, cfg.beta_end)


def _at(values, t, x):
    """values[t] shaped (B,1,1,1) to broadcast against images x (B,C,H,W)."""
    return values.to(x.device)[t].view(-1, *([1] * (x.dim() - 1)))


def forward_diffusion(sched, x0, t, noise=None):
    """Sample x_t ~ q(x_t | x_0) in one jump (Ho et al. 2020, eq. 4):  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
    x0 (B,C,H,W), t (B,). Returns (x_t, eps); eps is the target the network learns to predict."""
    if noise is None:
        noise = torch.randn_like(x0)
    abar = _at(sched.alpha_bars, t, x0)                                  # (B,1,1,1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, noise


def ddpm_step(sched, x_t, t, eps, generator=None):
    """One DDPM reverse step x_t -> x_{t-1} (Ho et al. 2020, Algorithm 2, line 4; t is an int for the batch):
    mean = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps);  x_{t-1} = mean + sqrt(beta~_t) z."""
    alpha, abar, beta = sched.alphas[t], sched.alpha_bars[t], sched.betas[t]
    mean = (x_t - beta / (1 - abar).sqrt() * eps) / alpha.sqrt()
    if t == 0:
        return mean                                             # no noise is added at the last step
    z = torch.randn(x_t.shape, generator=generator, device=x_t.device)
    return mean + sched.posterior_variance[t].sqrt() * z


@torch.inference_mode()   # no_grad without autograd's bookkeeping: sampling about a tenth faster (README)
def backward_denoise(model, sched, labels, sampler=SampleConfig.sampler, steps=None, eta=SampleConfig.eta,
                     guidance=SampleConfig.guidance, generator=None, keep=0, dtype=None,
                     guidance_interval=SampleConfig.guidance_interval):
    """Start from pure noise x_T ~ N(0, I) and denoise step by step (Algorithm 2 for sampler="ddpm").
    steps: T for DDPM, SampleConfig.steps for DDIM and DPM-Solver++ unless given. Guidance applies only
    while guidance_interval[0] <= t <= guidance_interval[1]. Returns the clean images in [-1, 1]
    and, if keep > 0, snapshots [(steps done, images), ...]: the pure noise, then up to `keep` evenly
    spaced points of the way, the last one being the result. (The blog's listing returns every step's
    image and samples with DDPM only, without guidance.)"""
    cfg = model.cfg
    device = next(model.parameters()).device
    ts = sampler_timesteps(sched.T, sampler, steps)
    shape = (len(labels), cfg.in_channels, cfg.image_size, cfg.image_size)
    x = torch.randn(shape, generator=generator, device=device)                # x_T (B,C,H,W)
    labels = labels.to(device)
    record = set(torch.linspace(0, len(ts) - 1, keep).round().long().tolist()) if keep else set()
    snapshots = [(0, x.cpu())] if keep else []
    history = None                                   # DPM-Solver++'s memory of the previous step
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        w = guidance_at(t, guidance, guidance_interval)
        eps = predict_noise(model, sched, x, t, labels, w, dtype)
        if sampler == "ddpm":
            x = ddpm_step(sched, x, t, eps, generator)
        elif sampler == "ddim":
            x = ddim_step(sched, x, t, t_prev, eps, eta, generator)
        else:
            x, history = dpm_solver_step(sched, x, t, t_prev, eps, history)
        if i in record:
            snapshots.append((i + 1, x.clamp(-1, 1).cpu()))
    if not torch.isfinite(x).all():   # (beyond the blog) clamp keeps nan, and the picture of nan would be black
        raise UserError("sampling overflowed: the images hold nan or inf (the weights, a LoRA weight or --lora-scale "
                        "are too large for this precision; fp16 overflows first, fp32 last)")
    return x.clamp(-1, 1), snapshots


# ----------------------------------------------------------------------------- beyond the blog: DDIM, DPM-Solver++,
# v-prediction, guidance, demo

def ddim_step(sched, x_t, t, t_prev, eps, eta=SampleConfig.eta, generator=None):
    """One DDIM step x_t -> x_{t_prev}, t_prev < t (t_prev = -1 means 'clean image'); Song et al. 2021, eq. 12:
    x0^ = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)            (their eq. 16)
    x_prev = sqrt(abar_prev) x0^ + sqrt(1 - abar_prev - sigma^2) eps + sigma z       (eta = 0: deterministic)"""
    abar = sched.alpha_bars[t]
    abar_prev = sched.alpha_bars[t_prev] if t_prev >= 0 else torch.tensor(1.0)
    x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    if eta > 0 and t_prev >= 0:
        x_prev = x_prev + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device)
    return x_prev


def dpm_solver_step(sched, x_t, t, t_prev, eps, history=None):
    """One DPM-Solver++(2M) step x_t -> x_{t_prev} (Lu et al. 2022, Algorithm 2), with lambda = log(alpha / sigma),
    alpha = sqrt(abar), sigma = sqrt(1 - abar), h = lambda_prev - lambda_t and x0^ as in DDIM:
    D = x0^ (first step), else (1 + 1/2r) x0^ - 1/2r x0^_last with r = h_last / h;
    x_prev = sigma_prev / sigma_t x_t - alpha_prev (e^-h - 1) D.   Returns (x_prev, history for the next step).
    With D = x0^ this is exactly DDIM (eta 0); the second-order D is what buys the same quality in fewer steps."""
    abar = sched.alpha_bars[t]
    x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    if t_prev < 0:
        return x0, None                                          # the last step: the clean estimate itself
    abar_prev = sched.alpha_bars[t_prev]
    h = 0.5 * (torch.log(abar_prev / (1 - abar_prev)) - torch.log(abar / (1 - abar)))
    d = x0
    if history is not None:
        x0_last, h_last = history
        r = h_last / h
        d = (1 + 1 / (2 * r)) * x0 - x0_last / (2 * r)
    return ((1 - abar_prev) / (1 - abar)).sqrt() * x_t - abar_prev.sqrt() * torch.expm1(-h) * d, (x0, h)


def check_signal_left(sched):
    """Refuse a schedule under which most x_t hold nothing of the image (abar_t < 1e-6: the image is under a
    thousandth of the noise). There the target follows from x_t alone (eps = x_t; min-SNR weighs v's error by
    about SNR_t = 0), so the network trains to a loss near 0 and samples black. (abar_T = 0 at the last step
    alone, a zero terminal SNR, is a legitimate choice and passes.)"""
    gone = sched.alpha_bars < 1e-6
    if gone.float().mean() > 0.5:
        first = int(gone.nonzero()[0])
        raise UserError(f"the noise schedule (beta from {sched.betas[0]:g} to {sched.betas[-1]:g} over "
                        f"T={sched.T} steps) leaves nothing of the image from step {first} on (abar_t < 1e-6), "
                        f"so most steps would train on noise alone; lower --beta-start or --beta-end (defaults "
                        f"{ModelConfig.beta_start:g}, {ModelConfig.beta_end:g})")


def guidance_at(t, guidance, interval=SampleConfig.guidance_interval):
    """The guidance weight used at step t: `guidance` while interval[0] <= t <= interval[1], else 0
    (guidance on an interval of noise levels only, Kynkaanniemi et al. 2024)."""
    return guidance if interval[0] <= t <= interval[1] else 0.0


def predict_noise(model, sched, x_t, t, labels, guidance=SampleConfig.guidance, dtype=None):
    """eps(x_t, t, label). With classifier-free guidance (Ho & Salimans 2022, eq. 6), w = guidance:
    out = out_uncond + (1 + w) (out_cond - out_uncond), both from ONE batched forward pass (2B images).
    A v-predicting network's v is turned into eps = sqrt(1 - abar) x_t + sqrt(abar) v (Salimans & Ho 2022,
    appendix D; affine in v, so guiding v or eps is the same). dtype (e.g. torch.bfloat16): run the network
    under torch.autocast; the sampler's own maths stays fp32."""
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    with torch.autocast(x_t.device.type, dtype=dtype, enabled=dtype is not None):
        if guidance == 0:
            out = model(x_t, tt, labels).float()
        else:
            nulls = torch.full_like(labels, model.cfg.num_labels)                      # the "no label" token
            both = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([labels, nulls])).float()  # (2B,C,H,W)
            out_cond, out_uncond = both.chunk(2)
            out = out_uncond + (1 + guidance) * (out_cond - out_uncond)
    if model.cfg.prediction == "eps":
        return out
    abar = sched.alpha_bars[t]
    return (1 - abar).sqrt() * x_t + abar.sqrt() * out


def sampler_timesteps(T, sampler, steps=None):
    """The timesteps `sampler` visits: all T for DDPM, else `steps` of them (SampleConfig.steps, at most T)."""
    if steps is None:                                # (not `steps or ...`: --steps 0 must be refused)
        steps = T if sampler == "ddpm" else min(SampleConfig.steps, T)
    if sampler == "ddpm" and steps != T:
        raise UserError(f"the DDPM sampler walks all T={T} steps; use --sampler ddim or dpm++ for fewer")
    return timesteps(T, steps)


def timesteps(T, steps):
    """`steps` timesteps evenly spaced over T-1 .. 0, largest first (all T of them for steps=T)."""
    if not 1 <= steps <= T:
        raise UserError(f"--steps must be between 1 and T={T}, got {steps}")
    return torch.linspace(T - 1, 0, steps).round().long().tolist()


def main():
    parser = Parser(description="Show one digit being noised by q(x_t | x_0) at several t.")
    parser.add_argument("--data", default="mnist", help="mnist, fashion-mnist, or a folder with one subfolder per label")
    parser.add_argument("--data-root", default="./data", help="where torchvision datasets are (or are downloaded to)")
    parser.add_argument("--index", type=number(int, "[0, 1e9]"), default=0,
                        help="which image of the data set to noise, from 0")
    parser.add_argument("--out", default="outputs/forward_diffusion.png", help="PNG file to write (an existing PNG is replaced)")
    parser.add_argument("--overwrite", action="store_true", help="let --out replace an existing file that is not a .png")
    parser.add_argument("--seed", type=number(int, LIMITS["seed"]), default=0, help=f"random seed for the noise, in {LIMITS['seed']}")
    args = parser.parse_args()
    make_folder(os.path.dirname(args.out), flag="--out's folder")
    check_new_output(args.out, None, args.overwrite or args.out.lower().endswith(".png"),   # a figure, or asked
                     inputs=data_inputs(args.data, args.data_root))
    cfg = ModelConfig()
    images, labels = load_images(args.data, args.data_root, cfg.image_size)
    if args.index >= len(images):
        raise UserError(f"--index must be in 0..{len(images) - 1}")
    sched = Schedule.from_config(cfg)
    ts = [0, 50, 100, 200, 300, 500, 700, 999]
    x0 = to_model_range(images[args.index:args.index + 1]).repeat(len(ts), 1, 1, 1)
    torch.manual_seed(args.seed)
    x_t, _ = forward_diffusion(sched, x0, torch.tensor(ts))
    names = [f"t={t}\nabar={sched.alpha_bars[t]:.3f}" for t in ts]
    save_process_figure([x.unsqueeze(0) for x in x_t], labels[args.index:args.index + 1], args.out, names)
    print(f"saved {args.out}")


if __name__ == "__main__":
    run_main(main)
