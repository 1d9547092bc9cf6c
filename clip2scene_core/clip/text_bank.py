"""Per-class text embeddings: prompt ensembling, a file cache, standalone embedding files.

A class embedding is the mean of the L2-normalised embeddings of every (template, name)
pair of the class, re-normalised. Every pair gets the same weight (a flat mean): a class
with more synonyms is not pulled towards any one of them, and with one name this is exactly
CLIP's prompt ensembling. Encoding 85 templates × ~60 names takes a while on a CPU, so
results are cached on disk keyed by a hash of (model name, weights identity, vocabulary
content, templates). Embedding files carry that provenance so a segmenter can swap the
vocabulary without loading CLIP, and so a file made for another model is refused. Files
carry a SHA-256 of their content (``checkpoint.DIGEST_KEY``), verified on load; NaN or inf
embeddings are refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_torch_save
from ..errors import CheckpointError, ConfigError
from ..versioned import FileKind, load_versioned, seal
from .prompts import DEFAULT_TEMPLATES, build_prompts, resolve_templates
from .vocabulary import Vocabulary

log = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "clip2scene-text-embeddings"
EMBEDDINGS_VERSION = 1
EMBEDDINGS_KIND = FileKind(EMBEDDINGS_FORMAT, EMBEDDINGS_VERSION, "text embedding file")
CACHE_ENV = "CLIP2SCENE_CACHE"

Encoder = Callable[[list[str]], Tensor]


def default_cache_dir() -> Path:
    """``$CLIP2SCENE_CACHE`` or ``~/.cache/clip2scene``, plus ``text_embeddings/``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "clip2scene")
    return Path(root) / "text_embeddings"


def embed_vocabulary(encode: Encoder, vocab: Vocabulary, templates: Sequence[str],
                     batch_size: int = 256) -> Tensor:
    """(K, D) float32 CPU class embeddings; ``encode`` maps texts to (T, D) embeddings."""
    templates = resolve_templates(templates)
    prompts: list[str] = []
    counts: list[int] = []
    for cls in vocab.class_names:
        p = build_prompts(vocab.prompt_names(cls), templates)
        prompts.extend(p)
        counts.append(len(p))
    chunks = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            e = encode(prompts[i:i + batch_size]).detach().float().cpu()
            chunks.append(torch.nn.functional.normalize(e, dim=-1))
    emb = torch.cat(chunks, 0)
    if emb.shape[0] != len(prompts):
        raise RuntimeError(f"text encoder returned {emb.shape[0]} embeddings for {len(prompts)} prompts")
    per_class = torch.stack([part.mean(0) for part in torch.split(emb, counts)])
    return torch.nn.functional.normalize(per_class, dim=-1)


