"""chorus-splat: splatfacto's Gaussians plus a per-Gaussian semantic latent distilled from several 2D teachers.

Per training step:
1. RGB is rendered exactly as splatfacto does (same densification strategy, losses and optimizers).
2. The semantic latent of every Gaussian (from a swappable ``SemanticSource``) is rendered in a second,
   cheap pass at the teachers' feature resolution rather than the full image: feature rendering is the
   expensive part of semantic splatting, and the teachers only see at patch resolution anyway.
3. One projector head per teacher decodes the rendered latent into that teacher's feature space; each
   teacher contributes a weighted cosine distillation loss.

By default the semantic pass does not send gradients into the Gaussians' geometry or opacity, so the
semantic branch cannot degrade RGB quality; ``semantic_grad_to_geometry`` turns that coupling on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Mapping, Optional, Tuple, Type, Union

import torch
from jaxtyping import Float, Int
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
from nerfstudio.model_components.lib_bilagrid import total_variation_loss
from nerfstudio.models.splatfacto import RGB2SH, SplatfactoModel, SplatfactoModelConfig, get_viewmat
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor, nn
from torch.nn import Parameter

from splatsem_ns.data.dataparser import DATAPARSER_SCALE_KEY
from splatsem_ns.data.depth import DEPTH_SERVED_KEY
from splatsem_ns.data.host_camera import HOST_CAMERA_KEY, EvalCameraReads, camera_intrinsics
from splatsem_ns.models.compile_options import (
    HeldOptions,
    compile_arguments,
    inductor_options,
    require_cpp_compiler,
)
from splatsem_ns.models.finite_guard import NonFiniteWatch
from splatsem_ns.models.folded_query import FoldedQuery
from splatsem_ns.models.heads import (
    ProjectorHead,
    copy_matching_heads,
    cosine_distillation_loss,
    heads_from_state_dict,
    resize_feature_map,
)
from splatsem_ns.models.optional_lpips import NaNMetric, optional_lpips
from splatsem_ns.models.semantic_source import LearnedLatentSourceConfig, SemanticSourceConfig
from splatsem_ns.models.smoothness import voxel_consensus_loss
from splatsem_ns.models.ssim import BlurWeights, blur_weights, photometric_loss
from splatsem_ns.models.strategy import SyncFreeDefaultStrategy
from splatsem_ns.rendering import rasterize_from_projection, rasterize_gaussians
from splatsem_ns.rendering.triton_rasterizer import (
    ProjectedTiles,
    fold_operands_for,
    project_and_bin,
    rasterize_features_triton,
    render_relevancy,
    triton_raster_available,
    triton_tile_size_ok,
)
from splatsem_ns.teachers.base import TEACHER_SPECS_KEY, TeacherSpec


@dataclass
class ChorusSplatModelConfig(SplatfactoModelConfig):
    """Splatfacto plus a distilled multi-teacher semantic latent."""

    _target: Type = field(default_factory=lambda: ChorusSplatModel)
    semantic_source: SemanticSourceConfig = field(default_factory=LearnedLatentSourceConfig)
    """Where each Gaussian's semantic latent comes from (a learned vector per Gaussian by default)."""
    projector_hidden_dim: int = 256
    """Hidden width of each teacher's projector MLP."""
    projector_num_layers: int = 2
    """Linear layers in each projector MLP (1 = a linear projection)."""
    teacher_loss_weights: Dict[str, float] = field(default_factory=dict)
    """Distillation loss weight per teacher name; teachers not listed get ``default_teacher_loss_weight``."""
    default_teacher_loss_weight: float = 1.0
    """Weight of each teacher's cosine distillation loss unless listed in ``teacher_loss_weights``."""
    semantic_grad_to_geometry: bool = False
    """Let distillation gradients move the Gaussians' means, scales, rotations and opacities. Off by default
    so the semantic branch cannot cost RGB quality."""
    semantic_render_scale: Optional[float] = None
    """Resolution of the semantic render relative to the image. None: the finest teacher feature grid."""
    semantic_supersample: int = 8
    """The semantic pass renders at up to this many times its resolution per axis (never finer than the image).
    A teacher's feature cell summarises its whole patch, while a coarse render of Gaussians smaller than a cell
    sees only the few in front, each dilated to a pixel. Training distils the fine render (``distill_at``);
    queries average each k x k block back to the grid. 1: render the coarse grid directly (cheapest). The
    default 8 was the best trade-off measured on ScanNet (benchmarks/results/semantic_report_scannet_h200.md):
    16 scored the same at 1.3x the training time."""
    semantic_max_pixels: int = 65536
    """Upper bound on the supersampled semantic render's pixel count: the factor is lowered until it fits, so
    a teacher with a fine grid (SAM's 64 x 64) does not multiply the cost (ScanNet with the labels proxy's
    32 x 24 grid: factor 8, 49k pixels)."""
    distill_at: Literal["teacher", "render"] = "render"
    """Where the distillation loss compares the rendered latent with each teacher. "teacher": the render
    (supersampled ones averaged per block) is resampled onto the teacher's feature grid, so a cell constrains
    only the mean of the Gaussians it covers and their mix within it is free. "render": the teacher's
    features are upsampled (bilinear) to the render's own resolution, supersampling included, and every
    rendered pixel (or the ``distill_pixels`` drawn among them) must match, which pulls each visible Gaussian,
    not just the cell's average, towards the feature of the cells it falls in; views then vote on each Gaussian
    through their shared gradients."""
    distill_pixels: int = 4096
    """With ``distill_at="render"``: render pixels drawn at random each step (the same for every teacher) where
    the heads decode and the loss compares, with the teachers' features interpolated there. Decoding every
    pixel of a supersampled render into wide teacher spaces (768 channels) would dominate the step's time and
    memory. 0: every pixel."""
    distill_area_weighting: bool = False
    """With ``distill_at="render"``: weight each render pixel's loss by the surface area it shows (its rendered
    depth squared, over a running mean of that), so every view counts by the surface it sees rather than by its
    pixel count. Otherwise a close-up view, whose pixels each cover a small patch, outvotes several distant
    views of the same surface: where its teacher is wrong, the Gaussians there learn its mistake. Off by
    default: on ScanNet it changed neither 2D nor 3D beyond the run-to-run spread."""
    semantic_alpha_normalize: bool = False
    """Divide the rendered latent by the semantic pass's accumulated opacity, so a pixel's latent is the
    weighted mean of the Gaussians it sees rather than their weighted sum against an empty (zero) background:
    thinly covered pixels then decode like the Gaussians in them, and a single Gaussian's latent decodes
    like a rendered pixel. Pixels that see (almost) nothing fade to zero. Off by default: on ScanNet it scored
    about 1 point lower in 2D and 3D."""
    semantic_rasterize_mode: Optional[Literal["classic", "antialiased"]] = None
    """Rasterization of the semantic pass; None: the RGB pass's ``rasterize_mode``. "antialiased" scales each
    Gaussian's opacity by its screen-space dilation, so Gaussians smaller than a pixel of the coarse render
    count by their area instead of covering the pixel."""
    semantic_tile_size: int = 4
    """Tile edge (pixels) of the semantic pass. That pass renders few pixels, so gsplat's default 16-pixel
    tiles leave most of a large GPU idle; smaller tiles give it more blocks to run in parallel (measured:
    benchmarks/results/train_speed_h200.md). Renders of more than ``SMALL_RENDER_PIXELS`` (the viewer's
    full-resolution queries) use 16-pixel tiles whatever this says."""
    depth_loss_weight: Optional[float] = None
    """Weight of an L1 loss between the rendered expected depth and the scene's sensor depth (pixels with a
    measurement only). It constrains geometry, which sparse captures (few views of a large room) otherwise leave
    loose, and a new viewpoint then sees the surfaces the teacher labelled. None (default): 3 when every training
    view has a depth image, else no depth loss; 0: off (trains like splatfacto); > 0: that weight, and depth
    images are required. On ScanNet scene0000_00 (benchmarks/results/semantic_report_scannet_h200.md) 3 with the
    voxel prior at 10 raised held-out 2D mIoU from 51-54 to 56-57, 3D foreground mIoU from 52-54 to 60-62 and
    click-to-segment IoU from 43-44 to 63-64 (semantic_report_scannet_clicks_h200.md), against 0.1 and no
    prior."""
    semantic_smoothness_weight: float = 10.0
    """Weight of a 3D prior that pulls each Gaussian's latent towards the opacity-weighted mean latent of the
    Gaussians in its voxel (``splatsem_ns.models.smoothness``): Gaussians that training views barely supervise
    take their neighbours' latent instead of keeping a random one. Adam scales each latent's step by its own
    gradient history, so a small weight already fills in unsupervised Gaussians, and a larger one also smooths
    supervised ones. On ScanNet 10 raised 3D foreground mIoU from about 53 to about 60 and held-out 2D by about 2
    points on its own, and more with the depth loss (see ``depth_loss_weight``). On the small synthetic room
    after 300 CPU steps it lowers held-out 2D and click-to-segment (README, Evaluation); after 1,000 steps it
    no longer does. 0: off."""
    semantic_smoothness_voxel: float = 0.05
    """Voxel edge of that prior in the units of the dataset's original frame (metres for depth-sensor captures
    such as ScanNet); the grid is shifted at random every step."""
    compile_distillation: bool = True
    """On CUDA, run the heads and distillation losses through ``torch.compile``: their many small element-wise
    kernels fuse into a few, which matters because a splatting step is bound by kernel launches on the host.
    The first training step pays the compilation (tens of seconds). Eager on CPU."""
    compile_mode: Optional[str] = None
    """``torch.compile`` mode of ``compile_distillation``: None (inductor's default: fused kernels, launched from
    Python every step) or "reduce-overhead" (the same kernels replayed as a CUDA graph, which removes most of their
    host-side launch cost; the render's size must then stay fixed, as it does without coarse-to-fine). Beside
    ``compile_options`` it is passed as the options it stands for, with ``compile_options`` on top."""
    compile_voxel_prior: bool = True
    """On CUDA, run the voxel prior (``semantic_smoothness_weight``) through ``torch.compile`` too, as one graph
    with dynamic shapes (the Gaussian count changes with densification), with ``compile_mode`` and
    ``compile_options``: its twenty-odd small operators over every Gaussian fuse into a few kernels. In the H100
    step profile the prior took 1.5 ms of host time a step. Timed with the other two compile levers in
    docs/benchmarks.md ("The compile levers, timed"); False: eager."""
    stacked_ssim: bool = True
    """splatfacto's SSIM loss with its five Gaussian blurs stacked into two (``models/ssim.py``): the same value and
    gradient to float rounding (a test), in four convolution launches forward and two backward instead of ten and
    six, for a step bound by the host's launches. False: pytorch_msssim's, as splatfacto computes it. Images
    smaller than the 11-pixel window (early coarse-to-fine steps of tiny scenes) always take pytorch_msssim's,
    which skips the blur along a dimension that short."""
    compile_photometric_loss: bool = True
    """On CUDA, run splatfacto's main loss (L1 and the stacked SSIM, ``models/ssim.photometric_loss``) through
    ``torch.compile`` as one graph, with ``compile_mode`` and ``compile_options``: its forty-odd elementwise
    operators and their backward fuse into a few kernels around the four blurs (cuDNN's). It compiles the stacked
    SSIM only: with ``stacked_ssim`` False the loss stays eager.
    On its own it lowered peak training memory from 1.48x splatfacto's to 1.21x on an H100 (the fused loss keeps
    fewer full-image temporaries for backward)."""
    compile_options: Tuple[str, ...] = ("cpp_wrapper=true",)
    """Inductor options of the compiled losses (``compile_distillation``, ``compile_voxel_prior``,
    ``compile_photometric_loss``) as KEY=VALUE: e.g. ``cpp_wrapper=true`` (the default: the
    compiled graphs launch their kernels from generated C++ rather than Python; in the H100 step profile the
    generated Python took 1.7 of the compiled distillation's 4.2 ms of host time) or ``combo_kernels=true``
    (independent kernels fused side by side into fewer launches). Checked when the model is built, and held
    process-wide through each CUDA training iteration, so that torch also compiles the losses' backward with them
    (``compile_options.HeldOptions``; without that, ``cpp_wrapper=true`` failed on the GPU under torch 2.11).
    With ``compile_voxel_prior`` and ``compile_photometric_loss`` it took chorus-splat from 1.44x splatfacto's step
    time to 1.14x on an H100 (docs/benchmarks.md), but the first training step then compiled for 45-60 s on a
    fresh process instead of about 7 s; short runs (a few thousand steps) lose more than they gain. Empty
    (``--pipeline.model.compile-options``, nothing after it): inductor's defaults."""
    semantic_every: int = 1
    """Run the semantic half of a training step (the latent render, the distillation losses, the voxel prior, and
    serving the teachers' features) on every this many steps; the RGB pass, its losses and the depth loss run every
    step. A splatting step is bound by the host's kernel launches, so this divides the semantic half's cost. 1:
    every step."""
    finite_check_every: int = 10
    """Every this many training steps, stop with an error naming the source if a NaN or inf appeared: in a batch
    input (teacher features, depth), a loss, or the Gaussians' parameters (splatsem_ns.models.finite_guard).
    Recording costs a few small kernels per step and no host-device synchronisation; the check itself reads a
    few numbers (nerfstudio synchronises as often to log the loss). 0: off."""
    rasterizer_backend: str = "auto"
    """"auto" (gsplat's CUDA kernels on GPU, the PyTorch reference path on CPU), "gsplat" or "torch"."""
    query_fused_raster: bool = False
    """The viewer's relevancy from one Triton kernel per frame that composites each tile's latent and folds the
    query in registers, never writing the latent (``render_query_relevancy``). Off: the latent rendered by the
    render path above, then the one-kernel fold, which measured faster on an H200 at 1280x720 from 1M Gaussians
    (3.55 ms against 3.78 ms per frame in the same run: benchmarks/results/query_speed_h200_triton_tiles.md).
    Both give the same map (a test)."""
    semantic_shares_rgb_projection: bool = True
    """In eval-mode renders without gradients whose latent has the RGB pass's size and tiles (the query panel at
    full resolution, or any evaluation at render scale 1 without supersampling), composite the latent through the
    RGB pass's projection and tile binning (``rendering.rasterize_from_projection``) instead of projecting the same
    Gaussians through the same camera again: the same compositing kernel on the same inputs, so the same latent (a
    test), with one projection and tile sort fewer per frame: a frame with the query at 1280x720 from 1M Gaussians
    took 3.80-3.88 ms against 4.61-4.64 ms projecting again (two H100 runs,
    benchmarks/results/query_speed_h100_shared_projection_run1.md, _run2.md)."""
    viewer_latent_triton: bool = False
    """While the query panel asks for the latent at full resolution (``viewer_semantic_scale`` set; eval mode, no
    gradients, no supersampling), render it with the forward-only Triton rasterizer
    (``rendering/triton_rasterizer.py``: the feature sum on tensor cores in float16 products with float32 sums, the
    alpha normalisation inside the kernel) instead of gsplat's; inside a whole eval-mode render from the RGB pass's
    projection and tile binning, as gsplat's latent is (``semantic_shares_rgb_projection``). Off by default: on
    H100s at 1280x720 from 1M Gaussians it was slower than gsplat's in every run that timed it, with the latent
    rendered alone (3.34-3.81 ms against 2.83-3.44 ms with the same fused fold; three runs) and in a whole frame with
    the query (4.36-4.65 ms against 3.80-3.88 ms; two runs); its render kernel took 1.40 ms of GPU time where gsplat's compositing took 0.89 ms
    (benchmarks/results/query_speed_h100_viewer_path.md, query_speed_h100_shared_projection_run1.md, _run2.md).
    Evaluation and training renders are gsplat's either way; where Triton cannot run, gsplat's."""


