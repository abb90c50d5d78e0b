"""Query maths of the semantic viewer: relevancy, stable PCA colours, argmax segmentation and 3D selection.

Pure torch on whatever device the inputs live on, so a viewer on a GPU computes everything next to the
rendered latent and only the final image crosses to the host.

Relevancy follows LERF (Kerr et al. 2023, ``lerf/lerf.py: get_relevancy``): for each positive query, a
softmax over the pair (positive, negative) for every canonical negative phrase, keeping the negative
that gives the positive its lowest probability. A feature is relevant when it is closer to the query
than to all the generic phrases ("object", "things", ...), whatever their absolute cosines are.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

DEFAULT_NEGATIVES = ("object", "things", "stuff", "texture")
"""LERF's canonical negative phrases."""
LERF_TEMPERATURE = 10.0
"""LERF's softmax temperature over cosine similarities."""
"""LERF's canonical negative phrases."""


def cosine_similarity(
    features: Float[Tensor, "*batch C"], queries: Float[Tensor, "Q C"]
) -> Float[Tensor, "*batch Q"]:
    """Cosine of every feature with every query (zero features give zero, not NaN)."""
    if features.shape[-1] != queries.shape[-1]:
        raise ValueError(
            f"Features have {features.shape[-1]} channels but the queries have {queries.shape[-1]}: they do "
            "not come from the same teacher."
        )
    queries = F.normalize(queries.to(features), dim=-1)
    return F.normalize(features, dim=-1) @ queries.T


def lerf_relevancy(
    features: Float[Tensor, "*batch C"],
    positives: Float[Tensor, "P C"],
    negatives: Float[Tensor, "M C"],
    temperature: float = LERF_TEMPERATURE,
) -> Float[Tensor, "*batch P"]:
    """LERF relevancy of every feature to every positive query, in [0, 1].

    For positive p and negative n_j the pairwise softmax gives
    ``exp(t s_p) / (exp(t s_p) + exp(t s_nj)) = sigmoid(t (s_p - s_nj))``, with ``s`` the cosines; the
    minimum over j is therefore ``sigmoid(t (s_p - max_j s_nj))``, computed that way so no ``[*, P, M]``
    tensor is built. Without negatives the relevancy is ``sigmoid(t s_p)``.
    """
    if positives.ndim != 2 or positives.shape[0] == 0:
        raise ValueError(
            f"Need at least one positive query embedding [P, C], got shape {tuple(positives.shape)}."
        )
    positive = cosine_similarity(features, positives)
    if negatives.shape[0] == 0:
        return torch.sigmoid(temperature * positive)
    hardest_negative = cosine_similarity(features, negatives).amax(dim=-1, keepdim=True)
    return torch.sigmoid(temperature * (positive - hardest_negative))


@dataclass(frozen=True)
class PCAProjection:
    """A fixed linear map from features to RGB, so colours stay put while the camera moves."""

    mean: Float[Tensor, " C"]
    components: Float[Tensor, "C 3"]
    """Principal directions, each signed so that its largest loading is positive (a deterministic sign)."""
    low: Float[Tensor, " 3"]
    """Projection values mapped to 0 (a low percentile of the fitted features)."""
    high: Float[Tensor, " 3"]
    """Projection values mapped to 1 (a high percentile of the fitted features)."""

    def __call__(self, features: Float[Tensor, "*batch C"]) -> Float[Tensor, "*batch 3"]:
        projected = (features - self.mean.to(features)) @ self.components.to(features)
        span = (self.high - self.low).to(features).clamp(min=1e-8)
        return ((projected - self.low.to(features)) / span).clamp(0.0, 1.0)


