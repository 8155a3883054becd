"""The diffusion maths, checked against formulas computed independently here in float64."""
import pytest
import torch
from torch import nn

from bench.speed import network_calls
from config import ModelConfig, UserError
from diffusion import Schedule, backward_denoise, ddim_step, ddpm_step, forward_diffusion, timesteps
from figures import to_uint8


def alpha_bar(T, t, beta_start=1e-4, beta_end=0.02):
    """abar_t = prod_{s<=t} (1 - beta_s), beta linear in s, in float64."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return float(torch.prod(1 - betas[:t + 1]))


def test_schedule_constants():
    """betas are linear from beta_start to beta_end and abar is their running product of (1 - beta)."""
    s = Schedule(1000, 1e-4, 0.02)
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    for t in (0, 1, 500, 999):
        assert float(s.alpha_bars[t]) == pytest.approx(alpha_bar(1000, t), rel=1e-4)
    assert float(s.alpha_bars_prev[0]) == 1.0
    assert torch.equal(s.alpha_bars_prev[1:], s.alpha_bars[:-1])


def test_forward_diffusion_mean_and_variance():
    """x_t ~ q(x_t | x_0) has mean sqrt(abar_t) x_0 and variance 1 - abar_t (statistically, x_0 constant)."""
    sched = Schedule(1000, 1e-4, 0.02)
    torch.manual_seed(0)
    n = 40000
    for t in (0, 100, 500, 999):
        x0 = torch.full((n, 1, 2, 2), 0.7)
        x_t, eps = forward_diffusion(sched, x0, torch.full((n,), t))
        abar = alpha_bar(1000, t)
        assert x_t.mean().item() == pytest.approx(abar ** 0.5 * 0.7, abs=0.01), t
        assert x_t.var().item() == pytest.approx(1 - abar, abs=0.01 + 0.02 * (1 - abar)), t
        assert eps.shape == x0.shape


def test_forward_diffusion_per_sample_timesteps_and_given_noise():
    """Each sample uses its own t, and a given noise is used as is (and returned as the target)."""
    sched = Schedule(50, 1e-4, 0.02)
    x0 = torch.randn(3, 1, 4, 4)
    noise = torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 25, 49])
    x_t, eps = forward_diffusion(sched, x0, t, noise)
    assert eps is noise
    for i in range(3):
        abar = alpha_bar(50, int(t[i]))
        expected = abar ** 0.5 * x0[i].double() + (1 - abar) ** 0.5 * noise[i].double()
        assert torch.allclose(x_t[i].double(), expected, atol=1e-5)


def test_ddpm_step_at_t0_with_true_noise_recovers_x0():
    """The last DDPM step (t = 0) adds no noise and, given the true eps, returns x_0."""
    sched = Schedule(1000, 1e-4, 0.02)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    x_t, eps = forward_diffusion(sched, x0, torch.zeros(4, dtype=torch.long))
    out = ddpm_step(sched, x_t, 0, eps)
    assert torch.allclose(out, x0, atol=1e-4)
    assert torch.equal(ddpm_step(sched, x_t, 0, eps), out)          # deterministic


def test_ddpm_step_is_the_posterior_mean_plus_posterior_noise():
    """For t > 0, x_{t-1} = mu~(x_t, x_0) + sqrt(beta~_t) z with the posterior mean of Ho et al. eq. 7."""
    T, t = 1000, 300
    sched = Schedule(T, 1e-4, 0.02)
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    x_t, eps = forward_diffusion(sched, x0, torch.full((2,), t))
    out = ddpm_step(sched, x_t, t, eps, generator=torch.Generator().manual_seed(5))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5))
    abar, abar_prev = alpha_bar(T, t), alpha_bar(T, t - 1)
    beta = 1 - abar / abar_prev
    mean = (abar_prev ** 0.5 * beta / (1 - abar)) * x0.double() \
        + ((1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar)) * x_t.double()
    var = beta * (1 - abar_prev) / (1 - abar)
    assert torch.allclose(out.double(), mean + var ** 0.5 * z.double(), atol=1e-4)


def test_ddim_eta0_is_deterministic():
    """DDIM with eta = 0 ignores the random generator: same inputs, same output."""
    sched = Schedule(50, 1e-4, 0.02)
    x_t, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    a = ddim_step(sched, x_t, 40, 20, eps, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = ddim_step(sched, x_t, 40, 20, eps, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = ddim_step(sched, x_t, 40, 20, eps, eta=1.0, generator=torch.Generator().manual_seed(1))
    d = ddim_step(sched, x_t, 40, 20, eps, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(c, d)                                     # eta > 0 does add noise


def test_ddim_with_true_noise_walks_the_forward_trajectory_to_x0():
    """With eta = 0 and the true eps, each DDIM step lands exactly on q's x_{t'} for the same eps, and the
    step to t_prev = -1 gives x_0 (within 1e-5)."""
    sched = Schedule(50, 1e-4, 0.02)
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    eps = torch.randn(2, 1, 8, 8)
    ts = timesteps(50, 6)
    x, _ = forward_diffusion(sched, x0, torch.full((2,), ts[0]), eps)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x = ddim_step(sched, x, t, t_prev, eps)
        if t_prev >= 0:
            expected, _ = forward_diffusion(sched, x0, torch.full((2,), t_prev), eps)
            assert torch.allclose(x, expected, atol=1e-5), (t, t_prev)
    assert torch.allclose(x, x0, atol=1e-5)


@pytest.mark.parametrize("T,steps", [(50, 50), (50, 10), (1000, 50), (1000, 7), (10, 2), (1000, 1000)])
def test_timesteps_strictly_decreasing_from_T_minus_1_to_0(T, steps):
    """timesteps(T, steps) gives `steps` distinct ints, strictly decreasing from T-1 to 0."""
    ts = timesteps(T, steps)
    assert len(ts) == steps
    assert ts[0] == T - 1 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert all(isinstance(t, int) for t in ts)


@pytest.mark.parametrize("steps", [0, 51])
def test_timesteps_out_of_range_is_a_user_error(steps):
    """Fewer than 1 or more than T steps is a UserError."""
    with pytest.raises(UserError):
        timesteps(50, steps)


class PerfectDenoiser(nn.Module):
    """Knows the answer: predicts the eps (or v, as cfg.prediction says) that makes x_t consistent with one
    fixed image x0."""

    def __init__(self, cfg, sched, x0):
        super().__init__()
        self.cfg, self.sched, self.x0 = cfg, sched, x0
        self.dummy = nn.Parameter(torch.zeros(1))              # backward_denoise asks for a device
        self.calls = 0

    def forward(self, x, t, labels):
        self.calls += 1
        abar = self.sched.alpha_bars[t].view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        return eps if self.cfg.prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * self.x0


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler,steps,guidance", [("ddim", 10, 0.0), ("ddim", 5, 2.0), ("ddpm", None, 0.0),
                                                    ("dpm++", 7, 0.0), ("dpm++", 4, 2.0)])
def test_backward_denoise_with_a_perfect_model_returns_x0(sampler, steps, guidance, prediction):
    """The sampling loop chains the steps correctly: with a model that always predicts the true eps (or v),
    DDIM, DDPM and DPM-Solver++ all end at x0 from any starting noise, calling the model once per step."""
    cfg = ModelConfig(T=50, prediction=prediction)
    sched = Schedule.from_config(cfg)
    x0 = (torch.rand(1, 1, 28, 28) * 2 - 1) * 0.9
    model = PerfectDenoiser(cfg, sched, x0)
    labels = torch.tensor([1, 2, 3])
    out, snaps = backward_denoise(model, sched, labels, sampler, steps, guidance=guidance,
                                  generator=torch.Generator().manual_seed(0), keep=4)
    assert out.shape == (3, 1, 28, 28)
    assert torch.allclose(out, x0.expand(3, -1, -1, -1), atol=1e-4)
    n_steps = steps or cfg.T
    assert model.calls == n_steps
    # snapshots: (steps done, images) for the pure noise, then `keep` points ending at the result
    assert [n for n, _ in snaps][0] == 0 and snaps[-1][0] == n_steps and len(snaps) == 5
    assert [n for n, _ in snaps] == sorted({n for n, _ in snaps})
    assert not torch.allclose(snaps[0][1], out, atol=0.1) and torch.equal(snaps[-1][1], out)


def test_ddim_default_steps_work_when_T_is_below_50():
    """sampler='ddim' with steps=None must not ask for more steps than T has (train.py samples its grid
    this way at the end of every run, so --T 20 would crash after training)."""
    cfg = ModelConfig(T=20)
    sched = Schedule.from_config(cfg)
    x0 = torch.zeros(1, 1, 28, 28)
    out, _ = backward_denoise(PerfectDenoiser(cfg, sched, x0), sched, torch.tensor([0]), "ddim")
    assert torch.allclose(out, x0, atol=1e-4)


def test_to_uint8_maps_model_range_to_pixels():
    """[-1, 1] maps to 0..255 (rounded), values outside are clamped."""
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]
    assert to_uint8(x).dtype == torch.uint8


@pytest.mark.parametrize("steps,guidance", [(20, 1.25), (25, 1.25), (50, 2.0), (50, 0.0)])
def test_speed_table_counts_the_calls_the_sampler_makes(steps, guidance):
    """bench/speed.py's "network calls x batch" column is what backward_denoise does at the default T:
    one call per step, on twice the batch while t is in the guidance interval."""
    cfg = ModelConfig()
    sched = Schedule.from_config(cfg)
    model = PerfectDenoiser(cfg, sched, torch.zeros(1, 1, 28, 28))
    batches = []
    model.register_forward_hook(lambda m, inputs, out: batches.append(len(inputs[0])))
    backward_denoise(model, sched, torch.arange(3), "ddim", steps, guidance=guidance)
    counted = " + ".join(f"{batches.count(b)} x {b}" for b in (3, 6) if batches.count(b))
    assert counted == network_calls(cfg.T, steps, guidance, 3)
