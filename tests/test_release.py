"""The release loader: files from disk, the right depth, and clear errors."""

from __future__ import annotations

import pytest
import torch

from var_lab.models import VAR, ReleaseFormatError, from_release_kwargs, load_release_var
from var_lab.models.release import check_state_dict, depth_of_state_dict


def tiny_pair(depth=2):
    vae_kwargs = dict(vocab_size=64, z_channels=8, ch=32, share_quant_resi=4, v_patch_nums=(1, 2, 3, 4))
    var_kwargs = dict(
        num_classes=10,
        depth=depth,
        embed_dim=128,
        num_heads=2,
        shared_aln=False,
        attn_l2_norm=True,
        cond_drop_rate=0.1,
        patch_nums=(1, 2, 3, 4),
    )
    return from_release_kwargs(vae_kwargs, var_kwargs)


def test_from_release_kwargs_builds_the_pair():
    vqvae, var = tiny_pair()
    assert var.vqvae is vqvae and var.depth == 2 and var.C == 128 and var.num_heads == 2
    assert not any(p.requires_grad for p in vqvae.parameters())


def test_from_release_kwargs_rejects_unknown_keyword():
    with pytest.raises(ReleaseFormatError, match="bogus"):
        from_release_kwargs({"bogus": 1}, {})


def test_missing_file_names_the_file_and_how_to_get_it(tmp_path):
    path = tmp_path / "var_d16.pth"
    with pytest.raises(FileNotFoundError, match="var_d16.pth") as info:
        load_release_var(path)
    assert "huggingface.co/FoundationVision/var" in str(info.value)


def test_wrong_depth_and_mismatched_keys(tmp_path):
    vqvae, var = tiny_pair(depth=2)
    path = tmp_path / "var_d2.pth"
    torch.save(var.state_dict(), path)
    loaded = load_release_var(path, vqvae=vqvae)
    assert loaded.depth == 2 and depth_of_state_dict(var.state_dict()) == 2
    with pytest.raises(ReleaseFormatError, match=r"depth-2 model, but depth 16"):
        load_release_var(path, vqvae=vqvae, depth=16)
    state = var.state_dict()
    state.pop("head.bias")
    state["blocks.0.attn.extra"] = torch.zeros(1)
    state["word_embed.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ReleaseFormatError) as info:
        load_release_var(bad, vqvae=vqvae)
    message = str(info.value)
    assert "bad.pth" in message and "head.bias" in message and "blocks.0.attn.extra" in message
    assert "word_embed.weight" in message


def test_corrupt_file_is_reported(tmp_path):
    path = tmp_path / "var_d16.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ReleaseFormatError, match="var_d16.pth"):
        load_release_var(path)


def test_check_state_dict_accepts_exact_match():
    _, var = tiny_pair()
    check_state_dict(var, var.state_dict(), "memory")
    assert isinstance(var, VAR)
