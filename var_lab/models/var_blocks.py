"""Transformer blocks of VAR: AdaLN-conditioned self-attention blocks with block-causal attention.

Attention kernels (``attn_impl``):
    - ``math``: the release's arithmetic with a dense additive mask (reference; slow).
    - ``sdpa``: ``F.scaled_dot_product_attention`` with a boolean block-causal mask (default on CPU).
    - ``flex``: FlexAttention with a block mask, compiled (default on CUDA): no dense L x L tensor per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLS = ("auto", "math", "sdpa", "flex")


def resolve_attn_impl(attn_impl: str, device: torch.device) -> str:
    """``auto`` -> ``flex`` on CUDA, ``sdpa`` elsewhere."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    if attn_impl == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return attn_impl


_compiled_flex = None


def _flex_attention(q_BHLc, k_BHLc, v_BHLc, block_mask, scale: float):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        # Uncompiled FlexAttention materialises the scores; compiled it is a fused kernel.
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q_BHLc, k_BHLc, v_BHLc, block_mask=block_mask, scale=scale)


@dataclass
class BlockCausalMask:
    """The block-causal mask in the form the chosen kernel wants.

    Attributes:
        impl: ``math``, ``sdpa`` or ``flex``.
        mask: float additive bias (1, 1, L, L) for math, bool (L, L) for sdpa (True = attend), a BlockMask for flex.
    """

    impl: str
    mask: object


class LayerKVCache:
    """Preallocated keys and values of one layer for scale-by-scale sampling (static shapes, no re-allocation)."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.k_BHLc = torch.empty(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v_BHLc = torch.empty(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.length = 0

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this scale's keys and values; return all keys and values so far."""
        end = self.length + k_BHlc.shape[2]
        self.k_BHLc[:, :, self.length : end] = k_BHlc
        self.v_BHLc[:, :, self.length : end] = v_BHlc
        self.length = end
        return self.k_BHLc[:, :, :end], self.v_BHLc[:, :, :end]


class DropPath(nn.Module):
    """Stochastic depth with the rate in a (non-persistent) 0-d buffer, not a Python float.

    torch.compile specialises on Python floats read in ``forward`` (a guard ``drop_prob == 0.0312...``), so blocks
    with different rates could not share one compiled graph: dynamo recompiled once per block and gave up after its
    recompile limit. As a tensor the rate is a graph input, and the 16-30 blocks of a VAR share one graph. The
    buffer is not in the state dict (the released checkpoints have no such key). A rate of 0 (the first block)
    keeps every sample exactly (a mask of ones): every block has the same module types, hence one graph.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob), persistent=False)

    @property
    def drop_prob(self) -> float:
        return 1.0 - float(self.keep_prob)

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {value}")
        self.keep_prob.fill_(1.0 - value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        # per sample, rescaled by the keep probability
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = torch.bernoulli(self.keep_prob.expand(shape)).div_(self.keep_prob)
        return x * keep.to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


class FFN(nn.Module):
    """fc1 -> tanh-GELU -> fc2."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x_BLC))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with learned q and v biases (k bias fixed at zero), optionally L2-normalised."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_l2_norm: bool = True,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(
        self,
        x_BLC: torch.Tensor,
        mask: Optional[BlockCausalMask],
        kv_cache: Optional[LayerKVCache] = None,
    ) -> torch.Tensor:
        """Attend within the block-causal mask, or over the cache (sampling; then ``mask`` is None)."""
        B, L, C = x_BLC.shape
        qkv_bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv_BL3Hc = F.linear(x_BLC, self.mat_qkv.weight, qkv_bias).view(B, L, 3, self.num_heads, self.head_dim)
        q_BHLc, k_BHLc, v_BHLc = qkv_BL3Hc.permute(2, 0, 3, 1, 4).unbind(dim=0)
        if self.attn_l2_norm:
            scale_mul_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q_BHLc = F.normalize(q_BHLc, dim=-1).mul(scale_mul_1H11)
            k_BHLc = F.normalize(k_BHLc, dim=-1)
        if kv_cache is not None:
            k_BHLc, v_BHLc = kv_cache.append(k_BHLc.to(kv_cache.k_BHLc.dtype), v_BHLc.to(kv_cache.v_BHLc.dtype))
            q_BHLc = q_BHLc.to(k_BHLc.dtype)
        dropout_p = self.attn_drop if self.training else 0.0
        if mask is None:
            out_BHLc = F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, dropout_p=dropout_p, scale=self.scale)
        elif mask.impl == "math":
            attn_BHLL = q_BHLc.mul(self.scale) @ k_BHLc.transpose(-2, -1)
            attn_BHLL = attn_BHLL.add_(mask.mask.to(attn_BHLL.dtype)).softmax(dim=-1)
            if dropout_p > 0:
                attn_BHLL = F.dropout(attn_BHLL, p=dropout_p)
            out_BHLc = attn_BHLL @ v_BHLc
        elif mask.impl == "sdpa":
            out_BHLc = F.scaled_dot_product_attention(
                q_BHLc, k_BHLc, v_BHLc, attn_mask=mask.mask, dropout_p=dropout_p, scale=self.scale
            )
        elif mask.impl == "flex":
            if dropout_p > 0:
                raise ValueError("attention dropout is not supported by the flex kernel; use attn_impl=sdpa")
            out_BHLc = _flex_attention(q_BHLc, k_BHLc, v_BHLc, mask.mask, self.scale)
        else:
            raise ValueError(f"unknown attention implementation {mask.impl!r}")
        out_BLC = out_BHLc.transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(out_BLC))