class ChorusSplatModel(SplatfactoModel):
    """Gaussian splatting with a multi-teacher semantic latent (see the module docstring)."""

    config: ChorusSplatModelConfig

    # ------------------------------------------------------------------ set-up
    def populate_modules(self) -> None:
        # splatfacto puts its seed colours on the GPU with a hard-coded .cuda(); hand it points without
        # colours (its "points but no colours" branch) and set the colours here, on any device.
        seed_points = self.seed_points
        has_seed_colors = (
            seed_points is not None and not self.config.random_init and seed_points[1].shape[0] > 0
        )
        if has_seed_colors:
            self.seed_points = (seed_points[0], seed_points[1][:0])
        if seed_points is not None and seed_points[0].shape[0] == 0:
            raise ValueError(
                "The seed point cloud is empty: nothing to initialise Gaussians from. Give a point cloud "
                "with points, or train with --pipeline.model.random-init True."
            )
        # A bad option or mode fails here, not at the first step's compile.
        self._compile_arguments = compile_arguments(self.config.compile_options, self.config.compile_mode)
        options = inductor_options(self.config.compile_options)
        # Held through each CUDA training iteration, so the compiled losses' backward compiles with them too.
        self.held_compile_options = HeldOptions(options) if options else None
        with optional_lpips():
            super().populate_modules()
        # gsplat's densification statistics without its three host synchronisations per step (same settings).
        self.strategy = SyncFreeDefaultStrategy(
            **{f.name: getattr(self.strategy, f.name) for f in dataclasses.fields(self.strategy)}
        )
        # pytorch_msssim keeps SSIM's window as a plain host tensor and copies it to the image's device on every
        # call, a blocking copy each training step; as a buffer it moves with the model once.
        window = self.ssim.win
        del self.ssim.win
        self.ssim.register_buffer("win", window, persistent=False)
        self.seed_points = seed_points
        if has_seed_colors:
            colors = seed_points[1].float() / 255.0
            if self.config.sh_degree > 0:
                self.gauss_params["features_dc"] = Parameter(RGB2SH(colors))
            else:
                self.gauss_params["features_dc"] = Parameter(torch.logit(colors, eps=1e-10))

        self.depth_loss_weight = resolve_depth_loss_weight(
            self.config.depth_loss_weight, bool((self.kwargs.get("metadata") or {}).get(DEPTH_SERVED_KEY))
        )
        # Scene units per unit of the dataset's original frame (the dataparser's scale), for metric settings.
        self.scene_scale = float((self.kwargs.get("metadata") or {}).get(DATAPARSER_SCALE_KEY, 1.0))
        source_config = self.config.semantic_source
        if getattr(source_config, "kind", "learned") == "encoder":  # metric voxels: Gaussians back in metres
            self.semantic_source = source_config.setup(metres_per_unit=1.0 / self.scene_scale)
        else:
            self.semantic_source = source_config.setup()
        for name, param in self.semantic_source.gaussian_params(self.num_points).items():
            self.gauss_params[name] = param

        specs: Dict[str, TeacherSpec] = (self.kwargs.get("metadata") or {}).get(TEACHER_SPECS_KEY, {}) or {}
        self.teacher_specs = dict(specs)
        self.projector_heads = nn.ModuleDict(
            {
                name: ProjectorHead(
                    self.semantic_source.latent_dim,
                    spec.feature_dim,
                    self.config.projector_hidden_dim,
                    self.config.projector_num_layers,
                )
                for name, spec in specs.items()
            }
        )
        copy_matching_heads(
            self.projector_heads, self.semantic_source.initial_heads()
        )  # a pretrained encoder's
        # Saved with the checkpoint, so a model restored without its teachers renders at the same scale. The
        # render path reads a Python copy: reading the (GPU) buffer every step would synchronise the device.
        self._semantic_scale = self._initial_semantic_scale(specs)
        self.register_buffer("semantic_scale", torch.tensor(self._semantic_scale))

        # Viewer display state (splatsem_ns.viewer.query_panel). Plain attributes, not buffers: never saved,
        # and used only when not training. Masks whose length is not the current Gaussian count are ignored.
        # output_hooks: ``hook(model, camera, outputs) -> dict``, merged into eval-mode outputs.
        # hidden_mask: bool [N], Gaussians left out like splatfacto's crop; highlight_mask: bool [N], tinted.
        self.output_hooks: list = []
        self.finite_watch = NonFiniteWatch()
        self._checked_inputs: set = set()  # (training image, input names) whose inputs the watch has seen
        self.training_image_names: List[str] = []  # set by the pipeline, to name an image in errors
        self._compiled_distillation = None  # built on the first CUDA training step (compile_distillation)
        self._compiled_voxel_prior = None  # likewise (compile_voxel_prior)
        self._compiled_photometric_loss = None  # likewise (compile_photometric_loss)
        self._announced_compile = False  # the first compile says the first steps will be slow
        self._ssim_weights: Optional[BlurWeights] = None  # stacked_ssim's blur, built at its first use
        self._mean_pixel_area: Optional[Tensor] = None  # running normaliser of distill_area_weighting
        self.hidden_mask: Optional[Tensor] = None
        self.highlight_mask: Optional[Tensor] = None
        # An eval camera's view matrix, intrinsics and size, for a second render of the same frame (the panel's).
        self._eval_camera_reads = EvalCameraReads(get_viewmat)
        # viewer_semantic_scale: resolution of the semantic render in eval-mode renders while the query panel is in
        # use (1.0: full resolution, so relevancy is not upsampled from a coarse grid); None: training's.
        self.viewer_semantic_scale: Optional[float] = None
        # viewer_latent_deferred: eval-mode renders leave ``semantic_latent`` out, because the query panel renders
        # its relevancy straight from the Gaussians (``render_query_relevancy``) and would not read it.
        self.viewer_latent_deferred: bool = False
        self.highlight_color: Tuple[float, float, float] = (1.0, 0.85, 0.0)

    def _initial_semantic_scale(self, specs: Mapping[str, TeacherSpec]) -> float:
        if self.config.semantic_render_scale is not None:
            return float(self.config.semantic_render_scale)
        if not specs:
            return 1.0 / 16.0
        return max(
            max(s.feature_grid[0] / s.image_size[0], s.feature_grid[1] / s.image_size[1])
            for s in specs.values()
        )

    def load_state_dict(self, dict, **kwargs):  # type: ignore[override]  # noqa: A002 (splatfacto's name)
        # Restored without teachers (ns-eval, ns-viewer): the heads exist only in the checkpoint.
        saved_heads = heads_from_state_dict(dict, "projector_heads.")
        for name in self.semantic_source.gaussian_params(0):
            saved = dict.get(f"gauss_params.{name}")
            if saved is not None and saved.shape[1:] != self.gauss_params[name].shape[1:]:
                # A source whose width came from its config, not its (absent) encoder: the checkpoint's width wins,
                # for the latents (splatfacto resizes them to the checkpoint's count only) and the heads they feed.
                self.semantic_source.adopt_latent_dim(saved.shape[1])
                self.gauss_params[name] = Parameter(
                    saved.new_zeros((0, *saved.shape[1:]), device=self.device)
                )
                for teacher in list(self.projector_heads):
                    if teacher in saved_heads:
                        self.projector_heads[teacher] = saved_heads[teacher].to(self.device)
        for name, head in saved_heads.items():
            if name not in self.projector_heads:
                self.projector_heads[name] = head.to(self.device)
        result = super().load_state_dict(dict, **kwargs)
        self._semantic_scale = float(self.semantic_scale)
        return result

    # ------------------------------------------------------------------ parameters
    def get_gaussian_param_groups(self) -> Dict[str, List[Parameter]]:
        groups = super().get_gaussian_param_groups()
        for name in self.semantic_source.gaussian_params(0):
            groups[name] = [self.gauss_params[name]]
        return groups

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        groups = super().get_param_groups()
        groups.update(self.semantic_source.param_groups())
        groups["projector_heads"] = list(self.projector_heads.parameters())
        return groups

    # ------------------------------------------------------------------ rendering
    def get_outputs(self, camera: Cameras) -> Dict[str, Union[torch.Tensor, List]]:
        """Splatfacto's RGB render (device-agnostic rasterizer) plus the rendered semantic latent.

        Returns rgb [H, W, 3], depth [H, W, 1] (eval or when requested), accumulation [H, W, 1],
        background, and semantic_latent [h, w, D] at ``semantic_scale`` of the full camera resolution.
        """
        if not isinstance(camera, Cameras):
            raise TypeError(f"chorus-splat renders Cameras, got {type(camera).__name__}")
        if self.training:
            assert camera.shape[0] == 1, "Only one camera at a time"
            camera_to_world = self.camera_optimizer.apply_to_camera(camera)
        else:
            camera_to_world = camera.camera_to_worlds

        crop_ids = self._visible_ids()
        if crop_ids is not None and crop_ids.sum() == 0:
            return self.get_empty_outputs(*self._eval_camera_reads.size(camera), self.background_color)
        params = {k: (v[crop_ids] if crop_ids is not None else v) for k, v in self.gauss_params.items()}
        latent = self.semantic_source(self.gauss_params)
        if crop_ids is not None:
            latent = latent[crop_ids]

        viewmat = get_viewmat(camera_to_world) if self.training else self._eval_camera_reads.viewmat(camera)
        # Everything that needs no camera size is queued before the size is read (see _viewer_semantic_inputs).
        colors = torch.cat((params["features_dc"][:, None, :], params["features_rest"]), dim=1)
        if self.config.sh_degree > 0:
            sh_degree = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
        else:
            colors, sh_degree = torch.sigmoid(colors).squeeze(1), None
        highlight = self._display_mask(self.highlight_mask)  # viewer display state
        if highlight is not None:
            highlight = highlight if crop_ids is None else highlight[crop_ids]
            colors = _tint(colors, highlight, self.highlight_color, is_sh=sh_degree is not None)
        means = params["means"]
        quats = params["quats"]
        scales = torch.exp(params["scales"])
        opacities = torch.sigmoid(params["opacities"]).squeeze(-1)
        # A training camera from the datamanager carries its intrinsics and size read on the host: reading them from
        # the device camera would make the host wait for the GPU, several times a step.
        host = (camera.metadata or {}).get(HOST_CAMERA_KEY) if self.training else None
        if host is not None:
            full_K, full_W, full_H = host.intrinsics()
        else:
            full_K, full_W, full_H = (
                camera_intrinsics(camera) if self.training else self._eval_camera_reads.intrinsics(camera)
            )
            full_K = full_K.to(self.device)
        # Same rounding as splatfacto's, so renders match its downscaled ground truth pixel for pixel.
        scale = self._get_downscale_factor()
        if scale == 1:  # past coarse-to-fine (or without it): the full camera, without reading it twice
            K, W, H = full_K, full_W, full_H
        elif host is not None:
            K, W, H = host.intrinsics(scale)
        else:
            camera.rescale_output_resolution(1 / scale)
            K, W, H = camera_intrinsics(camera)
            K = K.to(self.device)
            camera.rescale_output_resolution(scale)
        self.last_size = (H, W)

        wants_depth = (
            self.config.output_depth_during_training
            or self.depth_loss_weight > 0
            or (self.config.distill_area_weighting and self.config.distill_at == "render")
        )
        render_mode = "RGB+ED" if (wants_depth or not self.training) else "RGB"
        render, alpha, self.info = rasterize_gaussians(
            means=means,
            quats=quats,
            scales=scales,
            opacities=opacities,
            colors=colors,
            viewmats=viewmat,
            Ks=K,
            width=W,
            height=H,
            near_plane=0.01,
            far_plane=1e10,
            sh_degree=sh_degree,
            render_mode=render_mode,
            absgrad=self.strategy.absgrad,
            rasterize_mode=self.config.rasterize_mode,
            backend=self.config.rasterizer_backend,
        )
        if self.training:
            self.strategy.step_pre_backward(
                self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info
            )

        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training:
            if camera.metadata is not None and "cam_idx" in camera.metadata:
                rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], H, W)
        depth = None
        if render_mode == "RGB+ED":
            depth = torch.where(alpha > 0, render[..., 3:4], render[..., 3:4].detach().max()).squeeze(0)
        if background.shape[0] == 3 and not self.training:
            background = background.expand(H, W, 3)

        outputs: Dict[str, Union[torch.Tensor, List]] = {
            "rgb": rgb.squeeze(0),
            "depth": depth,  # type: ignore[dict-item]
            "accumulation": alpha.squeeze(0),
            "background": background,
        }
        deferred = not self.training and self.viewer_latent_deferred
        if self.projector_heads and (not self.training or self.is_semantic_step(self.step)) and not deferred:
            # Distilled at the render's resolution, training keeps the supersampled render whole.
            pool = not (self.training and self.config.distill_at == "render")
            outputs["semantic_latent"] = self._render_semantic_latent(
                means,
                quats,
                scales,
                opacities,
                latent,
                viewmat,
                full_K,
                full_W,
                full_H,
                self._semantic_scale if self.training else self._eval_semantic_scale(),
                pool,
                rgb_info=None if self.training else self.info,
            )
        if not self.training:  # viewer outputs (semantic queries) computed from this render
            for hook in self.output_hooks:
                outputs.update(hook(self, camera, outputs))
        return outputs

    def _get_background_color(self) -> Float[Tensor, " 3"]:
        # splatfacto keeps the eval background on the host and copies it up every frame; that copy waits for the RGB
        # render just queued, so the semantic pass could not be queued behind it. Moved once, it stays on the device
        # (``set_background``, which the viewer calls, replaces it as before).
        if self.config.background_color == "random" and not self.training:
            self.background_color = self.background_color.to(self.device)
        return super()._get_background_color()

    def is_semantic_step(self, step: int) -> bool:
        """Whether training step ``step`` runs the semantic half (see ``semantic_every``)."""
        return step % max(1, self.config.semantic_every) == 0

    def _visible_ids(self) -> Optional[Tensor]:
        """The Gaussians an eval-mode render draws (crop box and the viewer's hidden mask), or None for all."""
        crop_ids = None
        if self.crop_box is not None and not self.training:
            crop_ids = self.crop_box.within(self.means).squeeze()
        hidden = self._display_mask(self.hidden_mask)  # viewer display state
        if hidden is not None:
            crop_ids = ~hidden if crop_ids is None else crop_ids & ~hidden
        return crop_ids

    def _viewer_semantic_inputs(self, camera: Cameras) -> Optional[Dict]:
        """What an eval-mode render passes to ``_render_semantic_latent`` (visible Gaussians, camera, scale), or
        None when nothing is visible."""
        camera = camera.to(self.device)
        ids = self._visible_ids()
        if ids is not None and ids.sum() == 0:
            return None
        params = {k: (v[ids] if ids is not None else v) for k, v in self.gauss_params.items()}
        latent = self.semantic_source(self.gauss_params)
        inputs = {
            "means": params["means"].detach(),
            "quats": params["quats"].detach(),
            "scales": torch.exp(params["scales"]).detach(),
            "opacities": torch.sigmoid(params["opacities"]).squeeze(-1).detach(),
            "latent": (latent[ids] if ids is not None else latent).detach(),
            "viewmat": self._eval_camera_reads.viewmat(camera),
            "scale": self._eval_semantic_scale(),
        }
        # The camera's size last: reading it makes the host wait until the GPU has run everything queued, the
        # previous frame included. Queuing what needs no size first lets the host's work on it (about a third of a
        # millisecond a frame, get_viewmat's compiled call most of it) overlap the GPU's end of the previous frame,
        # where after the read the GPU would sit idle through it. After the frame's RGB pass, the same camera's
        # read is the one that pass made, and nothing waits here.
        inputs["K"], inputs["width"], inputs["height"] = self._eval_camera_reads.intrinsics(camera)
        return inputs

    @torch.no_grad()
    def render_viewer_latent(self, camera: Cameras) -> Optional[Float[Tensor, "h w D"]]:
        """The ``semantic_latent`` an eval-mode ``get_outputs`` gives (same Gaussians, same resolution), or None
        when nothing is visible: for the viewer's hooks when ``viewer_latent_deferred`` left it out."""
        inputs = self._viewer_semantic_inputs(camera)
        if inputs is None:
            return None
        return self._render_semantic_latent(
            inputs["means"], inputs["quats"], inputs["scales"], inputs["opacities"], inputs["latent"],
            inputs["viewmat"], inputs["K"], inputs["width"], inputs["height"], inputs["scale"],
        )  # fmt: skip

    def query_relevancy_supported(self, folded: FoldedQuery, camera: Optional[Cameras] = None) -> bool:
        """Whether ``render_query_relevancy`` can answer ``folded`` here (see there); with ``camera``, also for
        that camera's resolution."""
        if not triton_raster_available(self.device) or len(folded.front_weights) != 1:
            return False
        if folded.front_weights[0].shape[1] % 64:  # the relevancy epilogue's block of hidden units
            return False
        return camera is None or self._query_relevancy_fits(*self._eval_camera_reads.size(camera))

    def _query_relevancy_fits(self, width: int, height: int) -> bool:
        """Whether ``render_query_relevancy``'s kernel takes an eval render of a ``width`` x ``height`` camera."""
        w, h, k = self._semantic_render_size(width, height, self._eval_semantic_scale())
        tile = semantic_tile_size(self.config.semantic_tile_size, k * w * k * h)
        # Supersampled renders are pooled before the query.
        return k == 1 and triton_tile_size_ok(tile)

    @torch.no_grad()
    def render_query_relevancy(
        self, camera: Cameras, folded: FoldedQuery, factored: Optional[bool] = None, **kernel_options: int
    ) -> Optional[Float[Tensor, "h w P"]]:
        """The relevancy of ``folded`` over the semantic latent an eval-mode render gives (same Gaussians, same
        resolution, same normalisation), computed by one Triton kernel per frame that never writes the latent
        (``rendering/triton_rasterizer.py``). None where that path cannot run (no Triton or CUDA, a head with
        other than one hidden layer, a supersampled render, nothing visible): callers then fold the latent.
        ``kernel_options`` (``block_gaussians``, ``num_warps``, ``tile_size``: a power of two) tune the kernel; the
        defaults are its own and the render's tile size. ``factored``: the form of the head's norm
        (``fused_query``'s module docstring; None: ``FoldedQuery.factored_by_default``)."""
        if not self.query_relevancy_supported(folded):
            return None
        inputs = self._viewer_semantic_inputs(camera)  # reads the camera's size once, for the check below too
        if inputs is None or not self._query_relevancy_fits(inputs["width"], inputs["height"]):
            return None
        width, height, scale = inputs["width"], inputs["height"], inputs["scale"]
        w, h, _ = self._semantic_render_size(width, height, scale)  # k == 1 here (supported above)
        latent = inputs["latent"]
        precision = "fp16" if folded.fold.dtype in (torch.float16, torch.bfloat16) else "ieee"
        relevancy = render_relevancy(
            inputs["means"], inputs["quats"], inputs["scales"], inputs["opacities"], latent,
            inputs["viewmat"], _scale_intrinsics(inputs["K"], (w / width, h / height)), w, h,
            fold_operands_for(folded, latent.shape[-1], factored),
            normalize_min_alpha=_MIN_ALPHA if self.config.semantic_alpha_normalize else None,
            rasterize_mode=self.config.semantic_rasterize_mode or self.config.rasterize_mode,
            tile_size=kernel_options.pop("tile_size", semantic_tile_size(self.config.semantic_tile_size, w * h)),
            backend="torch" if self.config.rasterizer_backend == "torch" else "auto",
            precision=precision,
            **kernel_options,
        )  # fmt: skip
        return relevancy[0]

    def _display_mask(self, mask: Optional[Tensor]) -> Optional[Tensor]:
        """A viewer mask that applies to this render: eval mode only, and only while it still matches the
        Gaussians (densification during training changes their number)."""
        if self.training or mask is None or mask.shape[0] != self.num_points:
            return None
        return mask.to(self.device)

    def _render_semantic_latent(
        self,
        means: Float[Tensor, "N 3"],
        quats: Float[Tensor, "N 4"],
        scales: Float[Tensor, "N 3"],
        opacities: Float[Tensor, " N"],
        latent: Float[Tensor, "N D"],
        viewmat: Float[Tensor, "1 4 4"],
        K: Float[Tensor, "1 3 3"],
        width: int,
        height: int,
        scale: float,
        pool: bool = True,
        normalize: Optional[bool] = None,
        rgb_info: Optional[Dict] = None,
    ) -> Float[Tensor, "h w D"]:
        """The latent rendered at ``scale`` of the image. Supersampled renders (k x k pixels per output pixel)
        are averaged back to ``scale`` when ``pool``, else returned at k times that resolution. ``normalize``
        (default: ``semantic_alpha_normalize``) divides by the accumulated opacity. ``rgb_info``: the ``info`` of
        an RGB render of the same Gaussians and camera, whose projection this render reuses where it applies
        (``semantic_shares_rgb_projection``)."""
        w, h, k = self._semantic_render_size(width, height, scale)
        normalize = self.config.semantic_alpha_normalize if normalize is None else normalize
        tile = semantic_tile_size(self.config.semantic_tile_size, k * w * k * h)
        mode = self.config.semantic_rasterize_mode or self.config.rasterize_mode
        # The RGB pass's projection, where it is this render's: the same Gaussians, camera, size, tiles and mode.
        shared = (
            rgb_info
            if self.config.semantic_shares_rgb_projection
            and rgb_info is not None
            and not self.training
            and not torch.is_grad_enabled()
            and k == 1
            and (rgb_info.get("width"), rgb_info.get("height"), rgb_info.get("tile_size")) == (w, h, tile)
            and mode == self.config.rasterize_mode
            and rgb_info["means2d"].shape[:2] == (1, means.shape[0])
            else None
        )
        if self._viewer_triton_latent(k, tile):  # the panel's full-resolution latent (viewer_latent_triton)
            if shared is not None:
                tiles = ProjectedTiles.from_info(shared)
            else:
                K = _scale_intrinsics(K, (w / width, h / height))
                tiles = project_and_bin(means, quats, scales, opacities, viewmat, K, w, h, rasterize_mode=mode,
                                        tile_size=tile)  # fmt: skip
            rendered, _ = rasterize_features_triton(
                tiles.means2d, tiles.conics, tiles.opacities, latent, tiles.isect_offsets, tiles.flatten_ids, w, h,
                tile, normalize_min_alpha=_MIN_ALPHA if normalize else None,
            )  # fmt: skip
            return rendered[0]
        if shared is not None:
            rendered, alpha = rasterize_from_projection(shared, latent)
        else:
            if not self.config.semantic_grad_to_geometry:
                means, quats, scales, opacities = (
                    means.detach(),
                    quats.detach(),
                    scales.detach(),
                    opacities.detach(),
                )
            rendered, alpha, _ = rasterize_gaussians(
                means=means,
                quats=quats,
                scales=scales,
                opacities=opacities,
                colors=latent,
                viewmats=viewmat.detach(),
                Ks=_scale_intrinsics(K, (k * w / width, k * h / height)),
                width=k * w,
                height=k * h,
                rasterize_mode=mode,
                backend=self.config.rasterizer_backend,
                tile_size=tile,
            )
        if k > 1 and pool:
            rendered, alpha = (
                torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), k).permute(0, 2, 3, 1)
                for x in (rendered, alpha)
            )
        if normalize:
            # A weighted mean; below _MIN_ALPHA the pixel fades to zero instead of amplifying a stray Gaussian.
            rendered = rendered / alpha.clamp(min=_MIN_ALPHA)
        return rendered[0]

    def _viewer_triton_latent(self, k: int, tile: int) -> bool:
        """Whether this semantic render is the query panel's full-resolution latent that ``viewer_latent_triton``
        gives to the Triton rasterizer (see there)."""
        return (
            self.config.viewer_latent_triton
            and not self.training
            and not torch.is_grad_enabled()
            and self.viewer_semantic_scale is not None
            and k == 1
            and triton_tile_size_ok(tile)
            and self.config.rasterizer_backend != "torch"
            and triton_raster_available(self.device)
        )

    def _semantic_render_size(self, width: int, height: int, scale: float) -> Tuple[int, int, int]:
        """The semantic render's output size (w, h) at ``scale`` of a ``width`` x ``height`` image, and its
        supersampling factor k: k x k render pixels per output pixel, at most the image's own resolution and
        ``semantic_max_pixels`` in all."""
        w, h = _scaled_size(width, scale), _scaled_size(height, scale)
        budget = int(math.sqrt(self.config.semantic_max_pixels / (w * h)))
        return w, h, max(1, min(self.config.semantic_supersample, width // w, height // h, budget))

    def _eval_semantic_scale(self) -> float:
        """The semantic render's scale in eval-mode renders: the viewer's while its panel sets one, else training's."""
        return self._semantic_scale if self.viewer_semantic_scale is None else self.viewer_semantic_scale

    @torch.no_grad()
    def render_semantic_latent(
        self, camera: Cameras, scale: Optional[float] = None
    ) -> Float[Tensor, "h w D"]:
        """The rendered latent alone (no RGB), at ``scale`` of the camera's resolution (default: training's)."""
        return self.render_features(camera, self.semantic_source(self.gauss_params), scale)

    def gaussian_view_weights(self, cameras: Cameras) -> Float[Tensor, " N"]:
        """Each Gaussian's compositing weight summed over the pixels of ``cameras``, rendered at the semantic
        resolution: how much teacher supervision it could have had. Computed as the gradient of the summed
        render of a constant one-channel feature, so every backend gives it."""
        ones = torch.ones(self.num_points, 1, device=self.device, requires_grad=True)
        with torch.enable_grad():
            for i in range(len(cameras)):
                self.render_features(cameras[i : i + 1], ones, normalize=False).sum().backward()
        return ones.grad[:, 0] if ones.grad is not None else torch.zeros(self.num_points, device=self.device)

    def render_features(
        self,
        camera: Cameras,
        features: Float[Tensor, "N D"],
        scale: Optional[float] = None,
        normalize: Optional[bool] = None,
    ) -> Float[Tensor, "h w D"]:
        """Per-Gaussian ``features`` rendered through one camera as the semantic pass does (geometry fixed), at
        ``scale`` of its resolution (default: training's)."""
        camera = camera.to(self.device)
        K, width, height = camera_intrinsics(camera)
        return self._render_semantic_latent(
            self.means.detach(),
            self.quats.detach(),
            torch.exp(self.scales).detach(),
            torch.sigmoid(self.opacities).squeeze(-1).detach(),
            features,
            get_viewmat(camera.camera_to_worlds),
            K,
            width,
            height,
            self._semantic_scale if scale is None else float(scale),
            normalize=normalize,
        )

    def pixel_weights(
        self, camera: Cameras, row: int, col: int, scale: Optional[float] = None
    ) -> Float[Tensor, " N"]:
        """Each Gaussian's compositing weight at pixel (``row``, ``col``) of the semantic render at ``scale`` (default:
        training's): which Gaussians a click there hits, front ones first. The gradient of that pixel of the render
        of a constant one-channel feature, so every backend gives it."""
        ones = torch.ones(self.num_points, 1, device=self.device, requires_grad=True)
        with torch.enable_grad():
            self.render_features(camera, ones, scale, normalize=False)[row, col, 0].backward()
        return ones.grad[:, 0] if ones.grad is not None else torch.zeros(self.num_points, device=self.device)

    @torch.no_grad()
    def gaussian_features(self, teacher: str, chunk: int = 1 << 16) -> Float[Tensor, "N C"]:
        """Every Gaussian's latent decoded into one teacher's space (the 3D semantic field)."""
        latent = self.semantic_source(self.gauss_params)
        return torch.cat(
            [self.decode_features(latent[i : i + chunk], teacher) for i in range(0, len(latent), chunk)]
        )

    def decode_features(self, latent: Float[Tensor, "*batch D"], teacher: str) -> Float[Tensor, "*batch C"]:
        """Decode rendered (or per-Gaussian) latents into one teacher's feature space."""
        return self.projector_heads[teacher](latent)

    # ------------------------------------------------------------------ losses and metrics
    def get_metrics_dict(self, outputs, batch) -> Dict[str, torch.Tensor]:
        # nerfstudio's trainer reads the training metrics only on its logging steps; on the others splatfacto's PSNR
        # (the ground truth converted and composited once more, then a torchmetrics update) would be dispatched for
        # nothing.
        if self.training and not training_metrics_logged(self.step):
            return {"gaussian_count": self.num_points}
        return super().get_metrics_dict(outputs, batch)

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        loss_dict = self._splatfacto_loss_dict(outputs, batch)
        if self.depth_loss_weight > 0 and "depth_image" in batch and outputs.get("depth") is not None:
            loss_dict["depth"] = self.depth_loss_weight * depth_l1_loss(
                outputs["depth"], batch["depth_image"]
            )
        semantic_step = self.training and "semantic_latent" in outputs
        if self.config.semantic_smoothness_weight > 0 and semantic_step:
            loss_dict["semantic_smoothness"] = (
                self.config.semantic_smoothness_weight * self._voxel_prior_loss()
            )
        targets: Mapping[str, Tensor] = batch.get("teacher_features", {})
        if "semantic_latent" in outputs and targets:
            loss_dict.update(self._distillation_loss_dict(outputs, batch, targets))
        if self.training and self.config.finite_check_every > 0:
            inputs = {f"teacher features {name}": t for name, t in targets.items()}
            if "depth_image" in batch:
                inputs["depth image"] = batch["depth_image"]
            image = int(batch.get("image_idx", -1))
            # A training image's inputs (cached teacher features, depth) are the same every time it is served:
            # checking them once per image and set of inputs is enough, and saves the host a record per step.
            seen = (image, tuple(inputs))
            if image < 0 or seen not in self._checked_inputs:
                self.finite_watch.record("batch input", inputs, self.step, image)
                self._checked_inputs.add(seen)
            self.finite_watch.record("loss", loss_dict, self.step, image)
        return loss_dict

    def _splatfacto_loss_dict(self, outputs, batch) -> Dict[str, Tensor]:
        """splatfacto's losses, as nerfstudio 1.1.5's ``SplatfactoModel.get_loss_dict`` computes them (L1 + SSIM on the
        masked images, the optional scale regularisation every 10th step, the camera optimizer's and the bilateral
        grid's), with one change: on steps without the scale regularisation its zero is made on the device.
        splatfacto makes it on the host and copies it up, a blocking copy that stalls the host every step."""
        gt_img = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
        pred_img = outputs["rgb"]
        if "mask" in batch:
            mask = self._downscale_if_required(batch["mask"]).to(self.device)
            assert mask.shape[:2] == gt_img.shape[:2] == pred_img.shape[:2]
            gt_img, pred_img = gt_img * mask, pred_img * mask
        main_loss = self._photometric_loss(gt_img, pred_img)
        if self.config.use_scale_regularization and self.step % 10 == 0:
            scale_exp = torch.exp(self.scales)
            ratio = scale_exp.amax(dim=-1) / scale_exp.amin(dim=-1)
            scale_reg = (
                0.1 * (ratio.clamp(min=self.config.max_gauss_ratio) - self.config.max_gauss_ratio).mean()
            )
        else:
            scale_reg = pred_img.new_zeros(())
        loss_dict = {
            "main_loss": main_loss,
            "scale_reg": scale_reg,
        }
        if self.training:
            self.camera_optimizer.get_loss_dict(loss_dict)
            if self.config.use_bilateral_grid:
                loss_dict["tv_loss"] = 10 * total_variation_loss(self.bil_grids.grids)
        return loss_dict

    def _photometric_loss(
        self, target: Float[Tensor, "H W 3"], render: Float[Tensor, "H W 3"]
    ) -> Float[Tensor, ""]:
        """splatfacto's main loss, ``(1 - ssim_lambda) * L1 + ssim_lambda * (1 - SSIM)`` (see ``stacked_ssim`` and
        ``compile_photometric_loss``)."""
        lam = self.config.ssim_lambda
        if not self._stacks_ssim(render.shape[0], render.shape[1]):
            l1 = torch.abs(target - render).mean()
            ssim = self.ssim(target.permute(2, 0, 1)[None], render.permute(2, 0, 1)[None])
            return (1 - lam) * l1 + lam * (1 - ssim)
        function = self._compiled_on_cuda(
            "_compiled_photometric_loss", photometric_loss, self.config.compile_photometric_loss, render,
            fullgraph=True,
        )  # fmt: skip
        return function(
            target, render, self._ssim_blur_weights(render), lam, self.ssim.data_range, self.ssim.K
        )

    def _ssim_blur_weights(self, render: Tensor) -> BlurWeights:
        """The stacked SSIM's blur weights, from splatfacto's own window, built once per device and dtype."""
        weights = self._ssim_weights
        if weights is None or (weights[0].device, weights[0].dtype) != (render.device, render.dtype):
            window = self.ssim.win[0].flatten().to(device=render.device, dtype=render.dtype)
            self._ssim_weights = weights = blur_weights(window, 3 * render.shape[-1])
        return weights

    def _stacks_ssim(self, height: int, width: int) -> bool:
        """Whether the SSIM loss takes the stacked blurs (``stacked_ssim``): not for pytorch_msssim's other forms
        (per-channel clamping, per-image scores), which are not splatfacto's, nor for images smaller than the
        window."""
        plain = self.ssim.size_average and not self.ssim.nonnegative_ssim
        return self.config.stacked_ssim and plain and min(height, width) >= self.ssim.win.shape[-1]

    def _distillation_loss_dict(self, outputs, batch, targets: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The ``distill_<teacher>`` losses of one training batch (see ``distillation_losses``)."""
        latent = outputs["semantic_latent"]
        targets = {name: target.to(latent.device) for name, target in targets.items()}
        kept = {name: w.to(latent.device) for name, w in batch.get("teacher_weights", {}).items()}
        # Drawn outside the compiled losses, which stay deterministic.
        pixels = self.distillation_pixels(latent)
        weights = self.distillation_pixel_weights(latent, outputs.get("depth"), pixels)
        return self._distillation_function(latent)(latent, targets, pixels, weights, kept or None)

    def check_finite(self) -> None:
        """Raise ``NonFiniteTrainingError`` naming the first source if training met a NaN or inf (see
        ``finite_check_every``); the trainer also calls it before writing a checkpoint."""
        self.finite_watch.check(self.step, dict(self.gauss_params), self.training_image_names)

    def get_training_callbacks(self, training_callback_attributes) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(training_callback_attributes)
        if self.config.finite_check_every > 0:
            callbacks.append(
                TrainingCallback(
                    [TrainingCallbackLocation.AFTER_TRAIN_ITERATION],
                    lambda step: self.check_finite(),
                    update_every_num_iters=self.config.finite_check_every,
                )
            )
        if self.held_compile_options is not None:
            # First before and last after the trainer's iteration, whose backward pass runs the compiled losses'.
            callbacks.insert(
                0,
                TrainingCallback(
                    [TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                    lambda step: self._hold_compile_options(True),
                ),
            )
            callbacks.append(
                TrainingCallback(
                    [TrainingCallbackLocation.AFTER_TRAIN_ITERATION],
                    lambda step: self._hold_compile_options(False),
                )
            )
        return callbacks

    def distillation_losses(
        self,
        latent: Float[Tensor, "h w D"],
        targets: Mapping[str, Float[Tensor, "h_t w_t C_t"]],
        pixels: Optional[Int[Tensor, " n"]] = None,
        pixel_weights: Optional[Float[Tensor, " n"]] = None,
        target_weights: Optional[Mapping[str, Float[Tensor, "h_t w_t"]]] = None,
    ) -> Dict[str, Tensor]:
        """``{"distill_<teacher>": weighted cosine loss}``: the rendered latent is decoded by each teacher's head
        and compared with its features, on the teacher's grid or at the render's resolution (``distill_at``); there
        ``pixels`` (flat indices into the render) picks where, None: everywhere, and ``pixel_weights`` (one per
        picked pixel) weigh their losses. ``target_weights`` (per teacher, on its feature grid; the datamanager's
        cross-view consistency weights) weigh the teacher's cells, interpolated like its features."""
        if self.config.distill_at != "render":
            losses = {}
            on_grid: Dict[Tuple[int, int], Tensor] = {}  # the latent resampled once per distinct teacher grid
            for name, target in targets.items():
                size = tuple(target.shape[:2])
                if size not in on_grid:
                    on_grid[size] = resize_feature_map(latent, size)
                kept = None if target_weights is None else target_weights.get(name)
                losses[f"distill_{name}"] = self._teacher_weight(name) * cosine_distillation_loss(
                    self.decode_features(on_grid[size], name), target, kept
                )
            return losses
        # Every teacher is compared at the same render pixels: the latent there is gathered once, and the teachers
        # that share a feature grid are resampled there together, their channels (and consistency weights, one more
        # channel each, so they are sampled exactly like the features) side by side.
        size = (latent.shape[0], latent.shape[1])
        latent_at = latent_at_pixels(latent, pixels)
        grid = None if pixels is None else pixel_grid(pixels, size)
        sampled = {}
        for group in _same_grid_groups(targets).values():
            stacked, widths = [], []
            for name in group:
                kept = None if target_weights is None else target_weights.get(name)
                stacked += [targets[name]] if kept is None else [targets[name], kept[..., None]]
                widths.append((name, targets[name].shape[-1], kept is not None))
            joined = stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=-1)
            at = features_at_pixels(joined.to(latent.dtype), size, pixels, grid)
            start = 0
            for name, width, has_weights in widths:
                sampled[name] = (at[:, start : start + width], at[:, start + width] if has_weights else None)
                start += width + int(has_weights)
        losses = {}
        for name in targets:
            target, kept = sampled[name]
            weights = (
                kept if pixel_weights is None else (pixel_weights if kept is None else pixel_weights * kept)
            )
            losses[f"distill_{name}"] = self._teacher_weight(name) * cosine_distillation_loss(
                self.decode_features(latent_at, name), target, weights
            )
        return losses

    def _teacher_weight(self, name: str) -> float:
        return self.config.teacher_loss_weights.get(name, self.config.default_teacher_loss_weight)

    def distillation_pixels(self, latent: Float[Tensor, "h w D"]) -> Optional[Int[Tensor, " n"]]:
        """This step's random render pixels for the loss (``distill_pixels``), or None for all of them."""
        count = latent.shape[0] * latent.shape[1]
        if self.config.distill_at != "render" or not 0 < self.config.distill_pixels < count:
            return None
        return torch.randperm(count, device=latent.device)[: self.config.distill_pixels]

    def distillation_pixel_weights(
        self,
        latent: Float[Tensor, "h w D"],
        depth: Optional[Float[Tensor, "H W 1"]],
        pixels: Optional[Int[Tensor, " n"]],
    ) -> Optional[Float[Tensor, " n"]]:
        """With ``distill_area_weighting``: each distilled render pixel's surface area (rendered depth squared at
        it), over a running mean of this area across steps, so views keep their relative weights; None
        otherwise."""
        if not (self.config.distill_area_weighting and self.config.distill_at == "render") or depth is None:
            return None
        h, w = latent.shape[:2]
        flat = torch.arange(h * w, device=latent.device) if pixels is None else pixels
        # The render pixel's centre in the depth map (the RGB pass's resolution).
        rows = (((flat // w).float() + 0.5) * (depth.shape[0] / h)).long().clamp(max=depth.shape[0] - 1)
        cols = (((flat % w).float() + 0.5) * (depth.shape[1] / w)).long().clamp(max=depth.shape[1] - 1)
        area = depth.detach()[rows, cols, 0].square()
        mean = area.mean()
        self._mean_pixel_area = (
            mean if self._mean_pixel_area is None else 0.99 * self._mean_pixel_area + 0.01 * mean
        )
        # Capped: a pixel that sees nothing gets the farthest depth, which must not take over the step.
        return (area / self._mean_pixel_area.clamp(min=1e-12)).clamp(max=_MAX_AREA_WEIGHT)

    def _voxel_prior_loss(self) -> Float[Tensor, ""]:
        """The voxel prior (``voxel_consensus_loss``) of this step, unweighted: every Gaussian's latent against its
        voxel's, on a grid shifted at random (drawn here, outside the compiled graph)."""
        voxel = self.config.semantic_smoothness_voxel * self.scene_scale
        latent = self.semantic_source(self.gauss_params)
        function = self._compiled_on_cuda(
            "_compiled_voxel_prior", voxel_consensus_loss, self.config.compile_voxel_prior, latent,
            dynamic=True, fullgraph=True,
        )  # fmt: skip
        weights = torch.sigmoid(self.opacities).squeeze(-1)
        # Plain tensors, not the Parameters: Dynamo keeps a Parameter's sizes static whatever ``dynamic`` says
        # (force_parameter_static_shapes), so each densification would recompile, and past its recompile limit
        # ``fullgraph`` fails the run. A view keeps the latent's gradient; the means only place the voxels.
        return function(
            latent.view_as(latent),
            self.means.detach(),
            weights,
            voxel,
            torch.rand(3, device=self.device) * voxel,
        )

    def _distillation_function(self, latent: Tensor):
        return self._compiled_on_cuda(
            "_compiled_distillation", self.distillation_losses, self.config.compile_distillation, latent
        )

    def _hold_compile_options(self, hold: bool) -> None:
        """Hold ``compile_options`` process-wide (see ``HeldOptions``) from before a training iteration to after it,
        on CUDA, where the losses are compiled; release them after."""
        held = self.held_compile_options
        if held is None:
            return
        if hold and self.device.type == "cuda":
            held.enter()
        else:
            held.exit()

    def _compiled_on_cuda(self, attribute: str, function, enabled: bool, tensor: Tensor, **kwargs):
        """``function`` through ``torch.compile`` (with ``compile_mode``, ``compile_options`` and ``kwargs``) where
        ``enabled`` and ``tensor`` is on CUDA, compiled once and kept in ``attribute``; else ``function`` itself."""
        if not (enabled and tensor.is_cuda):
            return function
        if getattr(self, attribute) is None:
            if not self._announced_compile:  # the model's first compile
                if (self._compile_arguments["options"] or {}).get("cpp_wrapper"):
                    require_cpp_compiler()
                # The first steps stall while inductor compiles (45-60 s on an H100 with the default levers): say so,
                # or a user sees a frozen progress bar.
                self._announced_compile = True
                CONSOLE.log(
                    "Compiling chorus-splat's losses for the GPU: the first training steps take up to a minute "
                    "(inductor caches the result for later runs). For a short run, turn it off with "
                    "--pipeline.model.compile-options --pipeline.model.compile-voxel-prior False "
                    "--pipeline.model.compile-photometric-loss False --pipeline.model.compile-distillation False."
                )
            setattr(self, attribute, torch.compile(function, **self._compile_arguments, **kwargs))
        return getattr(self, attribute)

    def get_image_metrics_and_images(self, outputs, batch):
        if self.lpips is not None:
            return super().get_image_metrics_and_images(outputs, batch)
        # LPIPS weights could not be loaded (offline): report everything else rather than failing.
        self.lpips = NaNMetric()
        try:
            metrics, images = super().get_image_metrics_and_images(outputs, batch)
        finally:
            self.lpips = None
        for key in ("lpips", "cc_lpips"):
            metrics.pop(key, None)
        return metrics, images


DEFAULT_DEPTH_LOSS_WEIGHT = 3.0
"""Depth loss weight used when ``depth_loss_weight`` is None and the scene has depth for every training view."""
_MAX_AREA_WEIGHT = 10.0
"""Largest pixel weight of ``distill_area_weighting``, in units of the running mean pixel area."""
_MIN_ALPHA = 1e-3
"""Accumulated opacity below which ``semantic_alpha_normalize`` no longer divides (the pixel fades to zero)."""


def training_metrics_logged(step: int) -> bool:
    """Whether nerfstudio's trainer logs the training metrics of ``step``: every ``logging.steps_per_log`` steps from
    0, as its local writer set-up recorded. True where no writer was set up (a model used outside a trainer)."""
    every = writer.GLOBAL_BUFFER.get("steps_per_log")
    return not every or step % every == 0


def resolve_depth_loss_weight(configured: Optional[float], depth_served: bool) -> float:
    """The depth loss weight to train with: ``configured``, or with None the default where depth is served."""
    if configured is None:
        return DEFAULT_DEPTH_LOSS_WEIGHT if depth_served else 0.0
    return float(configured)


_HIGHLIGHT_WEIGHT = 0.65
"""How much of a highlighted Gaussian's colour the highlight colour replaces."""


def _tint(
    colors: Float[Tensor, "N *K 3"], mask: Tensor, color: Tuple[float, float, float], is_sh: bool
) -> Float[Tensor, "N *K 3"]:
    """Colours (RGB [N, 3], or SH coefficients [N, K, 3]) of the ``mask``-ed Gaussians moved towards ``color``.
    RGB2SH is affine, so mixing the DC coefficient mixes the base colour; view-dependent terms fade."""
    target = torch.tensor(color, dtype=colors.dtype, device=colors.device)
    colors = colors.clone()
    if is_sh:
        selected = colors[mask]
        selected[:, 0] = (1 - _HIGHLIGHT_WEIGHT) * selected[:, 0] + _HIGHLIGHT_WEIGHT * RGB2SH(target)
        selected[:, 1:] = (1 - _HIGHLIGHT_WEIGHT) * selected[:, 1:]
        colors[mask] = selected
    else:
        colors[mask] = (1 - _HIGHLIGHT_WEIGHT) * colors[mask] + _HIGHLIGHT_WEIGHT * target
    return colors


def depth_l1_loss(predicted: Float[Tensor, "H W 1"], sensor: Float[Tensor, "H0 W0"]) -> Float[Tensor, ""]:
    """Mean |rendered - sensor| depth over the pixels with a measurement (sensor > 0); the sensor map is
    resampled (nearest) to the render's size, which coarse-to-fine training shrinks early on."""
    size = tuple(predicted.shape[:2])
    if tuple(sensor.shape) != size:
        sensor = torch.nn.functional.interpolate(sensor[None, None].float(), size=size, mode="nearest")[0, 0]
    sensor = sensor.to(predicted.dtype)[..., None]
    valid = sensor > 0
    return (torch.abs(predicted - sensor) * valid).sum() / valid.sum().clamp(min=1)


def render_resolution_pairs(
    latent: Float[Tensor, "h w D"], target: Float[Tensor, "h_t w_t C"], pixels: Optional[Int[Tensor, " n"]]
) -> Tuple[Float[Tensor, "n D"], Float[Tensor, "n C"]]:
    """The rendered latent at ``pixels`` (flat indices; None: every pixel) and the teacher's features
    interpolated there: bilinear, as upsampling the teacher's grid to the render's size would give, but only
    at the pixels used."""
    size = (latent.shape[0], latent.shape[1])
    return latent_at_pixels(latent, pixels), features_at_pixels(target, size, pixels)


def latent_at_pixels(
    latent: Float[Tensor, "h w D"], pixels: Optional[Int[Tensor, " n"]]
) -> Float[Tensor, "n D"]:
    """The rendered latent at ``pixels`` (flat indices into the render; None: every pixel, in row-major order)."""
    flat = latent.reshape(latent.shape[0] * latent.shape[1], -1)
    return flat if pixels is None else flat[pixels]


def pixel_grid(pixels: Int[Tensor, " n"], size: Tuple[int, int]) -> Float[Tensor, "n 2"]:
    """The centres of ``pixels`` (flat indices into a render of ``size`` (h, w)) in grid_sample's [-1, 1]
    coordinates (align_corners=False), x first."""
    h, w = size
    rows, cols = pixels // w, pixels % w
    return torch.stack(((cols + 0.5) * (2.0 / w) - 1.0, (rows + 0.5) * (2.0 / h) - 1.0), dim=-1)


def features_at_pixels(
    target: Float[Tensor, "h_t w_t C"],
    size: Tuple[int, int],
    pixels: Optional[Int[Tensor, " n"]],
    grid: Optional[Float[Tensor, "n 2"]] = None,
) -> Float[Tensor, "n C"]:
    """A teacher's features interpolated at ``pixels`` of a render of ``size`` (h, w) (None: every pixel), bilinear
    as upsampling the teacher's grid to that size would give. ``grid``: ``pixel_grid(pixels, size)``, when the caller
    already has it."""
    if pixels is None:
        return resize_feature_map(target, size).reshape(size[0] * size[1], -1)
    grid = pixel_grid(pixels, size) if grid is None else grid
    # "border" clamps like interpolate's edges.
    sampled = torch.nn.functional.grid_sample(
        target.permute(2, 0, 1)[None],
        grid.to(target.dtype)[None, None],
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return sampled[0, :, 0].T


def _same_grid_groups(targets: Mapping[str, Tensor]) -> Dict[Tuple[int, int], List[str]]:
    """Teacher names by feature grid ``(h_t, w_t)``, in ``targets``' order."""
    groups: Dict[Tuple[int, int], List[str]] = {}
    for name, target in targets.items():
        groups.setdefault(tuple(target.shape[:2]), []).append(name)
    return groups


FULL_FRAME_TILE_SIZE = 16
"""Tile edge of semantic renders larger than ``SMALL_RENDER_PIXELS`` (gsplat's default, as the RGB pass)."""
SMALL_RENDER_PIXELS = 1 << 17
"""Renders up to this many pixels count as small: the training pass at the teachers' resolution is well under it,
a full-resolution viewer frame (1280 x 720: 921,600 pixels) well over it."""


def semantic_tile_size(configured: int, pixels: int) -> int:
    """Tile edge for a semantic render of ``pixels`` pixels. ``semantic_tile_size``'s small tiles give a small
    render more blocks to run in parallel; over a full frame they multiply the tile-Gaussian intersections to
    sort (each Gaussian covers 16 times as many 4-pixel tiles as 16-pixel ones) for no gain in parallelism."""
    return configured if pixels <= SMALL_RENDER_PIXELS else max(configured, FULL_FRAME_TILE_SIZE)


def _scaled_size(size: int, factor: float) -> int:
    return max(1, int(round(size * factor)))


def _scale_intrinsics(
    K: Float[Tensor, "C 3 3"], factor: Union[float, Tuple[float, float]]
) -> Float[Tensor, "C 3 3"]:
    """Intrinsics of the same camera resampled to another resolution (pixel-centre convention kept)."""
    fx, fy = (factor, factor) if isinstance(factor, float) else factor
    K = K.clone()
    K[:, 0, :] *= fx
    K[:, 1, :] *= fy
    return K
