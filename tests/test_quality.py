"""What the quality changes compute: v-prediction, min-SNR weighting and its importance-sampled noise levels,
the guidance interval, the foreach EMA."""
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from conftest import tiny_config
from diffusion import Schedule, backward_denoise, forward_diffusion, predict_noise
from train import EMA, draw_noise_levels, loss_weight, v_target
from unet import UNet

SCHED = Schedule.from_config(tiny_config())


def test_v_target_and_the_samplers_v_to_eps_are_inverse():
    """The sampler turns the v the network was trained on (train.v_target) back into exactly the eps that
    made x_t: eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
    torch.manual_seed(0)
    x0, t = torch.rand(4, 1, 28, 28) * 2 - 1, torch.tensor([0, 7, 25, 49])
    x_t, eps = forward_diffusion(SCHED, x0, t)
    v = v_target(SCHED, x0, eps, t)
    for i in range(len(t)):
        model = lambda x, tt, labels, v=v[i:i + 1]: v                    # noqa: E731  answers the true v
        model.cfg = tiny_config(prediction="v")
        eps_back = predict_noise(model, SCHED, x_t[i:i + 1], int(t[i]), torch.tensor([0]), guidance=0.0)
        assert torch.allclose(eps_back, eps[i:i + 1], atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weight_is_the_clean_image_error_times_min_snr_gamma(prediction):
    """Hang et al.'s weighting, whatever the network predicts: weight * (error of eps or v)^2 equals
    min(SNR_t, gamma) * (error of the implied x0)^2."""
    torch.manual_seed(0)
    gamma, t = 5.0, torch.arange(0, 50, 7)
    x0, target_err = torch.rand(len(t), 1, 28, 28), torch.randn(len(t), 1, 28, 28) * 0.1
    x_t, eps = forward_diffusion(SCHED, x0, t)
    abar = SCHED.alpha_bars[t].view(-1, 1, 1, 1)
    snr = (abar / (1 - abar)).flatten()
    if prediction == "eps":                      # x0^ = (x_t - sqrt(1 - abar) eps^) / sqrt(abar)
        x0_hat = (x_t - (1 - abar).sqrt() * (eps + target_err)) / abar.sqrt()
    else:                                        # x0^ = sqrt(abar) x_t - sqrt(1 - abar) v^
        x0_hat = abar.sqrt() * x_t - (1 - abar).sqrt() * (v_target(SCHED, x0, eps, t) + target_err)
    lhs = loss_weight(SCHED, t, prediction, gamma) * (target_err ** 2).mean(dim=(1, 2, 3))
    rhs = snr.clamp(max=gamma) * ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(lhs, rhs, rtol=1e-3)
    assert torch.equal(loss_weight(SCHED, t, prediction, 0.0), torch.ones(len(t)))   # the blog's plain MSE


@pytest.mark.parametrize("gamma, share", [(1.0, 0.0), (0.0, 0.5)])
def test_share_0_draws_the_blogs_uniform_noise_levels_with_the_same_random_numbers(gamma, share):
    """--t-importance 0 is the draw train_step always made: the same t from the same seed, weighed by loss_weight.
    So is any share under the blog's plain MSE (--min-snr-gamma 0), where every level weighs the same."""
    torch.manual_seed(3)
    expected = torch.randint(0, SCHED.T, (64,))
    torch.manual_seed(3)
    t, weight = draw_noise_levels(SCHED, 64, "v", gamma, share, torch.device("cpu"))
    assert torch.equal(t, expected) and torch.equal(weight, loss_weight(SCHED, t, "v", gamma))


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_importance_sampled_noise_levels_keep_the_expected_loss_and_go_where_the_weight_is(share):
    """E[weight * l(t)] over the importance draw equals the uniform draw's mean of loss_weight(t) * l(t), for any
    per-level loss l; and the draw puts its levels where the weight is, not evenly."""
    sched = Schedule(1000, 1e-4, 0.02)
    torch.manual_seed(0)
    per_level_loss = torch.rand(sched.T) + torch.linspace(0, 2, sched.T)     # any l(t)
    w = loss_weight(sched, torch.arange(sched.T), "v", 1.0)
    t, weight = draw_noise_levels(sched, 400_000, "v", 1.0, share, torch.device("cpu"))
    expected = (w * per_level_loss).mean()
    assert abs((weight * per_level_loss[t]).mean() - expected) < 0.01 * expected
    light = w < w.max() / 10                                                  # levels that carry little loss
    assert light[t].float().mean() < (1 - share) * light.float().mean() + 0.05


class CountingModel(nn.Module):
    """Returns zeros and records the batch size of each call (2B when guided, B when not) and its t."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.dummy, self.calls = cfg, nn.Parameter(torch.zeros(1)), []

    def forward(self, x, t, labels):
        self.calls.append((int(t[0]), len(x)))
        return torch.zeros_like(x)


def test_guidance_applies_only_inside_its_interval():
    """With guidance_interval (lo, hi), only the steps with lo <= t <= hi pay for the second (unconditional)
    half of the batch; the others run the conditional network alone."""
    model = CountingModel(tiny_config())
    backward_denoise(model, SCHED, torch.arange(3), "ddim", 10, guidance=1.0, guidance_interval=(10, 30),
                     generator=torch.Generator().manual_seed(0))
    assert len(model.calls) == 10
    assert all(size == (6 if 10 <= t <= 30 else 3) for t, size in model.calls)
    assert {size for _, size in model.calls} == {3, 6}


def test_foreach_ema_equals_the_warmed_up_formula():
    """EMA.update_parameters (one foreach lerp) gives what AveragedModel with the same decay rule gives."""
    torch.manual_seed(0)
    model = UNet(tiny_config())
    ours = EMA(model, 0.9)
    reference = AveragedModel(model, avg_fn=lambda avg, new, n: (d := min(0.9, (1 + int(n)) / (10 + int(n)))) * avg
                              + (1 - d) * new, use_buffers=True)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(model)
        reference.update_parameters(model)
    for a, b in zip(ours.module.parameters(), reference.module.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert int(ours.n_averaged) == 4 and ours.state_dict().keys() == reference.state_dict().keys()


def test_ema_loaded_from_a_checkpoint_continues_its_warm_up():
    """The EMA counts its updates on the host; after load_state_dict it must continue from the file's
    n_averaged (resume), not from where the fresh object was: same weights as an EMA that never stopped."""
    torch.manual_seed(0)
    model = UNet(tiny_config())
    straight, resumed = EMA(model, 0.9), None
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        straight.update_parameters(model)
        if step == 2:                                   # "save" after 3 updates, "load" into a new EMA
            resumed = EMA(model, 0.9)
            resumed.update_parameters(model)            # (its own count moves on: loading must reset it)
            resumed.load_state_dict(straight.state_dict())
        elif resumed is not None:
            resumed.update_parameters(model)
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)
    assert int(resumed.n_averaged) == 5 and resumed.count == 5
