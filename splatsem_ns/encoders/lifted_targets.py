"""Teacher features lifted onto Gaussians: a per-Gaussian target wherever a view sees the Gaussian's centre.

Render-and-distill supervises what the Gaussians blend into at a pixel. A blend can be right while the Gaussians in
it are not each right: the front ones can carry a pixel, and a decoder that is not linear can read a class off a mix
of latents that none of them decodes to on its own. Scores that vote per Gaussian in 3D then lag the 2D ones (the
encoder's one-scene CPU check: 52.3 target-view mIoU on its own training scene, 13.8 in 3D). Lifting each view's
teacher features onto the Gaussians it sees gives every such Gaussian its own target, as SceneSplat's lifted labels
do.

A Gaussian's centre is seen by a view when it projects inside the image in front of the camera and the view's
sensor depth there agrees with its depth to within ``tolerance`` (relative): without depth, a view says nothing here.
The feature is read at the centre's exact image position, bilinear in the teacher's grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from splatsem_ns.evaluation.voting import project_points


@dataclass
class LiftedTargets:
    """Sampled (Gaussian, view) pairs of a batch where the view sees the Gaussian, with the teachers' features."""

    gaussians: Int[Tensor, " P"]
    """Index of each pair's Gaussian in the batch's joined Gaussians."""
    features: Dict[str, Float[Tensor, "P C"]]
    """Per teacher, its feature at the Gaussian's position in the pair's view."""
    available: Dict[str, Bool[Tensor, " P"]]
    """Per teacher, whether the pair's view has that teacher's features."""


def lift_teacher_features(
    means: Float[Tensor, "N 3"],
    batch_index: Int[Tensor, " N"],
    views: Mapping[str, Any],
    teachers: Sequence[str],
    pairs_per_scene: int,
    tolerance: float = 0.05,
    near: float = 0.01,
    generator: Optional[torch.Generator] = None,
) -> Optional[LiftedTargets]:
    """At most ``pairs_per_scene`` random (Gaussian, view) pairs per scene of the batch whose view sees the
    Gaussian's centre, with each teacher's feature there; None when no view of the batch sees any.

    ``views``: one part of a ``MultiSceneDataManager`` batch (``images`` [B, V, H, W, 3], ``intrinsics`` [B, V, 3,
    3], ``camera_to_world`` [B, V, 4, 4] OpenGL, ``depth`` [B, V, H, W] with 0 where unmeasured, ``has_depth`` [B],
    ``teacher_features`` {name: [B, V, h, w, C]}, ``teacher_available`` {name: [B, V]})."""
    height, width = (int(s) for s in views["images"].shape[2:4])
    num_views = views["intrinsics"].shape[1]
    chosen, view_of, uv_of = [], [], []
    for b, with_depth in enumerate(torch.as_tensor(views["has_depth"]).reshape(-1).tolist()):
        mine = torch.nonzero(batch_index == b).squeeze(1)
        if not with_depth or mine.numel() == 0:
            continue
        scene: list = [[], [], []]  # Gaussian, flat view index, image position of each pair
        for v in range(num_views):
            uv, z, inside = project_points(
                means[mine].detach().float(),
                views["intrinsics"][b, v].float(),
                views["camera_to_world"][b, v].float(),
                (height, width),
                near,
            )
            rows = uv[:, 1].floor().long().clamp(0, height - 1)
            cols = uv[:, 0].floor().long().clamp(0, width - 1)
            sensor = views["depth"][b, v].to(z)[rows, cols]
            picked = torch.nonzero(
                inside & (sensor > 0) & ((z - sensor).abs() <= tolerance * sensor)
            ).squeeze(1)
            scene[0].append(mine[picked])
            scene[1].append(torch.full_like(picked, b * num_views + v))
            scene[2].append(uv[picked])
        pairs = [torch.cat(x) for x in scene]
        if len(pairs[0]) > pairs_per_scene:  # a random subset, the same size for every scene
            keep = torch.randperm(len(pairs[0]), generator=generator)[:pairs_per_scene].to(means.device)
            pairs = [x[keep] for x in pairs]
        chosen.append(pairs[0])
        view_of.append(pairs[1])
        uv_of.append(pairs[2])
    if not chosen or sum(len(c) for c in chosen) == 0:
        return None
    gaussians, flat_views, uv = torch.cat(chosen), torch.cat(view_of), torch.cat(uv_of)
    features, available = {}, {}
    for name in teachers:
        maps = views["teacher_features"][name]  # [B, V, h, w, C]
        grid_maps = maps.flatten(0, 1).permute(0, 3, 1, 2).float()  # [B*V, C, h, w]
        sampled = torch.empty(len(gaussians), maps.shape[-1], device=means.device)
        # The image position in the [-1, 1] coordinates of a grid that covers the whole image (pixel edges at -1, 1).
        grid = torch.stack((uv[:, 0] * (2.0 / width) - 1.0, uv[:, 1] * (2.0 / height) - 1.0), dim=-1)
        for view in torch.unique(flat_views).tolist():
            here = flat_views == view
            out = F.grid_sample(
                grid_maps[view : view + 1],
                grid[here][None, None].to(grid_maps),
                mode="bilinear",
                padding_mode="border",
                align_corners=False,
            )  # [1, C, 1, n]
            sampled[here] = out[0, :, 0].T.to(sampled)
        features[name] = sampled
        flags = (views.get("teacher_available") or {}).get(name)
        available[name] = (
            torch.ones(len(gaussians), dtype=torch.bool, device=means.device)
            if flags is None
            else flags.reshape(-1).to(means.device)[flat_views]
        )
    return LiftedTargets(gaussians=gaussians, features=features, available=available)
