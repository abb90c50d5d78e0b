"""DINOv2 and DINOv3 through transformers: generalist dense features, no text encoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type

import torch
from jaxtyping import Float
from torch import Tensor

from splatsem_ns.teachers.base import Teacher, TeacherConfig
from splatsem_ns.teachers.loading import (
    describe,
    gated_hint,
    load_hf_model,
    network_pixels,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

GATED_PREFIXES = ("facebook/dinov3",)
"""Hub ids whose download needs an accepted license and a logged-in user."""


@dataclass
class DINOTeacherConfig(TeacherConfig):
    """A DINOv2 (``Dinov2Model``, with or without registers) or DINOv3 (``DINOv3ViTModel``) backbone."""

    _target: Type = field(default_factory=lambda: DINOTeacher)
    name: str = "dinov2"
    """Key of this teacher in losses, caches and the viewer; unique within one run."""
    model_name: str = "facebook/dinov2-small"
    """Hugging Face hub id (or a name shipped in ``arch_configs/hf``). The DINOv3 ids are gated."""
    input_size: int = 448
    """Length in pixels of the longer image side fed to the network (rounded to the patch size)."""


class DINOTeacher(Teacher):
    """Last-layer patch tokens (after the final layernorm), without the class and register tokens."""

    config: DINOTeacherConfig
    has_text_encoder = False

    def __init__(self, config: DINOTeacherConfig) -> None:
        super().__init__(config)
        from transformers import Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel

        hint = gated_hint(config.model_name) if config.model_name.startswith(GATED_PREFIXES) else ""
        model = load_hf_model(config, hint=hint)
        if not isinstance(model, (Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel)):
            raise ValueError(
                f"{describe(config)}: expected a DINOv2 or DINOv3 backbone, got {type(model).__name__}."
            )
        patch = model.config.patch_size
        self.model = model
        self.feature_stride = int(patch if isinstance(patch, int) else patch[0])
        self.feature_dim = int(model.config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        # DINOv2's processor resizes bicubically, DINOv3's bilinearly.
        self.resize_mode = "bilinear" if isinstance(model, DINOv3ViTModel) else "bicubic"

    @torch.no_grad()
    def encode_image(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C h w"]:
        pixels, size = network_pixels(self, images, IMAGENET_MEAN, IMAGENET_STD, self.resize_mode)
        tokens = self.model(pixel_values=pixels).last_hidden_state[:, self.num_prefix_tokens :]
        gh, gw = size[0] // self.feature_stride, size[1] // self.feature_stride
        return tokens.transpose(1, 2).reshape(images.shape[0], -1, gh, gw).float()