class AdaLNSelfAttn(nn.Module):
    """x += gamma1 * attn(ln(x) * (1 + scale1) + shift1); x += gamma2 * mlp(ln(x) * (1 + scale2) + shift2)."""

    def __init__(
        self,
        embed_dim: int,
        cond_dim: int,
        num_heads: int,
        shared_aln: bool = False,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        attn_l2_norm: bool = True,
    ):
        super().__init__()
        self.C = embed_dim
        self.D = cond_dim
        self.drop_path = DropPath(drop_path)  # also at rate 0, so that every block has the same code to compile
        self.attn = SelfAttention(embed_dim, num_heads, attn_drop=attn_drop, proj_drop=drop, attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """gamma1, gamma2, scale1, scale2, shift1, shift2, each (B, 1, C).

        ``cond`` is the class embedding (B, D), or with shared AdaLN the shared projection (B, 1, 6, C).
        """
        if self.shared_aln:
            return (self.ada_gss + cond).unbind(2)
        return self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)

    def compile_teacher_forcing(self, **compile_kwargs) -> None:
        """torch.compile this block's teacher-forcing path (training and validation; sampling stays eager).

        Regional compilation: every block of a VAR runs the same code with the same shapes and no per-block Python
        constants (see ``DropPath``), so dynamo compiles one graph per (mode, batch shape) and all blocks reuse it.
        The KV-cached sampling path, whose shapes change at every scale, is not compiled.
        """
        self._compiled_tf = torch.compile(self._forward, **compile_kwargs)

    def forward(
        self,
        x_BLC: torch.Tensor,
        cond: torch.Tensor,
        mask: Optional[BlockCausalMask],
        kv_cache: Optional[LayerKVCache] = None,
    ) -> torch.Tensor:
        compiled = self.__dict__.get("_compiled_tf")
        if compiled is not None and kv_cache is None and not torch.compiler.is_compiling():
            return compiled(x_BLC, cond, mask)
        return self._forward(x_BLC, cond, mask, kv_cache)

    def _forward(
        self,
        x_BLC: torch.Tensor,
        cond: torch.Tensor,
        mask: Optional[BlockCausalMask],
        kv_cache: Optional[LayerKVCache] = None,
    ) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond)
        h_BLC = self.ln_wo_grad(x_BLC).mul(scale1.add(1)).add_(shift1)
        # Out of place (the release scales in place): where dynamo breaks the graph between the attention and this
        # product, an in-place mul_ mutates the next graph's input, which that graph also saved for backward, and the
        # backward fails ("modified by an inplace operation ... CopyBackwards"; issue 18, resumed compiled runs).
        x_BLC = x_BLC + self.drop_path(self.attn(h_BLC, mask, kv_cache).mul(gamma1))
        h_BLC = self.ln_wo_grad(x_BLC).mul(scale2.add(1)).add_(shift2)
        x_BLC = x_BLC + self.drop_path(self.ffn(h_BLC).mul(gamma2))
        return x_BLC


class AdaLNBeforeHead(nn.Module):
    """LayerNorm without affine, then AdaLN scale and shift from the class embedding."""

    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.C = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale_B1C, shift_B1C = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale_B1C.add(1)).add_(shift_B1C)


class SharedAdaLin(nn.Linear):
    """The shared AdaLN projection (B, D) -> (B, 1, 6, C), computed once for all blocks."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)
