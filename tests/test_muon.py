"""train.Muon, train.py's default optimizer: orthogonalized updates for the weight matrices, AdamW for the rest."""
import pytest
import torch

from config import ModelConfig
from diffusion import Schedule
from train import NEWTON_SCHULZ, Muon, lr_schedule, orthogonalize, train_step
from unet import UNet

CPU = torch.device("cpu")
SMALL = ModelConfig(widths=(8, 16), time_dim=16, context_dim=16, heads=2)


def with_spectrum(n, a, b, low, high, seed=0):
    """n random a x b matrices U diag(s) V^T whose singular values s run from 10^low to 10^high."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, a, a, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, b, a, generator=g))[0]
    return U @ torch.diag_embed(torch.logspace(low, high, a).expand(n, a)) @ V.mT, U, V


def test_orthogonalize_evens_out_the_singular_values_and_keeps_the_directions():
    G, U, V = with_spectrum(3, 16, 40, -1, 1)                 # singular values 0.1 ... 10
    O, = orthogonalize([G])
    s = torch.linalg.svdvals(O)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    D = U.mT @ O @ V                                          # diagonal: O keeps G's singular directions
    assert (D - torch.diag_embed(D.diagonal(dim1=1, dim2=2))).abs().max() < 1e-3


def test_orthogonalize_through_padded_gram_matrices_is_the_textbook_iteration():
    """Batches of different sizes, padded together (24 and 32 rows share size 32): each comes out as the
    iteration X <- c1 X + c2 (X X^T) X + c3 (X X^T)^2 X on X itself would give it."""
    batches = [with_spectrum(2, a, b, -2, 0.5, seed=a)[0].double() for a, b in ((24, 30), (32, 288), (8, 8))]
    c1, c2, c3 = NEWTON_SCHULZ
    for G, O in zip(batches, orthogonalize(batches)):
        X = G / G.norm(dim=(1, 2), keepdim=True)
        for _ in range(5):
            A = X @ X.mT
            X = c1 * X + (c2 * A + c3 * A @ A) @ X
        torch.testing.assert_close(O, X, rtol=0, atol=1e-6)


def test_muon_takes_the_hidden_weight_matrices_and_leaves_the_rest_to_adamw():
    model = UNet(ModelConfig())
    opt = Muon(model.named_parameters(), 1e-3, CPU)
    hidden, rest = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert {id(p) for p in opt.adamw.param_groups[0]["params"]} == rest
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(hidden) + len(rest) == len(names) and not hidden & rest
    for pid, name in names.items():
        first_or_last = name.startswith(("context.", "stem.", "head."))
        expected = dict(model.named_parameters())[name].ndim >= 2 and not first_or_last
        assert (pid in hidden) == expected, name
    assert any("conv1" in names[p] for p in hidden) and any("Wq" in names[p] for p in hidden)


@pytest.mark.parametrize("shape", [(24, 8, 3, 3), (40, 12)])
def test_a_muon_step_gives_a_matrix_an_update_of_one_size_in_every_direction(shape):
    """Whatever the gradient's spectrum, the step is lr 0.2 sqrt(max(out, in)) times a near-orthogonal matrix:
    a conv's kernel read as out x (in k k), also when it is stored channels-last as train.py's convs are."""
    w = torch.nn.Parameter(torch.randn(shape))
    if len(shape) == 4:
        w.data = w.data.contiguous(memory_format=torch.channels_last)
    out, fan_in = shape[0], w[0].numel()
    G = with_spectrum(1, min(out, fan_in), max(out, fan_in), -1, 1, seed=1)[0][0]
    grad = (G if out <= fan_in else G.T).reshape(shape).contiguous()
    w.grad = grad.clone()
    opt = Muon([("down.0.conv1.weight", w), ("head.bias", torch.nn.Parameter(torch.zeros(1)))], 1e-2, CPU,
               weight_decay=0.0)
    before = w.detach().clone()
    opt.step()
    step = (w.detach() - before).reshape(out, fan_in) / (-1e-2 * 0.2 * max(out, fan_in) ** 0.5)
    s = torch.linalg.svdvals(step)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    assert (step * grad.reshape(out, fan_in)).sum() > 0                     # downhill
    assert torch.equal(w.grad, grad)                                        # the gradient is left as it was


def test_the_rest_takes_adamw_steps_at_the_schedulers_lr():
    """Biases, norms, the label embedding, stem and head move as torch.optim.AdamW moves them, with the lr
    that the LR schedule sets on Muon's param_groups (warm-up here), and with weight decay."""
    torch.manual_seed(0)
    model, twin = UNet(SMALL), UNet(SMALL)
    twin.load_state_dict(model.state_dict())
    ours = Muon(model.named_parameters(), 1e-2, CPU, weight_decay=0.1)
    rest = [n for n, p in model.named_parameters() if any(p is q for q in ours.param_groups[1]["params"])]
    for m in (model, twin):                   # the matrices stay fixed in both, so that the gradients stay alike
        for n, p in m.named_parameters():
            p.requires_grad_(n in rest)
    reference = torch.optim.AdamW([dict(twin.named_parameters())[n] for n in rest], lr=1e-2, weight_decay=0.1,
                                  fused=True)    # (the same kernel: Adam magnifies rounding where a gradient is ~0)
    schedules = [lr_schedule(ours, 3, 10), lr_schedule(reference, 3, 10)]
    stem = model.stem[1].weight.detach().clone()
    for _ in range(3):
        for m in (model, twin):
            m.zero_grad()
            m(torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 5, 50, 9]),
              torch.tensor([0, 1, 2, 10])).square().mean().backward()
        ours.step()
        reference.step()
        for s in schedules:
            s.step()
    for name in rest:
        torch.testing.assert_close(dict(model.named_parameters())[name], dict(twin.named_parameters())[name],
                                   rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.stem[1].weight, stem)                      # (they did move)


def test_a_grad_scaler_unscales_both_groups():
    """fp16 training steps through a GradScaler, which unscales the gradients of every param_group before
    Muon.step: with a loss scaled by 1024, the weights move as without scaling."""
    sched = Schedule.from_config(SMALL)
    x0, labels = torch.rand(4, 1, 28, 28) * 2 - 1, torch.tensor([0, 3, 5, 9])
    weights = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        torch.manual_seed(0)
        model = UNet(SMALL)
        opt = Muon(model.named_parameters(), 1e-2, CPU)
        for _ in range(2):
            train_step(model, opt, sched, x0, labels, 0.1, scaler=scaler)
        weights.append(model.state_dict())
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-4, atol=1e-5, msg=name)
