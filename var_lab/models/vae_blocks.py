"""Convolutional encoder and decoder of the VQVAE (the latent-diffusion vq-f16 family, as in the VAR release).

Module and parameter names match the released ``vae_ch160v4096z32`` state dict so that it loads with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the release's 32 groups and eps 1e-6 (fewer groups when ``channels`` is not divisible)."""
    groups = num_groups
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    """Stride-2 3x3 convolution with asymmetric (right/bottom) zero padding, as in the release."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, pad=(0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self.conv1(F.silu(self.norm1(x_BChw)))
        h_BChw = self.conv2(self.dropout(F.silu(self.norm2(h_BChw))))
        return self.nin_shortcut(x_BChw) + h_BChw


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1 qkv convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.C = channels
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1, stride=1, padding=0)
        self.w_ratio = int(channels) ** (-0.5)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        qkv_B3Chw = self.qkv(self.norm(x_BChw))
        B, _, h, w = qkv_B3Chw.shape
        C = self.C
        q_BChw, k_BChw, v_BChw = qkv_B3Chw.reshape(B, 3, C, h, w).unbind(1)
        # Same arithmetic as the release (bmm, then scale) so that token indices match it exactly.
        q_BNC = q_BChw.reshape(B, C, h * w).permute(0, 2, 1)
        k_BCN = k_BChw.reshape(B, C, h * w)
        w_BNN = torch.bmm(q_BNC, k_BCN).mul_(self.w_ratio)
        w_BNN = F.softmax(w_BNN, dim=2)
        v_BCN = v_BChw.reshape(B, C, h * w)
        h_BCN = torch.bmm(v_BCN, w_BNN.permute(0, 2, 1))
        h_BChw = h_BCN.reshape(B, C, h, w)
        return x_BChw + self.proj_out(h_BChw)


class MidBlock(nn.Module):
    """The middle of the encoder and of the decoder: resnet block, optional self-attention, resnet block."""

    def __init__(self, channels: int, *, dropout: float = 0.0, using_sa: bool = True):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout)
        self.attn_1 = AttnBlock(channels) if using_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x_BChw)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, z_channels, H / 2**(levels-1), W / 2**(levels-1))."""

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
        z_channels: int = 32,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and using_sa:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)
        self.mid = MidBlock(block_in, dropout=dropout, using_sa=using_mid_sa)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        h_BChw = self.conv_in(img_B3HW)
        for i_level in range(self.num_resolutions):
            level = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h_BChw = level.block[i_block](h_BChw)
                if len(level.attn) > 0:
                    h_BChw = level.attn[i_block](h_BChw)
            if i_level != self.num_resolutions - 1:
                h_BChw = level.downsample(h_BChw)
        h_BChw = self.mid(h_BChw)
        return self.conv_out(F.silu(self.norm_out(h_BChw)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h * 2**(levels-1), w * 2**(levels-1)), unbounded."""

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
        z_channels: int = 32,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(block_in, dropout=dropout, using_sa=using_mid_sa)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and using_sa:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample2x(block_in)
            self.up.insert(0, up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self.mid(self.conv_in(z_BChw))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h_BChw = level.block[i_block](h_BChw)
                if len(level.attn) > 0:
                    h_BChw = level.attn[i_block](h_BChw)
            if i_level != 0:
                h_BChw = level.upsample(h_BChw)
        return self.conv_out(F.silu(self.norm_out(h_BChw)))
