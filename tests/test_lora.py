"""LoRA in-process: injection, freezing, merging, strict loading and the base fingerprint."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from config import FinetuneConfig, UserError
from conftest import tiny_batch
from lora import (LoraConv2d, LoraEmbedding, LoraLayer, fingerprint, inject_lora, load_lora_state_dict,
                  lora_plus_groups, lora_state_dict, mark_only_lora_trainable, merge_lora, unwrap_lora)
from train import train_step
from diffusion import Schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from lora_fashion import markdown  # noqa: E402
from speed import detour_forward  # noqa: E402

TARGETS = ("Wq", "Wk", "Wv")


def _randomise_lora_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.lora_b.copy_(0.1 * torch.randn(m.lora_b.shape, generator=g))


def test_inject_lora_wraps_every_target_layer(tiny_model, tiny_cfg):
    """inject_lora replaces each Wq/Wk/Wv (and nothing else) by a LoraLayer of the requested rank."""
    names = inject_lora(tiny_model, TARGETS, r=3, alpha=6.0)
    loras = {n: m for n, m in tiny_model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(names) == sorted(loras)
    assert len(names) == 3 * (2 * (len(tiny_cfg.widths) - tiny_cfg.attention_from) + 1)   # blocks with attention
    assert {n.split(".")[-1] for n in names} == set(TARGETS)
    for m in loras.values():
        assert m.lora_a.shape == (m.base.in_features, 3) and m.lora_b.shape == (3, m.base.out_features)


def test_fresh_lora_leaves_output_unchanged(tiny_model, tiny_cfg):
    """B starts at zero, so a freshly injected LoRA changes nothing, bit for bit."""
    x, t, labels = tiny_batch(tiny_cfg)
    with torch.no_grad():
        before = tiny_model(x, t, labels)
        inject_lora(tiny_model, TARGETS, r=4, alpha=4.0)
        after = tiny_model(x, t, labels)
    assert torch.equal(before, after)


def test_only_lora_trains(tiny_model, tiny_cfg):
    """After mark_only_lora_trainable only lora_a/lora_b require grad, and optimizer steps over ALL
    parameters change them and nothing else."""
    inject_lora(tiny_model, TARGETS, r=2, alpha=2.0)
    trainable = mark_only_lora_trainable(tiny_model)
    grad_names = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    lora_names = {n for n, _ in tiny_model.named_parameters() if n.split(".")[-1] in ("lora_a", "lora_m", "lora_b")}
    assert grad_names == lora_names and len(lora_names) > 0
    assert {id(p) for p in trainable} == {id(p) for n, p in tiny_model.named_parameters() if n in lora_names}

    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = Schedule.from_config(tiny_cfg)
    x0, _, labels = tiny_batch(tiny_cfg, 4)
    torch.manual_seed(0)
    # two steps: in the first, A's gradient is zero because B = 0; in the second both move
    for _ in range(2):
        train_step(tiny_model, optimizer, sched, x0.clamp(-1, 1), labels, p_uncond=0.0)
    for name, p in tiny_model.named_parameters():
        if name in lora_names:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


@pytest.mark.parametrize("ratio", [1.0, 16.0])
def test_lora_plus_moves_b_ratio_times_as_far(tiny_model, tiny_cfg, ratio):
    """lora_plus_groups: every trainable LoRA tensor in exactly one group, B (lora_b) at ratio x lr, A and
    a conv's core M at lr; AdamW's first step moves each entry by its group's lr (|m / sqrt(v)| = 1), so
    B moves ratio x as far as with one lr, and A and M (zero gradient while B = 0) wait for B."""
    inject_lora(tiny_model, ("Wq", "Wv", "conv"), r=2, alpha=2.0)
    trainable = mark_only_lora_trainable(tiny_model)
    groups = lora_plus_groups(tiny_model, 1e-3, ratio)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(names[id(p)] for p in trainable) and len(set(grouped)) == len(grouped)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3 * ratio]
    assert all(n.endswith(".lora_b") for n in map(names.get, map(id, groups[1]["params"])))
    assert any(n.endswith(".lora_m") for n in grouped) and any(n.endswith(".lora_a") for n in grouped)

    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
    x0, _, labels = tiny_batch(tiny_cfg, 4)
    torch.manual_seed(0)
    train_step(tiny_model, optimizer, Schedule.from_config(tiny_cfg), x0.clamp(-1, 1), labels, p_uncond=0.0)
    for n, p in tiny_model.named_parameters():
        step = (p.detach() - before[n]).abs().max().item()
        if n.endswith(".lora_b"):
            assert step == pytest.approx(1e-3 * ratio, rel=1e-3), n
        elif n.split(".")[-1].startswith("lora_"):
            assert step == 0.0, n


def test_merge_matches_unmerged_and_unwrap_removes_lora_layers(tiny_model, tiny_cfg):
    """merge_lora folds (A B)^T alpha/r into W: the merged model's output is the LoRA model's, exactly
    (with a non-zero B, so the adapter matters). The LoRA layers stay (merged, to undo);
    unwrap_lora then leaves a plain model with the base's state_dict keys."""
    x, t, labels = tiny_batch(tiny_cfg)
    base_keys = set(tiny_model.state_dict())
    with torch.no_grad():
        base_out = tiny_model(x, t, labels)
        inject_lora(tiny_model, TARGETS, r=4, alpha=8.0)     # alpha / r = 2: the scale must be applied
        _randomise_lora_b(tiny_model)
        lora_out = tiny_model(x, t, labels)
        merged = merge_lora(tiny_model)
        merged_out = tiny_model(x, t, labels)
    assert len(merged) == 9                                     # Wq, Wk, Wv of down.1, mid and up.1
    assert all(tiny_model.get_submodule(name).merged for name in merged)
    assert (lora_out - base_out).abs().max() > 1e-3            # the adapter really changes the output
    assert torch.equal(merged_out, lora_out)
    assert unwrap_lora(tiny_model) == merged
    assert not any(isinstance(m, LoraLayer) for m in tiny_model.modules())
    for name in merged:
        assert type(tiny_model.get_submodule(name)) is nn.Linear
    assert set(tiny_model.state_dict()) == base_keys
    with torch.no_grad():
        assert torch.equal(tiny_model(x, t, labels), merged_out)


