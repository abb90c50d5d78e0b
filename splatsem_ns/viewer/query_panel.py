"""The semantic query panel of ``ns-viewer``: text queries, PCA and segmentation views, click-to-segment and
3D selections (highlight, hide, isolate, export).

The panel is an ``nn.Module`` without parameters that ``ChorusPipeline`` holds as ``semantic_query``:
nerfstudio's viewer finds viewer elements only by walking the pipeline's modules, so the controls must
live on one. It adds nothing to checkpoints. Its ``output_hook`` runs at the end of every eval-mode
``ChorusSplatModel.get_outputs`` and adds:

- ``query``: the current view of the query as RGB (relevancy heatmap over the render, PCA colours of a
  teacher's decoded features, or an argmax segmentation over the typed class list);
- ``relevancy: <text>`` per positive query: LERF relevancy in [0, 1], one channel, for nerfstudio's own
  colormap controls.

All of it is computed on the model's device from the rendered semantic latent (decoded by the chosen
teacher's projector head), at the latent's resolution, and resized to the render. The controls are read
once per render into a ``QuerySnapshot``, so edits made in the browser while a frame renders (or while
training runs) never mix two settings in one frame. Text embeddings are cached per (teacher, text); a
teacher is built, for its text encoder, the first time a query needs it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import matplotlib
import torch
from jaxtyping import Bool, Float, Int
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer_elements import (
    ViewerButton,
    ViewerCheckbox,
    ViewerClick,
    ViewerControl,
    ViewerDropdown,
    ViewerElement,
    ViewerSlider,
    ViewerText,
)
from nerfstudio.viewer_legacy.server.viewer_utils import IOChangeException
from torch import Tensor, nn

from splatsem_ns.models.folded_query import FoldedQuery
from splatsem_ns.models.heads import resize_feature_map
from splatsem_ns.models.relevancy import (
    DEFAULT_NEGATIVES,
    PCAProjection,
    blend_labels,
    click_seed,
    cosine_similarity,
    fit_pca,
    grow_region,
    overlay_heatmap,
    overlay_queries,
    segmentation_palette,
    select_by_click,
    select_by_text,
)
from splatsem_ns.teachers.base import Teacher, TeacherConfig, declared_text_encoder

DISPLAY_MODES = ("relevancy", "pca", "segmentation")
"""What the ``query`` output shows."""
COLORMAPS = ("turbo", "viridis", "inferno", "magma", "plasma")
"""Colormaps of the relevancy heatmap (matplotlib names)."""
OBJECT_TEACHERS = ("sam", "instances")
"""Teachers preferred for click-to-segment, in order: object-aware features separate instances."""
QUERY_OUTPUT = "query"
"""Output key of the panel's RGB view."""
RELEVANCY_OUTPUT = "relevancy: {}"
"""Output key of one positive query's relevancy map."""
CLICK_RENDER_HEIGHT = 256
"""Height of the latent render used to read the clicked pixel's feature (width follows the view's aspect)."""


_FAILED_PATHS: set = set()
"""Fast paths ("raster": the fused relevancy rasterizer) that failed in this process and are not tried again."""


def _fused_raster_wanted(model: nn.Module) -> bool:
    """Whether the relevancy should come from the model's fused raster+fold kernel (``render_query_relevancy``):
    the model has one, its config asks for it (``query_fused_raster``) and it has not failed in this process."""
    config = getattr(model, "config", None)
    return (
        hasattr(model, "render_query_relevancy")
        and bool(getattr(config, "query_fused_raster", False))
        and "raster" not in _FAILED_PATHS
    )


class QueryError(ValueError):
    """A query that cannot be answered as set (e.g. a teacher without a text encoder); shown in the panel."""


def split_phrases(text: str) -> Tuple[str, ...]:
    """Comma-separated phrases, stripped, empty ones and repeats dropped (order kept)."""
    phrases = (p.strip() for p in text.split(","))
    return tuple(dict.fromkeys(p for p in phrases if p))


@dataclass(frozen=True)
class QuerySnapshot:
    """Every control the hook uses, read once at the start of a render."""

    positives: Tuple[str, ...]
    negatives: Tuple[str, ...]
    teacher: str
    mode: str
    threshold: float
    colormap: str
    classes: Tuple[str, ...]

    @property
    def needs_text(self) -> bool:
        return self.mode != "pca"

    @property
    def has_input(self) -> bool:
        """Whether there is anything to compute in this mode."""
        if self.mode == "relevancy":
            return bool(self.positives)
        if self.mode == "segmentation":
            return bool(self.classes)
        return True


@dataclass
class QueryResult:
    """What the last render computed (kept for inspection and tests)."""

    snapshot: QuerySnapshot
    image: Float[Tensor, "H W 3"]
    relevancy: Optional[Float[Tensor, "H W P"]] = None
    """Per positive query (relevancy mode)."""
    segmentation: Optional[Int[Tensor, "H W"]] = None
    """Index into ``snapshot.classes`` (segmentation mode)."""


