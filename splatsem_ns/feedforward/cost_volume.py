"""Depth from a plane-sweep cost volume, refined at full resolution (MVSplat's depth predictor).

For every context view (the *reference*) and every depth candidate, each other context view (a *source*) is warped
onto the reference as if the whole scene sat on the fronto-parallel plane at that depth; where the guess is right
the warped features match the reference's. Dot-product correlation, averaged over the sources, scores every
candidate at every pixel; a U-Net refines the scores with the reference's own features (textureless and occluded
regions need context), a softmax over candidates turns them into a matching distribution, and its expectation (in
inverse depth, where the candidates are uniform) is the depth. The largest probability says how sure the match is.

Camera convention at the boundary: OpenGL camera-to-world (nerfstudio's), pinhole intrinsics in pixels of the grid
being warped, pixel centres at +0.5, z-depth. ``source_pixel_coordinates`` converts to OpenCV once and does the
rest there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from splatsem_ns.feedforward.cameras import opengl_to_opencv, pixel_centres, rigid_inverse, scale_intrinsics
from splatsem_ns.feedforward.constants import device_constant
from splatsem_ns.feedforward.unet import UNet2d

MIN_SOURCE_DEPTH = 1e-4
"""Warped points closer than this in front of the source camera (or behind it) sample nothing (zero features)."""


@dataclass
class DepthPredictorConfig:
    """Plane-sweep cost volume, its refinement U-Net and the full-resolution depth refinement."""

    num_depth_candidates: int = 128
    """Depth planes of the sweep (MVSplat: 128), uniform in inverse depth between ``near`` and ``far``."""
    near: float = 0.3
    """Nearest candidate depth in metres (the scene's metric frame), unless the forward pass is given one."""
    far: float = 12.0
    """Farthest candidate depth in metres; indoor rooms fit in 0.3-12 m."""
    cost_unet_channels: Tuple[int, ...] = (128, 128, 128)
    """Channels per level of the U-Net that refines the cost volume at 1/4 resolution."""
    refine_feature_channels: int = 32
    """Backbone features are projected to this many channels before being upsampled to full resolution."""
    refine_unet_channels: Tuple[int, ...] = (32, 64, 96)
    """Channels per level of the full-resolution depth-refinement U-Net."""
    refine_out_channels: int = 32
    """Full-resolution features the refinement hands to the Gaussian head and the semantic latent head."""
    depth_chunk: int = 32
    """Candidates warped at a time when building the cost volume: bounds memory, not the result."""


@dataclass
class DepthOutput:
    """Per-view depth and what the later heads read from the depth predictor."""

    depth: Float[Tensor, "B V H W"]
    """Refined z-depth in metres."""
    confidence: Float[Tensor, "B V H W"]
    """Largest matching probability (upsampled from 1/4 resolution), in (0, 1]."""
    features: Float[Tensor, "B V F H W"]
    """Full-resolution features from the refinement U-Net."""
    probabilities: Float[Tensor, "B V D h w"]
    """Matching distribution over the candidates at 1/4 resolution."""
    candidates: Float[Tensor, "B D"]
    """The candidate depths, nearest first."""


def depth_candidates(near: Float[Tensor, " B"], far: Float[Tensor, " B"], num: int) -> Float[Tensor, "B D"]:
    """``num`` depths uniform in inverse depth from ``near`` (index 0) to ``far`` (index num - 1): equal steps of
    disparity, so equal steps of image motion for a given baseline."""
    steps = torch.linspace(0.0, 1.0, num, device=near.device, dtype=near.dtype)
    inverse = 1.0 / near[:, None] + steps * (1.0 / far[:, None] - 1.0 / near[:, None])
    return 1.0 / inverse


def source_pixel_coordinates(
    reference_intrinsics: Float[Tensor, "*batch 3 3"],
    reference_camera_to_world: Float[Tensor, "*batch 4 4"],
    source_intrinsics: Float[Tensor, "*batch 3 3"],
    source_camera_to_world: Float[Tensor, "*batch 4 4"],
    depths: Float[Tensor, "*batch D"],
    height: int,
    width: int,
) -> Tuple[Float[Tensor, "*batch D h w 2"], Bool[Tensor, "*batch D h w"]]:
    """Where each reference pixel centre, pushed to each candidate z-depth, lands in the source image.

    Cameras are OpenGL camera-to-world (x right, y up, looking down -z); intrinsics are pinhole in pixels of the
    ``height`` x ``width`` grid both views are sampled on. Returns the source (u, v) in pixels (u right, v down, a
    pixel's centre at +0.5) and whether the point is in front of the source camera.

    In OpenCV camera frames the map is a homography per plane: ``p_src ~ d * K_s R K_r^-1 [u, v, 1] + K_s t`` with
    ``[R t]`` the reference-to-source transform.
    """
    dtype = torch.promote_types(depths.dtype, torch.float32)
    reference_pose = opengl_to_opencv(reference_camera_to_world.to(dtype))
    source_pose = opengl_to_opencv(source_camera_to_world.to(dtype))
    reference_to_source = rigid_inverse(source_pose) @ reference_pose
    k_source = source_intrinsics.to(dtype)
    homography = (
        k_source
        @ reference_to_source[..., :3, :3]
        @ torch.linalg.inv_ex(reference_intrinsics.to(dtype)).inverse
    )
    offset = (k_source @ reference_to_source[..., :3, 3:4])[..., 0]  # [..., 3]
    uv = pixel_centres(height, width, depths.device, dtype)
    homogeneous = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)  # [h, w, 3]
    rays = torch.einsum("...ij,hwj->...hwi", homography, homogeneous)  # [..., h, w, 3]
    points = (
        depths.to(dtype)[..., :, None, None, None] * rays[..., None, :, :, :]
        + offset[..., None, None, None, :]
    )
    z = points[..., 2]
    in_front = z > MIN_SOURCE_DEPTH
    coordinates = points[..., :2] / torch.where(in_front, z, torch.ones_like(z))[..., None]
    return coordinates, in_front


