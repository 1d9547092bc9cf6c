"""2D teachers of pre-training: the ``Teacher2D`` interface and teachers that need no CLIP.

* ``clip2scene_core.clip.ClipTeacher`` — MaskCLIP features + CLIP text embeddings;
* ``LabelImageTeacher`` — per-pixel class images (2D annotations, a segmenter's argmax);
* ``StoredPredictionTeacher`` — per-image logits / probabilities / features saved from any 2D
  network.

Write your own by implementing the four methods of ``Teacher2D`` (README, "Your own 2D
teacher"); ``as_teacher`` wraps older objects that have only ``pixel_features(image, uv)``
and ``text_embeddings``.
"""
from .base import (TEACHER_METHODS, LegacyTeacher, Teacher2D, TeacherError, TeacherView, array_digest,
                   as_teacher, file_digest, identity_digest, require_known_classes, state_fingerprint)
from .labels import LabelImageTeacher, read_label_image, rellis3d_label_teacher
from .sources import SourceLocator, class_unit_vectors
from .stored import StoredPredictionTeacher, load_prediction_array

__all__ = [
    "Teacher2D", "TeacherView", "TeacherError", "LegacyTeacher", "as_teacher", "TEACHER_METHODS",
    "identity_digest", "file_digest", "array_digest", "state_fingerprint", "require_known_classes",
    "LabelImageTeacher", "read_label_image", "rellis3d_label_teacher", "StoredPredictionTeacher",
    "load_prediction_array", "SourceLocator", "class_unit_vectors",
]
