"""Codebook collapse and its cure (dead-code restarts) in tokenizer training, with the real Lightning training path."""

from __future__ import annotations

import pytest
import torch

from var_lab.config import DataConfig, FitTokenizerConfig, TokenizerModelConfig, TrackingConfig, TrainerConfig
from var_lab.models.quant import MultiScaleQuantizer

TINY = TokenizerModelConfig(
    vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 4, 8),
    using_sa=False, using_mid_sa=False,
)  # fmt: skip


def test_restart_codes_moves_only_dead_codes_onto_candidates():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(vocab_size=16, channels=4, patch_nums=(1, 2))
    hits_SV = torch.zeros(2, 16)
    hits_SV[:, :4] = 10.0  # codes 0-3 live, 4-15 never hit
    q.update_usage(hits_SV)
    dead_V = q.dead_codes(threshold=0.03)
    assert dead_V.tolist() == [False] * 4 + [True] * 12
    before = q.embedding.weight.detach().clone()
    candidates_NC = torch.randn(5, 4)
    assert q.restart_codes(dead_V, candidates_NC) == 12
    after = q.embedding.weight.detach()
    assert torch.equal(after[:4], before[:4])
    assert torch.equal(after[4:], candidates_NC[torch.arange(12) % 5])  # repeated when there are fewer rows
    assert not q.dead_codes(threshold=0.03).any()  # restarted codes get a uniform share: not dead again at once
    # a restarted code is the nearest one for the vector it was placed on
    assert q.nearest_code(candidates_NC).tolist() == [4, 5, 6, 7, 8]


def test_residual_vectors_are_what_each_scale_looks_up():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(vocab_size=32, channels=4, patch_nums=(1, 2, 4))
    f_BChw = torch.randn(3, 4, 4, 4)
    rows_NC = q.residual_vectors(f_BChw)
    assert rows_NC.shape == (3 * (1 + 4 + 16), 4)
    idx = torch.cat([i.reshape(-1) for i in q.f_to_idx(f_BChw)])
    # f_to_idx orders rows scale by scale and (b, h, w) within a scale, as residual_vectors does
    assert torch.equal(q.nearest_code(rows_NC), idx)


def _train(tmp_path, restart_every: int) -> dict:
    from var_lab.train import fit_tokenizer

    cfg = FitTokenizerConfig(
        output_dir=str(tmp_path / f"restart{restart_every}"),
        tokenizer=TINY,
        data=DataConfig(
            name="fashion_mnist", resolution=32, batch_size=16, num_workers=0, limit_train=1280, limit_val=128
        ),  # fmt: skip
        lr=2e-3,
        betas=(0.9, 0.99),
        dead_code_restart_every=restart_every,
        trainer=TrainerConfig(accelerator="cpu", max_epochs=1, enable_progress_bar=False, log_every_n_steps=10),
        tracking=TrackingConfig(tracking_uri="none"),
    )
    return fit_tokenizer(cfg)["metrics"]


@pytest.mark.slow
def test_a_collapsing_tiny_tokenizer_uses_its_codebook_with_dead_code_restarts(tmp_path, fashion_mnist_dir):
    collapsed = _train(tmp_path, restart_every=0)
    restarted = _train(tmp_path, restart_every=10)
    last = len(TINY.patch_nums) - 1
    # without restarts most codes are never selected on the validation images; with them nearly all are
    assert collapsed[f"val/usage_scale_{last}"] < 50, collapsed
    assert restarted[f"val/usage_scale_{last}"] >= 80, restarted
    assert restarted["val/psnr"] > collapsed["val/psnr"], (restarted, collapsed)