def test_each_lora_layer_computes_the_detour_beside_its_base():
    """forward computes (W + dW) x; that is what bench/speed.py's detour_forward computes the blog's way (and times
    beside it): W x + (x A B) alpha/r for a linear layer, base(x) + B(M(A(x))) alpha/r for a conv (three convs in a
    row) and W[i] + A[i] B alpha/r for an embedding, within float rounding."""
    torch.manual_seed(0)
    linear, conv = LoraLayer(nn.Linear(6, 5), r=2, alpha=3.0), LoraConv2d(nn.Conv2d(4, 3, 3, padding=1), r=2, alpha=3.0)
    embedding = LoraEmbedding(nn.Embedding(7, 5), r=2, alpha=3.0)
    for layer, x in ((linear, torch.randn(8, 6)), (conv, torch.randn(2, 4, 5, 5)), (embedding, torch.tensor([0, 3, 6]))):
        nn.init.normal_(layer.lora_b)                           # B = 0 would hide a wrong detour
        with torch.no_grad():
            assert torch.allclose(layer(x), detour_forward(layer, x), atol=1e-5), type(layer).__name__


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_merge_changes_no_output_of_any_lora_layer_in_fp32_and_bf16(tiny_model, tiny_cfg, dtype):
    """Every kind of LoRA layer (the default targets: linear, conv, embedding), merged, computes exactly what it
    computed unmerged, also under bf16 autocast: forward multiplies by the same W + dW (dW in fp32) that the
    merge stores, so both round the same weight to bf16."""
    x, t, labels = tiny_batch(tiny_cfg)
    inject_lora(tiny_model, FinetuneConfig.lora_targets, FinetuneConfig.lora_rank, FinetuneConfig.lora_alpha)
    _randomise_lora_b(tiny_model)
    assert {type(m) for m in tiny_model.modules() if isinstance(m, LoraLayer)} == {LoraLayer, LoraConv2d, LoraEmbedding}
    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            return tiny_model(x, t, labels)
    lora_out = run()
    merge_lora(tiny_model)                                      # outside autocast, as denoise.py merges
    assert torch.equal(run(), lora_out)


def test_lora_state_dict_round_trip(tiny_model, tiny_cfg):
    """lora_state_dict holds only LoRA tensors; loading it into a fresh injection restores the output."""
    inject_lora(tiny_model, TARGETS, r=2, alpha=2.0)
    _randomise_lora_b(tiny_model)
    state = lora_state_dict(tiny_model)
    assert state and all(k.endswith((".lora_a", ".lora_b")) for k in state)
    x, t, labels = tiny_batch(tiny_cfg)
    with torch.no_grad():
        expected = tiny_model(x, t, labels)
    from unet import UNet
    torch.manual_seed(0)
    other = UNet(tiny_cfg)                                    # same base weights (same seed)
    inject_lora(other, TARGETS, r=2, alpha=2.0)
    load_lora_state_dict(other, state)
    with torch.no_grad():
        assert torch.equal(other(x, t, labels), expected)


