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

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from splatsem_ns.models.heads import ProjectorHead
from splatsem_ns.models.relevancy import LERF_TEMPERATURE


class FoldedQuery(nn.Module):
    """Relevancy of ``positives`` against ``negatives`` (text embeddings of the head's teacher) for latents."""

    def __init__(
        self,
        head: ProjectorHead,
        positives: Float[Tensor, "P C"],
        negatives: Float[Tensor, "M C"],
        temperature: float = LERF_TEMPERATURE,
    ) -> None:
        super().__init__()
        if positives.ndim != 2 or positives.shape[0] == 0:
            raise ValueError(
                f"Need at least one positive query embedding [P, C], got {tuple(positives.shape)}."
            )
        layers = list(head.net)
        last = layers[-1]
        assert isinstance(last, nn.Linear)
        self.front = nn.Sequential(*layers[:-1])  # latent -> last hidden activations (empty for one layer)
        weight, bias = last.weight.detach(), last.bias.detach()  # [C, H], [C], in the head's dtype
        queries = F.normalize(torch.cat([positives, negatives]).to(weight), dim=-1)  # [P+M, C]
        self.num_positives = positives.shape[0]
        self.temperature = temperature
        self.register_buffer("query_weight", queries @ weight)  # [P+M, H]
        self.register_buffer("query_bias", queries @ bias)  # [P+M]
        self.register_buffer("gram", weight.T @ weight)  # [H, H]
        self.register_buffer("gram_bias", weight.T @ bias)  # [H]
        self.register_buffer("bias_norm", bias @ bias)

    def forward(self, latent: Float[Tensor, "*batch D"]) -> Float[Tensor, "*batch P"]:
        hidden = self.front(latent.to(self.gram.dtype))
        dots = hidden @ self.query_weight.T + self.query_bias  # f . q  [*, P+M]
        norm2 = ((hidden @ self.gram) * hidden).sum(-1) + 2 * hidden @ self.gram_bias + self.bias_norm
        cosine = dots / norm2.clamp_min(0).sqrt().clamp_min(1e-12)[..., None]  # as F.normalize's eps
        positive = cosine[..., : self.num_positives]
        if cosine.shape[-1] == self.num_positives:
            return torch.sigmoid(self.temperature * positive)
        hardest = cosine[..., self.num_positives :].amax(dim=-1, keepdim=True)
        return torch.sigmoid(self.temperature * (positive - hardest))
