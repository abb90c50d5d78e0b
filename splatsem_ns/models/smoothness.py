"""A 3D prior on the semantic latent: Gaussians that share a voxel should agree.

Distillation supervises a Gaussian only through the pixels where it is visible, in proportion to its blending
weight there. Gaussians that training views see barely, or only behind others, keep latents that nothing
constrains, and a new viewpoint can put them in front. Measured on ScanNet scene0000_00
(benchmarks/results/semantic_report_scannet_h200.md): labelling the Gaussians near labelled points with those
points' classes scores about 71 2D mIoU at held-out views through the trained geometry (the others left
transparent), while the distilled latents score 51 to 54 there. This prior pulls each latent towards the
opacity-weighted mean latent of its voxel. Voxels are offset at random every step, so over training the pull
reaches every neighbour within about a voxel and spreads, step by step, into regions that no view supervises;
a well-supervised Gaussian is also held by its distillation gradients. There it raised 3D foreground mIoU from
about 53 to about 60, and with the stronger default depth loss also held-out 2D and click-to-segment (see
``semantic_smoothness_weight``).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

_AXIS_BITS = 21
"""Bits per voxel coordinate in the packed 64-bit key (coordinates within +-2^20 voxels of the origin)."""


def voxel_keys(cells: "torch.LongTensor") -> "torch.LongTensor":
    """One int64 per integer voxel coordinate triple ``[N, 3]``: equal keys exactly when the cells are equal."""
    half = 1 << (_AXIS_BITS - 1)
    shifted = (cells + half).clamp(0, (1 << _AXIS_BITS) - 1)
    return (shifted[:, 0] << (2 * _AXIS_BITS)) | (shifted[:, 1] << _AXIS_BITS) | shifted[:, 2]


def voxel_index(keys: "torch.LongTensor") -> "torch.LongTensor":
    """Dense voxel ids ``[N]`` in 0..V-1 (V distinct ``keys``), in ascending key order like ``torch.unique``'s
    inverse, computed on the keys' device without reading V back: sort, mark where the key changes, count."""
    if keys.numel() == 0:
        return keys.clone()
    sorted_keys, order = torch.sort(keys)  # the sorted keys come with the order: no gather of them
    # A voxel's id is the number of key changes before its first Gaussian in sorted order.
    ids = torch.nn.functional.pad(torch.cumsum(sorted_keys[1:] != sorted_keys[:-1], dim=0), (1, 0))
    return torch.empty_like(ids).scatter_(0, order, ids)


def voxel_consensus_loss(
    latent: Float[Tensor, "N D"],
    means: Float[Tensor, "N 3"],
    weights: Float[Tensor, " N"],
    voxel: float,
    offset: Float[Tensor, "3"],
) -> Float[Tensor, ""]:
    """Mean ``1 - cos(latent_i, m_v(i))`` over the Gaussians that share their voxel with another, where
    ``m_v`` is the ``weights``-weighted mean latent of voxel v (a fixed target: no gradient flows through it).
    Voxels have edge ``voxel`` and their grid is shifted by ``offset`` (same units as ``means``).

    It runs over every Gaussian each semantic step, so its temporaries are ``[N, D]``-sized: they are kept to two
    at a time, and one (the unit target per Gaussian) is held for backward."""
    with torch.no_grad():
        inverse = voxel_index(voxel_keys(torch.floor((means - offset) / voxel).long()))
        # Per voxel: the weighted latent sum and the Gaussian count. One row per Gaussian, not per voxel: the voxel
        # count is only known on the device, and reading it back (as torch.unique's outputs need) would make the
        # host wait for the GPU in every training step.
        sums = torch.zeros_like(latent).index_add_(0, inverse, latent * weights.to(latent.dtype)[:, None])
        counts = torch.zeros(len(inverse), dtype=latent.dtype, device=latent.device)
        counts.index_add_(0, inverse, torch.ones_like(counts))
        # The mean's direction is the sum's (the total weight only scales it): normalised in place, then gathered.
        # A voxel whose weights are all zero has a zero target, and its Gaussians a cosine of 0, as with a zero mean.
        sums.div_(torch.linalg.vector_norm(sums, dim=-1, keepdim=True).clamp_(min=1e-12))
        target = sums[inverse]
        del sums
        shared = (counts[inverse] > 1).to(latent.dtype)
    # cos(latent, unit target) = latent . target / |latent|, as cosine_similarity with eps 1e-8 computes it.
    cosine = torch.linalg.vecdot(latent, target) / torch.linalg.vector_norm(latent, dim=-1).clamp(min=1e-8)
    return ((1.0 - cosine) * shared).sum() / shared.sum().clamp(min=1.0)
