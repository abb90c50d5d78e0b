"""CLIP through open_clip: dense image features in the joint image-text space, and a text encoder."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Sequence, Type

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from splatsem_ns.teachers.base import Teacher, TeacherConfig
from splatsem_ns.teachers.loading import (
    checkpoint_path,
    describe,
    ensure_online,
    hf_endpoint,
    network_pixels,
    read_arch_config,
    seeded_random_init,
    warn_random_weights,
    weights_unavailable,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class OpenCLIPTeacherConfig(TeacherConfig):
    """A CLIP model from open_clip (ViT image towers only)."""

    _target: Type = field(default_factory=lambda: OpenCLIPTeacher)
    name: str = "clip"
    """Key of this teacher in losses, caches and the viewer; unique within one run."""
    model_name: str = "ViT-B-16"
    """open_clip architecture name (``open_clip.list_models()``) or one shipped in ``arch_configs/open_clip``."""
    pretrained: str = "laion2b_s34b_b88k"
    """open_clip pretrained tag (``open_clip.list_pretrained_tags_by_model(model_name)``). With a checkpoint
    file it still decides whether the model uses QuickGELU (the ``openai`` weights need it)."""
    input_size: int = 448
    """Length in pixels of the longer image side fed to the network (rounded to the patch size). CLIP was
    trained at 224; twice that gives a 28-cell grid and still works with interpolated position embeddings."""
    dense_path: Literal["maskclip", "tokens"] = "maskclip"
    """How patch tokens become dense features. ``maskclip``: the last block's attention is replaced by its
    value path (MaskCLIP). ``tokens``: the plain last-layer patch tokens. Both then go through ``ln_post``
    and ``proj`` into the text space."""
    normalize: bool = True
    """L2-normalise dense features and text embeddings (CLIP compares them by cosine similarity)."""


class OpenCLIPTeacher(Teacher):
    """Dense CLIP features, MaskCLIP style.

    CLIP is only trained to align the pooled class token with text. Its patch tokens can still be read in
    the text space because ``ln_post`` and ``proj``, which map the class token there, are token-wise. The
    last block's attention, though, mixes every patch with global context (its query-key maps are close to
    uniform), which blurs localisation; MaskCLIP keeps only that block's value path (value -> out_proj,
    then the residual and MLP), so each token keeps its own content. ``dense_path="tokens"`` skips that.
    """

    config: OpenCLIPTeacherConfig
    has_text_encoder = True

    def __init__(self, config: OpenCLIPTeacherConfig) -> None:
        super().__init__(config)
        import open_clip
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        model = _load_open_clip(config)
        visual = model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ValueError(
                f"{describe(config)}: dense features need a plain open_clip ViT image tower; "
                f"this model's is {type(visual).__name__}."
            )
        if not all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks):
            raise ValueError(
                f"{describe(config)}: the image tower's blocks are not standard attention blocks."
            )
        self.model = model.eval().requires_grad_(False)
        self.feature_stride = int(visual.patch_size[0])
        self.feature_dim = int(visual.output_dim)
        if open_clip.get_model_config(config.model_name) is not None:
            self.tokenizer = open_clip.get_tokenizer(config.model_name)
        else:
            self.tokenizer = open_clip.SimpleTokenizer(context_length=int(model.context_length))

    def _pos_embed(self, height: int, width: int) -> Float[Tensor, "N D"]:
        # Position embeddings are learnt for a square grid; other grids get them bicubically resampled.
        visual = self.model.visual
        pos = visual.positional_embedding
        gh, gw = visual.grid_size
        if (height, width) == (gh, gw):
            return pos
        grid = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False)
        grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(height * width, -1)
        return torch.cat([pos[:1], grid], dim=0)

    @torch.no_grad()
    def encode_image(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C h w"]:
        x, _ = network_pixels(self, images, CLIP_MEAN, CLIP_STD, "bicubic")
        visual = self.model.visual
        x = visual.conv1(x)
        batch, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(gh, gw).to(x.dtype)
        x = visual.ln_pre(x)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        if self.config.dense_path == "maskclip":
            width_ = x.shape[-1]
            attn = last.attn
            value = F.linear(last.ln_1(x), attn.in_proj_weight[2 * width_ :], attn.in_proj_bias[2 * width_ :])
            x = x + last.ls_1(attn.out_proj(value))
            x = x + last.ls_2(last.mlp(last.ln_2(x)))
        else:
            x = last(x)
        tokens = visual.ln_post(x[:, 1:]) @ visual.proj
        if self.config.normalize:
            tokens = F.normalize(tokens, dim=-1)
        return tokens.transpose(1, 2).reshape(batch, -1, gh, gw).float()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Float[Tensor, "N C"]:
        self.eval()
        tokens = self.tokenizer(list(texts)).to(self.device)
        embeddings = self.model.encode_text(tokens).float()
        return F.normalize(embeddings, dim=-1) if self.config.normalize else embeddings


def _load_open_clip(config: OpenCLIPTeacherConfig) -> Any:
    """Build the model and load its weights following ``loading``'s order."""
    import open_clip

    known = open_clip.get_model_config(config.model_name) is not None
    shipped = None if known else read_arch_config("open_clip", config.model_name)
    if not known and shipped is None:
        raise ValueError(
            f"{describe(config)}: unknown open_clip architecture {config.model_name!r} "
            "(see open_clip.list_models() and arch_configs/open_clip)."
        )
    pretrained_cfg: Dict[str, Any] = {}
    if config.pretrained and known:
        pretrained_cfg = open_clip.get_pretrained_cfg(config.model_name, config.pretrained)
        if not pretrained_cfg and not config.random_weights and config.checkpoint is None:
            tags = open_clip.list_pretrained_tags_by_model(config.model_name)
            raise ValueError(
                f"{describe(config)}: open_clip has no pretrained tag {config.pretrained!r} for this model; "
                f"available: {', '.join(tags) or 'none'}."
            )
    quick_gelu = bool(pretrained_cfg.get("quick_gelu", False))

    weights: Optional[Path] = None
    if config.random_weights:
        warn_random_weights(config)
    elif config.checkpoint is not None:
        weights = _checkpoint_file(config)
    else:
        weights = _pretrained_file(config, pretrained_cfg)

    with seeded_random_init():
        if known:
            model = open_clip.create_model(config.model_name, pretrained=None, force_quick_gelu=quick_gelu)
        else:
            assert shipped is not None
            model = open_clip.CLIP(**dict(shipped, quick_gelu=quick_gelu or shipped.get("quick_gelu", False)))
    if weights is not None:
        try:
            open_clip.load_checkpoint(model, str(weights))
        except Exception as err:  # unreadable file, or one for another architecture
            raise weights_unavailable(config, f"the weights {weights} could not be loaded: {err}") from err
    return model


