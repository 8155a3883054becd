"""The UNet's shapes, its time embedding and label context, and where gradients flow."""
import pytest
import torch

from conftest import tiny_batch, tiny_config
from unet import CrossAttention, GroupNorm32, LabelContext, UNet, sinusoidal_embedding


@pytest.mark.parametrize("B", [1, 3, 8])
def test_unet_output_shape_equals_input_shape(tiny_model, tiny_cfg, B):
    """eps_theta(x_t, t, label) has x_t's shape, for any batch size, including the 'no label' index."""
    x, t, labels = tiny_batch(tiny_cfg, B)
    labels[0] = tiny_cfg.num_labels                        # the classifier-free-guidance null label
    with torch.no_grad():
        out = tiny_model(x, t, labels)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_unet_output_depends_on_label_and_time(tiny_model, tiny_cfg):
    """The label and the timestep both reach the output (a network ignoring them would still pass shapes)."""
    x, t, labels = tiny_batch(tiny_cfg, 2)
    with torch.no_grad():
        out = tiny_model(x, t, labels)
        other_label = tiny_model(x, t, (labels + 1) % tiny_cfg.num_labels)
        other_time = tiny_model(x, (t + 7) % tiny_cfg.T, labels)
    assert (out - other_label).abs().max() > 1e-6
    assert (out - other_time).abs().max() > 1e-6


def test_attention_from_skips_the_transformer_block_below_that_level():
    """attention_from=1 (the default): the 14x14 blocks are plain residual conv blocks, the 7x7 ones and the
    middle keep their Transformer block; 0 (the blog's) puts one in every block. Both take the label."""
    for level in (0, 1):
        model = UNet(tiny_config(attention_from=level))
        blocks = {"down.0": model.down[0], "up.0": model.up[0], "down.1": model.down[1], "up.1": model.up[1],
                  "mid": model.mid}
        plain = sorted(name for name, block in blocks.items() if block.transformer is None)
        assert plain == ([] if level == 0 else ["down.0", "up.0"])
        x, t, labels = tiny_batch(model.cfg, 2)
        with torch.no_grad():
            assert not torch.allclose(model(x, t, labels), model(x, t, (labels + 1) % model.cfg.num_labels))


def test_channels_last_and_groupnorm32_change_no_numbers(tiny_model, tiny_cfg):
    """The speed-only layout choices: the channels-last UNet computes what the same weights in the usual
    (contiguous) layout compute, and GroupNorm32 under bf16 autocast is GroupNorm of the fp32 input."""
    x, t, labels = tiny_batch(tiny_cfg, 3)
    plain = UNet(tiny_cfg)
    plain.load_state_dict(tiny_model.state_dict())
    plain.to(memory_format=torch.contiguous_format)
    assert tiny_model.stem[1].weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.stem[1].weight.is_contiguous() and not plain.stem[1].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(tiny_model(x, t, labels), plain(x, t, labels), atol=1e-5)
    norm, h = GroupNorm32(4, 8), torch.randn(2, 8, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(h)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.nn.functional.group_norm(h.float(), 4, norm.weight, norm.bias), atol=1e-6)


def test_sinusoidal_embedding_shape_and_values():
    """t (B,) -> (B, dim): sines then cosines of t * 10000^(-i/half); at t=0 that is [0..0, 1..1]."""
    t = torch.tensor([0, 1, 17, 999])
    emb = sinusoidal_embedding(t, 16)
    assert emb.shape == (4, 16)
    assert torch.equal(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    freqs = 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 8)
    expected = torch.cat([(17 * freqs).sin(), (17 * freqs).cos()])
    assert torch.allclose(emb[2].double(), expected, atol=1e-5)
    assert len({tuple(row.tolist()) for row in emb}) == 4       # different t, different embedding


def test_label_context_shape_and_per_label_tokens():
    """LabelContext: labels (B,) -> (B, tokens, dim); a label always maps to the same tokens."""
    ctx = LabelContext(num_labels=10, tokens=3, dim=5)
    labels = torch.tensor([0, 4, 4, 10])
    out = ctx(labels)
    assert out.shape == (4, 3, 5)
    assert torch.equal(out[1], out[2])
    assert not torch.equal(out[0], out[1])
    assert not torch.equal(out[1, 0], out[1, 1])               # the tokens of one label differ


def _cross_attention_grads(cfg):
    torch.manual_seed(0)
    model = UNet(cfg)
    x, t, labels = tiny_batch(cfg, 4)
    loss = (model(x, t, labels) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    attns = [m for m in model.modules() if isinstance(m, CrossAttention)]
    levels = len(cfg.widths) - cfg.attention_from
    assert len(attns) == 2 * levels + 1                         # every down, up and middle block that has one
    return attns


def test_every_cross_attention_projection_gets_gradient():
    """With >= 2 context tokens, Wq, Wk and Wv of EVERY cross-attention receive non-zero gradient."""
    for i, attn in enumerate(_cross_attention_grads(tiny_config(context_tokens=2))):
        for name in ("Wq", "Wk", "Wv"):
            grad = getattr(attn, name).weight.grad
            assert grad is not None and grad.abs().max() > 0, f"cross-attention {i}: {name} has zero gradient"


def test_one_context_token_gives_wq_wk_zero_gradient():
    """Why context_tokens >= 2: with ONE token softmax is identically 1, so Wq and Wk get exactly zero
    gradient (the tutorial's bug) while Wv still learns."""
    for attn in _cross_attention_grads(tiny_config(context_tokens=1)):
        assert torch.count_nonzero(attn.Wq.weight.grad) == 0
        assert torch.count_nonzero(attn.Wk.weight.grad) == 0
        assert attn.Wv.weight.grad.abs().max() > 0
