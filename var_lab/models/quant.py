"""Multi-scale residual vector quantizer (VAR's ``VectorQuantizer2``) and its phi convolutions.

Scale k of K, with side p_k: the residual ``f_rest`` is area-downsampled to p_k x p_k (not at the last scale), each
vector takes its nearest code (squared L2), the codes are bicubic-upsampled back (not at the last scale), pass through
phi_k and are added to ``f_hat`` and subtracted from ``f_rest``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def phi_ticks(n: int) -> np.ndarray:
    """Positions in [0, 1] of n phi convolutions (the release's rule, with its special case for n = 4)."""
    if n == 4:
        return np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n)
    return np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)


def _nearest_tick(ticks: np.ndarray, t: float) -> int:
    return int(np.argmin(np.abs(ticks - t)))


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h)."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def _make_phi(channels: int, resi_ratio: float) -> nn.Module:
    return Phi(channels, resi_ratio) if abs(resi_ratio) > 1e-6 else nn.Identity()


class PhiShared(nn.Module):
    """One phi for every scale (``share_quant_resi = 1``)."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def at(self, t: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """n phi convolutions spread over the scales (``share_quant_resi = n > 1``)."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = phi_ticks(len(qresi_ls))

    def at(self, t: float) -> nn.Module:
        return self.qresi_ls[_nearest_tick(self.ticks, t)]


class PhiNonShared(nn.ModuleList):
    """One phi per scale (``share_quant_resi = 0``)."""

    def __init__(self, qresi: list[nn.Module]):
        super().__init__(qresi)
        self.ticks = phi_ticks(len(qresi))

    def at(self, t: float) -> nn.Module:
        return self[_nearest_tick(self.ticks, t)]


