"""Segment Anything's image encoder: object-aware dense features, no text encoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, Tuple, Type

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from splatsem_ns.teachers.base import Teacher, TeacherConfig
from splatsem_ns.teachers.loading import (
    available_arch_configs,
    checkpoint_path,
    describe,
    load_into,
    load_state_dict_file,
    network_pixels,
    read_arch_config,
    seeded_random_init,
    url_checkpoint,
    warn_random_weights,
    weights_unavailable,
)

# SAM normalises 0-255 pixels with these; dividing both by 255 gives the same result on [0, 1] pixels.
SAM_MEAN = tuple(v / 255.0 for v in (123.675, 116.28, 103.53))
SAM_STD = tuple(v / 255.0 for v in (58.395, 57.12, 57.375))


@dataclass
class SAMTeacherConfig(TeacherConfig):
    """The image encoder of a segment-anything model (the prompt encoder and mask decoder are not built)."""

    _target: Type = field(default_factory=lambda: SAMTeacher)
    name: str = "sam"
    """Key of this teacher in losses, caches and the viewer; unique within one run."""
    model_name: str = "vit_b"
    """Encoder architecture: ``vit_b``, ``vit_l``, ``vit_h`` (``sam_model_registry`` keys) or another name
    shipped in ``arch_configs/sam``."""
    input_size: int = 1024
    """Longer image side fed to the encoder. SAM's encoder has fixed absolute position embeddings, so this
    must equal the architecture's image size (1024 for the official models)."""
    download_url: str = ""
    """Where to download the weights when no checkpoint is given; empty means the official URL of
    ``model_name``. Files go to torch hub's checkpoint folder and are reused from there."""


class SAMTeacher(Teacher):
    """SAM's preprocessing (longer side to 1024, pixel mean/std, zero padding to a square) and encoder.

    The encoder returns a 64 x 64 grid for the padded square; only the cells over the image are kept, so
    the grid covers the image and nothing else. Unlike SAM's own resize the shorter side is rounded to a
    multiple of the patch size (at most 8 px of aspect change at 1024) so that no cell straddles padding.
    """

    config: SAMTeacherConfig
    has_text_encoder = False

    def __init__(self, config: SAMTeacherConfig) -> None:
        super().__init__(config)
        arch = read_arch_config("sam", config.model_name)
        if arch is None:
            raise ValueError(
                f"{describe(config)}: unknown SAM encoder {config.model_name!r}; "
                f"available: {', '.join(available_arch_configs('sam'))}."
            )
        if config.input_size != arch["img_size"]:
            raise ValueError(
                f"{describe(config)}: input_size must be {arch['img_size']} (the encoder's fixed image size), "
                f"got {config.input_size}."
            )
        self.image_size = int(arch["img_size"])
        self.feature_stride = int(arch["patch_size"])
        self.feature_dim = int(arch["out_chans"])
        self.encoder = _load_encoder(config, arch).eval().requires_grad_(False)

    def network_input_size(self, height: int, width: int) -> Tuple[int, int]:
        """(H', W') of the resized image before padding: longer side = the encoder's image size."""
        scale = self.image_size / max(height, width)
        s = self.feature_stride
        return max(s, round(height * scale / s) * s), max(s, round(width * scale / s) * s)

    @torch.no_grad()
    def encode_image(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C h w"]:
        height, width = images.shape[-2:]
        pixels, size = network_pixels(self, images, SAM_MEAN, SAM_STD)
        # Zero padding after normalisation, bottom and right, as segment-anything's Sam.preprocess does.
        pixels = F.pad(pixels, (0, self.image_size - size[1], 0, self.image_size - size[0]))
        features = self.encoder(pixels)
        gh, gw = self.feature_grid(height, width)
        return features[:, :, :gh, :gw].float()


def _build_encoder(arch: Dict[str, Any]) -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    # Same settings as segment_anything.build_sam._build_sam.
    return ImageEncoderViT(
        img_size=arch["img_size"],
        patch_size=arch["patch_size"],
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        mlp_ratio=arch["mlp_ratio"],
        out_chans=arch["out_chans"],
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        global_attn_indexes=tuple(arch["global_attn_indexes"]),
        window_size=arch["window_size"],
    )


def _load_encoder(config: SAMTeacherConfig, arch: Dict[str, Any]) -> nn.Module:
    if config.random_weights:
        warn_random_weights(config)
        weights = None
    elif config.checkpoint is not None:
        weights = checkpoint_path(config)
        if weights.is_dir():
            raise weights_unavailable(
                config, f"the checkpoint {weights} is a folder; SAM needs its .pth file."
            )
    else:
        url = config.download_url or arch.get("url", "")
        if not url:
            raise weights_unavailable(config, "there is no download URL for this encoder.")
        weights = url_checkpoint(config, url)
    with seeded_random_init():
        encoder = _build_encoder(arch)
    if weights is not None:
        load_into(config, encoder, _encoder_state(load_state_dict_file(config, Path(weights))), Path(weights))
    return encoder


def _encoder_state(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The image-encoder part of a full SAM checkpoint; an encoder-only state dict passes unchanged."""
    prefix = "image_encoder."
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state
