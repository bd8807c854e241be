"""Shapes, dtypes, phi-sharing modes, attention kernels, sampler and scaling metadata of the plain models."""

from __future__ import annotations

import pytest
import torch

from var_lab.models import VAR, VQVAE, from_depth
from var_lab.models.quant import PhiNonShared, PhiPartiallyShared, PhiShared, phi_ticks
from var_lab.models.sampling import filter_top_k_top_p_

PATCH_NUMS = (1, 2, 3, 4, 6, 8)


def tiny_vqvae(share_quant_resi: int = 4) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(
        vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), patch_nums=PATCH_NUMS, share_quant_resi=share_quant_resi
    )


def tiny_var(vqvae: VQVAE, depth: int = 2, **kwargs) -> VAR:
    torch.manual_seed(0)
    return VAR(vqvae=vqvae, num_classes=10, depth=depth, embed_dim=64, num_heads=2, **kwargs)


@pytest.mark.parametrize("share,cls,count", [(0, PhiNonShared, 6), (1, PhiShared, 1), (3, PhiPartiallyShared, 3)])
def test_phi_sharing_modes(share, cls, count):
    vqvae = tiny_vqvae(share)
    assert isinstance(vqvae.quantize.quant_resi, cls)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in vqvae.quantize.quant_resi.modules()) == count
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    idx_list = vqvae.img_to_idx(img)
    assert [t.shape for t in idx_list] == [(2, p * p) for p in PATCH_NUMS]
    assert vqvae.idx_to_img(idx_list).shape == (2, 3, 32, 32)
    assert vqvae.idx_to_var_input(idx_list).shape == (2, sum(p * p for p in PATCH_NUMS) - 1, 8)


def test_phi_ticks_follow_the_release_rule():
    assert phi_ticks(4) == pytest.approx([1 / 12, 1 / 12 + (10 / 12) / 3, 1 - 1 / 12 - (10 / 12) / 3, 11 / 12])
    assert phi_ticks(2) == pytest.approx([0.25, 0.75])
    vqvae = tiny_vqvae(4)
    # 6 scales at t = 0, .2, .4, .6, .8, 1 -> nearest of ticks (1/12, 13/36, 23/36, 11/12)
    chosen = [list(vqvae.quantize.quant_resi.qresi_ls).index(vqvae.quantize.phi(si)) for si in range(6)]
    assert chosen == [0, 0, 1, 2, 3, 3]


def test_vqvae_training_forward_has_straight_through_gradient():
    vqvae = tiny_vqvae()
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, vq_loss, hits = vqvae(img)
    assert rec.shape == img.shape and vq_loss.ndim == 0
    assert hits.shape == (len(PATCH_NUMS), 64) and hits.sum(1).tolist() == [2 * p * p for p in PATCH_NUMS]
    (rec.square().mean() + vq_loss).backward()
    assert vqvae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vqvae.quantize.embedding.weight.grad.abs().sum() > 0
    vqvae.quantize.update_usage(hits)
    assert len(vqvae.quantize.usage_percent(2 * 64)) == len(PATCH_NUMS)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_var_forward_shapes_and_backward(impl):
    vqvae = tiny_vqvae()
    var = tiny_var(vqvae, attn_impl=impl).train()
    idx_list = vqvae.img_to_idx(torch.rand(3, 3, 32, 32) * 2 - 1)
    x_BLCv = vqvae.idx_to_var_input(idx_list)
    logits = var(torch.tensor([0, 1, 2]), x_BLCv)
    assert logits.shape == (3, var.L, 64) and logits.dtype == torch.float32
    logits.mean().backward()
    assert all(p.grad is not None for p in var.parameters())


def test_attention_kernels_agree():
    vqvae = tiny_vqvae()
    x = vqvae.idx_to_var_input(vqvae.img_to_idx(torch.rand(2, 3, 32, 32) * 2 - 1))
    labels = torch.tensor([3, 4])
    out = {}
    for impl in ("sdpa", "math"):
        var = tiny_var(vqvae, attn_impl=impl).eval()
        out[impl] = var(labels, x)
    torch.testing.assert_close(out["sdpa"], out["math"], rtol=1e-5, atol=1e-5)


def test_block_causal_mask_blocks_the_future():
    """Changing the tokens of the last scale must not change logits of earlier scales."""
    vqvae = tiny_vqvae()
    var = tiny_var(vqvae).eval()
    x = vqvae.idx_to_var_input(vqvae.img_to_idx(torch.rand(1, 3, 32, 32) * 2 - 1))
    y = x.clone()
    last_begin = var.begin_ends[-1][0]
    y[:, last_begin - 1 :] += 1.0  # inputs of the last scale (input row i predicts token i + 1)
    a = var(torch.tensor([1]), x)
    b = var(torch.tensor([1]), y)
    torch.testing.assert_close(a[:, :last_begin], b[:, :last_begin])
    assert not torch.allclose(a[:, last_begin:], b[:, last_begin:])


