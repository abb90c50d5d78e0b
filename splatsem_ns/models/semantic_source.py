"""Where each Gaussian's semantic latent comes from: a swappable part of the model.

Today the latent is a free parameter per Gaussian. A feed-forward 3D encoder over the Gaussians
(a sparse-conv UNet on their positions and colours, as in Chorus) plugs in as another source: it
computes the latent from the Gaussian parameters and owns network weights instead of per-Gaussian
parameters. The model only calls the three methods below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Type

import torch
from jaxtyping import Float
from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor, nn
from torch.nn import Parameter


@dataclass
class SemanticSourceConfig(InstantiateConfig):
    """Base config of a semantic latent source."""

    _target: Type = field(default_factory=lambda: SemanticSource)
    latent_dim: int = 32
    """Channels of the per-Gaussian semantic latent. gsplat compiles its rasterizer for 1-5, 8, 9, 16, 17,
    32, 33, 64, ... channels; other counts are padded up, so pick one of those."""


class SemanticSource(nn.Module):
    """Produces an ``[N, latent_dim]`` latent for the N Gaussians of a model."""

    config: SemanticSourceConfig

    def __init__(self, config: SemanticSourceConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def gaussian_params(self, num_points: int) -> Dict[str, Parameter]:
        """Per-Gaussian parameters to add to the model's ``gauss_params``: they are densified, pruned and
        optimised together with the Gaussians (each needs an optimizer of the same name)."""
        return {}

    def param_groups(self) -> Dict[str, List[Parameter]]:
        """Other trainable parameters (network weights), by optimizer name."""
        return {}

    def initial_heads(self) -> Dict[str, nn.Module]:
        """Projector heads the model should start from (by teacher), e.g. a pretrained encoder's."""
        return {}

    def adopt_latent_dim(self, width: int) -> None:
        """Called when a checkpoint's latents are ``width`` wide: a source whose width is known from its config
        only accepts its own."""
        if width != self.latent_dim:
            raise ValueError(
                f"The checkpoint's semantic latents have {width} channels, this model's config {self.latent_dim}"
            )

    def forward(self, gauss_params: nn.ParameterDict) -> Float[Tensor, "N D"]:
        raise NotImplementedError


@dataclass
class LearnedLatentSourceConfig(SemanticSourceConfig):
    """Where the latent comes from: a free vector per Gaussian, optimised directly (feature-splatting style), or,
    with ``kind encoder``, a pretrained Chorus encoder over the Gaussians, fine-tuned on the scene
    (render-and-distill adaptation). One config with a ``kind`` rather than a union of configs, so that
    ``--pipeline.model.semantic-source.*`` options stay flat on the command line."""

    _target: Type = field(default_factory=lambda: LearnedLatentSource)
    kind: Literal["learned", "encoder"] = "learned"
    """"learned": a latent parameter per Gaussian; "encoder": computed by ``encoder_checkpoint``'s encoder."""
    init_std: float = 0.1
    """Standard deviation of the random initial latents; non-zero so every head gets a gradient at step 0."""
    encoder_checkpoint: Optional[Path] = None
    """kind encoder: the chorus-pretrain run's config.yml (its latest checkpoint). Restoring an adapted run reads it
    too, before the run's own weights replace it, except with adapt "latents": such a run restores (ns-eval,
    ns-viewer, export) without it."""
    adapt: Literal["latents", "head", "all", "none"] = "latents"
    """kind encoder: what the scene's render-and-distill adapts (the projector heads always train). "latents": the
    encoder runs once, on the Gaussians of the first render, and its output seeds a free latent per Gaussian that then
    trains, densifies and prunes exactly as ``kind learned``'s (chorus-splat's own step cost). "head": only the
    per-Gaussian layers after the backbone train; the backbone runs without gradients once per ``refresh_every``
    updates or densification and is reused in between. "all": every weight, re-encoding the whole scene with
    gradients at every step (810-830 ms per step on 370k Gaussians on an H200, about 30 times chorus-splat's step).
    "none": the encoder fixed (the zero-shot latents, refreshed as for "head"). On ScanNet after 5000 steps
    (benchmarks/results/semantic_report_scannet_adapt_h200.md) "latents" scored 64.9 held-out 2D mIoU against 65.1
    from scratch, and "head" collapsed to 5.1: the layers after a backbone whose features do not separate the scene's
    classes cannot recover them."""
    heads: Literal["pretrained", "fresh"] = "pretrained"
    """kind encoder: whether the projector heads start from the chorus-pretrain run's or from a fresh
    initialisation, as ``kind learned``'s do."""
    refresh_every: int = 100
    """kind encoder, adapt "head" or "none": optimizer updates of the Gaussians' positions (one per training step)
    between runs of the fixed backbone on the moved Gaussians; it also runs whenever densification replaces them
    (splatfacto densifies every 100 steps)."""

    def setup(self, **kwargs) -> "SemanticSource":
        if self.kind == "encoder":
            return EncoderLatentSource(self, **kwargs)
        return LearnedLatentSource(self)


