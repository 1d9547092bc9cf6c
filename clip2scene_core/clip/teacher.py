"""``ClipTeacher``: a frozen open_clip model giving text embeddings and MaskCLIP pixel features.

CLIP2Scene distils CLIP into a 3D network: points are projected into camera images, the
teacher gives each pixel a CLIP embedding (MaskCLIP) and each class a text embedding, and
the student learns to match them. The teacher is never trained: eval mode, no gradients.

Weights come from a local file (open_clip / OpenAI state dict, or OpenAI's TorchScript
``.pt``) or an open_clip pretrained tag ("openai", "laion2b_s34b_b79k", …) downloaded by
open_clip on machines with network access. Nothing is downloaded at import time.
"""
from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError, ConfigError, WeightsNotFoundError
from ..device import resolve_device
from .maskclip import MaskClipOptions, dense_forward, dense_forward_with_keys, vision_kind, vision_stride
from .preprocess import (OPENAI_MEAN, OPENAI_STD, ImageGeometry, PreprocessConfig,
                         preprocess_images, sample_grid)
from .prompts import DEFAULT_TEMPLATES
from .refine import KeySmoothing, prompt_denoise, smooth_features
from .text_bank import TextEmbeddingBank
from .vocabulary import Vocabulary

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz", ".tar")
_TEXT_BATCH = 256
_IMAGE_BATCH = 8


def _looks_like_path(weights: str) -> bool:
    return (any(sep in weights for sep in ("/", "\\", os.sep)) or weights.startswith(("~", "."))
            or weights.lower().endswith(_WEIGHT_SUFFIXES))