class MultiScaleQuantizer(nn.Module):
    """Residual quantizer over ``patch_nums`` scales sharing one codebook.

    Args:
        vocab_size: codebook size V.
        channels: code width Cvae.
        patch_nums: side of each scale, smallest first; the last equals the latent side.
        beta: commitment loss weight.
        quant_resi: phi mixing ratio r.
        share_quant_resi: 0 (one phi per scale), 1 (one shared phi) or n > 1 (n phis spread over the scales).
        default_qresi_counts: number of phis when ``share_quant_resi = 0`` (0: one per scale).
    """

    def __init__(
        self,
        vocab_size: int,
        channels: int,
        patch_nums: tuple[int, ...],
        beta: float = 0.25,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
    ):
        super().__init__()
        if len(patch_nums) < 2 or any(a >= b for a, b in zip(patch_nums, patch_nums[1:])) or patch_nums[0] < 1:
            raise ValueError(f"patch_nums must be at least two strictly increasing positive sides, got {patch_nums}")
        if share_quant_resi < 0:
            raise ValueError(f"share_quant_resi must be >= 0, got {share_quant_resi}")
        self.vocab_size = vocab_size
        self.Cvae = channels
        self.patch_nums = tuple(patch_nums)
        self.beta = beta
        if share_quant_resi == 0:
            count = default_qresi_counts or len(self.patch_nums)
            self.quant_resi = PhiNonShared([_make_phi(channels, quant_resi) for _ in range(count)])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(_make_phi(channels, quant_resi))
        else:
            phis = nn.ModuleList([_make_phi(channels, quant_resi) for _ in range(share_quant_resi)])
            self.quant_resi = PhiPartiallyShared(phis)
        # Codebook usage per scale (EMA of hit counts); the released files carry it.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.register_buffer("num_usage_updates", torch.zeros((), dtype=torch.long), persistent=False)
        self.embedding = nn.Embedding(vocab_size, channels)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def phi(self, si: int) -> nn.Module:
        """The phi convolution used at scale ``si``."""
        K = self.num_scales
        return self.quant_resi.at(si / (K - 1))

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry (squared L2) of each row: (N, Cvae) -> (N,)."""
        codes_VC = self.embedding.weight.data
        # Same arithmetic as the release so that indices match it exactly.
        d_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(codes_VC.square(), dim=1, keepdim=False)
        d_NV.addmm_(z_NC, codes_VC.T, alpha=-2, beta=1)
        return torch.argmin(d_NV, dim=1)

    def _upsampled_code(self, idx_Bhw: torch.Tensor, si: int, H: int, W: int) -> torch.Tensor:
        h_BChw = self.embedding(idx_Bhw).permute(0, 3, 1, 2)
        if si != self.num_scales - 1:
            h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
        return self.phi(si)(h_BChw.contiguous())

    def _quantize_scale(self, f_rest_BChw: torch.Tensor, si: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One residual step: the nearest codes of the residual at scale ``si`` and their upsampled, phi-refined map.

        Returns:
            ``idx_N`` (B * p * p,) and ``h_BChw`` (B, Cvae, H, W).
        """
        B, C, H, W = f_rest_BChw.shape
        pn = self.patch_nums[si]
        if si != self.num_scales - 1:
            rest_BChw = F.interpolate(f_rest_BChw, size=(pn, pn), mode="area")
        else:
            rest_BChw = f_rest_BChw
        rest_NC = rest_BChw.permute(0, 2, 3, 1).reshape(-1, C)
        idx_N = self.nearest_code(rest_NC)
        h_BChw = self._upsampled_code(idx_N.view(B, pn, pn), si, H, W)
        return idx_N, h_BChw

    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize for training, with the straight-through estimator.

        Args:
            f_BChw: encoder latent (B, Cvae, H, W).

        Returns:
            f_hat_BChw: quantized latent (gradient flows straight through to ``f_BChw``),
            vq_loss: mean over scales of commitment (beta) + codebook MSE,
            hits_SV: code hit counts per scale (float, this process only).
        """
        f_BChw = f_BChw.float()
        f_no_grad = f_BChw.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        K = self.num_scales
        hits_SV = torch.zeros(K, self.vocab_size, device=f_BChw.device)
        vq_loss = f_BChw.new_zeros(())
        for si in range(K):
            idx_N, h_BChw = self._quantize_scale(f_rest, si)
            hits_SV[si] = idx_N.bincount(minlength=self.vocab_size).float()
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw.detach()
            vq_loss = vq_loss + F.mse_loss(f_hat.data, f_BChw).mul(self.beta) + F.mse_loss(f_hat, f_no_grad)
        vq_loss = vq_loss / K
        f_hat = (f_hat.data - f_no_grad).add(f_BChw)
        return f_hat, vq_loss, hits_SV

    @torch.no_grad()
    def update_usage(self, hits_SV: torch.Tensor) -> None:
        """Update the EMA of code hits per scale (pass counts already summed over processes)."""
        n = int(self.num_usage_updates)
        if n == 0:
            self.ema_vocab_hit_SV.copy_(hits_SV)
        elif n < 100:
            self.ema_vocab_hit_SV.mul_(0.9).add_(hits_SV.mul(0.1))
        else:
            self.ema_vocab_hit_SV.mul_(0.99).add_(hits_SV.mul(0.01))
        self.num_usage_updates += 1

    def usage_percent(self, vectors_per_update: float) -> list[float]:
        """Percentage of codes in use per scale (hit at least 8% of a uniform share), as the release reports it."""
        margin = vectors_per_update / self.vocab_size * 0.08
        return [(self.ema_vocab_hit_SV[si] >= margin).float().mean().item() * 100 for si in range(self.num_scales)]

    @torch.no_grad()
    def residual_vectors(self, f_BChw: torch.Tensor) -> torch.Tensor:
        """Every residual vector the quantizer looks up, over all scales: (B, Cvae, H, W) -> (N, Cvae).

        Scale k contributes B * p_k^2 rows (the area-downsampled residual that scale k's nearest-code search sees).
        These are the candidates a dead code is restarted to.
        """
        f_rest = f_BChw.detach().float().clone()
        rows = []
        for si, pn in enumerate(self.patch_nums):
            rest = f_rest if si == self.num_scales - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            rows.append(rest.permute(0, 2, 3, 1).reshape(-1, self.Cvae))
            _, h_BChw = self._quantize_scale(f_rest, si)
            f_rest.sub_(h_BChw)
        return torch.cat(rows)

    @torch.no_grad()
    def dead_codes(self, threshold: float) -> torch.Tensor:
        """Codes whose hits, summed over scales, are under ``threshold`` of a uniform share: (V,) bool.

        Uses the EMA of hits (``update_usage``); all False before the first update.
        """
        if int(self.num_usage_updates) == 0:
            return torch.zeros(self.vocab_size, dtype=torch.bool, device=self.ema_vocab_hit_SV.device)
        hits_V = self.ema_vocab_hit_SV.sum(0)
        return hits_V < threshold * hits_V.sum() / self.vocab_size

    @torch.no_grad()
    def restart_codes(self, dead_V: torch.Tensor, candidates_NC: torch.Tensor) -> int:
        """Move every dead code onto a candidate vector and give it a uniform share of the usage EMA.

        The standard cure for codebook collapse (dead-code restarts, as in Jukebox / SoundStream): a code that no
        residual selects gets no gradient and would stay dead; placed on a residual it is selected at once.
        The nearest-code lookup itself is unchanged, so trained codebooks keep the released format.

        Args:
            dead_V: (V,) bool, which codes to move.
            candidates_NC: (n, Cvae) vectors to draw from, in order (the caller shuffles them; every process of a
                distributed run must pass the same rows so that the codebooks stay identical). Drawn with repetition
                when there are more dead codes than rows.

        Returns:
            The number of codes moved.
        """
        idx_dead = torch.nonzero(dead_V, as_tuple=False).flatten()
        n = int(idx_dead.numel())
        if n == 0 or candidates_NC.shape[0] == 0:
            return 0
        rows = torch.arange(n, device=candidates_NC.device) % candidates_NC.shape[0]
        weight = self.embedding.weight
        weight.data[idx_dead] = candidates_NC[rows].to(weight.dtype)
        uniform = self.ema_vocab_hit_SV.sum(1, keepdim=True) / self.vocab_size
        self.ema_vocab_hit_SV[:, idx_dead] = uniform.expand(-1, n)
        return n

    @torch.no_grad()
    def f_to_idx(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Token indices per scale of a latent: (B, Cvae, H, W) -> list of (B, p * p)."""
        B, _, H, W = f_BChw.shape
        if self.patch_nums[-1] != H or self.patch_nums[-1] != W:
            raise ValueError(f"latent is {H}x{W} but the last scale is {self.patch_nums[-1]}")
        f_rest = f_BChw.detach().float().clone()
        idx_list = []
        for si, pn in enumerate(self.patch_nums):
            idx_N, h_BChw = self._quantize_scale(f_rest, si)
            f_rest.sub_(h_BChw)
            idx_list.append(idx_N.reshape(B, pn * pn))
        return idx_list

    def idx_to_fhat(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Sum of every scale's upsampled, phi-refined codes: list of (B, p * p) -> (B, Cvae, H, W)."""
        B = idx_list[0].shape[0]
        H = W = self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
        for si, (pn, idx_Bl) in enumerate(zip(self.patch_nums, idx_list)):
            f_hat = f_hat + self._upsampled_code(idx_Bl.view(B, pn, pn), si, H, W)
        return f_hat

    def idx_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of the transformer: list of (B, p * p) -> (B, L - 1, Cvae).

        Rows for scale k+1 are the running ``f_hat`` after scales 0..k, area-downsampled to p_{k+1}.
        """
        B = idx_list[0].shape[0]
        C = self.Cvae
        H = W = self.patch_nums[-1]
        K = self.num_scales
        f_hat = self.embedding.weight.new_zeros(B, C, H, W, dtype=torch.float32)
        next_scales = []
        pn_next = self.patch_nums[0]
        for si in range(K - 1):
            h_BCpp = self.embedding(idx_list[si]).transpose(1, 2).reshape(B, C, pn_next, pn_next)
            h_BChw = F.interpolate(h_BCpp, size=(H, W), mode="bicubic")
            f_hat = f_hat + self.phi(si)(h_BChw)
            pn_next = self.patch_nums[si + 1]
            next_BCpp = F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
            next_scales.append(next_BCpp.view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1)

    def next_var_input(
        self, si: int, f_hat_BChw: torch.Tensor, h_BCpp: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of sampling: add scale ``si``'s codes to ``f_hat`` and return the next scale's input.

        Args:
            si: index of the scale just sampled.
            f_hat_BChw: running latent (B, Cvae, H, W), updated in place.
            h_BCpp: code vectors of scale ``si`` (B, Cvae, p, p).

        Returns:
            f_hat_BChw and the next scale's input (B, Cvae, p_next, p_next) (``f_hat`` itself after the last scale).
        """
        H = self.patch_nums[-1]
        K = self.num_scales
        if si != K - 1:
            h_BChw = self.phi(si)(F.interpolate(h_BCpp, size=(H, H), mode="bicubic"))
            f_hat_BChw.add_(h_BChw)
            pn_next = self.patch_nums[si + 1]
            return f_hat_BChw, F.interpolate(f_hat_BChw, size=(pn_next, pn_next), mode="area")
        f_hat_BChw.add_(self.phi(si)(h_BCpp))
        return f_hat_BChw, f_hat_BChw
