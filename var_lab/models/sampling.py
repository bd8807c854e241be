"""Token sampling: classifier-free guidance schedule, top-k and top-p filtering with a seeded generator."""

from __future__ import annotations

from typing import Optional

import torch


def cfg_ratio(cfg: float, si: int, num_scales: int) -> float:
    """Guidance strength at scale ``si``: grows linearly from 0 to ``cfg`` over the scales."""
    return cfg * si / max(num_scales - 1, 1)


def guided_logits(logits_2BlV: torch.Tensor, t: float) -> torch.Tensor:
    """(1 + t) * cond - t * uncond, with the conditional half first: (2B, l, V) -> (B, l, V)."""
    B = logits_2BlV.shape[0] // 2
    return (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]


def filter_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask (in place, to -inf) every logit outside the top-k and outside the top-p nucleus.

    Args:
        logits_BlV: logits (B, l, V), modified in place.
        top_k: keep the k largest (0: off).
        top_p: keep the smallest set whose probability reaches top_p (0: off).

    Returns:
        ``logits_BlV``.
    """
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth_Bl1 = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_Bl1, -torch.inf)
    if top_p > 0:
        sorted_BlV, sorted_idx_BlV = logits_BlV.sort(dim=-1, descending=False)
        remove_sorted_BlV = sorted_BlV.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove_sorted_BlV[..., -1:] = False
        remove_BlV = remove_sorted_BlV.scatter(sorted_idx_BlV.ndim - 1, sorted_idx_BlV, remove_sorted_BlV)
        logits_BlV.masked_fill_(remove_BlV, -torch.inf)
    return logits_BlV


def sample_top_k_top_p(
    logits_BlV: torch.Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Sample one token per position after top-k/top-p filtering: (B, l, V) -> (B, l) indices.

    ``logits_BlV`` is modified in place. With ``top_k = 1`` this is greedy decoding.
    """
    B, l, V = logits_BlV.shape
    filter_top_k_top_p_(logits_BlV, top_k=top_k, top_p=top_p)
    probs_NV = logits_BlV.softmax(dim=-1).view(-1, V)
    idx_N = torch.multinomial(probs_NV, num_samples=1, replacement=True, generator=generator)
    return idx_N.view(B, l)