def _is_torchscript(path: Path) -> bool:
    """OpenAI's CLIP ``.pt`` files are TorchScript archives (a zip holding ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/", 2)[1:2] == ["code"] or n.endswith("/constants.pkl") for n in zf.namelist())


def register_model_config(name: str, model_cfg: dict[str, Any], directory: str | Path) -> Path:
    """Make ``name`` known to open_clip (``create_model``, ``get_tokenizer``) from a config dict.

    Writes ``directory/name.json`` and adds it to open_clip's registry; used for small test
    models and for architectures not shipped with open_clip.
    """
    import json

    import open_clip

    if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError("model config needs embed_dim, vision_cfg and text_cfg")
    path = Path(directory) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(model_cfg, indent=2))
    open_clip.add_model_config(path)
    return path


class ClipTeacher:
    """Frozen CLIP: ``encode_text``, ``text_embeddings``, ``dense_features``, ``pixel_features``.

    Implements ``clip2scene_core.teachers.Teacher2D`` (the MaskCLIP teacher of pre-training).
    ``key_smoothing`` (off by default): MaskCLIP's key smoothing of the dense features
    (``refine.py``), with the last block's keys from the same forward; ``dense_scores`` gives
    class scores with optional prompt denoising.
    """

    #: features come from the image alone (the teacher cache need not keep it after the pass)
    reads_sources = False

    def __init__(self, model: torch.nn.Module, model_name: str, tokenizer: Any,
                 device: str | torch.device = "cpu", preprocess: PreprocessConfig | None = None,
                 options: MaskClipOptions | None = None, weights_source: str = "random",
                 key_smoothing: KeySmoothing | None = None) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().float()
        self.model.requires_grad_(False)
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.preprocess = preprocess or PreprocessConfig()
        self.options = options or MaskClipOptions()
        self.key_smoothing = key_smoothing or KeySmoothing()
        self.weights_source = weights_source
        self.kind = vision_kind(self.model.visual)
        self.stride = vision_stride(self.model.visual)
        cfg = getattr(self.model.visual, "preprocess_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", getattr(self.model.visual, "image_mean", None) or OPENAI_MEAN))
        self.std = tuple(cfg.get("std", getattr(self.model.visual, "image_std", None) or OPENAI_STD))
        self._weights_id: str | None = None
        self._identity: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (f"ClipTeacher({self.model_name!r}, {self.kind}, embed_dim={self.embed_dim}, "
                f"weights={self.weights_source!r}, device={self.device})")

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_name: str, weights: str | Path | None = None,
                        device: str | torch.device = "auto", *, quick_gelu: bool | None = None,
                        preprocess: PreprocessConfig | None = None,
                        options: MaskClipOptions | None = None,
                        cache_dir: str | None = None,
                        key_smoothing: KeySmoothing | None = None) -> "ClipTeacher":
        """An open_clip architecture by name with weights from a local file or a pretrained tag.

        ``weights=None`` means the "openai" tag. ``quick_gelu=None`` picks QuickGELU for
        OpenAI weights (TorchScript files, "openai"-style tags) and the config's choice
        otherwise; pass True for an OpenAI state dict saved as a plain file.
        """
        import open_clip
        from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

        if model_name.startswith(("hf-hub:", "local-dir:")):
            # the scheme names its own weights; ``weights`` is ignored as in open_clip
            try:
                model = open_clip.create_model(model_name, cache_dir=cache_dir)
            except Exception as exc:
                raise WeightsNotFoundError(f"cannot load CLIP model '{model_name}': {exc}") from exc
            return cls(model, model_name, open_clip.get_tokenizer(model_name), device, preprocess,
                       options, model_name, key_smoothing)
        name = model_name.replace("/", "-")
        if open_clip.get_model_config(name) is None:
            raise ConfigError(f"unknown CLIP model '{model_name}'; open_clip knows e.g. "
                              f"ViT-B-16, ViT-B-32, ViT-L-14, RN50, RN101, RN50x4, RN50x16 "
                              f"(all: open_clip.list_models())")
        weights = "openai" if weights is None else str(weights)
        path = Path(weights).expanduser()
        if path.is_file():
            model = cls._load_local(name, path, quick_gelu)
            source = f"file:{path.resolve()}"
        elif _looks_like_path(weights):
            raise WeightsNotFoundError(f"CLIP weights file not found: {path}")
        else:
            tag_cfg = get_pretrained_cfg(name, weights)
            if not tag_cfg:
                raise WeightsNotFoundError(
                    f"'{weights}' is neither an existing weights file nor a pretrained tag of {name}; "
                    f"known tags: {list_pretrained_tags_by_model(name)}")
            qg = tag_cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu
            try:
                model = open_clip.create_model(name, pretrained=weights, force_quick_gelu=bool(qg),
                                               cache_dir=cache_dir)
            except Exception as exc:  # open_clip wraps every download failure in RuntimeError
                if "download" not in str(exc).lower():
                    raise CheckpointError(f"weights '{weights}' of {name} do not load: {exc}") from exc
                url = tag_cfg.get("url") or f"https://huggingface.co/{tag_cfg.get('hf_hub', '')}"
                raise WeightsNotFoundError(
                    f"could not download CLIP weights for tag '{weights}' of {name} ({exc}). "
                    f"On a machine without network access, fetch the file elsewhere (e.g. {url}) "
                    f"and pass its local path: ClipTeacher.from_pretrained('{name}', "
                    f"weights='/path/to/file.pt')") from exc
            source = f"tag:{weights}"
        tokenizer = open_clip.get_tokenizer(name)
        log.info("CLIP teacher %s loaded from %s", name, source)
        return cls(model, name, tokenizer, device, preprocess, options, source, key_smoothing)

    @staticmethod
    def _load_local(name: str, path: Path, quick_gelu: bool | None) -> torch.nn.Module:
        import open_clip

        if _is_torchscript(path):
            try:
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
            except Exception as exc:
                raise CheckpointError(f"{path}: unreadable TorchScript CLIP file ({exc})") from exc
            model = open_clip.create_model(name, pretrained=None,
                                           force_quick_gelu=True if quick_gelu is None else quick_gelu)
            # scalars OpenAI stores in its archives, and non-persistent buffers a trace keeps
            expected = set(model.state_dict())
            for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
                if key not in expected:
                    sd.pop(key, None)
            try:
                model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"{path}: weights do not fit CLIP model {name}: {exc}") from exc
            return model
        try:
            return open_clip.create_model(name, pretrained=str(path), force_quick_gelu=bool(quick_gelu))
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot load as weights of CLIP model {name}: {exc}") from exc

    @classmethod
    def from_config(cls, model_cfg: dict[str, Any], device: str | torch.device = "cpu", *,
                    model_name: str = "custom", seed: int | None = None,
                    preprocess: PreprocessConfig | None = None,
                    options: MaskClipOptions | None = None,
                    key_smoothing: KeySmoothing | None = None) -> "ClipTeacher":
        """A randomly initialised CLIP from ``{embed_dim, vision_cfg, text_cfg[, quick_gelu]}``.

        For tests and for checking shapes; ``vision_cfg.layers`` as an int gives a ViT, as a
        list of four a ModifiedResNet. The text tower must use CLIP's 49408-token BPE vocabulary.
        """
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        unknown = sorted(set(model_cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu",
                                           "init_logit_scale"})
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {unknown}")
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
        if missing:
            raise ConfigError(f"model config: missing key(s) {missing}")
        text_cfg = dict(model_cfg["text_cfg"])
        if text_cfg.get("vocab_size", 49408) < 49408:
            raise ConfigError("text_cfg.vocab_size must be >= 49408 (CLIP's BPE tokenizer)")
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = open_clip.model.CLIP(**model_cfg)
        except (TypeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"model config does not build a CLIP model: {exc}") from exc
        open_clip.model.set_model_preprocess_cfg(
            model, {"size": model.visual.image_size, "mean": OPENAI_MEAN, "std": OPENAI_STD,
                    "interpolation": "bicubic", "resize_mode": "shortest"})
        tokenizer = SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
        return cls(model, model_name, tokenizer, device, preprocess, options, "random", key_smoothing)

    # --- text ---------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint image-text space (512 for ViT-B/16, 1024 for RN50)."""
        return int(self.model.visual.output_dim)

    @property
    def weights_id(self) -> str:
        """Content hash of the text tower's weights (keys the text embedding cache)."""
        if self._weights_id is None:
            h = hashlib.blake2b(digest_size=16)
            for k, v in sorted(self.model.state_dict().items()):
                if k.startswith("visual.") or not isinstance(v, Tensor):
                    continue
                t = v.detach().float().cpu().contiguous()
                h.update(f"{k}:{tuple(t.shape)};".encode())
                h.update(t.view(-1).view(torch.uint8).numpy())
            self._weights_id = h.hexdigest()
        return self._weights_id

    def identity(self) -> dict[str, Any]:
        """What the MaskCLIP features depend on besides the image (``teachers.Teacher2D``):
        architecture, a digest of *all* weights, preprocessing, MaskCLIP options."""
        from dataclasses import asdict

        if self._identity is None:
            h = hashlib.sha256()
            for k, v in sorted(self.model.state_dict().items()):
                t = v.detach().float().cpu().contiguous()
                h.update(f"{k}:{tuple(t.shape)};".encode())
                h.update(t.view(-1).view(torch.uint8).numpy())
            self._identity = {"kind": "maskclip", "model_name": self.model_name, "weights": h.hexdigest(),
                              "preprocess": asdict(self.preprocess), "options": asdict(self.options),
                              "mean": list(self.mean), "std": list(self.std)}
            if self.key_smoothing.enabled:   # absent when off: today's cache keys stay valid
                self._identity["key_smoothing"] = asdict(self.key_smoothing)
        return self._identity

    def source_digest(self, view: Any) -> str:
        """MaskCLIP reads nothing but the image."""
        return ""

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """(T, D) L2-normalised text embeddings on ``self.device``."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ConfigError("encode_text expects a list of strings")
        if len(texts) == 0:
            return torch.zeros((0, self.embed_dim), device=self.device)
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), _TEXT_BATCH):
                tokens = self.tokenizer(list(texts[i:i + _TEXT_BATCH])).to(self.device)
                out.append(self._encode_tokens(tokens).float())
        return F.normalize(torch.cat(out), dim=-1)

    def _encode_tokens(self, tokens: Tensor) -> Tensor:
        """open_clip's ``encode_text``, run only up to the last end-of-text token of the batch.

        With CLIP's causal mask and end-of-text pooling, padding after the EOT token cannot
        change the output, and prompts are ~10 of 77 tokens: this is several times faster on
        a CPU with the same result. Other text towers use open_clip's own path.
        """
        m = self.model
        mask = getattr(m, "attn_mask", None)
        if (getattr(m, "text_pool_type", None) != "argmax" or mask is None
                or not hasattr(m, "token_embedding")):
            return m.encode_text(tokens)
        eot = tokens.argmax(dim=-1)                      # EOT has the largest token id
        n = int(eot.max()) + 1
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens[:, :n]).to(cast) + m.positional_embedding[:n].to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=mask[:n, :n]))
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if isinstance(m.text_projection, torch.nn.Linear):
            return m.text_projection(x)
        return x @ m.text_projection if m.text_projection is not None else x

    def text_bank(self, cache_dir: str | Path | None = None, use_cache: bool = True) -> TextEmbeddingBank:
        return TextEmbeddingBank(lambda t: self.encode_text(t), self.model_name,
                                 lambda: self.weights_id, cache_dir, use_cache)

    def text_embeddings(self, vocab: Vocabulary | Sequence[str],
                        templates: str | Sequence[str] = DEFAULT_TEMPLATES,
                        cache_dir: str | Path | None = None, use_cache: bool = True) -> Tensor:
        """(K, D) class embeddings (mean over templates × synonyms, re-normalised), cached on disk."""
        if not isinstance(vocab, Vocabulary):
            vocab = Vocabulary.from_names(list(vocab))
        return self.text_bank(cache_dir, use_cache).get(vocab, templates).to(self.device)

    # --- images -------------------------------------------------------------------------
    def prepare(self, images: np.ndarray | Tensor | Sequence[np.ndarray]) -> tuple[Tensor, ImageGeometry]:
        """Network input (B, 3, Hp, Wp) and the pixel ↔ grid mapping."""
        return preprocess_images(images, self.stride, self.preprocess, self.mean, self.std, self.device)

    def forward_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised dense (B, D, h, w) and pooled (B, D) features of a prepared input.

        With ``key_smoothing`` on, the dense features are smoothed (``refine.smooth_features``)
        rather than the class scores: scores are linear in the normalised features, so the
        argmax is the same, and every consumer of features (pixel_features, the cache, the
        node's fusion) gets the refinement without knowing the classes.
        """
        dense, pooled = [], []
        smooth = self.key_smoothing.enabled
        with torch.no_grad():
            for i in range(0, x.shape[0], _IMAGE_BATCH):
                if smooth:
                    d, p, k = dense_forward_with_keys(self.model.visual, x[i:i + _IMAGE_BATCH], self.options)
                    d = smooth_features(d.float(), k.float(), self.key_smoothing)
                else:
                    d, p = dense_forward(self.model.visual, x[i:i + _IMAGE_BATCH], self.options)
                dense.append(d.float())
                pooled.append(p.float())
        return F.normalize(torch.cat(dense), dim=1), F.normalize(torch.cat(pooled), dim=-1)

    def dense_features(self, images: np.ndarray | Tensor | Sequence[np.ndarray]) -> Tensor:
        """(B, D, h, w) MaskCLIP features, L2-normalised over D; (h, w) = padded size / stride."""
        x, _ = self.prepare(images)
        return self.forward_input(x)[0]

    def dense_features_with_geometry(self, images: np.ndarray | Tensor | Sequence[np.ndarray]
                                     ) -> tuple[Tensor, ImageGeometry]:
        """``dense_features`` plus the geometry needed to sample them at original pixels."""
        x, geo = self.prepare(images)
        return self.forward_input(x)[0], geo

    def dense_scores(self, images: np.ndarray | Tensor | Sequence[np.ndarray], text_emb: Tensor,
                     denoise_threshold: float | None = None, logit_scale: float | None = None) -> Tensor:
        """(B, K, h, w) cosine scores of the dense features against (K, D) class embeddings.

        ``denoise_threshold`` (MaskCLIP: 0.5) applies prompt denoising per image: classes whose
        confidence (softmax over classes of ``logit_scale`` × scores; None: the model's own
        scale, 100 for trained CLIP) stays below it at every cell get -inf.
        """
        if text_emb.ndim != 2 or text_emb.shape[1] != self.embed_dim:
            raise ConfigError(f"text embeddings must be (K, {self.embed_dim}), got {tuple(text_emb.shape)}")
        feats = self.dense_features(images)
        scores = torch.einsum("bdhw,kd->bkhw", feats, F.normalize(text_emb.to(feats), dim=-1))
        if denoise_threshold is None:
            return scores
        if logit_scale is None:
            logit_scale = min(float(self.model.logit_scale.exp()), 100.0)
        return prompt_denoise(scores, denoise_threshold, logit_scale)

    def encode_image(self, images: np.ndarray | Tensor | Sequence[np.ndarray]) -> Tensor:
        """(B, D) global image embeddings (class token / attention pool), L2-normalised."""
        x, _ = self.prepare(images)
        return self.forward_input(x)[1]

    def pixel_features(self, image: np.ndarray | Tensor, uv: np.ndarray, view: Any = None) -> Tensor:
        """(N, D) features at pixels ``uv`` (u column, v row) of one (H, W, 3) image.

        Bilinear on the feature grid, mapped through the resize; rows re-normalised.
        CalibrationError if a pixel lies outside the image. ``view`` (the sample/camera,
        ``teachers.TeacherView``) is unused: MaskCLIP needs the image alone.
        """
        feats, geo = self.dense_features_with_geometry(image)
        if feats.shape[0] != 1:
            raise ConfigError(f"pixel_features takes one image, got a batch of {feats.shape[0]}")
        return sample_grid(feats[0], uv, geo)

    @staticmethod
    def pseudo_labels(features: Tensor, text_emb: Tensor, return_scores: bool = False
                      ) -> Tensor | tuple[Tensor, Tensor]:
        """Class index of the most similar text embedding, per pixel or per point.

        ``features`` is (B, D, h, w) → labels (B, h, w), or (N, D) → labels (N,). With
        ``return_scores`` also returns the cosine similarity of the chosen class.
        """
        if text_emb.ndim != 2:
            raise ConfigError(f"text embeddings must be (K, D), got shape {tuple(text_emb.shape)}")
        dim = 1 if features.ndim == 4 else -1
        if features.ndim not in (2, 4) or features.shape[dim] != text_emb.shape[1]:
            raise ConfigError(f"features {tuple(features.shape)} do not match text embeddings "
                              f"{tuple(text_emb.shape)} (need (N, D) or (B, D, h, w) with the same D)")
        f = F.normalize(features.float(), dim=dim)
        t = F.normalize(text_emb.to(f.device, torch.float32), dim=-1)
        logits = torch.einsum("bdhw,kd->bkhw", f, t) if features.ndim == 4 else f @ t.T
        scores, labels = logits.max(dim=dim)
        return (labels, scores) if return_scores else labels
