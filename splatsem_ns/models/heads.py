"""Per-teacher projector heads and the distillation loss.

The scene stores one compact latent per Gaussian; each teacher gets a small MLP that decodes the
rendered latent into that teacher's feature space (the Chorus design). Heads act per pixel on the
rendered map, so their cost scales with the feature-map size, not with the number of Gaussians.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn


class ProjectorHead(nn.Module):
    """A per-pixel MLP ``latent_dim -> hidden_dim -> ... -> feature_dim``."""

    def __init__(self, latent_dim: int, feature_dim: int, hidden_dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"A projector head needs at least one layer, got {num_layers}.")
        dims = [latent_dim] + [hidden_dim] * (num_layers - 1) + [feature_dim]
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < num_layers - 1:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)
        self.latent_dim = latent_dim
        self.feature_dim = feature_dim

    def forward(self, latent: Float[Tensor, "*batch D"]) -> Float[Tensor, "*batch C"]:
        return self.net(latent)


def heads_from_state_dict(state_dict: Mapping[str, Tensor], prefix: str) -> Dict[str, ProjectorHead]:
    """Rebuild heads from checkpoint tensors ``{prefix}{teacher}.net.{i}.weight``.

    Used when a model is restored without its teachers (ns-eval, ns-viewer): the checkpoint is the
    only record of each teacher's feature dimension.
    """
    linears: Dict[str, Dict[int, Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith(prefix) and key.endswith(".weight"):
            teacher, _, index, _ = key[len(prefix) :].split(".")
            linears.setdefault(teacher, {})[int(index)] = value
    heads = {}
    for teacher, weights in linears.items():
        ordered = [weights[i] for i in sorted(weights)]
        latent_dim, feature_dim = ordered[0].shape[1], ordered[-1].shape[0]
        hidden_dim = ordered[0].shape[0] if len(ordered) > 1 else 1
        heads[teacher] = ProjectorHead(latent_dim, feature_dim, hidden_dim, num_layers=len(ordered))
    return heads


def cosine_distillation_loss(
    predicted: Float[Tensor, "*batch C"],
    target: Float[Tensor, "*batch C"],
    weights: Optional[Float[Tensor, "*batch"]] = None,
) -> Float[Tensor, ""]:
    """Mean of ``1 - cos(predicted, target)`` over all pixels (each times its ``weights`` entry when given):
    scale-free, so teachers of very different feature norms can share one weighting scheme."""
    per_pixel = 1.0 - F.cosine_similarity(predicted, target.to(predicted.dtype), dim=-1, eps=1e-6)
    return (per_pixel if weights is None else per_pixel * weights.to(per_pixel.dtype)).mean()


def masked_cosine_distillation_loss(
    predicted: Float[Tensor, "B V n C"], target: Float[Tensor, "B V n C"], available: Optional[Tensor]
) -> Float[Tensor, ""]:
    """``cosine_distillation_loss`` over the views whose teacher features exist (``available``: [B, V] bool, or
    None for all): the mean over those pixels alone, 0 when there are none, so a batch with a scene whose teacher
    is absent neither dilutes nor pulls towards zero features."""
    if available is None:
        return cosine_distillation_loss(predicted, target)
    weights = available.to(device=predicted.device, dtype=predicted.dtype)[..., None].expand(
        predicted.shape[:-1]
    )
    return cosine_distillation_loss(predicted, target, weights / weights.mean().clamp_min(1e-12))


@torch.no_grad()
def unit_direction_sum(
    target: Float[Tensor, "B V n C"], available: Optional[Tensor]
) -> Tuple[Float[Tensor, " C"], Float[Tensor, ""]]:
    """Sum of the unit teacher features over the views that have them (``available``: [B, V] bool, or None for
    all), and their count (a tensor on the features' device, so nothing waits for the GPU): ``sum / count`` is their
    mean direction (its norm is the mean cosine of the best single constant feature)."""
    unit = F.normalize(target.float(), dim=-1)
    if available is None:
        count = unit.new_full((), float(unit[..., 0].numel()))  # a fill kernel, not a host-to-device copy
    else:
        keep = available.to(unit.device, unit.dtype)[..., None, None]  # [B, V, 1, 1]
        unit = unit * keep
        count = keep.sum() * unit.shape[2]
    return unit.reshape(-1, unit.shape[-1]).sum(0), count


def mean_direction(
    total: Float[Tensor, " C"], count: Float[Tensor, ""], across_ranks: bool = True
) -> Float[Tensor, " C"]:
    """``total / count`` (``unit_direction_sum``'s), summed over every rank first when a distributed run is
    going and ``across_ranks``: the centre of the global batch, as one GPU with the same batch would compute it,
    rather than of each rank's few samples. Every rank must call it alike (it all-reduces)."""
    if across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        packed = torch.cat((total.float(), count.float().reshape(1)))
        dist.all_reduce(packed, group=_centre_group())
        total, count = packed[:-1], packed[-1]
    return total / count.clamp(min=1.0)


_CENTRE_GROUPS: Dict[int, object] = {}


def _centre_group():
    """A process group of its own for the centre's all-reduce, created on first use (every rank reaches it in the
    same step). On the default group, beside DistributedDataParallel's gradient all-reduces, gloo aborted a rank at
    exit in one of three runs of the two-process test (the cause was not pinned down); with its own group, 11 of 11
    runs passed."""
    key = id(dist.group.WORLD)
    if key not in _CENTRE_GROUPS:
        _CENTRE_GROUPS[key] = dist.new_group()
    return _CENTRE_GROUPS[key]


def centred_cosine_distillation_loss(
    predicted: Float[Tensor, "B V n C"],
    target: Float[Tensor, "B V n C"],
    centre: Float[Tensor, " C"],
    available: Optional[Tensor],
) -> Float[Tensor, ""]:
    """``masked_cosine_distillation_loss`` between the unit predicted and teacher features, each minus ``centre``
    (their mean direction, e.g. over the batch, held fixed). Teacher features share a common direction, so the
    plain cosine is mostly met by it and tells classes apart by small angles; centred, a prediction is compared
    only on what differs from that direction (a constant prediction scores about 1, the wrong one of two classes
    2)."""
    centre = centre.detach().to(predicted.dtype)
    return masked_cosine_distillation_loss(
        F.normalize(predicted, dim=-1) - centre,
        F.normalize(target.to(predicted.dtype), dim=-1) - centre,
        available,
    )


def resize_feature_map(features: Float[Tensor, "h w C"], size: tuple[int, int]) -> Float[Tensor, "H2 W2 C"]:
    """Resample a feature map to another grid that covers the same image (area-style averaging when
    shrinking, bilinear when growing)."""
    if tuple(features.shape[:2]) == tuple(size):
        return features
    chw = features.permute(2, 0, 1)[None]
    shrinking = size[0] <= features.shape[0] and size[1] <= features.shape[1]
    if shrinking:
        out = F.interpolate(chw, size=size, mode="area")
    else:
        out = F.interpolate(chw, size=size, mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0)


def copy_matching_heads(own: Mapping[str, nn.Module], heads: Mapping[str, nn.Module]) -> List[str]:
    """Load each of ``heads`` into ``own``'s head of the same teacher where every parameter's shape matches (a
    pretrained or predicted starting point); returns the teachers copied."""
    copied = []
    for name, head in heads.items():
        mine = own[name] if name in own else None
        if mine is not None and all(
            a.shape == b.shape for a, b in zip(mine.parameters(), head.parameters(), strict=False)
        ):
            mine.load_state_dict(head.state_dict())
            copied.append(name)
    return copied
