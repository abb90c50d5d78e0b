"""Feed-forward semantic Gaussians: a SemanticSplat-style image-to-Gaussians network (pure PyTorch).

Sparse posed context views go in; one 3D Gaussian per context pixel comes out, with a semantic latent that the
package's per-teacher ``ProjectorHead``s decode after rendering, as for every other method of the package.
"""

from splatsem_ns.feedforward.backbone import BackboneConfig, MultiViewBackbone
from splatsem_ns.feedforward.cost_volume import (
    DepthPredictor,
    DepthPredictorConfig,
    depth_candidates,
    plane_sweep_correlation,
    source_pixel_coordinates,
    warp_features,
)
from splatsem_ns.feedforward.gaussian_head import GaussianHead, GaussianHeadConfig
from splatsem_ns.feedforward.gaussians import PredictedGaussians
from splatsem_ns.feedforward.network import (
    PARTS,
    SemanticSplatNetwork,
    SemanticSplatNetworkConfig,
    network_inputs,
    teacher_channels_of,
)
from splatsem_ns.feedforward.render import RenderedViews, render_predicted
from splatsem_ns.feedforward.semantic_branch import SemanticBranch, SemanticBranchConfig

__all__ = [
    "PARTS",
    "BackboneConfig",
    "DepthPredictor",
    "DepthPredictorConfig",
    "GaussianHead",
    "GaussianHeadConfig",
    "MultiViewBackbone",
    "PredictedGaussians",
    "RenderedViews",
    "SemanticBranch",
    "SemanticBranchConfig",
    "SemanticSplatNetwork",
    "SemanticSplatNetworkConfig",
    "depth_candidates",
    "network_inputs",
    "plane_sweep_correlation",
    "render_predicted",
    "source_pixel_coordinates",
    "teacher_channels_of",
    "warp_features",
]
