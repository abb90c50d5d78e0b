"""SigLIP2 (and SigLIP) through transformers: dense image features in the text space, and a text encoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from splatsem_ns.teachers.base import Teacher, TeacherConfig
from splatsem_ns.teachers.loading import (
    describe,
    load_hf_model,
    load_hf_tokenizer,
    network_pixels,
)

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass
class SigLIP2TeacherConfig(TeacherConfig):
    """A fixed-resolution SigLIP2 (or SigLIP) checkpoint, i.e. one whose config is a ``SiglipConfig``.

    The default, ``google/siglip2-base-patch16-512``, is the highest-resolution base-size SigLIP2: at its
    native 512 px the grid is 32 x 32 with no position-embedding rescaling along the longer side, which
    matters more for dense distillation than the extra capacity of larger towers.
    """

    _target: Type = field(default_factory=lambda: SigLIP2Teacher)
    name: str = "siglip2"
    """Key of this teacher in losses, caches and the viewer; unique within one run."""
    model_name: str = "google/siglip2-base-patch16-512"
    """Hugging Face hub id (or a name shipped in ``arch_configs/hf``)."""
    input_size: int = 512
    """Length in pixels of the longer image side fed to the network (rounded to the patch size)."""
    normalize: bool = True
    """L2-normalise dense features and text embeddings (SigLIP scores pairs by scaled cosine similarity)."""
    lowercase_text: bool = True
    """Lower-case prompts before tokenising: SigLIP2 was trained on lower-cased text."""
    tokenizer: str = ""
    """Where the tokenizer comes from: a hub id or a folder. Empty: the checkpoint folder if one is given,
    else ``model_name``; with ``random_weights``, the byte stand-in. ``"bytes"``: always the byte stand-in
    (``ByteTokenizer``, for architectures that have no real tokenizer)."""

    NOT_IN_FEATURES: ClassVar[Tuple[str, ...]] = ("name", "lowercase_text", "tokenizer")
    """Text-side options: they change the text embeddings, never the image features the cache holds."""


class ByteTokenizer:
    """Stand-in tokenizer for random-weight models, whose real tokenizer files cannot be had offline.

    Each prompt's UTF-8 bytes map to ids ``(byte + 2) % vocab_size`` (0 is padding, 1 end of sequence),
    truncated and padded to ``max_length``. It is deterministic and has no linguistic meaning: it only lets
    ``encode_text`` run in tests and benchmarks.
    """

    def __init__(self, vocab_size: int, max_length: int) -> None:
        self.vocab_size = vocab_size
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> Int[Tensor, "N L"]:
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [(b + 2) % self.vocab_size for b in text.encode("utf-8")][: self.max_length - 1] + [1]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


class SigLIP2Teacher(Teacher):
    """Dense SigLIP2 features in the image-text space.

    SigLIP pools patch tokens with an attention head (one learnt probe query) and only that pooled vector
    is aligned with text. Each patch token is sent through the same head as if the probe attended to that
    token alone: softmax over one key is 1, so attention reduces to value -> out_proj, followed by the
    head's layernorm + MLP residual. The result lives where the pooled embedding lives, in the text space.
    """

    config: SigLIP2TeacherConfig
    has_text_encoder = True

    def __init__(self, config: SigLIP2TeacherConfig) -> None:
        super().__init__(config)
        from transformers import SiglipModel

        model = load_hf_model(config)
        if not isinstance(model, SiglipModel):
            raise ValueError(
                f"{describe(config)}: expected a fixed-resolution SigLIP/SigLIP2 checkpoint (SiglipModel), got "
                f"{type(model).__name__}. NaFlex checkpoints are not supported; use e.g. "
                "google/siglip2-base-patch16-512."
            )
        vision, text = model.config.vision_config, model.config.text_config
        if not model.vision_model.use_head:
            raise ValueError(
                f"{describe(config)}: the vision tower has no pooling head to map patches to text."
            )
        if text.projection_size != vision.hidden_size:
            raise ValueError(
                f"{describe(config)}: text embeddings ({text.projection_size}) and image embeddings "
                f"({vision.hidden_size}) have different sizes."
            )
        self.model = model
        self.feature_stride = int(vision.patch_size)
        self.feature_dim = int(vision.hidden_size)
        self.text_length = int(text.max_position_embeddings)
        self.tokenizer = self._load_tokenizer(int(text.vocab_size))

    def _load_tokenizer(self, vocab_size: int) -> Any:
        choice = self.config.tokenizer
        if choice == "bytes" or (choice == "" and self.config.random_weights):
            return ByteTokenizer(vocab_size, self.text_length)
        checkpoint = self.config.checkpoint
        if choice:
            source = choice
        elif checkpoint is not None and Path(checkpoint).is_dir():
            source = str(checkpoint)
        else:
            source = self.config.model_name
        return load_hf_tokenizer(self.config, source)

    def _tokenize(self, texts: List[str]) -> Int[Tensor, "N L"]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer(texts)
        # SigLIP was trained on max-length padded text without an attention mask, pooling the last token.
        batch: Dict[str, Tensor] = self.tokenizer(
            texts, padding="max_length", max_length=self.text_length, truncation=True, return_tensors="pt"
        )
        return batch["input_ids"]

    @torch.no_grad()
    def encode_image(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C h w"]:
        pixels, size = network_pixels(self, images, SIGLIP_MEAN, SIGLIP_STD)
        vision = self.model.vision_model
        tokens = vision(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        head = vision.head
        dim = tokens.shape[-1]
        attn = head.attention
        value = F.linear(tokens, attn.in_proj_weight[2 * dim :], attn.in_proj_bias[2 * dim :])
        dense = attn.out_proj(value)
        dense = dense + head.mlp(head.layernorm(dense))
        if self.config.normalize:
            dense = F.normalize(dense, dim=-1)
        gh, gw = size[0] // self.feature_stride, size[1] // self.feature_stride
        return dense.transpose(1, 2).reshape(images.shape[0], -1, gh, gw).float()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Float[Tensor, "N C"]:
        self.eval()
        prompts = [t.lower() for t in texts] if self.config.lowercase_text else list(texts)
        ids = self._tokenize(prompts).to(self.device)
        embeddings = self.model.text_model(input_ids=ids).pooler_output.float()
        return F.normalize(embeddings, dim=-1) if self.config.normalize else embeddings