def cache_key(model_name: str, weights_id: str, vocab: Vocabulary, templates: Sequence[str]) -> str:
    """Hex digest of everything the embeddings depend on (not the vocabulary's display name)."""
    payload = {"format": EMBEDDINGS_VERSION, "model": model_name, "weights": weights_id,
               "vocab": vocab.content_hash(), "templates": list(resolve_templates(templates))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class TextEmbeddings:
    """Class embeddings plus where they came from (what an embedding file holds)."""

    vocabulary: Vocabulary
    embeddings: Tensor          # (K, D) float32, rows L2-normalised
    model_name: str
    weights_id: str = ""
    templates: tuple[str, ...] = ()
    #: False when read from a file written before content digests existed (not checked)
    verified: bool = field(default=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        e = self.embeddings
        if not isinstance(e, Tensor) or e.ndim != 2 or e.shape[0] != len(self.vocabulary):
            shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise CheckpointError(
                f"text embeddings must be ({len(self.vocabulary)}, D) for vocabulary "
                f"'{self.vocabulary.name}', got {shape}")
        if not torch.isfinite(e).all():
            rows = torch.nonzero(~torch.isfinite(e).all(1)).flatten().tolist()
            names = [self.vocabulary.class_names[i] for i in rows[:5]]
            raise CheckpointError(f"text embeddings contain NaN or inf (class(es) {names}"
                                  f"{' and more' if len(rows) > 5 else ''})")
        self.templates = tuple(self.templates)

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def check(self, model_name: str | None = None, vocabulary: Vocabulary | None = None,
              weights_id: str | None = None, embed_dim: int | None = None, source: str = "") -> None:
        """Raise CheckpointError unless these embeddings fit the given model / vocabulary."""
        where = f"{source}: " if source else ""
        if model_name is not None and model_name != self.model_name:
            raise CheckpointError(
                f"{where}text embeddings were made with CLIP model '{self.model_name}', not '{model_name}'")
        if weights_id is not None and self.weights_id and weights_id != self.weights_id:
            raise CheckpointError(
                f"{where}text embeddings were made with other weights of '{self.model_name}' "
                f"({self.weights_id[:12]} != {weights_id[:12]})")
        if vocabulary is not None and not vocabulary.same_classes(self.vocabulary):
            raise CheckpointError(
                f"{where}text embeddings are for vocabulary '{self.vocabulary.name}' "
                f"{self.vocabulary.class_names}, not '{vocabulary.name}' {vocabulary.class_names}")
        if embed_dim is not None and embed_dim != self.embed_dim:
            raise CheckpointError(
                f"{where}text embeddings have dimension {self.embed_dim}, the model needs {embed_dim}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION,
                "model_name": self.model_name, "weights_id": self.weights_id,
                "templates": list(self.templates), "vocabulary": self.vocabulary.to_dict(),
                "embeddings": self.embeddings.detach().float().cpu().contiguous()}


def save_text_embeddings(path: str | Path, vocab: Vocabulary, emb: Tensor, model_name: str,
                         weights_id: str = "", templates: Sequence[str] = ()) -> None:
    """Write an embedding file atomically (temporary file + rename)."""
    te = TextEmbeddings(vocab, emb.detach().float().cpu(), model_name, weights_id,
                        tuple(resolve_templates(templates)) if templates else ())
    atomic_torch_save(seal(te.to_dict()), path)


def load_text_embeddings(path: str | Path, model_name: str | None = None,
                         vocabulary: Vocabulary | None = None, weights_id: str | None = None,
                         embed_dim: int | None = None) -> TextEmbeddings:
    """Read an embedding file; CheckpointError if missing, corrupt or made for something else."""
    path = Path(path)
    data, verified = load_versioned(path, EMBEDDINGS_KIND)
    try:
        te = TextEmbeddings(Vocabulary.from_dict(data["vocabulary"]), data["embeddings"],
                            str(data["model_name"]), str(data.get("weights_id", "")),
                            tuple(data.get("templates", ())), verified=verified)
    except (KeyError, TypeError, AttributeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: damaged text embedding file ({exc})") from exc
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    te.check(model_name, vocabulary, weights_id, embed_dim, source=str(path))
    return te


class TextEmbeddingBank:
    """Class embeddings for any vocabulary, computed once per (model, vocabulary, templates).

    ``weights_id`` may be a callable so that hashing the weights only happens when a cache
    file is actually looked up.
    """

    def __init__(self, encode: Encoder, model_name: str, weights_id: str | Callable[[], str] = "",
                 cache_dir: str | Path | None = None, use_cache: bool = True) -> None:
        self.encode = encode
        self.model_name = model_name
        self._weights_id = weights_id
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.use_cache = use_cache

    @property
    def weights_id(self) -> str:
        if callable(self._weights_id):
            self._weights_id = str(self._weights_id())
        return self._weights_id

    def key(self, vocab: Vocabulary, templates: Sequence[str] | str = DEFAULT_TEMPLATES) -> str:
        return cache_key(self.model_name, self.weights_id, vocab, resolve_templates(templates))

    def path_for(self, vocab: Vocabulary, templates: Sequence[str] | str = DEFAULT_TEMPLATES) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in vocab.name)[:40]
        return self.cache_dir / f"{safe}-{self.key(vocab, templates)[:24]}.pt"

    def get(self, vocab: Vocabulary, templates: Sequence[str] | str = DEFAULT_TEMPLATES) -> Tensor:
        """(K, D) float32 CPU embeddings, from the cache when a matching file exists."""
        templates = resolve_templates(templates)
        path = self.path_for(vocab, templates) if self.use_cache else None
        if path is not None and path.is_file():
            try:
                te = load_text_embeddings(path, self.model_name, vocab, self.weights_id)
                if te.templates == templates:
                    if not te.verified:         # an older cache file: rewrite it with a digest
                        try:
                            save_text_embeddings(path, vocab, te.embeddings, self.model_name,
                                                 self.weights_id, templates)
                        except OSError as exc:
                            log.warning("could not rewrite text embedding cache %s: %s", path, exc)
                    return te.embeddings
                log.warning("cache file %s has other templates; recomputing", path)
            except CheckpointError as exc:
                log.warning("ignoring unusable cache file: %s", exc)
        emb = embed_vocabulary(self.encode, vocab, templates)
        if path is not None:
            try:
                save_text_embeddings(path, vocab, emb, self.model_name, self.weights_id, templates)
            except OSError as exc:
                log.warning("could not write text embedding cache %s: %s", path, exc)
        return emb
