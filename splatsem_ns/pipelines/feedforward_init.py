"""Seed a chorus-splat scene with a feed-forward prediction: Gaussians, latents and heads from semantic-splat.

``ns-train chorus-splat --data SCENE --pipeline.feedforward-init RUN/config.yml`` runs a trained semantic-splat
network over the scene's training views (in groups of ``views_per_group`` consecutive views, which a capture's
order makes overlapping), keeps the predicted Gaussians that are not transparent, and starts chorus-splat from
them instead of the seed points: positions, shapes, colours, the semantic latent, and the projector heads of the
teachers both runs share. Per-scene optimisation then refines them.

The network works in the scene's metric frame, chorus-splat in nerfstudio's normalised one: cameras go through
the inverse of the dataparser transform and scale, and the predictions back through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from jaxtyping import Float
from nerfstudio.models.splatfacto import num_sh_bases
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor
from torch.nn import Parameter

from splatsem_ns.data.frames import to_dataparser_frame, to_metric_frame
from splatsem_ns.data.scene_frames import fit_view
from splatsem_ns.export.semantic_ply import GaussianColumns
from splatsem_ns.models.heads import copy_matching_heads
from splatsem_ns.models.semantic_splat import restore_semantic_splat


@dataclass
class FeedforwardInitConfig:
    """How a feed-forward prediction seeds a chorus-splat scene (see the module docstring)."""

    image_size: Tuple[int, int] = (240, 320)
    """(height, width) the network sees the training views at (multiples of 4; as it was trained)."""
    views_per_group: int = 2
    """Context views per prediction (consecutive training views)."""
    min_opacity: float = 0.05
    """Predicted Gaussians below this opacity are left out."""
    max_gaussians: int = 1_000_000
    """At most this many seeds (the most opaque are kept)."""


@torch.no_grad()
def predict_seeds(
    config_path: Path,
    images: List[np.ndarray],
    intrinsics: Float[Tensor, "N 3 3"],
    camera_to_world: Float[Tensor, "N 3 4"],
    transform: Float[Tensor, "3 4"],
    scale: float,
    init: FeedforwardInitConfig,
    device: str,
) -> Tuple[GaussianColumns, Dict[str, torch.nn.Module]]:
    """The semantic-splat run's prediction over the training views in the dataparser frame, as splatfacto-shaped
    columns (log scales, logit opacities, degree-0 colours); and the run's projector heads."""
    model = restore_semantic_splat(config_path, device)
    metric = to_metric_frame(camera_to_world, transform, scale)
    fitted = [
        fit_view(image, K.numpy(), init.image_size) for image, K in zip(images, intrinsics, strict=True)
    ]
    n, group = len(images), max(2, init.views_per_group)
    names = ("means", "scales", "quats", "opacities", "features_dc", "features_rest", "latent")
    parts: Dict[str, List[Tensor]] = {k: [] for k in names}
    for start in range(0, max(n - group + 1, 1), group):
        views = list(range(start, min(start + group, n)))
        if len(views) < 2:
            break
        context = {
            "images": torch.from_numpy(np.stack([fitted[v][0] for v in views]))[None].to(device),
            "intrinsics": torch.from_numpy(np.stack([fitted[v][1] for v in views])).float()[None].to(device),
            "camera_to_world": metric[views][None].to(device),
        }
        predicted = model.predict(context)
        keep = predicted.opacities[0] >= init.min_opacity
        for name in names:
            parts[name].append(getattr(predicted, name)[0][keep])
    joined = {k: torch.cat(v) for k, v in parts.items()}
    if len(joined["means"]) == 0:
        raise ValueError(
            f"The semantic-splat run {config_path} predicted no Gaussian above opacity {init.min_opacity}."
        )
    if len(joined["means"]) > init.max_gaussians:  # the most opaque
        top = torch.topk(joined["opacities"], init.max_gaussians).indices
        joined = {k: v[top] for k, v in joined.items()}
    means, scales, quats = to_dataparser_frame(
        joined["means"], joined["scales"], joined["quats"], transform.to(device), scale
    )
    # Higher SH bands would have to be rotated into the new frame; the network predicts degree 0 by default, and
    # the chorus model starts its higher bands at zero (seed_chorus_model).
    seeds = GaussianColumns(
        means=means,
        scales=torch.log(scales),
        quats=quats,
        opacities=torch.logit(joined["opacities"], eps=1e-6)[:, None],
        features_dc=joined["features_dc"],
        features_rest=joined["features_rest"][:, :0],
        latent=joined["latent"],
    )
    return seeds, dict(model.projector_heads.items())


def seed_chorus_model(model, seeds: GaussianColumns, heads: Dict[str, torch.nn.Module]) -> List[str]:
    """Replace ``model``'s Gaussians (a ``ChorusSplatModel`` before its optimizers are built) with ``seeds``; copy
    the heads whose teacher and sizes match. Returns the names of the heads copied."""
    latent_name = "semantic_latent"
    if (
        latent_name in model.gauss_params
        and model.gauss_params[latent_name].shape[1] != seeds.latent.shape[1]
    ):
        raise ValueError(
            f"chorus-splat's latent has {model.gauss_params[latent_name].shape[1]} channels and the feed-forward "
            f"network's {seeds.latent.shape[1]}: train them with the same latent size."
        )
    device = model.gauss_params["means"].device
    rest = num_sh_bases(model.config.sh_degree) - 1
    values = {
        "means": seeds.means,
        "scales": seeds.scales,
        "quats": seeds.quats,
        "opacities": seeds.opacities,
        "features_dc": seeds.features_dc,
        "features_rest": torch.zeros(len(seeds.means), rest, 3),
        latent_name: seeds.latent,
    }
    for name in list(model.gauss_params):
        if name not in values:
            raise ValueError(f"feed-forward init does not know how to seed the Gaussian parameter '{name}'")
        model.gauss_params[name] = Parameter(values[name].detach().float().to(device).contiguous())
    copied = copy_matching_heads(getattr(model, "projector_heads", {}), heads)
    CONSOLE.log(
        f"Feed-forward init: {len(seeds.means)} Gaussians with latents"
        + (f" and the heads of {', '.join(copied)}" if copied else "")
        + " from the semantic-splat prediction."
    )
    return copied