def warp_features(
    source_features: Float[Tensor, "*batch C h w"],
    reference_intrinsics: Float[Tensor, "*batch 3 3"],
    reference_camera_to_world: Float[Tensor, "*batch 4 4"],
    source_intrinsics: Float[Tensor, "*batch 3 3"],
    source_camera_to_world: Float[Tensor, "*batch 4 4"],
    depths: Float[Tensor, "*batch D"],
) -> Float[Tensor, "*batch C D h w"]:
    """The source's features seen from the reference at every candidate depth (bilinear ``grid_sample``; zeros
    outside the source image and behind the source camera). Same conventions as ``source_pixel_coordinates``;
    both views share the feature grid ``h`` x ``w`` the intrinsics are given for."""
    *batch, channels, height, width = source_features.shape
    num_depths = depths.shape[-1]
    coordinates, in_front = source_pixel_coordinates(
        reference_intrinsics,
        reference_camera_to_world,
        source_intrinsics,
        source_camera_to_world,
        depths,
        height,
        width,
    )
    # grid_sample with align_corners=False puts -1 and +1 at the outer edges of the border pixels, i.e. at pixel
    # coordinates 0 and W: exactly the +0.5 pixel-centre convention.
    scale = device_constant((2.0 / width, 2.0 / height), coordinates.device, coordinates.dtype)
    grid = torch.where(in_front[..., None], coordinates * scale - 1.0, torch.full_like(coordinates, -2.0))
    # Sampled in at least float32: half-precision coordinates would be off by a sizeable part of a pixel.
    sample_dtype = torch.promote_types(source_features.dtype, torch.float32)
    grid = grid.reshape(-1, num_depths * height, width, 2).to(sample_dtype)
    warped = F.grid_sample(
        source_features.reshape(-1, channels, height, width).to(sample_dtype),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    return warped.reshape(*batch, channels, num_depths, height, width).to(source_features.dtype)


def plane_sweep_correlation(
    features: Float[Tensor, "B V C h w"],
    intrinsics: Float[Tensor, "B V 3 3"],
    camera_to_world: Float[Tensor, "B V 4 4"],
    depths: Float[Tensor, "B D"],
    depth_chunk: int = 32,
) -> Float[Tensor, "B V D h w"]:
    """The cost volume: for every view, the dot product of its features with every other view's features warped
    onto it at each candidate depth, divided by sqrt(C) and averaged over the other views.

    ``intrinsics`` are for the feature grid (scale the image intrinsics with ``scale_intrinsics``); cameras are
    OpenGL camera-to-world. Needs at least two views.
    """
    batch, views, channels, height, width = features.shape
    if views < 2:
        raise ValueError(f"A plane-sweep cost volume needs at least 2 views, got {views}.")
    pairs = [(v, u) for v in range(views) for u in range(views) if u != v]
    reference = device_constant(tuple(v for v, _ in pairs), features.device, torch.long)
    source = device_constant(tuple(u for _, u in pairs), features.device, torch.long)
    num_pairs = len(pairs)

    def per_pair(x: Tensor, index: Tensor) -> Tensor:  # [B, V, ...] -> [B * P, ...]
        return x[:, index].flatten(0, 1)

    reference_features = per_pair(features, reference)
    source_features = per_pair(features, source)
    cameras = (
        per_pair(intrinsics, reference),
        per_pair(camera_to_world, reference),
        per_pair(intrinsics, source),
        per_pair(camera_to_world, source),
    )
    pair_depths = depths[:, None].expand(batch, num_pairs, -1).flatten(0, 1)
    chunks = []
    for start in range(0, depths.shape[-1], depth_chunk):
        warped = warp_features(source_features, *cameras, pair_depths[:, start : start + depth_chunk])
        chunks.append((reference_features[:, :, None] * warped).sum(dim=1) / math.sqrt(channels))
    correlation = torch.cat(chunks, dim=1)  # [B * P, D, h, w]
    return correlation.reshape(batch, views, views - 1, -1, height, width).mean(dim=2)


class DepthPredictor(nn.Module):
    """Cost volume -> U-Net -> matching distribution -> depth at 1/4 resolution -> refined full-resolution depth."""

    def __init__(self, config: DepthPredictorConfig, feature_dim: int) -> None:
        super().__init__()
        self.config = config
        candidates = config.num_depth_candidates
        self.cost_unet = UNet2d(candidates + feature_dim, candidates, config.cost_unet_channels)
        self.feature_projection = nn.Conv2d(feature_dim, config.refine_feature_channels, 1)
        # Input: image (3), normalised inverse depth (1), confidence (1), projected features.
        self.refine_unet = UNet2d(
            5 + config.refine_feature_channels, config.refine_out_channels + 1, config.refine_unet_channels
        )

    def forward(
        self,
        images: Float[Tensor, "B V 3 H W"],
        features: Float[Tensor, "B V C h w"],
        intrinsics: Float[Tensor, "B V 3 3"],
        camera_to_world: Float[Tensor, "B V 4 4"],
        near: Float[Tensor, " B"],
        far: Float[Tensor, " B"],
    ) -> DepthOutput:
        """``images`` normalised as the backbone saw them; ``intrinsics`` at the image size (H, W)."""
        batch, views, _, height, width = images.shape
        feature_height, feature_width = features.shape[-2:]
        feature_intrinsics = scale_intrinsics(intrinsics, feature_width / width, feature_height / height)
        candidates = depth_candidates(
            near.to(features.dtype), far.to(features.dtype), self.config.num_depth_candidates
        )
        correlation = plane_sweep_correlation(
            features, feature_intrinsics, camera_to_world, candidates, self.config.depth_chunk
        )

        flat_features = features.flatten(0, 1)
        flat_correlation = correlation.flatten(0, 1)
        # Residual refinement: the raw correlation already ranks candidates; the U-Net corrects where it cannot.
        logits = flat_correlation + self.cost_unet(torch.cat([flat_correlation, flat_features], dim=1))
        probabilities = torch.softmax(logits, dim=1)  # [B*V, D, h, w]
        inverse_candidates = (1.0 / candidates).repeat_interleave(views, dim=0)[:, :, None, None]
        inverse_depth = (probabilities * inverse_candidates).sum(dim=1, keepdim=True)
        confidence = probabilities.max(dim=1, keepdim=True).values

        # Work in inverse depth normalised to [0, 1] over the candidate range (0 = far, 1 = near): the scale the
        # refinement U-Net sees is then the same for every scene.
        inverse_near = (1.0 / near).to(features.dtype).repeat_interleave(views)[:, None, None, None]
        inverse_far = (1.0 / far).to(features.dtype).repeat_interleave(views)[:, None, None, None]
        normalised = (inverse_depth - inverse_far) / (inverse_near - inverse_far)
        size = (height, width)
        normalised = F.interpolate(normalised, size=size, mode="bilinear", align_corners=False)
        confidence = F.interpolate(confidence, size=size, mode="bilinear", align_corners=False)
        projected = F.interpolate(
            self.feature_projection(flat_features), size=size, mode="bilinear", align_corners=False
        )
        refined = self.refine_unet(
            torch.cat([images.flatten(0, 1), normalised, confidence, projected], dim=1)
        )
        normalised = (normalised + refined[:, :1]).clamp(0.0, 1.0)
        depth = 1.0 / (inverse_far + normalised * (inverse_near - inverse_far))

        return DepthOutput(
            depth=depth[:, 0].unflatten(0, (batch, views)),
            confidence=confidence[:, 0].unflatten(0, (batch, views)),
            features=refined[:, 1:].unflatten(0, (batch, views)),
            probabilities=probabilities.unflatten(0, (batch, views)),
            candidates=candidates,
        )
