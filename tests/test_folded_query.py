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


def test_a_bfloat16_fold_stays_close_to_the_float32_relevancy():
    # The viewer folds in bfloat16 on the GPU; relevancy is a display value in [0, 1].
    torch.manual_seed(3)
    head = ProjectorHead(32, 768, 256, 2)
    latent = torch.randn(48, 64, 32)
    texts = torch.nn.functional.normalize(torch.randn(5, 768), dim=-1)
    expected = lerf_relevancy(head(latent), texts[:1], texts[1:])
    folded = FoldedQuery(head, texts[:1], texts[1:], compute_dtype=torch.bfloat16)
    result = folded(latent)
    assert result.dtype == torch.float32
    assert (result - expected).abs().max() < 0.005  # measured: 0.0016
    assert not torch.equal(result, expected)  # the bfloat16 path did run


def test_the_compiled_fold_gives_the_eager_numbers():
    torch.manual_seed(4)
    head = ProjectorHead(8, 32, 16, 2)
    texts = torch.randn(3, 32)
    latent = torch.randn(10, 12, 8)
    eager = FoldedQuery(head, texts[:1], texts[1:])(latent)
    compiled = FoldedQuery(head, texts[:1], texts[1:], compiled=True)
    assert torch.allclose(compiled(latent), eager, atol=1e-6)
    assert torch.allclose(compiled(latent[:3]), eager[:3], atol=1e-6)  # another pixel count: same function


def test_a_fold_that_cannot_compile_runs_eagerly(monkeypatch):
    import splatsem_ns.models.folded_query as folded_query

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(folded_query, "_compiled_relevancy", broken)
    monkeypatch.setattr(folded_query, "_FAILED", set())
    head = ProjectorHead(8, 32, 16, 2)
    texts = torch.randn(3, 32)
    latent = torch.randn(5, 8)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        result = FoldedQuery(head, texts[:1], texts[1:], compiled=True)(latent)
    assert torch.allclose(result, FoldedQuery(head, texts[:1], texts[1:])(latent))


_FUSED_CHECK = """
import os
os.environ["TRITON_INTERPRET"] = "1"  # Triton's CPU interpreter: the kernel's arithmetic, without a GPU
import torch
from splatsem_ns.models.folded_query import FoldedQuery
from splatsem_ns.models.fused_query import fused_available, fused_relevancy
from splatsem_ns.models.heads import ProjectorHead
from splatsem_ns.models.relevancy import lerf_relevancy
torch.manual_seed(0)
latent = torch.randn(7, 19, 32)  # 133 pixels: a partial last block of 64
# Heads whose output is narrower (96) and wider (160) than their hidden layer (128): R of the factored norm is
# padded with zero rows in the first, square in the second.
for out in (96, 160):
    head = ProjectorHead(32, out, 128, 2)
    texts = torch.nn.functional.normalize(torch.randn(6, out), dim=-1)
    errors = []
    for positives, negatives, dtype in [(1, 4, torch.float32), (2, 4, torch.float32), (2, 0, torch.float32),
                                        (1, 4, torch.bfloat16)]:
        fold = FoldedQuery(head, texts[:positives], texts[positives:positives + negatives], compute_dtype=dtype,
                           fused=True)
        assert fused_available(latent, fold.front_weights)
        # The default form: factored for 16-bit operands (the form timed faster), Gram for float32 (its factored
        # variant spills registers and was not timed).
        assert fold.operands().factored == (dtype == torch.bfloat16)
        expected = lerf_relevancy(head(latent), texts[:positives], texts[positives:positives + negatives])
        got = fused_relevancy(latent, fold.operands(factored=True))
        gram = fused_relevancy(latent, fold.operands(factored=False))
        assert torch.equal(fold(latent), got if dtype == torch.bfloat16 else gram)  # the module takes the default
        assert got.shape == expected.shape == gram.shape, (got.shape, expected.shape)
        errors.append((float((got - expected).abs().max()), float((gram - expected).abs().max())))
    print(out, errors)
    assert max(max(e) for e in errors[:3]) < 1e-5 and max(errors[3]) < 5e-3, errors
"""


@pytest.mark.slow
def test_the_fused_kernel_gives_the_folded_numbers():
    import subprocess
    import sys

    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", _FUSED_CHECK], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_the_fused_path_is_skipped_where_it_cannot_run():
    # On a CPU without Triton's interpreter the fused flag falls back to the fold, with the same numbers.
    head = ProjectorHead(32, 40, 64, 2)
    texts = torch.randn(3, 40)
    latent = torch.randn(5, 32)
    fused = FoldedQuery(head, texts[:1], texts[1:], fused=True)(latent)
    assert torch.equal(fused, FoldedQuery(head, texts[:1], texts[1:])(latent))
