"""Text queries folded into a projector head: relevancy straight from the rendered latent.

LERF relevancy needs the cosine of each pixel's decoded feature ``f = W h + b`` (``h``: the head's last hidden
activations, ``W, b``: its last layer) with each query ``q``. Both parts of that cosine are cheap in ``h``:
- ``f . q = h . (W^T q) + b . q``: one small matrix per query set, folded in once per query;
- ``|f|^2 = h^T (W^T W) h + 2 (W^T b) . h + |b|^2``: a ``hidden x hidden`` Gram matrix, folded in once per head.
So a relevancy map never builds the ``[H, W, C]`` feature map (C = 768 for SigLIP2-B, against a hidden width of 256),
which is what makes full-resolution queries fast. ``FoldedQuery`` gives the same numbers as
``lerf_relevancy(head(latent), positives, negatives)`` (a test checks it).
"""

from __future__ import annotations

import warnings
from functools import cached_property
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from splatsem_ns.models.fused_query import (
    FoldOperands,
    fold_operands,
    fused_available,
    fused_relevancy,
    norm_factor_terms,
)
from splatsem_ns.models.heads import ProjectorHead
from splatsem_ns.models.relevancy import LERF_TEMPERATURE


class FoldedQuery(nn.Module):
    """Relevancy of ``positives`` against ``negatives`` (text embeddings of the head's teacher) for latents.

    ``compute_dtype`` runs the head's hidden layers and the folded product in another precision (bfloat16 on a
    GPU halves the memory traffic of a full frame's hidden activations); the cosine's division and the sigmoid
    stay in (at least) float32. None: the head's own dtype. ``compiled`` runs the whole map through one
    ``torch.compile``-d function shared by every query (compiled once per dtype and head depth, not per text),
    so its element-wise tail fuses into the products instead of writing ``[pixels, hidden]`` intermediates.
    ``fused`` runs heads with one hidden layer through one Triton kernel (``models/fused_query.py``) on CUDA, in
    float16 with float32 sums when ``compute_dtype`` is a 16-bit type; otherwise, or if it fails, the others."""

    def __init__(
        self,
        head: ProjectorHead,
        positives: Float[Tensor, "P C"],
        negatives: Float[Tensor, "M C"],
        temperature: float = LERF_TEMPERATURE,
        compute_dtype: Optional[torch.dtype] = None,
        compiled: bool = False,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if positives.ndim != 2 or positives.shape[0] == 0:
            raise ValueError(
                f"Need at least one positive query embedding [P, C], got {tuple(positives.shape)}."
            )
        linears = [layer for layer in head.net if isinstance(layer, nn.Linear)]
        if any(not isinstance(layer, (nn.Linear, nn.ReLU)) for layer in head.net):
            raise TypeError("FoldedQuery folds heads of Linear layers with ReLU between them.")
        last = linears[-1]
        weight, bias = last.weight.detach(), last.bias.detach()  # [C, H], [C], in the head's dtype
        queries = F.normalize(torch.cat([positives, negatives]).to(weight), dim=-1)  # [Q = P+M, C]
        self.num_positives = positives.shape[0]
        self.num_queries = queries.shape[0]
        self.temperature = temperature
        self.compiled = compiled
        self.fused = fused
        dtype = compute_dtype or weight.dtype
        # latent -> last hidden activations: the head's other layers (ReLU after each), transposed for x @ W.
        self.front_weights = [layer.weight.detach().T.to(dtype).contiguous() for layer in linears[:-1]]
        self.front_biases = [layer.bias.detach().to(dtype) for layer in linears[:-1]]
        # One product gives every term that depends on the pixel: [f.q (Q) | G h (H) | (W^T b).h (1)], G = W^T W.
        fold = torch.cat([(queries @ weight).T, weight.T @ weight, (weight.T @ bias)[:, None]], dim=1)
        self.fold = fold.to(dtype)  # [H, Q + H + 1]
        # The cosine's tail in at least float32, whatever the product's precision.
        tail = torch.promote_types(weight.dtype, torch.float32)
        self.query_bias = (queries @ bias).to(tail)  # [Q]
        self.bias_norm = (bias @ bias).to(tail)
        self._last_layer = (weight, bias)  # for the kernels' factored norm (norm_terms)
        self._operands: Dict[Tuple[Optional[int], bool], FoldOperands] = {}  # see operands()

    @cached_property
    def norm_terms(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The last layer's QR terms of the kernels' factored norm (``fused_query.norm_factor_terms``), computed on
        first use and shared by every width and form ``operands`` lays out."""
        return norm_factor_terms(*self._last_layer)

    @property
    def factored_by_default(self) -> bool:
        """Whether the kernels take the head's norm in the factored form unless told otherwise: for 16-bit operands
        and a power-of-two hidden width (what it needs), the form measured faster. On H100s at 1280x720 the fold took
        0.43-0.55 ms against the Gram form's 0.75-0.81 ms, with the same largest error against the float32 fold
        (benchmarks/results/query_speed_h100_factored_run1.md, _run2.md and query_speed_h100_viewer_path.md: three
        runs, two machines). The float32 variant spills registers (``tests/test_triton_compiles.py``) and was not
        timed, so float32 keeps the Gram form."""
        hidden = self.fold.shape[0]
        return self.fold.dtype in (torch.float16, torch.bfloat16) and hidden & (hidden - 1) == 0

    def operands(self, channels: Optional[int] = None, factored: Optional[bool] = None) -> FoldOperands:
        """These terms laid out for the Triton kernels (``fused_query.fold_operands``; a head with one hidden layer),
        the first layer zero-padded to ``channels`` (default: the head's width); ``factored``: the norm's form
        (None: ``factored_by_default``). Built once per width and form and kept: the viewer asks every frame, and
        the terms never change."""
        factored = self.factored_by_default if factored is None else factored
        key = (channels, factored)
        if key not in self._operands:
            self._operands[key] = fold_operands(
                self.front_weights, self.front_biases, self.fold, self.query_bias, self.bias_norm,
                self.num_positives, self.temperature, self.norm_terms, channels=channels,
                factored=factored,
            )  # fmt: skip
        return self._operands[key]

    def forward(self, latent: Float[Tensor, "*batch D"]) -> Float[Tensor, "*batch P"]:
        args = (
            latent,
            self.front_weights,
            self.front_biases,
            self.fold,
            self.query_bias,
            self.bias_norm,
            self.num_positives,
            self.temperature,
        )
        # The fastest path that can run here; one that fails (no Triton build, no compiler) is not tried again
        # in this process, and every path gives the same map.
        paths = []
        if self.fused and fused_available(latent, self.front_weights):
            fused = lambda *_: fused_relevancy(latent, self.operands())  # noqa: E731 (same call shape)
            paths.append(("fused", fused, "the fused query kernel failed"))
        if self.compiled:
            paths.append(("compiled", _compiled_relevancy, "compiling the folded query failed"))
        for name, function, failure in paths:
            if name in _FAILED:
                continue
            try:
                return function(*args)
            except Exception as err:  # noqa: BLE001 (see above)
                _FAILED.add(name)
                warnings.warn(f"{failure} ({type(err).__name__}: {err}); using the next path.", stacklevel=2)
        return folded_relevancy(*args)


def folded_relevancy(
    latent: Float[Tensor, "*batch D"],
    front_weights: List[Tensor],
    front_biases: List[Tensor],
    fold: Float[Tensor, "H K"],
    query_bias: Float[Tensor, " Q"],
    bias_norm: Float[Tensor, ""],
    num_positives: int,
    temperature: float,
) -> Float[Tensor, "*batch P"]:
    """LERF relevancy of each latent from the folded terms (see ``FoldedQuery``)."""
    hidden = latent.to(fold.dtype)
    for weight, bias in zip(front_weights, front_biases, strict=True):
        hidden = torch.relu(hidden @ weight + bias)
    product = hidden @ fold  # [*, Q + H + 1]
    q = query_bias.shape[0]
    tail = query_bias.dtype
    dots = product[..., :q].to(tail) + query_bias  # f . q
    # |f|^2 = h^T G h + 2 (W^T b) . h + |b|^2
    norm2 = (product[..., q:-1] * hidden).to(tail).sum(-1) + 2 * product[..., -1].to(tail) + bias_norm
    cosine = dots / norm2.clamp_min(0).sqrt().clamp_min(1e-12)[..., None]  # as F.normalize's eps
    positive = cosine[..., :num_positives]
    if q == num_positives:
        return torch.sigmoid(temperature * positive)
    hardest = cosine[..., num_positives:].amax(dim=-1, keepdim=True)
    return torch.sigmoid(temperature * (positive - hardest))


_COMPILED = None
_FAILED: set = set()
"""Paths ("fused", "compiled") that failed in this process."""


def _compiled_relevancy(*args) -> Tensor:
    """``folded_relevancy`` through one ``torch.compile``-d function, shared by every query."""
    global _COMPILED
    if _COMPILED is None:  # dynamic: any pixel count (viewer resolution) without recompiling
        _COMPILED = torch.compile(folded_relevancy, dynamic=True)
    return _COMPILED(*args)