@dataclass
class Selection:
    """A set of Gaussians chosen by text or by a click, kept as the rule that chose them so it can be
    re-evaluated after densification changes the Gaussians."""

    description: str
    teacher: str
    threshold: float
    positives: Optional[Float[Tensor, "P C"]] = None
    negatives: Optional[Float[Tensor, "M C"]] = None
    pixel_feature: Optional[Float[Tensor, " C"]] = None
    surface_point: Optional[Float[Tensor, "3"]] = None
    """Where a click hit the scene (the centre of the Gaussian that weighs most in the clicked pixel), for
    ``region_radius``; a point, not an index, so the rule survives densification."""
    region_radius: Optional[float] = None
    """A click's spatial limit, in scene units: only the matching Gaussians connected to the one nearest
    ``surface_point`` (``models.relevancy.grow_region``). None: every matching Gaussian."""
    excluded: Tuple[Tuple["Selection", bool], ...] = ()
    """What was hidden when the selection was made, as (selection, invert) rules: a click picks among the Gaussians
    it could see, so those stay out of it (also after "Show all"), however alike their features are."""
    _cache: Dict[str, Tensor] = field(default_factory=dict, repr=False)

    def mask(self, model: nn.Module) -> Bool[Tensor, " N"]:
        """The selected Gaussians of ``model`` as it is now: the matches, limited to the clicked region if set."""
        cached = self._cache.get("mask")
        if cached is not None and cached.shape[0] == model.num_points:
            return cached
        mask = self.matches(model)
        hidden = hidden_by(self.excluded, model)
        if hidden is not None:
            mask = mask & ~hidden
        if (
            self.pixel_feature is not None
            and self.region_radius is not None
            and self.surface_point is not None
        ):
            closeness = 1.0 / (1.0 + (model.means.detach() - self.surface_point.to(model.means)).norm(dim=-1))
            mask = grow_region(
                model.means, mask, click_seed(model.means, mask, closeness), self.region_radius
            )
        self._cache["mask"] = mask
        return mask

    def matches(self, model: nn.Module) -> Bool[Tensor, " N"]:
        """The Gaussians the rule matches (feature similarity to the click, or the text), before any region."""
        cached = self._cache.get("matches")
        if cached is not None and cached.shape[0] == model.num_points:
            return cached
        features = model.gaussian_features(self.teacher)
        if self.pixel_feature is not None:
            matches = select_by_click(features, self.pixel_feature.to(features), self.threshold)
        else:
            assert self.positives is not None and self.negatives is not None
            matches = select_by_text(features, self.positives, self.negatives, self.threshold)
        self._cache["matches"] = matches
        return matches

    def limit_to_region(self, surface_point: Float[Tensor, "3"], radius: float) -> None:
        """Keep only the matches connected to the one nearest ``surface_point`` (the matches stay cached)."""
        self.description += " (connected region)"
        self.surface_point, self.region_radius = surface_point, radius
        self._cache.pop("mask", None)


def hidden_by(rules: Sequence[Tuple[Selection, bool]], model: nn.Module) -> Optional[Bool[Tensor, " N"]]:
    """The Gaussians of ``model`` that (selection, invert) rules hide: a selection's Gaussians, or with ``invert``
    every Gaussian but those. None: no rules."""
    hidden = None
    for selection, invert in rules:
        mask = selection.mask(model)
        mask = ~mask if invert else mask
        hidden = mask if hidden is None else hidden | mask
    return hidden


