"""The VAR transformer: next-scale prediction over the tokenizer's multi-scale token maps.

State dict keys match the released ``var_d{16,20,24,30}.pth`` (including the buffers ``lvl_1L`` and
``attn_bias_for_masking`` that the released files carry).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from var_lab.config import DEPTH_RULE, depth_is_valid, invalid_message
from var_lab.models.presets import drop_path_for, width_for
from var_lab.models.sampling import cfg_ratio, guided_logits, sample_top_k_top_p
from var_lab.models.var_blocks import (
    AdaLNBeforeHead,
    AdaLNSelfAttn,
    BlockCausalMask,
    LayerKVCache,
    SharedAdaLin,
    resolve_attn_impl,
)
from var_lab.models.vqvae import VQVAE

if TYPE_CHECKING:
    from var_lab.config import VARModelConfig


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer.

    Args:
        vqvae: the tokenizer (kept as a plain attribute, not a submodule, so the state dict matches the release);
            may be None for shape-only use, then ``vocab_size`` and ``z_channels`` are required.
        num_classes: number of classes; the class table has one more row ("no class").
        depth: number of blocks.
        embed_dim: width C (default 64 * depth).
        num_heads: heads (default depth).
        mlp_ratio: MLP hidden width / C.
        drop_rate: dropout after attention projection and MLP.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth of the last block (default 0.1 * depth / 24), linear over blocks.
        norm_eps: LayerNorm epsilon.
        shared_aln: one AdaLN projection for all blocks.
        cond_drop_rate: label dropping probability in training.
        attn_l2_norm: L2-normalised attention with a learned per-head scale.
        patch_nums: scale sides (default: the tokenizer's).
        attn_impl: ``auto``, ``flex``, ``sdpa`` or ``math`` (see ``var_blocks``).
        init_adaln_gamma: initial scale of the AdaLN gamma rows (the release's ``alng``).
        vocab_size: V when ``vqvae`` is None.
        z_channels: Cvae when ``vqvae`` is None.
    """

    def __init__(
        self,
        vqvae: Optional[VQVAE] = None,
        num_classes: int = 1000,
        depth: int = 16,
        embed_dim: Optional[int] = None,
        num_heads: Optional[int] = None,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: Optional[float] = None,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        cond_drop_rate: float = 0.1,
        attn_l2_norm: bool = True,
        patch_nums: Optional[tuple[int, ...]] = None,
        attn_impl: str = "auto",
        init_adaln_gamma: float = 1e-3,
        vocab_size: Optional[int] = None,
        z_channels: Optional[int] = None,
    ):
        super().__init__()
        if not depth_is_valid(depth):
            raise ValueError(invalid_message("depth", depth, DEPTH_RULE))
        embed_dim = width_for(depth) if embed_dim is None else embed_dim
        num_heads = depth if num_heads is None else num_heads
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if vqvae is not None:
            vocab_size = vqvae.vocab_size
            z_channels = vqvae.Cvae
            patch_nums = vqvae.patch_nums if patch_nums is None else tuple(patch_nums)
            if tuple(patch_nums) != tuple(vqvae.patch_nums):
                raise ValueError(f"patch_nums {patch_nums} differ from the tokenizer's {vqvae.patch_nums}")
        if vocab_size is None or z_channels is None or patch_nums is None:
            raise ValueError("without a vqvae, vocab_size, z_channels and patch_nums are required")
        self._vqvae = [vqvae]  # a list hides it from nn.Module registration (not part of the state dict)
        self.V = vocab_size
        self.Cvae = z_channels
        self.depth = depth
        self.C = self.D = embed_dim
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.cond_drop_rate = cond_drop_rate
        self.shared_aln = shared_aln
        self.attn_impl = attn_impl
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.drop_path_rate = drop_path_for(depth) if drop_path_rate is None else drop_path_rate
        #: recompute each block in the backward pass (memory for compute); set by the training module
        self.activation_checkpointing = False

        init_std = math.sqrt(1 / self.C / 3)
        self.word_embed = nn.Linear(self.Cvae, self.C)
        self.class_emb = nn.Embedding(num_classes + 1, self.C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(self.D, 6 * self.C)) if shared_aln else nn.Identity()
        )
        # Linear over blocks; plain floats so that construction also works on the meta device.
        dpr = [self.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            [
                AdaLNSelfAttn(
                    embed_dim=self.C,
                    cond_dim=self.D,
                    num_heads=num_heads,
                    shared_aln=shared_aln,
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_eps=norm_eps,
                    attn_l2_norm=attn_l2_norm,
                )
                for i in range(depth)
            ]
        )
        lvl_L = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", lvl_L.view(1, self.L).contiguous())
        mask_LL = lvl_L.view(self.L, 1) >= lvl_L.view(1, self.L)
        bias_11LL = torch.where(mask_LL, 0.0, -torch.inf).reshape(1, 1, self.L, self.L)
        self.register_buffer("attn_bias_for_masking", bias_11LL.contiguous())
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_eps=norm_eps)
        self.head = nn.Linear(self.C, self.V)
        self._mask_cache: dict = {}
        self.init_weights(init_adaln_gamma=init_adaln_gamma, init_std=init_std)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_config(cls, config: VARModelConfig, vqvae: Optional[VQVAE], init_adaln_gamma: float = 1e-3) -> VAR:
        """A transformer of the architecture in ``config`` (its fields are this constructor's arguments) on top of
        ``vqvae``; ``num_classes`` must be resolved. ``init_adaln_gamma`` is the recipe's ``optim.alng``."""
        if config.num_classes is None:
            raise ValueError("model.num_classes must be resolved (from the dataset) before building the model")
        kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return cls(vqvae=vqvae, init_adaln_gamma=init_adaln_gamma, **kwargs)

    @property
    def vqvae(self) -> Optional[VQVAE]:
        """The tokenizer used by ``sample`` (not a submodule: move it to a device yourself)."""
        return self._vqvae[0]

    def attach_tokenizer(self, vqvae: VQVAE) -> None:
        """Use ``vqvae`` for sampling; it must have this model's vocabulary, channels and scales."""
        if (vqvae.vocab_size, vqvae.Cvae, tuple(vqvae.patch_nums)) != (self.V, self.Cvae, self.patch_nums):
            raise ValueError(
                f"tokenizer (V={vqvae.vocab_size}, Cvae={vqvae.Cvae}, patch_nums={vqvae.patch_nums}) does not match "
                f"the transformer (V={self.V}, Cvae={self.Cvae}, patch_nums={self.patch_nums})"
            )
        self._vqvae = [vqvae]

    @torch.no_grad()
    def init_weights(
        self,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-3,
        init_head: float = 0.02,
        init_std: Optional[float] = None,
    ) -> None:
        """The release's initialisation (truncated normal std sqrt(1/(3C)), scaled head, AdaLN and residual outputs)."""
        if init_std is None or init_std < 0:
            init_std = math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=init_std)
        nn.init.trunc_normal_(self.pos_start, std=init_std)
        nn.init.trunc_normal_(self.pos_1LC, std=init_std)
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        if self.shared_aln:
            self.shared_ada_lin[-1].weight.mul_(init_adaln)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if block.shared_aln:
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[-1].weight[2 * self.C :].mul_(init_adaln)
                block.ada_lin[-1].weight[: 2 * self.C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()

    # ------------------------------------------------------------------ scaling metadata
    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts by group: ``embed``, ``blocks`` (attention + MLP), ``adaln``, ``head``, ``total``."""
        counts = {"embed": 0, "blocks": 0, "adaln": 0, "head": 0}
        for name, p in self.named_parameters():
            if name.startswith(("word_embed", "class_emb", "pos_start", "pos_1LC", "lvl_embed")):
                group = "embed"
            elif ".ada_lin." in name or name.endswith("ada_gss") or name.startswith(("shared_ada_lin", "head_nm")):
                group = "adaln"
            elif name.startswith("blocks."):
                group = "blocks"
            elif name.startswith("head."):
                group = "head"
            else:
                raise AssertionError(f"parameter {name} has no scaling group")
            counts[group] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def estimate_flops(self) -> float:
        """Training FLOPs per image (forward + backward): 3 * (2 L (12 d C^2 + C V + Cvae C) + 4 d L^2 C)."""
        L = self.L
        C = self.C
        per_token = 12 * self.depth * C * C + C * self.V + self.Cvae * C
        return 3.0 * (2.0 * L * per_token + 4.0 * self.depth * L * L * C)

    def scaling_metadata(self) -> dict[str, object]:
        """The ``model.*`` params of the MLflow contract: size, parameter counts by group, FLOPs per image, scales."""
        counts = self.num_scaling_params()
        return {
            "model.depth": self.depth,
            "model.width": self.C,
            "model.heads": self.num_heads,
            "model.params_total": counts["total"],
            "model.params_blocks": counts["blocks"],
            "model.params_embed": counts["embed"],
            "model.params_adaln": counts["adaln"],
            "model.params_head": counts["head"],
            "model.flops_per_image": self.estimate_flops(),
            "model.patch_nums": ",".join(str(pn) for pn in self.patch_nums),
        }

    # ------------------------------------------------------------------ forward (teacher forcing)
    def block_causal_mask(self, device: torch.device, length: Optional[int] = None) -> BlockCausalMask:
        """The block-causal mask for the first ``length`` tokens, built once per device and kernel."""
        length = self.L if length is None else length
        impl = resolve_attn_impl(self.attn_impl, device)
        key = (impl, str(device), length)
        if key not in self._mask_cache:
            # Never inference tensors, even when first built under Lightning's inference_mode validation: the cached
            # mask is reused by training, whose compiled backward saves it.
            with torch.inference_mode(False):
                self._mask_cache[key] = self._build_mask(impl, device, length)
        return self._mask_cache[key]

    def _build_mask(self, impl: str, device: torch.device, length: int) -> BlockCausalMask:
        """The mask of ``length`` tokens for kernel ``impl`` (see ``block_causal_mask``)."""
        if impl == "math":
            mask = self.attn_bias_for_masking[:, :, :length, :length]
        elif impl == "sdpa":
            mask = self.attn_bias_for_masking[0, 0, :length, :length] == 0
        else:
            from torch.nn.attention.flex_attention import create_block_mask

            lvl_L = self.lvl_1L[0, :length].to(device)

            def block_causal(b, h, q_idx, kv_idx):
                return lvl_L[q_idx] >= lvl_L[kv_idx]

            mask = create_block_mask(block_causal, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)
        return BlockCausalMask(impl, mask)

    def _apply(self, fn, recurse=True):
        self._mask_cache = {}  # masks live on a device; rebuild after .to()/.cuda()
        return super()._apply(fn, recurse)

    def get_logits(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Head: AdaLN before head, then the vocabulary projection, in float32: -> (B, L, V)."""
        return self.head(self.head_nm(x_BLC.float(), cond_BD).float()).float()

    def forward(self, labels_B: torch.Tensor, x_BLCv: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing logits.

        Args:
            labels_B: class labels (B,) in [0, num_classes); in training they are dropped to "no class" with
                probability ``cond_drop_rate``.
            x_BLCv: teacher-forcing input (B, L - 1, Cvae) from ``vqvae.idx_to_var_input``.

        Returns:
            logits_BLV in float32.
        """
        B = x_BLCv.shape[0]
        device = x_BLCv.device
        if self.training and self.cond_drop_rate > 0:
            drop_B = torch.rand(B, device=device) < self.cond_drop_rate
            labels_B = torch.where(drop_B, self.num_classes, labels_B)
        # Embeddings in float32, as the release does, then the residual stream in the autocast dtype.
        with torch.autocast(device_type=device.type, enabled=False):
            cond_BD = self.class_emb(labels_B)
            sos_BlC = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos_BlC, self.word_embed(x_BLCv.float())), dim=1)
            x_BLC = x_BLC + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        if torch.is_autocast_enabled(device.type):
            main_dtype = torch.get_autocast_dtype(device.type)
        else:
            main_dtype = x_BLC.dtype
        x_BLC = x_BLC.to(main_dtype)
        cond = self.shared_ada_lin(cond_BD).to(main_dtype)
        mask = self.block_causal_mask(device)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x_BLC = checkpoint(block, x_BLC, cond, mask, None, use_reentrant=False)
            else:
                x_BLC = block(x_BLC, cond, mask)
        return self.get_logits(x_BLC, cond_BD)

    # ------------------------------------------------------------------ sampling
    @contextmanager
    def _eval_mode(self):
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def sample_tokens(
        self,
        labels_B: torch.Tensor,
        cfg: float = 1.5,
        top_k: int = 900,
        top_p: float = 0.96,
        generator: Optional[torch.Generator] = None,
        known_idx: Optional[list[torch.Tensor]] = None,
        known_mask: Optional[list[torch.Tensor]] = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Scale-by-scale sampling with a KV cache and classifier-free guidance.

        With ``known_idx`` and ``known_mask`` (zero-shot editing, the paper's in-/out-painting), the tokens of the known
        region are teacher-forced at every scale: wherever ``known_mask[k]`` is true, scale k keeps ``known_idx[k]``
        instead of its sample, and the next scales are conditioned on it; the rest is sampled.

        Args:
            labels_B: class labels (B,); a label equal to ``num_classes`` samples unconditionally.
            cfg: guidance ratio; at scale k the strength is cfg * k / (K - 1).
            top_k: top-k filter (0: off).
            top_p: top-p filter (0: off).
            generator: a torch.Generator on the model's device for reproducible samples.
            known_idx: per scale, the token indices of the given image (B, p * p) (``VQVAE.img_to_idx``).
            known_mask: per scale, which of them to keep (B, p * p) bool (:func:`token_masks`).

        Returns:
            idx_list (token indices per scale, each (B, p * p)) and the final latent f_hat (B, Cvae, H, W).
        """
        if (known_idx is None) != (known_mask is None):
            raise ValueError("known_idx and known_mask go together")
        if known_idx is not None and not (len(known_idx) == len(known_mask) == len(self.patch_nums)):
            raise ValueError(f"known_idx and known_mask need one tensor per scale ({len(self.patch_nums)})")
        vqvae = self.vqvae
        if vqvae is None:
            raise RuntimeError("this VAR has no tokenizer attached: call attach_tokenizer(vqvae) first")
        quantizer = vqvae.quantize
        B = labels_B.shape[0]
        device = self.pos_1LC.device
        labels_B = labels_B.to(device)
        K = len(self.patch_nums)
        with self._eval_mode():
            cond_2BD = self.class_emb(torch.cat((labels_B, torch.full_like(labels_B, self.num_classes))))
            lvl_pos_1LC = self.lvl_embed(self.lvl_1L) + self.pos_1LC
            first_2BlC = cond_2BD.unsqueeze(1).expand(2 * B, self.first_l, -1)
            x_2BlC = first_2BlC + self.pos_start.expand(2 * B, self.first_l, -1) + lvl_pos_1LC[:, : self.first_l]
            if torch.is_autocast_enabled(device.type):
                cache_dtype = torch.get_autocast_dtype(device.type)
            else:
                cache_dtype = x_2BlC.dtype
            head_dim = self.C // self.num_heads
            caches = [LayerKVCache(2 * B, self.num_heads, self.L, head_dim, cache_dtype, device) for _ in self.blocks]
            f_hat_BChw = cond_2BD.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
            cond = self.shared_ada_lin(cond_2BD)
            idx_list = []
            cur_L = 0
            for si, pn in enumerate(self.patch_nums):
                cur_L += pn * pn
                for block, cache in zip(self.blocks, caches):
                    x_2BlC = block(x_2BlC, cond, None, cache)
                logits_BlV = guided_logits(self.get_logits(x_2BlC, cond_2BD), cfg_ratio(cfg, si, K))
                idx_Bl = sample_top_k_top_p(logits_BlV, top_k=top_k, top_p=top_p, generator=generator)
                if known_idx is not None:
                    keep_Bl = known_mask[si].to(device=device, dtype=torch.bool)
                    idx_Bl = torch.where(keep_Bl, known_idx[si].to(device=device, dtype=idx_Bl.dtype), idx_Bl)
                idx_list.append(idx_Bl)
                h_BlCv = quantizer.embedding(idx_Bl)
                h_BCpp = h_BlCv.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
                f_hat_BChw, next_BCpp = quantizer.next_var_input(si, f_hat_BChw, h_BCpp)
                if si != K - 1:
                    next_BlCv = next_BCpp.view(B, self.Cvae, -1).transpose(1, 2)
                    pn_next = self.patch_nums[si + 1]
                    x_BlC = self.word_embed(next_BlCv) + lvl_pos_1LC[:, cur_L : cur_L + pn_next * pn_next]
                    x_2BlC = x_BlC.repeat(2, 1, 1)
        return idx_list, f_hat_BChw

    @torch.no_grad()
    def sample(
        self,
        labels_B: torch.Tensor,
        cfg: float = 1.5,
        top_k: int = 900,
        top_p: float = 0.96,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Sample images for the given labels: (B,) -> images (B, 3, H, W) in [0, 1].

        See ``sample_tokens`` for the arguments. The same generator seed gives the same images.
        """
        _, f_hat_BChw = self.sample_tokens(labels_B, cfg=cfg, top_k=top_k, top_p=top_p, generator=generator)
        return self._decode(f_hat_BChw)

    def _decode(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """The tokenizer's decoder on a sampled latent: (B, Cvae, h, w) -> images (B, 3, H, W) in [0, 1]."""
        vqvae = self.vqvae
        with self._eval_mode():
            img_B3HW = vqvae.fhat_to_img(f_hat_BChw.to(vqvae.post_quant_conv.weight.dtype))
        return img_B3HW.float().add_(1).mul_(0.5)

    @torch.no_grad()
    def edit(
        self,
        img_B3HW: torch.Tensor,
        keep_B1HW: torch.Tensor,
        labels_B: torch.Tensor,
        cfg: float = 1.5,
        top_k: int = 900,
        top_p: float = 0.96,
        generator: Optional[torch.Generator] = None,
        composite: bool = True,
    ) -> torch.Tensor:
        """Zero-shot in-painting, out-painting or class-conditional editing of images.

        The image's tokens (every scale) inside the kept region are teacher-forced and the rest is sampled for
        ``labels_B``: keep the border to in-paint a hole, keep the centre to out-paint, keep everything but an object
        and give another class to edit it.

        Args:
            img_B3HW: images in [0, 1] at the tokenizer's resolution.
            keep_B1HW: 1 where the image is kept, 0 where it is generated (any float in [0, 1]; a token is kept only
                when its whole cell is kept, see :func:`token_masks`).
            labels_B: class labels (B,) of what to generate.
            cfg, top_k, top_p, generator: as in ``sample_tokens``.
            composite: paste the given pixels back where ``keep_B1HW`` is 1 (the coarse scales that straddle the
                boundary are sampled, so the decoded known region is close to, not equal to, the input).

        Returns:
            Images (B, 3, H, W) in [0, 1].
        """
        vqvae = self.vqvae
        if vqvae is None:
            raise RuntimeError("this VAR has no tokenizer attached: call attach_tokenizer(vqvae) first")
        device = self.pos_1LC.device
        with self._eval_mode():
            known_idx = vqvae.img_to_idx(img_B3HW.to(device).mul(2).sub(1))
        known_mask = token_masks(keep_B1HW.to(device), self.patch_nums)
        _, f_hat_BChw = self.sample_tokens(
            labels_B, cfg=cfg, top_k=top_k, top_p=top_p, generator=generator, known_idx=known_idx, known_mask=known_mask
        )
        out_B3HW = self._decode(f_hat_BChw)
        if composite:
            keep = keep_B1HW.to(out_B3HW).clamp(0, 1)
            out_B3HW = keep * img_B3HW.to(out_B3HW) + (1 - keep) * out_B3HW
        return out_B3HW


def token_masks(keep_B1HW: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
    """Which token of each scale lies wholly in the kept region: (B, 1, H, W) in [0, 1] -> list of (B, p * p) bool.

    A token of a p x p scale covers an H/p x W/p cell of the image; it is known only when the whole cell is kept
    (area average 1), so every pixel to generate is generated at every scale.
    """
    if keep_B1HW.dim() != 4 or keep_B1HW.shape[1] != 1:
        raise ValueError(f"keep mask must be (B, 1, H, W), got {tuple(keep_B1HW.shape)}")
    keep = keep_B1HW.float()
    return [
        (F.interpolate(keep, size=(pn, pn), mode="area") >= 1 - 1e-6).reshape(keep.shape[0], pn * pn)
        for pn in patch_nums
    ]


def loss_per_token(logits_BLV: torch.Tensor, target_BL: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of every token (B, L), in nats."""
    B, L, V = logits_BLV.shape
    loss_N = F.cross_entropy(
        logits_BLV.reshape(-1, V), target_BL.reshape(-1), reduction="none", label_smoothing=label_smoothing
    )
    return loss_N.view(B, L)