def fit_pca(
    features: Float[Tensor, "N C"], max_samples: int = 20_000, percentile: float = 0.02
) -> PCAProjection:
    """Top three principal components of ``features`` (an evenly strided subsample of at most
    ``max_samples``), with the colour range set by the ``percentile`` and ``1 - percentile`` quantiles so
    a few outliers do not wash out the rest. Deterministic: no random sampling, eigh on the covariance."""
    features = features.reshape(-1, features.shape[-1])
    if features.shape[0] < 2:
        raise ValueError(f"PCA needs at least two feature vectors, got {features.shape[0]}.")
    stride = max(1, features.shape[0] // max_samples)
    sample = features[::stride].double()
    mean = sample.mean(dim=0)
    centred = sample - mean
    covariance = centred.T @ centred / (sample.shape[0] - 1)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    components = vectors[:, -3:].flip(-1)
    if components.shape[1] < 3:  # fewer than three channels: repeat the last direction
        components = torch.cat([components, components[:, -1:].expand(-1, 3 - components.shape[1])], dim=1)
    signs = torch.sign(components.gather(0, components.abs().argmax(dim=0, keepdim=True)))
    components = components * torch.where(signs == 0, 1.0, signs).to(components)
    projected = centred @ components
    low = torch.quantile(projected, percentile, dim=0)
    high = torch.quantile(projected, 1.0 - percentile, dim=0)
    dtype = features.dtype
    return PCAProjection(mean.to(dtype), components.to(dtype), low.to(dtype), high.to(dtype))


def pca_colors(
    features: Float[Tensor, "*batch C"], projection: Optional[PCAProjection] = None
) -> Float[Tensor, "*batch 3"]:
    """RGB in [0, 1] from the first three principal components. Pass a ``projection`` fitted once (e.g. on
    every Gaussian's features) for colours that do not change from frame to frame; without one it is
    fitted on ``features`` themselves."""
    if projection is None:
        projection = fit_pca(features.reshape(-1, features.shape[-1]))
    return projection(features)


def argmax_segmentation(
    features: Float[Tensor, "*batch C"], class_embeddings: Float[Tensor, "K C"]
) -> Int[Tensor, " *batch"]:
    """Index (into ``class_embeddings``) of the class with the highest cosine for every feature."""
    if class_embeddings.ndim != 2 or class_embeddings.shape[0] == 0:
        raise ValueError(
            f"Need at least one class embedding [K, C], got shape {tuple(class_embeddings.shape)}."
        )
    return cosine_similarity(features, class_embeddings).argmax(dim=-1)


def segmentation_palette(num_classes: int, device: Optional[torch.device] = None) -> Float[Tensor, "K 3"]:
    """Distinct, deterministic colours: hues spaced by the golden ratio, so neighbouring ids differ most."""
    golden = 0.618033988749895
    colours = [
        colorsys.hsv_to_rgb((0.1 + i * golden) % 1.0, 0.75 if i % 2 == 0 else 0.55, 0.95 if i % 3 else 0.8)
        for i in range(num_classes)
    ]
    return torch.tensor(colours, dtype=torch.float32, device=device).reshape(num_classes, 3)


def select_by_text(
    gaussian_features: Float[Tensor, "N C"],
    positives: Float[Tensor, "P C"],
    negatives: Float[Tensor, "M C"],
    threshold: float = 0.5,
    temperature: float = 10.0,
    chunk: int = 1 << 18,
) -> Bool[Tensor, " N"]:
    """Gaussians whose relevancy to any of the positives exceeds ``threshold``."""
    selected = [
        lerf_relevancy(gaussian_features[i : i + chunk], positives, negatives, temperature).amax(dim=-1)
        > threshold
        for i in range(0, gaussian_features.shape[0], chunk)
    ]
    if not selected:
        return torch.zeros(0, dtype=torch.bool, device=gaussian_features.device)
    return torch.cat(selected)


def select_by_click(
    gaussian_features: Float[Tensor, "N C"], pixel_feature: Float[Tensor, " C"], threshold: float = 0.8
) -> Bool[Tensor, " N"]:
    """Gaussians whose feature has a cosine above ``threshold`` with the clicked pixel's feature."""
    if pixel_feature.ndim != 1:
        raise ValueError(
            f"The clicked pixel's feature must be one vector [C], got shape {tuple(pixel_feature.shape)}."
        )
    return cosine_similarity(gaussian_features, pixel_feature[None])[:, 0] > threshold


def grow_region(
    means: Float[Tensor, "N 3"],
    selected: Bool[Tensor, " N"],
    seed: Optional[int],
    radius: float,
) -> Bool[Tensor, " N"]:
    """The connected part of a click's selection around the clicked Gaussian: of the ``selected`` Gaussians, those
    reachable from ``seed`` (an index; see ``ChorusSplatModel.pixel_weights``) through chains of selected Gaussians
    whose centres are at most ``radius`` apart. Two chairs of the same kind match the clicked one's feature alike;
    only the clicked chair is connected to the click. A seed outside the selection, or none (``click_seed`` found
    nothing selected), selects nothing."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    region = torch.zeros_like(selected)
    if seed is None or not bool(selected[seed]):
        return region
    indices = torch.nonzero(selected).squeeze(1)
    centres = means.detach()[indices].cpu().numpy().astype(np.float64)
    pairs = cKDTree(centres).query_pairs(float(radius), output_type="ndarray")  # [E, 2]
    graph = coo_matrix(
        (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(len(centres),) * 2
    )
    _, component = connected_components(graph, directed=False)
    at_seed = component[int(torch.searchsorted(indices, torch.tensor(seed, device=indices.device)))]
    region[indices[torch.as_tensor(component == at_seed, device=indices.device)]] = True
    return region


def click_seed(
    means: Float[Tensor, "N 3"], selected: Bool[Tensor, " N"], weights: Float[Tensor, " N"]
) -> Optional[int]:
    """The selected Gaussian a click's region grows from: the one with the largest compositing weight at the clicked
    pixel (``weights``), else, when no selected Gaussian shows there, the selected one nearest the pixel's most
    visible Gaussian. None when nothing is selected."""
    if not bool(selected.any()):
        return None
    visible = torch.where(selected, weights, torch.zeros_like(weights))
    if float(visible.max()) > 0:
        return int(visible.argmax())
    front = means.detach()[int(weights.argmax())]
    distance = (means.detach() - front).square().sum(-1)
    return int(torch.where(selected, distance, torch.full_like(distance, float("inf"))).argmin())


def _level_above(relevancy: Tensor, threshold: float) -> Tensor:
    """Relevancy rescaled so that ``threshold`` maps to 0 and 1 to 1, clamped to [0, 1]."""
    return ((relevancy - threshold) / max(1.0 - threshold, 1e-6)).clamp(0.0, 1.0)


def overlay_heatmap(
    rgb: Float[Tensor, "H W 3"],
    relevancy: Float[Tensor, "H W"],
    colormap: Float[Tensor, "L 3"],
    threshold: float,
    opacity: Union[float, Float[Tensor, "H W 1"]] = 0.7,
) -> Float[Tensor, "H W 3"]:
    """LERF-style composite: the colormapped relevancy over the RGB render wherever it exceeds
    ``threshold`` (``threshold`` maps to the colormap's start, 1 to its end), plain RGB elsewhere.
    ``opacity`` may vary per pixel (e.g. scaled by the render's alpha, so empty space stays empty)."""
    level = _level_above(relevancy, threshold)
    index = (level * (colormap.shape[0] - 1)).round().long()
    heat = colormap.to(rgb)[index]
    weight = opacity * (relevancy > threshold).to(rgb)[..., None]
    return rgb * (1.0 - weight) + heat * weight


def overlay_queries(
    rgb: Float[Tensor, "H W 3"],
    relevancy: Float[Tensor, "H W P"],
    palette: Float[Tensor, "P 3"],
    threshold: float,
    opacity: Union[float, Float[Tensor, "H W 1"]] = 0.7,
) -> Float[Tensor, "H W 3"]:
    """Several queries in one image: each pixel above ``threshold`` takes the colour of its most relevant
    query, more opaque the more relevant it is."""
    top, best = relevancy.max(dim=-1)
    level = _level_above(top, threshold)
    weight = opacity * ((top > threshold).to(rgb) * (0.5 + 0.5 * level))[..., None]
    return rgb * (1.0 - weight) + palette.to(rgb)[best] * weight


def blend_labels(
    rgb: Float[Tensor, "H W 3"],
    labels: Int[Tensor, "H W"],
    palette: Float[Tensor, "K 3"],
    opacity: Union[float, Float[Tensor, "H W 1"]] = 0.6,
) -> Float[Tensor, "H W 3"]:
    """Class colours over the RGB render."""
    return rgb * (1.0 - opacity) + palette.to(rgb)[labels] * opacity
