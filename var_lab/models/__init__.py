"""Plain ``nn.Module`` models of var-lab: the multi-scale VQVAE tokenizer and the VAR transformer.

Nothing in this package imports Lightning or touches global distributed state; the LightningModules in
``var_lab.modules`` wrap these models and parallelism is chosen by the Trainer.

Axis-suffix legend
------------------
Tensor names carry their axes as suffixes, as in the original release. A name is renamed after every reshape.

====  ==========================================================================
B     batch
L     all tokens of an image over every scale (``sum(p * p for p in patch_nums)``)
l     tokens of one scale (``p * p``), or a prefix of L during cached sampling
C     transformer width (``64 * depth``)
Cv    tokenizer latent channels (``Cvae``, ``z_channels``)
D     conditioning width (the class embedding; equals C)
H, W  image height and width (also latent height and width in ``_BChw``)
h, w  latent height and width of one scale
p     side of one scale (``patch_nums[k]``)
V     codebook size (vocabulary)
K     number of scales
N     flattened batch of vectors (``B * h * w``)
S     scales (rows of per-scale statistics)
1     a broadcast axis of size one
====  ==========================================================================

Examples: ``x_BLC`` transformer activations, ``idx_Bl`` token indices of one scale, ``logits_BLV`` logits,
``f_BCvhw`` latent feature map, ``img_B3HW`` images.
"""

from var_lab.models.presets import VARPreset, from_depth
from var_lab.models.release import (
    ReleaseFormatError,
    from_release_kwargs,
    load_release_tokenizer,
    load_release_var,
)
from var_lab.models.var import VAR
from var_lab.models.vqvae import VQVAE

__all__ = [
    "VAR",
    "VQVAE",
    "VARPreset",
    "ReleaseFormatError",
    "from_depth",
    "from_release_kwargs",
    "load_release_tokenizer",
    "load_release_var",
]
