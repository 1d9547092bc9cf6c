"""CLIP side of CLIP2Scene: the frozen teacher (text + MaskCLIP pixel features) and vocabularies.

Importing this package does not import open_clip or download anything; open_clip is loaded
when a ``ClipTeacher`` is built.
"""
from .maskclip import MaskClipOptions
from .preprocess import ImageGeometry, PreprocessConfig, preprocess_images, sample_grid
from .prompts import DEFAULT_TEMPLATES, TEMPLATE_SETS, resolve_templates
from .refine import KeySmoothing, key_smoothing, kept_classes, prompt_denoise
from .teacher import ClipTeacher, register_model_config
from .text_bank import (TextEmbeddingBank, TextEmbeddings, default_cache_dir,
                        load_text_embeddings, save_text_embeddings)
from .vocabulary import Vocabulary

__all__ = [
    "ClipTeacher", "register_model_config", "MaskClipOptions", "PreprocessConfig", "ImageGeometry",
    "preprocess_images", "sample_grid",
    "Vocabulary", "TextEmbeddingBank", "TextEmbeddings", "save_text_embeddings",
    "load_text_embeddings", "default_cache_dir", "DEFAULT_TEMPLATES", "TEMPLATE_SETS",
    "resolve_templates", "KeySmoothing", "key_smoothing", "kept_classes", "prompt_denoise",
]