def _checkpoint_file(config: OpenCLIPTeacherConfig) -> Path:
    path = checkpoint_path(config)
    if path.is_file():
        return path
    # A hub snapshot folder of an open_clip model.
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    raise weights_unavailable(
        config,
        f"the checkpoint folder {path} has no open_clip_model.safetensors or open_clip_pytorch_model.bin.",
    )


def _pretrained_file(config: OpenCLIPTeacherConfig, pretrained_cfg: Dict[str, Any]) -> Path:
    """The weights of an open_clip pretrained tag: local cache first, then a download."""
    from open_clip.pretrained import download_pretrained

    if not pretrained_cfg:
        raise weights_unavailable(config, "it has no pretrained tag to download and no checkpoint.")
    cached = _cached_pretrained_file(pretrained_cfg)
    if cached is not None:
        return cached
    hub = pretrained_cfg.get("hf_hub", "")
    ensure_online(config, f"{hf_endpoint()}/{hub}" if hub else pretrained_cfg.get("url", ""))
    try:
        return Path(download_pretrained(pretrained_cfg))
    except Exception as err:
        raise weights_unavailable(
            config, f"downloading the '{config.pretrained}' weights failed: {err}"
        ) from err


def _cached_pretrained_file(pretrained_cfg: Dict[str, Any]) -> Optional[Path]:
    """Where open_clip would have put these weights, if they are there already."""
    from huggingface_hub import hf_hub_download

    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        candidates = [filename] if filename else []
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        candidates += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for candidate in candidates:
            try:
                return Path(hf_hub_download(repo, candidate, local_files_only=True))
            except Exception:  # not in the cache under this name
                continue
    url = pretrained_cfg.get("url", "")
    if url:
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if path.is_file():
            return path
    return None
