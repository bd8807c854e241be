"""Model sizes and the release's per-depth training recipe, from the single size knob ``depth``."""

from __future__ import annotations

from dataclasses import dataclass

from var_lab.config import DEPTH_RULE, depth_is_valid, invalid_message

# The release's recipe for ImageNet 256 (docs/var_reference.md). Batch is the global batch.
_RELEASE_RECIPES = {
    16: dict(global_batch=768, epochs=200, base_lr=1e-4, alng=1e-3, final_lr_ratio=0.1, final_weight_decay=0.05),
    20: dict(global_batch=768, epochs=250, base_lr=1e-4, alng=1e-3, final_lr_ratio=0.1, final_weight_decay=0.05),
    24: dict(global_batch=768, epochs=350, base_lr=8e-5, alng=1e-4, final_lr_ratio=0.01, final_weight_decay=0.05),
    30: dict(global_batch=1024, epochs=350, base_lr=8e-5, alng=1e-5, final_lr_ratio=0.01, final_weight_decay=0.08),
}


def width_for(depth: int) -> int:
    """The one size rule: width C = 64 * depth (and heads = depth, so the head dimension is always 64)."""
    return 64 * depth


def drop_path_for(depth: int) -> float:
    """Stochastic depth of the last block, the release's 0.1 * depth / 24."""
    return 0.1 * depth / 24


@dataclass(frozen=True)
class VARPreset:
    """Architecture and recipe derived from ``depth``."""

    depth: int
    global_batch: int
    epochs: int
    base_lr: float
    alng: float
    final_lr_ratio: float
    final_weight_decay: float
    recipe_source: str
    """Which released depth the recipe was taken from (the nearest one for other depths)."""

    @property
    def width(self) -> int:
        return width_for(self.depth)

    @property
    def heads(self) -> int:
        return self.depth

    @property
    def drop_path_rate(self) -> float:
        return drop_path_for(self.depth)

    def core_params(self) -> int:
        """N(d) = 18 d (64 d)^2: attention 4w^2 + MLP 8w^2 + AdaLN 6w^2 per block (the paper's count)."""
        return 18 * self.depth * self.width**2


def from_depth(depth: int) -> VARPreset:
    """The preset for a depth: width 64 * depth, heads = depth, drop path 0.1 * depth / 24, the release's recipe.

    Depths without a released recipe take the recipe of the nearest released depth (ties go to the smaller).
    """
    if not depth_is_valid(depth):
        raise ValueError(invalid_message("depth", depth, DEPTH_RULE))
    nearest = min(_RELEASE_RECIPES, key=lambda d: (abs(d - depth), d))
    source = f"release d{nearest}" if nearest == depth else f"release d{nearest} (nearest to d{depth})"
    return VARPreset(depth=depth, recipe_source=source, **_RELEASE_RECIPES[nearest])
