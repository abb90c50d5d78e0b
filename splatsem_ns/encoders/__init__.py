"""Feed-forward 3D encoders over Gaussians and point clouds: sparse backbones in pure PyTorch (spconv optional).

``GaussianEncoder`` turns splatfacto-style Gaussians of one or several scenes into one semantic latent per
Gaussian; the backbone is picked by versioned name from ``BACKBONES`` ("SpUNet-v1", "PTv3-lite-v1").
"""

from splatsem_ns.encoders.encoder import GaussianEncoder, GaussianEncoderConfig
from splatsem_ns.encoders.inputs import (
    GAUSSIAN_CHANNELS,
    INPUT_CHANNELS,
    POINT_CHANNELS,
    estimate_normals,
    gaussian_input_features,
    point_input_features,
)
from splatsem_ns.encoders.ptv3 import PTv3Lite, PTv3LiteConfig, patch_attention, patch_layout
from splatsem_ns.encoders.registry import (
    BACKBONES,
    BackboneConfig,
    Registry,
    SparseBackbone,
    available_backbones,
    build_backbone,
)
from splatsem_ns.encoders.serialization import (
    ORDERS,
    hilbert_decode,
    hilbert_encode,
    serialization_codes,
    serialize,
    z_order_decode,
    z_order_encode,
)
from splatsem_ns.encoders.sparse_conv import (
    InverseConv3d,
    KernelMap,
    StridedConv3d,
    SubmanifoldConv3d,
    inverse_conv3d,
    spconv_available,
    strided_conv3d,
    submanifold_conv3d,
)
from splatsem_ns.encoders.sparse_tensor import SparseTensor
from splatsem_ns.encoders.spunet import SpUNet, SpUNetConfig
from splatsem_ns.encoders.voxelize import Voxelization, pool_to_voxels, unpool_to_points, voxelize

__all__ = [
    "BACKBONES",
    "GAUSSIAN_CHANNELS",
    "INPUT_CHANNELS",
    "ORDERS",
    "POINT_CHANNELS",
    "BackboneConfig",
    "GaussianEncoder",
    "GaussianEncoderConfig",
    "InverseConv3d",
    "KernelMap",
    "PTv3Lite",
    "PTv3LiteConfig",
    "Registry",
    "SparseBackbone",
    "SparseTensor",
    "SpUNet",
    "SpUNetConfig",
    "StridedConv3d",
    "SubmanifoldConv3d",
    "Voxelization",
    "available_backbones",
    "build_backbone",
    "estimate_normals",
    "gaussian_input_features",
    "hilbert_decode",
    "hilbert_encode",
    "inverse_conv3d",
    "patch_attention",
    "patch_layout",
    "point_input_features",
    "pool_to_voxels",
    "serialization_codes",
    "serialize",
    "spconv_available",
    "strided_conv3d",
    "submanifold_conv3d",
    "unpool_to_points",
    "voxelize",
    "z_order_decode",
    "z_order_encode",
]
