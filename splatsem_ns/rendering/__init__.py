"""Gaussian rasterization: gsplat's CUDA kernels on GPU and a pure-PyTorch path with the same signature."""

from splatsem_ns.rendering.rasterize import rasterize_from_projection, rasterize_gaussians
from splatsem_ns.rendering.torch_rasterizer import (
    TileBins,
    bin_gaussians_to_tiles,
    project_gaussians,
    rasterize_gaussians_torch,
)

__all__ = [
    "TileBins",
    "bin_gaussians_to_tiles",
    "project_gaussians",
    "rasterize_from_projection",
    "rasterize_gaussians",
    "rasterize_gaussians_torch",
]
