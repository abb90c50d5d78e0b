"""Queries folded into a projector head give the relevancy of the decoded features, without decoding them."""

from __future__ import annotations

import pytest
import torch

from splatsem_ns.models.folded_query import FoldedQuery
from splatsem_ns.models.heads import ProjectorHead
from splatsem_ns.models.relevancy import lerf_relevancy


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("positives,negatives", [(1, 4), (3, 4), (2, 0)])
def test_folded_relevancy_matches_the_decoded_one(layers, positives, negatives):
    torch.manual_seed(layers * 10 + positives)
    head = ProjectorHead(16, 96, 32, layers).double()
    latent = torch.randn(24, 40, 16, dtype=torch.float64)
    texts = torch.randn(positives + negatives, 96, dtype=torch.float64)
    expected = lerf_relevancy(head(latent), texts[:positives], texts[positives:])
    folded = FoldedQuery(head, texts[:positives], texts[positives:])
    assert torch.allclose(folded(latent), expected, atol=1e-9)
    single = FoldedQuery(head.float(), texts[:positives].float(), texts[positives:].float())
    assert torch.allclose(single(latent.float()).double(), expected, atol=1e-4)  # float32, as on the GPU


def test_the_fold_needs_a_positive_query():
    with pytest.raises(ValueError, match="at least one positive"):
        FoldedQuery(ProjectorHead(4, 8, 8, 2), torch.zeros(0, 8), torch.zeros(2, 8))