def test_loading_lora_of_another_rank_names_the_wrong_shape(tiny_model, tiny_cfg):
    """Rank-2 LoRA tensors into a model injected at rank 4: a UserError naming the wrong shape."""
    from unet import UNet
    inject_lora(tiny_model, TARGETS, r=2, alpha=2.0)
    state = lora_state_dict(tiny_model)
    other = UNet(tiny_cfg)
    inject_lora(other, TARGETS, r=4, alpha=2.0)
    with pytest.raises(UserError) as e:
        load_lora_state_dict(other, state)
    msg = str(e.value)
    assert "wrong shape" in msg and ".lora_" in msg
    assert "2)" in msg and "4)" in msg                        # e.g. (8, 2) vs (8, 4)


def test_loading_lora_with_missing_or_extra_keys_is_refused(tiny_model):
    """Strict load: a missing or an unexpected LoRA tensor is a UserError, never silently ignored."""
    inject_lora(tiny_model, TARGETS, r=2, alpha=2.0)
    state = lora_state_dict(tiny_model)
    missing = dict(state)
    missing.pop(next(iter(missing)))
    with pytest.raises(UserError, match="missing"):
        load_lora_state_dict(tiny_model, missing)
    with pytest.raises(UserError, match="unexpected"):
        load_lora_state_dict(tiny_model, {**state, "mid.transformer.attn.Wo.lora_a": torch.zeros(16, 2)})


def test_fingerprint_identifies_base_weights(tiny_model, tiny_cfg):
    """The base fingerprint is the same for the same weights (also after a LoRA with B = 0 is merged
    back in), and changes when any base weight changes."""
    from unet import UNet
    base = fingerprint(tiny_model)
    torch.manual_seed(0)
    assert fingerprint(UNet(tiny_cfg)) == base                # same seed, same weights
    inject_lora(tiny_model, TARGETS, r=2, alpha=2.0)
    merge_lora(tiny_model)                                    # B = 0: W' = W
    assert fingerprint(tiny_model) == base
    with torch.no_grad():
        tiny_model.head[2].bias[0] += 1e-3
    assert fingerprint(tiny_model) != base


def test_fashion_bench_reports_each_classifiers_share_of_full_fine_tuning():
    """bench/lora_fashion.py --classifier-seeds: a run's accuracy under each classifier is divided by full
    fine-tuning's under the SAME classifier, and their mean is reported; with one classifier, no second table.
    --strict-seeds adds bench/strict_reader.py's table, each share again against full fine-tuning's reading."""
    rows = [{"name": "full", "flags": ["--full"], "trainable": 100, "total": 100, "file_bytes": 2048, "s_per_step": 0.2,
             "wall_s": 60, "peak_rss_mib": 900, "accuracy": 0.9, "fd_ratio": 7.0, "classifier": {0: 0.9, 3: 0.8},
             "strict": {1: 0.92}},
            {"name": "default", "flags": [], "trainable": 3, "total": 103, "file_bytes": 1024, "s_per_step": 0.2,
             "wall_s": 60, "peak_rss_mib": 900, "accuracy": 0.81, "fd_ratio": 20.0, "classifier": {0: 0.81, 3: 0.76},
             "strict": {1: 0.782}}]
    args = SimpleNamespace(base="base.pt", steps=10, seed=0, per_label=100, classifier_seeds=(0, 3), strict_seeds=())
    table = markdown(rows, 4096, args).splitlines()
    assert "| default | 81.0% (90%) | 76.0% (95%) | 92.5% |" in table       # 0.81 / 0.9 and 0.76 / 0.8
    assert "| full | 90.0% | 80.0% | - |" in table
    main_row = next(line for line in table if line.startswith("| default | `(defaults)`"))
    assert "| 81.0% | 90% | 20.0x |" in main_row                           # the first classifier fills the main table
    assert not any("strict" in line for line in table)
    args.classifier_seeds, args.strict_seeds = (0,), (1,)
    table = markdown(rows, 4096, args).splitlines()
    assert not any("classifier 0" in line for line in table)
    assert "| run | strict 1 | of full's, mean |" in table
    assert "| default | 78.2% (85%) | 85.0% |" in table                  # 0.782 / 0.92
