"""The EMA of the weights after a SHORT run: with the warmed-up decay it is not worse than the raw weights;
with a fixed 0.999 it would still be mostly the untrained start (the failure the warm-up exists for)."""
import torch
from torch.optim.swa_utils import AveragedModel

from conftest import tiny_config
from diffusion import Schedule, forward_diffusion
from train import EMA, train_step
from unet import UNet

STEPS = 60


def denoising_loss(model, sched, x0, labels):
    """The training objective on fixed held-out noise and timesteps: || eps - eps_theta(x_t, t, y) ||^2."""
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, sched.T, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t, eps = forward_diffusion(sched, x0, t, noise)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x_t, t, labels), eps).item()


def test_warmed_up_ema_is_not_worse_than_raw_weights_after_a_short_run():
    torch.manual_seed(0)
    cfg = tiny_config(widths=(16, 32), prediction="eps")      # denoising_loss measures the eps error
    model = UNet(cfg)
    sched = Schedule.from_config(cfg)
    ema = EMA(model, 0.999)                                 # decay warmed up: min(0.999, (1+n)/(10+n))
    fixed = AveragedModel(model, avg_fn=lambda avg, new, n: 0.999 * avg + 0.001 * new, use_buffers=True)
    # a simple learnable "data set": bright squares whose position depends on the label
    labels = torch.arange(10).repeat(3)
    x0 = -torch.ones(len(labels), 1, 28, 28)
    for i, k in enumerate(labels):
        x0[i, :, 2 * k:2 * k + 8, 4:12] = 1.0
    start = denoising_loss(model, sched, x0, labels)            # the untrained network
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        train_step(model, optimizer, sched, x0, labels, p_uncond=0.1)
        ema.update_parameters(model)
        fixed.update_parameters(model)

    raw = denoising_loss(model.eval(), sched, x0, labels)
    warmed = denoising_loss(ema.module.eval(), sched, x0, labels)
    fixed_loss = denoising_loss(fixed.module.eval(), sched, x0, labels)
    assert raw < 0.5 * start, f"the short run did not learn (loss {start:.3f} -> {raw:.3f})"
    assert warmed <= 1.1 * raw, f"warmed-up EMA {warmed:.4f} is worse than the raw weights {raw:.4f}"
    assert fixed_loss > 1.5 * warmed, (f"a fixed 0.999 decay should still be near the untrained start "
                                       f"after {STEPS} steps ({fixed_loss:.4f} vs {warmed:.4f})")