class SemanticQueryPanel(nn.Module):
    """Viewer controls for semantic queries of a ``ChorusSplatModel`` (see the module docstring).

    Args:
        teacher_configs: The run's teachers (names must match the model's projector heads).
        build_teacher: Builds a teacher from its config, on the device its text embeddings are made.
        get_model: Returns the model (a callable, so the panel does not register the model as a submodule
            and duplicate its weights in checkpoints).
        class_names: Default class list of the segmentation display (e.g. the scene's classes.json).
        query_teacher: Default teacher of text queries; None: the first teacher whose class declares a
            text encoder, else the first teacher.
        object_teachers: Teachers preferred, in order, for click-to-segment.
        export_path: Default file of "Export selection".
    """

    def __init__(
        self,
        teacher_configs: Sequence[TeacherConfig],
        build_teacher: Callable[[TeacherConfig], Teacher],
        get_model: Callable[[], nn.Module],
        class_names: Sequence[str] = (),
        query_teacher: Optional[str] = None,
        object_teachers: Sequence[str] = OBJECT_TEACHERS,
        export_path: str = "exports/selection.ply",
    ) -> None:
        super().__init__()
        self._configs = {c.name: c for c in teacher_configs}
        self._build_teacher = build_teacher
        self._get_model = get_model
        names = list(self._configs) or ["(no teachers)"]
        if query_teacher is None:
            query_teacher = next((n for n, c in self._configs.items() if declared_text_encoder(c)), names[0])
        elif query_teacher not in self._configs:
            raise ValueError(f"Query teacher '{query_teacher}' is not among the run's teachers {names}.")
        click_teacher = next((n for n in object_teachers if n in self._configs), names[-1])

        # Plain dicts and locks: not submodules, so nothing here reaches the pipeline's state_dict.
        self._lock = threading.RLock()
        self._teachers: Dict[str, Teacher] = {}
        self._embeddings: Dict[Tuple[str, str], Tensor] = {}
        # The last relevancy query's fold, with what it was made from (see _folded_query).
        self._folded: Optional[Tuple[tuple, FoldedQuery]] = None
        self._pca: Dict[Tuple[str, int], PCAProjection] = {}
        self._colormaps: Dict[Tuple[str, str], Tensor] = {}
        self._selection: Optional[Selection] = None
        self._highlighted: Optional[Selection] = None
        # What is hidden: (selection, invert) pairs; an inverted one hides everything but the selection.
        self._hidden: List[Tuple[Selection, bool]] = []
        self._touched = False
        self._suspended = 0
        self._clicking = False
        self._last_camera: Optional[Cameras] = None
        self.last_result: Optional[QueryResult] = None
        self.last_message = ""

        def on_query(_: ViewerElement) -> None:
            self._on_query_changed()

        # Reading order in the panel is set by ``order`` below (nerfstudio installs attributes alphabetically).
        self.positives = ViewerText(
            "Positives", "", cb_hook=on_query, hint="Comma-separated queries, e.g. 'sofa, lamp'."
        )
        self.negatives = ViewerText(
            "Negatives",
            ", ".join(DEFAULT_NEGATIVES),
            cb_hook=on_query,
            hint="Canonical phrases a match must beat.",
        )
        self.teacher = ViewerDropdown(
            "Teacher", query_teacher, names, cb_hook=on_query, hint="Text queries need a text encoder."
        )
        self.display = ViewerDropdown(
            "Display", "relevancy", list(DISPLAY_MODES), cb_hook=on_query, hint="Shown in the 'query' output."
        )
        self.threshold = ViewerSlider(
            "Threshold", 0.5, 0.0, 1.0, 0.01, cb_hook=on_query, hint="Relevancy shown and selected in 3D."
        )
        self.colormap = ViewerDropdown("Colormap", "turbo", list(COLORMAPS), cb_hook=on_query)
        self.classes = ViewerText(
            "Classes", ", ".join(class_names), cb_hook=on_query, hint="Comma-separated classes to segment."
        )
        self.full_resolution = ViewerCheckbox(
            "Full resolution",
            True,
            cb_hook=lambda _: self._push_semantic_scale(self._get_model()),
            hint="Render the latent at the view's resolution for the panel's outputs, not at training's.",
        )
        self.click_select = ViewerCheckbox(
            "Click to segment",
            False,
            cb_hook=lambda _: self._on_click_toggled(),
            hint="Click a pixel to select.",
        )
        self.click_teacher = ViewerDropdown(
            "Click teacher", click_teacher, names, hint="Object-aware features group a clicked object."
        )
        self.click_similarity = ViewerSlider("Click similarity", 0.8, 0.0, 1.0, 0.01)
        self.click_region = ViewerCheckbox(
            "Click: connected region only",
            False,
            hint="Keep only the matching Gaussians connected to the clicked surface (leaves out a second object "
            "of the same kind elsewhere).",
        )
        self.click_region_radius = ViewerSlider(
            "Region link distance", 0.05, 0.005, 0.5, 0.005, hint="Largest gap inside a region, in metres."
        )
        self.highlight_button = ViewerButton("Highlight matches", cb_hook=lambda _: self.highlight_matches())
        self.hide_button = ViewerButton("Hide matches", cb_hook=lambda _: self.hide_matches())
        self.isolate_button = ViewerButton("Show only matches", cb_hook=lambda _: self.show_only_matches())
        self.show_all_button = ViewerButton("Show all", cb_hook=lambda _: self.show_all())
        self.export_file = ViewerText(
            "Export file", export_path, hint="PLY file the selection is written to."
        )
        self.export_button = ViewerButton("Export selection", cb_hook=lambda _: self.export_selection())
        self.status = ViewerText("Status", "", disabled=True)
        self.viewer_control = ViewerControl()
        order = [
            self.positives,
            self.negatives,
            self.teacher,
            self.display,
            self.threshold,
            self.colormap,
            self.classes,
            self.full_resolution,
            self.click_select,
            self.click_teacher,
            self.click_similarity,
            self.click_region,
            self.click_region_radius,
            self.highlight_button,
            self.hide_button,
            self.isolate_button,
            self.show_all_button,
            self.export_file,
            self.export_button,
            self.status,
        ]
        for position, element in enumerate(order):
            _install_in_order(element, float(position))

    @classmethod
    def for_pipeline(cls, pipeline: nn.Module) -> "SemanticQueryPanel":
        """The panel of a ``ChorusPipeline``: its datamanager's teachers and scene classes, its model."""
        from splatsem_ns.data.dataparser import CLASS_NAMES_KEY

        datamanager = pipeline.datamanager
        configs = datamanager.teacher_configs() if hasattr(datamanager, "teacher_configs") else []
        metadata = getattr(getattr(datamanager, "train_dataparser_outputs", None), "metadata", None) or {}
        classes = [str(n) for i, n in sorted((metadata.get(CLASS_NAMES_KEY) or {}).items()) if int(i) != 0]
        eval_config = getattr(pipeline.config, "semantic_eval", None)
        return cls(
            configs,
            build_teacher=datamanager.build_teacher,
            get_model=lambda: pipeline.model,
            class_names=classes,
            query_teacher=getattr(eval_config, "query_teacher", None),
        )

    # ------------------------------------------------------------------ rendering
    def snapshot(self) -> QuerySnapshot:
        """The controls' current values (each read once)."""
        return QuerySnapshot(
            positives=split_phrases(self.positives.value),
            negatives=split_phrases(self.negatives.value),
            teacher=self.teacher.value,
            mode=self.display.value,
            threshold=float(self.threshold.value),
            colormap=self.colormap.value,
            classes=split_phrases(self.classes.value),
        )

    @torch.no_grad()
    def output_hook(self, model: nn.Module, camera: Cameras, outputs: Dict) -> Dict[str, Tensor]:
        """Outputs of the current query for one eval-mode render (registered in ``model.output_hooks``)."""
        if self._clicking:
            return {}
        self._last_camera = camera
        if self._suspended:
            return {}
        snapshot = self.snapshot()
        try:
            with self._lock:
                self._refresh_display(model)
                if not snapshot.has_input:
                    # Once the panel is in use, keep the key while the query is being typed, so the viewer
                    # does not fall back to another output.
                    return {QUERY_OUTPUT: outputs["rgb"]} if self._touched else {}
                result = self._answer(model, snapshot, outputs, camera)
        except IOChangeException:  # the viewer interrupting a render
            raise
        except Exception as err:  # noqa: BLE001 (a bad query must not stop the viewer)
            self._say(f"{type(err).__name__}: {err}")
            return {}
        self.last_result = result
        out = {QUERY_OUTPUT: result.image}
        if result.relevancy is not None:
            for i, text in enumerate(snapshot.positives):
                out[RELEVANCY_OUTPUT.format(text)] = result.relevancy[..., i : i + 1]
        return out

    def _answer(
        self, model: nn.Module, snapshot: QuerySnapshot, outputs: Dict, camera: Optional[Cameras] = None
    ) -> QueryResult:
        if "semantic_latent" not in outputs and not getattr(model, "viewer_latent_deferred", False):
            raise QueryError("this model renders no semantic latent (it was trained without teachers).")
        if snapshot.teacher not in model.projector_heads:
            raise QueryError(
                f"the model has no head for teacher '{snapshot.teacher}' (heads: {sorted(model.projector_heads)})."
            )
        rgb: Tensor = outputs["rgb"]
        alpha: Tensor = outputs["accumulation"]
        size = tuple(rgb.shape[:2])
        if snapshot.mode == "relevancy":
            folded = self._folded_query(model.projector_heads[snapshot.teacher], snapshot, rgb.device)
            # Where the model asks for it (query_fused_raster), the latent is not rendered at all: one Triton kernel
            # per frame composites each tile's latent in registers and ends in this fold
            # (rendering/triton_rasterizer.py). Otherwise, or where it cannot run, the rendered latent through the
            # fold above, which measured faster on the H200.
            relevancy = None
            if camera is not None and _fused_raster_wanted(model):
                try:
                    relevancy = model.render_query_relevancy(camera, folded)
                except Exception as err:  # noqa: BLE001 (the fold below gives the same map)
                    _FAILED_PATHS.add("raster")
                    CONSOLE.print(f"[yellow]The fused relevancy rasterizer failed ({type(err).__name__}: {err}); "
                                  "folding the rendered latent instead.")  # fmt: skip
            if relevancy is None:
                relevancy = folded(self._latent(model, camera, outputs))
            relevancy = resize_feature_map(relevancy, size)
            return self._relevancy_result(snapshot, rgb, alpha, relevancy)
        features = model.decode_features(self._latent(model, camera, outputs), snapshot.teacher)  # [h, w, C]
        if snapshot.mode == "pca":
            colours = resize_feature_map(self._pca_projection(model, snapshot.teacher)(features), size)
            return QueryResult(snapshot, colours * alpha + rgb * (1.0 - alpha))
        if snapshot.mode == "segmentation":
            classes = self.embed(snapshot.teacher, snapshot.classes, device=features.device)
            scores = resize_feature_map(cosine_similarity(features, classes), size)
            labels = scores.argmax(dim=-1)
            palette = segmentation_palette(len(snapshot.classes), device=rgb.device)
            return QueryResult(snapshot, blend_labels(rgb, labels, palette, 0.6 * alpha), segmentation=labels)
        raise QueryError(f"unknown display '{snapshot.mode}'")

    @staticmethod
    def _latent(model: nn.Module, camera: Optional[Cameras], outputs: Dict) -> Tensor:
        """The render's latent; rendered here when the model left it out for the fused relevancy path."""
        latent = outputs.get("semantic_latent")
        if latent is None and camera is not None:
            latent = model.render_viewer_latent(camera)
        if latent is None:
            raise QueryError("nothing visible to query.")
        return latent

    def _relevancy_result(
        self, snapshot: QuerySnapshot, rgb: Tensor, alpha: Tensor, relevancy: Tensor
    ) -> QueryResult:
        """The relevancy maps ([H, W, P]) drawn over the render: a heat map for one query, colours for several."""
        if len(snapshot.positives) == 1:
            lut = self._colormap(snapshot.colormap, rgb.device)
            image = overlay_heatmap(rgb, relevancy[..., 0], lut, snapshot.threshold, opacity=0.7 * alpha)
        else:
            palette = segmentation_palette(len(snapshot.positives), device=rgb.device)
            image = overlay_queries(rgb, relevancy, palette, snapshot.threshold, opacity=0.7 * alpha)
        return QueryResult(snapshot, image, relevancy=relevancy)

    def _pca_projection(self, model: nn.Module, teacher: str) -> PCAProjection:
        # Fitted on the Gaussians rather than on a frame, so every view shares one colour map; refitted only
        # when the teacher or (after densification) the Gaussians change.
        key = (teacher, int(model.num_points))
        if key not in self._pca:
            features = model.gaussian_features(teacher)
            visible = torch.sigmoid(model.opacities.squeeze(-1)) > 0.1
            self._pca = {key: fit_pca(features[visible] if int(visible.sum()) >= 16 else features)}
        return self._pca[key]

    def _colormap(self, name: str, device: torch.device) -> Float[Tensor, "256 3"]:
        key = (name, str(device))
        if key not in self._colormaps:
            samples = matplotlib.colormaps[name](torch.linspace(0, 1, 256).numpy())[:, :3]
            self._colormaps[key] = torch.as_tensor(samples, dtype=torch.float32, device=device)
        return self._colormaps[key]

    # ------------------------------------------------------------------ text
    def text_teacher(self, name: str) -> Teacher:
        """The teacher ``name``, built on first use; it must have a text encoder."""
        with self._lock:
            if name not in self._configs:
                raise QueryError(f"unknown teacher '{name}' (teachers: {sorted(self._configs)}).")
            if name not in self._teachers:
                self._say(f"Loading teacher '{name}' for text queries...")
                self._teachers[name] = self._build_teacher(self._configs[name])
            teacher = self._teachers[name]
        if not teacher.has_text_encoder:
            with_text = [n for n, t in self._teachers.items() if t.has_text_encoder]
            raise QueryError(
                f"teacher '{name}' has no text encoder, so it cannot answer text queries; choose a "
                f"language-aligned teacher{f' such as {with_text[0]}' if with_text else ''} in 'Teacher'."
            )
        return teacher

    @torch.no_grad()
    def embed(
        self, teacher: str, texts: Sequence[str], device: Optional[torch.device] = None
    ) -> Float[Tensor, "T C"]:
        """Text embeddings in ``teacher``'s space, each computed once per (teacher, text)."""
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if (teacher, t) not in self._embeddings]
            if missing:
                encoded = self.text_teacher(teacher).encode_text(missing).float()
                for text, vector in zip(missing, encoded, strict=True):
                    self._embeddings[(teacher, text)] = vector
            stacked = torch.stack([self._embeddings[(teacher, t)] for t in texts]) if texts else None
        if stacked is None:
            raise QueryError("no text to embed.")
        return stacked if device is None else stacked.to(device)

    def _on_query_changed(self) -> None:
        # Runs in the viewer's callback thread (not the render's), so slow first-time work happens here: the
        # teacher is built and the texts embedded before the re-render that the viewer triggers next.
        self._touched = True
        self._push_semantic_scale(self._get_model())
        snapshot = self.snapshot()
        if snapshot.has_input:
            self.show_query_output()
        if not (snapshot.needs_text and snapshot.has_input):
            return
        texts = snapshot.positives + snapshot.negatives if snapshot.mode == "relevancy" else snapshot.classes
        try:
            self.embed(snapshot.teacher, texts)
        except Exception as err:  # noqa: BLE001 (shown in the panel; the render reports it again)
            self._say(f"{type(err).__name__}: {err}")
            return
        self._say("")

    def show_query_output(self) -> bool:
        """Switch the viewer's "Output type" to the panel's output, so using the panel shows its result without
        anyone choosing that output by hand. Returns whether a viewer was there to switch."""
        viewer = getattr(self.viewer_control, "viewer", None)
        # nerfstudio's ControlPanel has no public setter of the output; its dropdown is the element to set.
        dropdown = getattr(getattr(viewer, "control_panel", None), "_output_render", None)
        if dropdown is None:
            return False
        if QUERY_OUTPUT not in dropdown.options:  # the viewer adds outputs only after a render returns them
            dropdown.set_options([*dropdown.options, QUERY_OUTPUT])
        if dropdown.value != QUERY_OUTPUT:
            dropdown.value = QUERY_OUTPUT
            trigger = getattr(viewer, "_trigger_rerender", None)
            if trigger is not None:
                trigger()
        return True

    # ------------------------------------------------------------------ 3D selection
    def text_selection(self, snapshot: Optional[QuerySnapshot] = None) -> Selection:
        """The Gaussians whose relevancy to any positive query exceeds the threshold."""
        snapshot = snapshot or self.snapshot()
        if not snapshot.positives:
            raise QueryError("type a query in 'Positives' first.")
        model = self._get_model()
        device = model.means.device
        selection = Selection(
            description=", ".join(snapshot.positives),
            teacher=snapshot.teacher,
            threshold=snapshot.threshold,
            positives=self.embed(snapshot.teacher, snapshot.positives, device),
            negatives=self.embed(snapshot.teacher, snapshot.negatives, device),
        )
        if snapshot.teacher not in model.projector_heads:
            raise QueryError(f"the model has no head for teacher '{snapshot.teacher}'.")
        return selection

    def _matches(self) -> Selection:
        """What the selection buttons act on: the text query when one is typed, else the last click."""
        if split_phrases(self.positives.value):
            self._selection = self.text_selection()
        if self._selection is None:
            raise QueryError("nothing selected: type a query in 'Positives' or click an object.")
        return self._selection

    def highlight_matches(self) -> Optional[Bool[Tensor, " N"]]:
        """Tint the matching Gaussians in every view; returns their mask."""
        return self._display_action(lambda s: setattr(self, "_highlighted", s), "highlighted")

    def hide_matches(self) -> Optional[Bool[Tensor, " N"]]:
        """Leave the matching Gaussians out of the render (adds to what is already hidden)."""
        return self._display_action(lambda s: self._hidden.append((s, False)), "hidden")

    def show_only_matches(self) -> Optional[Bool[Tensor, " N"]]:
        """Hide every Gaussian except the matching ones."""
        return self._display_action(lambda s: setattr(self, "_hidden", [(s, True)]), "shown alone")

    def show_all(self) -> None:
        """Undo hiding and highlighting."""
        with self._lock:
            self._hidden, self._highlighted = [], None
            self._refresh_display(self._get_model(), force=True)
        self._say("Showing all Gaussians.")

    def _display_action(self, apply: Callable[[Selection], None], verb: str) -> Optional[Tensor]:
        try:
            with self._lock:
                selection = self._matches()
                model = self._get_model()
                mask = selection.mask(model)
                apply(selection)
                self._refresh_display(model, force=True)
        except Exception as err:  # noqa: BLE001 (shown in the panel)
            self._say(f"{type(err).__name__}: {err}")
            return None
        self._say(f"{int(mask.sum())} of {mask.shape[0]} Gaussians ({selection.description}) {verb}.")
        return mask

    def _refresh_display(self, model: nn.Module, force: bool = False) -> None:
        """Push the display state into the model's masks (re-evaluating selections after densification)."""
        self._push_semantic_scale(model)
        if self._suspended:
            model.hidden_mask = model.highlight_mask = None
            return
        stale = any(
            m is not None and m.shape[0] != model.num_points
            for m in (model.hidden_mask, model.highlight_mask)
        )
        if not (force or stale):
            return
        model.hidden_mask = hidden_by(self._hidden, model)
        model.highlight_mask = self._highlighted.mask(model) if self._highlighted is not None else None

    def _push_semantic_scale(self, model: Optional[nn.Module]) -> None:
        """While the panel is in use (and not suspended), renders give the latent at full resolution."""
        if model is None or not hasattr(model, "viewer_semantic_scale"):
            return
        wanted = self.full_resolution.value and self._touched and not self._suspended
        model.viewer_semantic_scale = 1.0 if wanted else None
        if hasattr(model, "viewer_latent_deferred"):
            # Relevancy straight from the Gaussians needs no rendered latent: the model skips it in those renders.
            model.viewer_latent_deferred = wanted and self._relevancy_from_gaussians(model)

    def _folded_query(self, head: nn.Module, snapshot: QuerySnapshot, device: torch.device) -> FoldedQuery:
        """The current texts folded into ``head`` (the [h, w, C] feature map is never built: models/folded_query.py),
        built once and reused by every frame until the texts, the teacher, the device or the head's weights change
        (a head still training changes every step; each parameter's version counter says so)."""
        weights = tuple((p.data_ptr(), p._version) for p in head.parameters())
        key = (snapshot.teacher, snapshot.positives, snapshot.negatives, str(device), weights)
        if self._folded is not None and self._folded[0] == key:
            return self._folded[1]
        # On the GPU, bfloat16 inputs through the one-kernel Triton fold (models/fused_query.py): at 1280 x 720 from
        # 1M Gaussians the map takes 1.0 ms after the render, against 2.4 ms for the compiled fold and 3.8 ms eager
        # (benchmarks/results/query_speed_h200_fused.md). Where Triton cannot run, the compiled fold (compiled once
        # per session), else the eager one: every path gives the same map.
        folded = FoldedQuery(
            head,
            self.embed(snapshot.teacher, snapshot.positives, device=device),
            self.embed(snapshot.teacher, snapshot.negatives, device=device),
            compute_dtype=torch.bfloat16 if device.type == "cuda" else None,
            compiled=device.type == "cuda",
            fused=device.type == "cuda",
        )
        self._folded = (key, folded)
        return folded

    def _relevancy_from_gaussians(self, model: nn.Module) -> bool:
        """Whether the current query's relevancy can come from ``model.render_query_relevancy`` (for any camera;
        a camera it cannot handle still falls back to a latent rendered by the panel)."""
        if self.display.value != "relevancy" or not _fused_raster_wanted(model):
            return False
        heads = getattr(model, "projector_heads", {})  # an nn.ModuleDict: no .get
        if self.teacher.value not in heads or not hasattr(model, "query_relevancy_supported"):
            return False
        head = heads[self.teacher.value]
        linears = [layer for layer in head.net if isinstance(layer, nn.Linear)]
        device = model.means.device
        # Only the head's shape matters here: a fold of zero texts would do, but FoldedQuery wants one positive.
        probe = FoldedQuery(head, torch.zeros(1, linears[-1].out_features, device=device),
                            torch.zeros(0, linears[-1].out_features, device=device))  # fmt: skip
        return bool(model.query_relevancy_supported(probe))

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """No query outputs and no hiding or highlighting inside the block (evaluation renders the model as
        trained, whatever the viewer shows)."""
        model = self._get_model()
        with self._lock:
            self._suspended += 1
            self._refresh_display(model)
        try:
            yield
        finally:
            with self._lock:
                self._suspended -= 1
                self._refresh_display(model, force=True)

    # ------------------------------------------------------------------ click
    def _on_click_toggled(self) -> None:
        control = self.viewer_control
        if not hasattr(control, "viser_server"):
            return  # no viewer (scripts, tests): on_click can still be called directly
        if self.click_select.value:
            control.register_pointer_cb("click", self.on_click, removed_cb=self._on_click_removed)
            self._say("Click an object in the view to select it.")
        else:
            control.unregister_pointer_cb()

    def _on_click_removed(self) -> None:
        if self.click_select.value:
            self.click_select.value = False

    def on_click(self, click: ViewerClick) -> Optional[Bool[Tensor, " N"]]:
        """Select (and highlight) the visible Gaussians whose object-aware features match the clicked pixel's."""
        viewer = getattr(self.viewer_control, "viewer", None)
        # Pointer callbacks bypass the viewer's lock; take it, so a training step cannot change the
        # Gaussians during the click's render.
        train_lock = getattr(viewer, "train_lock", None) or nullcontext()
        try:
            with train_lock:
                mask = self.select_at(self._click_camera(), click.screen_pos)
        except Exception as err:  # noqa: BLE001 (shown in the panel)
            self._say(f"{type(err).__name__}: {err}")
            return None
        if viewer is not None:
            viewer._trigger_rerender()
        return mask

    def _click_camera(self) -> Cameras:
        control = self.viewer_control
        if hasattr(control, "viser_server"):
            clients = control.viser_server.get_clients()
            if clients:
                aspect = next(iter(clients.values())).camera.aspect
                camera = control.get_camera(CLICK_RENDER_HEIGHT, max(1, round(CLICK_RENDER_HEIGHT * aspect)))
                if camera is not None:
                    return camera
        if self._last_camera is None:
            raise QueryError("no view to click in yet.")
        return self._last_camera

    @torch.no_grad()
    def select_at(self, camera: Cameras, screen_pos: Tuple[float, float]) -> Bool[Tensor, " N"]:
        """Select the Gaussians similar, in the click teacher's space, to the pixel at ``screen_pos`` (x, y in
        [0, 1], OpenCV image convention) of ``camera``; highlights them and returns their mask."""
        teacher = self.click_teacher.value
        model = self._get_model()
        if teacher not in model.projector_heads:
            raise QueryError(f"the model has no head for click teacher '{teacher}'.")
        # A full eval-mode render (this panel's outputs off), so hidden or cropped Gaussians cannot be picked.
        was_training, self._clicking = model.training, True
        # At training's semantic scale, as the click similarity was tuned: the full-resolution render's single
        # pixel is a noisier sample of its object than the pooled one (recall fell from 0.57 to 0.30).
        scale = getattr(model, "viewer_semantic_scale", None)
        deferred = getattr(model, "viewer_latent_deferred", False)
        model.eval()
        try:
            if scale is not None:
                model.viewer_semantic_scale = None
            if deferred:  # the click reads the rendered latent
                model.viewer_latent_deferred = False
            outputs = model.get_outputs_for_camera(camera.to(model.device))
        finally:
            self._clicking = False
            if scale is not None:
                model.viewer_semantic_scale = scale
            if deferred:
                model.viewer_latent_deferred = True
            model.train(was_training)
        latent, alpha = outputs.get("semantic_latent"), outputs["accumulation"]
        if latent is None:
            raise QueryError("this model renders no semantic latent (it was trained without teachers).")
        x, y = (min(max(float(v), 0.0), 1.0) for v in screen_pos)
        height, width = alpha.shape[:2]
        if float(alpha[min(int(y * height), height - 1), min(int(x * width), width - 1)]) < 0.5:
            raise QueryError("nothing there: the clicked pixel shows empty space.")
        h, w = latent.shape[:2]
        cell = (min(int(y * h), h - 1), min(int(x * w), w - 1))
        pixel_feature = model.decode_features(latent[cell], teacher)
        weights = None
        if self.click_region.value:  # each Gaussian's weight in the clicked pixel of the latent's render
            weights = model.pixel_weights(camera.to(model.device), *cell)
        with self._lock:
            selection = Selection(
                description="clicked object",
                teacher=teacher,
                threshold=float(self.click_similarity.value),
                pixel_feature=pixel_feature,
                excluded=tuple(self._hidden),
            )
            mask = selection.mask(model)
            seed = None if weights is None else click_seed(model.means, mask, weights)
            if seed is not None:
                # Grown from the matching Gaussian that weighs most in the clicked pixel, kept as its centre.
                radius = float(self.click_region_radius.value) * float(getattr(model, "scene_scale", 1.0))
                selection.limit_to_region(model.means.detach()[seed].clone(), radius)
                mask = selection.mask(model)
            self._selection = self._highlighted = selection
            self._refresh_display(model, force=True)
        self._say(f"Clicked object: {int(mask.sum())} of {mask.shape[0]} Gaussians selected.")
        return mask

    # ------------------------------------------------------------------ export
    def export_selection(self) -> Optional[Path]:
        """Write the current selection (the typed query, else the last click) as a semantic PLY."""
        try:
            from splatsem_ns.export import SemanticScene
        except (ImportError, AttributeError) as err:
            self._say(f"Export is unavailable in this installation (splatsem_ns.export: {err}).")
            return None
        try:
            with self._lock:
                model = self._get_model()
                mask = self._matches().mask(model)
                if not bool(mask.any()):
                    raise QueryError("the selection is empty; lower the threshold or pick another query.")
                scene = SemanticScene.from_model(model, list(self._configs.values()))
            path = Path(self.export_file.value).expanduser()
            written = scene.save(path, selection=mask.cpu())
        except Exception as err:  # noqa: BLE001 (shown in the panel)
            self._say(f"Export failed: {type(err).__name__}: {err}")
            return None
        self._say(f"Exported {getattr(written, 'num_written', int(mask.sum()))} Gaussians to {path}.")
        return path

    # ------------------------------------------------------------------ messages
    def _say(self, message: str) -> None:
        self.last_message = message
        if message:
            CONSOLE.log(f"[semantic query] {message}")
        if self.status.gui_handle is not None:
            self.status.value = message
        else:
            self.status.default_value = message


class _OrderedGui:
    """viser's GUI API with a fixed ``order`` for the next element it adds."""

    def __init__(self, gui, order: float) -> None:
        self._gui, self._order = gui, order

    def __getattr__(self, name: str):
        attribute = getattr(self._gui, name)
        if name.startswith("add_"):
            return lambda *args, **kwargs: attribute(*args, **{"order": self._order, **kwargs})
        return attribute


class _OrderedServer:
    def __init__(self, server, order: float) -> None:
        self._server, self.gui = server, _OrderedGui(server.gui, order)

    def __getattr__(self, name: str):
        return getattr(self._server, name)


def _install_in_order(element: ViewerElement, order: float) -> None:
    """Install ``element`` at position ``order`` of its folder: nerfstudio installs a module's viewer elements
    in alphabetical order of their attribute names, which would scatter the panel's controls."""
    install = element.install
    element.install = lambda server: install(_OrderedServer(server, order))  # type: ignore[method-assign]