def test_bf16_autocast_forward_runs_on_cpu():
    vqvae = tiny_vqvae()
    var = tiny_var(vqvae).eval()
    x = vqvae.idx_to_var_input(vqvae.img_to_idx(torch.rand(2, 3, 32, 32) * 2 - 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = var(torch.tensor([1, 2]), x)
    ref = var(torch.tensor([1, 2]), x)
    assert logits.dtype == torch.float32
    assert ((logits - ref).norm() / ref.norm()) < 5e-2


def test_shared_adaln_and_no_l2_norm_variants():
    vqvae = tiny_vqvae()
    var = tiny_var(vqvae, shared_aln=True, attn_l2_norm=False)
    keys = var.state_dict().keys()
    assert "shared_ada_lin.1.weight" in keys and "blocks.0.ada_gss" in keys
    assert not any("scale_mul_1H11" in k for k in keys)
    x = vqvae.idx_to_var_input(vqvae.img_to_idx(torch.rand(2, 3, 32, 32) * 2 - 1))
    assert var(torch.tensor([0, 1]), x).shape == (2, var.L, 64)
    assert var.sample(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0)).shape == (2, 3, 32, 32)


def test_same_seed_same_samples_and_different_seed_differs():
    vqvae = tiny_vqvae()
    var = tiny_var(vqvae)
    labels = torch.tensor([0, 5, 9])
    a = var.sample(labels, cfg=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = var.sample(labels, cfg=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    c = var.sample(labels, cfg=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert a.shape == (3, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # cached sampling must agree with teacher forcing on its own tokens (the KV cache is exact)
    idx_list, _ = var.sample_tokens(labels, cfg=0.0, top_k=1, top_p=0.0, generator=torch.Generator().manual_seed(0))
    logits = var.eval()(labels, vqvae.idx_to_var_input(idx_list))
    assert torch.equal(logits.argmax(-1), torch.cat(idx_list, dim=1))


def test_editing_keeps_the_known_tokens_at_every_scale_and_samples_the_rest():
    """Zero-shot in-painting (the paper's editing): the kept region's tokens are teacher-forced at every scale."""
    from var_lab.models.var import token_masks

    vqvae = tiny_vqvae()
    var = tiny_var(vqvae)
    img = torch.rand(2, 3, 32, 32)
    keep = torch.ones(2, 1, 32, 32)
    keep[:, :, 8:24, 8:24] = 0  # in-paint the centre
    keep[1] = 0
    keep[1, :, :, :16] = 1  # out-paint the right half of the second image
    masks = token_masks(keep, PATCH_NUMS)
    assert [m.shape for m in masks] == [(2, p * p) for p in PATCH_NUMS]
    assert not masks[0].any()  # the 1x1 scale straddles the hole: sampled
    # at 8x8 a token covers 4x4 pixels: exactly the cells outside the hole are kept
    assert masks[-1][0].view(8, 8)[2:6, 2:6].sum() == 0 and masks[-1][0].sum() == 64 - 16
    assert masks[-1][1].view(8, 8)[:, :4].all() and not masks[-1][1].view(8, 8)[:, 4:].any()
    with torch.no_grad():
        known = vqvae.eval().img_to_idx(img * 2 - 1)
    labels = torch.tensor([3, 4])
    for seed in (0, 1):
        idx_list, _ = var.sample_tokens(
            labels, top_k=0, top_p=0.0, generator=torch.Generator().manual_seed(seed), known_idx=known, known_mask=masks
        )
        for k, (idx, ref, m) in enumerate(zip(idx_list, known, masks)):
            assert torch.equal(idx[m], ref[m]), f"scale {k}: a known token changed"
        if seed == 0:
            first = [t.clone() for t in idx_list]
    changed = sum(int((a != b)[~m].sum()) for a, b, m in zip(first, idx_list, masks))
    assert changed > 0  # the unknown tokens are sampled (another seed, other tokens)
    assert all(torch.equal(a[m], b[m]) for a, b, m in zip(first, idx_list, masks))
    out = var.edit(img, keep, labels, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32) and torch.equal(out * keep, img * keep)  # the kept pixels pasted back
    raw = var.edit(img, keep, labels, generator=torch.Generator().manual_seed(0), composite=False)
    assert torch.equal(raw * (1 - keep), out * (1 - keep))
    with pytest.raises(ValueError, match="go together"):
        var.sample_tokens(labels, known_idx=known)


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    kept = filter_top_k_top_p_(logits.clone(), top_k=3).isfinite()
    assert kept.tolist() == [[[True, True, True, False]]]
    kept = filter_top_k_top_p_(logits.clone(), top_p=0.7).isfinite()
    assert kept.tolist() == [[[True, True, False, False]]]


def test_preset_and_scaling_metadata():
    preset = from_depth(16)
    assert (preset.width, preset.heads, preset.global_batch, preset.epochs) == (1024, 16, 768, 200)
    assert preset.drop_path_rate == pytest.approx(0.1 * 16 / 24)
    assert from_depth(30).final_weight_decay == 0.08
    assert from_depth(27).recipe_source.startswith("release d24")
    vqvae = tiny_vqvae()
    var = tiny_var(vqvae, depth=3)
    counts = var.num_scaling_params()
    assert counts["total"] == sum(p.numel() for p in var.parameters())
    assert counts["total"] == counts["embed"] + counts["blocks"] + counts["adaln"] + counts["head"]
    C, d = 64, 3
    assert counts["adaln"] == d * (C * 6 * C + 6 * C) + (C * 2 * C + 2 * C)


@pytest.mark.parametrize("depth", [1, 3])
def test_flops_estimate_matches_an_independent_count(depth):
    """estimate_flops (training FLOPs per image) against torch's own count of one forward + backward.

    The math kernel is counted (FlopCounterMode has no count for the CPU SDPA path with a mask); the estimate leaves
    out only the per-image AdaLN projections and the elementwise work, a fraction of a percent here.
    """
    from torch.utils.flop_counter import FlopCounterMode

    var = tiny_var(tiny_vqvae(), depth=depth, attn_impl="math")
    B = 2
    x_BLCv = torch.randn(B, var.L - 1, var.Cvae)
    labels_B = torch.randint(0, 10, (B,))
    with FlopCounterMode(display=False) as counter:
        var(labels_B, x_BLCv).sum().backward()
    assert var.estimate_flops() == pytest.approx(counter.get_total_flops() / B, rel=0.01)


def test_release_sizes_on_meta_device(shapes_listing):
    """Strict loading of every released state dict, built on the meta device (no 1-8 GB allocation)."""
    from var_lab.models.release import RELEASE_PATCH_NUMS

    expected_millions = {16: 310.28, 20: 600.92, 24: 1033.40, 30: 2010.02}
    with torch.device("meta"):
        vqvae = VQVAE()
        state = {k: torch.empty(v) for k, v in shapes_listing["vae_ch160v4096z32"].items()}
        vqvae.load_state_dict(state, strict=True, assign=True)
        for depth, millions in expected_millions.items():
            var = VAR(vqvae=None, depth=depth, vocab_size=4096, z_channels=32, patch_nums=RELEASE_PATCH_NUMS)
            state = {k: torch.empty(v) for k, v in shapes_listing[f"var_d{depth}"].items()}
            var.load_state_dict(state, strict=True, assign=True)
            assert var.num_scaling_params()["total"] / 1e6 == pytest.approx(millions, abs=0.01)


@pytest.mark.slow
def test_compiled_blocks_train_when_dynamo_breaks_the_graph_inside_the_attention(monkeypatch):
    """Issue 18: resumed compiled GPU runs broke the block's graph between the attention and its AdaLN gate. The gate
    was an in-place ``mul_``, which then mutated the next graph's input that graph had saved for backward, and the
    first backward failed ("modified by an inplace operation ... CopyBackwards"). Here a graph break is forced at the
    same place on the CPU; the compiled blocks must train and give the eager gradients."""
    from var_lab.models.var_blocks import SelfAttention

    torch.manual_seed(0)
    var = tiny_var(tiny_vqvae(), depth=2, attn_impl="sdpa", drop_path_rate=0.0).train()
    labels_B = torch.randint(0, 10, (3,))
    x_BLCv = torch.randn(3, var.L - 1, var.Cvae)
    target_BL = torch.randint(0, var.V, (3, var.L))

    def grads() -> list[torch.Tensor]:
        var.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same label dropping
        logits_BLV = var(labels_B, x_BLCv)
        torch.nn.functional.cross_entropy(logits_BLV.flatten(0, 1), target_BL.flatten()).backward()
        return [p.grad.clone() for p in var.parameters() if p.grad is not None]

    eager = grads()
    attention_forward = SelfAttention.forward

    def forward_with_a_graph_break(self, *args, **kwargs):
        out = attention_forward(self, *args, **kwargs)
        torch._dynamo.graph_break()
        return out

    monkeypatch.setattr(SelfAttention, "forward", forward_with_a_graph_break)
    torch._dynamo.reset()
    for block in var.blocks:
        block.compile_teacher_forcing(dynamic=False)
    compiled = grads()
    torch._dynamo.reset()
    assert len(compiled) == len(eager)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_mask_first_built_under_inference_mode_is_a_normal_tensor():
    """Lightning validates under ``torch.inference_mode``; the mask cached there is reused by training, whose
    (compiled, flex) backward saves it, and inference tensors cannot be saved for backward."""
    var = tiny_var(tiny_vqvae(), depth=1, attn_impl="sdpa")
    with torch.inference_mode():
        mask = var.block_causal_mask(torch.device("cpu"))
    assert isinstance(mask.mask, torch.Tensor) and not mask.mask.is_inference()
    assert var.block_causal_mask(torch.device("cpu")) is mask  # built once