class LearnedLatentSource(SemanticSource):
    """``latent = gauss_params["semantic_latent"]``."""

    config: LearnedLatentSourceConfig
    PARAM_NAME = "semantic_latent"

    def gaussian_params(self, num_points: int) -> Dict[str, Parameter]:
        return {self.PARAM_NAME: Parameter(torch.randn(num_points, self.latent_dim) * self.config.init_std)}

    def forward(self, gauss_params: nn.ParameterDict) -> Float[Tensor, "N D"]:
        return gauss_params[self.PARAM_NAME]


class EncoderLatentSource(SemanticSource):
    """``latent = encoder(Gaussians)``: a pretrained Chorus encoder (``chorus-pretrain``), run on the Gaussians in
    metres (the encoder's voxels are metric), adapted to the scene as ``adapt`` says."""

    config: LearnedLatentSourceConfig
    OPTIMIZER = "semantic_encoder"
    INPUTS = ("means", "features_dc", "opacities", "scales", "quats")

    def __init__(self, config: LearnedLatentSourceConfig, metres_per_unit: float = 1.0) -> None:
        super().__init__(config)
        if config.encoder_checkpoint is None:
            raise ValueError(
                "semantic-source kind 'encoder' needs --pipeline.model.semantic-source.encoder-checkpoint "
                "RUN/config.yml of a chorus-pretrain run"
            )
        from splatsem_ns.models.semantic_splat import restore_network_model

        self.metres_per_unit = float(metres_per_unit)
        self._cached: Optional[tuple] = None  # (what the latents were computed from, the latents)
        self._backbone_cache: Optional[tuple] = None  # (the Gaussians' storage, their version, features)
        checkpoint = Path(config.encoder_checkpoint)
        # A run adapted with "latents" saves everything it renders with (its latents and heads), so ns-viewer, ns-eval
        # and export restore it on a machine without the pretraining run; the checkpoint's shapes replace the
        # configured width when it loads. Only seeding a new run needs the encoder: that fails on first use.
        self._missing_checkpoint = (
            checkpoint if config.adapt == "latents" and not checkpoint.is_file() else None
        )
        encoder: Optional[nn.Module] = None
        if self._missing_checkpoint is not None:
            CONSOLE.print(
                f"[yellow]The encoder checkpoint {checkpoint} is not here: restoring a run whose latents it seeded "
                "needs nothing from it, but a new run cannot start without it.[/yellow]"
            )
            self._latent_dim = config.latent_dim
            self._heads: Dict[str, nn.Module] = {}
        else:
            pretrained = restore_network_model(checkpoint, "ns-train chorus-pretrain")
            if not hasattr(pretrained, "encoder"):
                raise ValueError(
                    f"{config.encoder_checkpoint} is not a chorus-pretrain run (it has no encoder)"
                )
            encoder = pretrained.encoder.requires_grad_(False)
            self._latent_dim = encoder.latent_dim
            # A plain dict: the heads are copied into the model's own, not held twice in its state.
            self._heads = dict(pretrained.projector_heads.items())
        if config.adapt == "latents":
            # Needed once, to seed the latents: held in a list, outside the module tree, so it is neither saved with
            # the run (the default encoder is 150 MB) nor moved with the model, and dropped once the latents hold its
            # output. Whether they do is saved (a restored run keeps its trained latents); the Python copy spares a
            # device read every step.
            self._seed_encoder: List[nn.Module] = [] if encoder is None else [encoder.eval()]
            self.register_buffer("latents_seeded", torch.tensor(False))
            self._latents_seeded = False
        else:
            self.encoder = encoder
            for module in {"all": [encoder], "head": self._after_backbone()}.get(config.adapt, []):
                module.requires_grad_(True)

    def _after_backbone(self) -> List[nn.Module]:
        return [self.encoder.voxel_proj, self.encoder.point_mlp, self.encoder.head]

    def train(self, mode: bool = True) -> "EncoderLatentSource":
        super().train(mode)
        # What does not adapt keeps its BatchNorm statistics: the zero-shot encoder's, as in evaluation.
        if mode and self.config.adapt in ("head", "none"):
            self.encoder.backbone.eval()
        return self

    @property
    def latent_dim(self) -> int:
        return self._latent_dim

    def adopt_latent_dim(self, width: int) -> None:
        """The width of the latents a checkpoint holds, which replaces the configured one of a source built without
        its encoder (see ``__init__``)."""
        self._latent_dim = int(width)

    def gaussian_params(self, num_points: int) -> Dict[str, Parameter]:
        if self.config.adapt != "latents":
            return {}
        # Zeros until the first render fills them with the encoder's output (``_seeded_latents``).
        return {LearnedLatentSource.PARAM_NAME: Parameter(torch.zeros(num_points, self.latent_dim))}

    def param_groups(self) -> Dict[str, List[Parameter]]:
        if self.config.adapt == "latents":
            return {}
        trained = [p for p in self.encoder.parameters() if p.requires_grad]
        return {self.OPTIMIZER: trained} if trained else {}

    def initial_heads(self) -> Dict[str, nn.Module]:
        return dict(self._heads) if self.config.heads == "pretrained" else {}

    def forward(self, gauss_params: nn.ParameterDict) -> Float[Tensor, "N D"]:
        if self.config.adapt == "latents":
            return self._seeded_latents(gauss_params)
        if self.training and self.config.adapt != "all":
            return self._from_cached_backbone(gauss_params)
        if self.training or torch.is_grad_enabled():  # a training step needs the graph
            return self._encode(gauss_params)
        # Renders without gradients (the viewer, evaluation) reuse the latents while neither the Gaussians nor the
        # encoder changed: one encoder pass over a million Gaussians costs far more than the render itself.
        tensors = [gauss_params[k] for k in self.INPUTS] + list(self.encoder.parameters())
        key = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._encode(gauss_params))
        return self._cached[1]

    def _inputs(self, gauss_params: nn.ParameterDict) -> List[Tensor]:
        """The encoder's inputs in metres (its voxels are metric), detached: the encoder does not move Gaussians."""
        unit = self.metres_per_unit
        return [
            gauss_params["means"].detach() * unit,
            gauss_params["features_dc"].detach(),
            gauss_params["opacities"].detach(),
            gauss_params["scales"].detach() + math.log(unit),
            gauss_params["quats"].detach(),
        ]

    def _from_cached_backbone(self, gauss_params: nn.ParameterDict) -> Float[Tensor, "N D"]:
        """A training step's latents with the backbone fixed: its features are reused until densification replaces
        the Gaussians (new storage) or the optimizer has moved them ``refresh_every`` times (each in-place update
        bumps the tensor's version), and only the layers after it run."""
        means, inputs = gauss_params["means"], self._inputs(gauss_params)
        storage, version = (means.data_ptr(), tuple(means.shape)), means._version
        cache = self._backbone_cache
        if cache is None or cache[0] != storage or version - cache[1] >= max(1, self.config.refresh_every):
            self._backbone_cache = cache = (storage, version, self.encoder.backbone_features(*inputs))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.adapt == "head"):
            return self.encoder.latent_from_backbone(cache[2], *inputs)

    def _seeded_latents(self, gauss_params: nn.ParameterDict) -> Float[Tensor, "N D"]:
        """adapt "latents": the free per-Gaussian latents, filled with the encoder's output (evaluation mode) on the
        first call of a run that has not done so, the zero-shot prediction from which the scene's training goes on."""
        latents = gauss_params[LearnedLatentSource.PARAM_NAME]
        if not self._latents_seeded:
            self._latents_seeded = bool(self.latents_seeded)  # a restored run's flag: read once
        if not self._latents_seeded:
            if not self._seed_encoder:
                raise FileNotFoundError(
                    f"The encoder checkpoint {self._missing_checkpoint} does not exist, and this run's latents have "
                    "not been seeded from it yet: give --pipeline.model.semantic-source.encoder-checkpoint the "
                    "config.yml of a chorus-pretrain run (its nerfstudio_models/ beside it)."
                )
            encoder = self._seed_encoder[0].to(latents.device).eval()  # BatchNorm statistics as pretrained
            with torch.no_grad():
                latents.copy_(encoder(*self._inputs(gauss_params)))
            self.latents_seeded.fill_(True)
            self._latents_seeded = True
        self._seed_encoder.clear()  # its work is done (or was, in the restored run): free its memory
        return latents

    def _encode(self, gauss_params: nn.ParameterDict) -> Float[Tensor, "N D"]:
        return self.encoder(*self._inputs(gauss_params))
