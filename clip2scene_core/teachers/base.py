"""The 2D teacher interface of pre-training, content digests for cache keys, and the adapter
that keeps teachers written before this interface working.

Pre-training distils whatever a 2D teacher says about the pixels that LiDAR points hit into
the 3D network. Training asks a teacher for exactly four things (``Teacher2D``): a name, an
identity (what its features depend on besides the image), a digest of the per-image files it
reads, class embeddings for a vocabulary, and features at pixels of one image of a known
sample/camera. Anything with these members is a teacher: CLIP (``ClipTeacher``), a dataset's
2D annotations (``LabelImageTeacher``), saved outputs of any 2D network
(``StoredPredictionTeacher``), or your own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import Clip2SceneError, ConfigError
from ..label_spaces import match_classes

__all__ = ["TeacherView", "Teacher2D", "TeacherError", "LegacyTeacher", "as_teacher", "identity_digest",
           "file_digest", "array_digest", "state_fingerprint", "require_known_classes", "TEACHER_METHODS"]

log = logging.getLogger(__name__)

#: what training calls on a teacher (checked by ``as_teacher``)
TEACHER_METHODS = ("identity", "source_digest", "text_embeddings", "pixel_features")


class TeacherError(Clip2SceneError, ValueError):
    """A teacher object does not fit the interface, or cannot find/read what it needs."""


@dataclass(frozen=True)
class TeacherView:
    """Which image a teacher is asked about: the sample (``token``, ``scene``) and the camera.

    Teachers that read something other than the image (a label image, a stored prediction)
    find their file from these fields; ``stamp_ns`` is the image's time stamp (0 if unknown).
    """

    token: str
    camera: str
    scene: str = ""
    stamp_ns: int = 0

    def fields(self) -> dict[str, Any]:
        """Values for path patterns: ``{token}``, ``{camera}``, ``{scene}``, ``{stamp_ns}``."""
        return {"token": self.token, "camera": self.camera, "scene": self.scene, "stamp_ns": self.stamp_ns}


@runtime_checkable
class Teacher2D(Protocol):
    """Everything pre-training calls on a 2D teacher.

    * ``model_name``: recorded in checkpoints (``clip_model``) and logs.
    * ``identity()``: JSON-able description of everything the features depend on *besides*
      the image and the per-image sources: weight digests, class lists, settings. Its digest
      is part of every cache key, so two teachers that differ in any of it never share cache
      entries. Use ``file_digest`` / ``array_digest`` / ``state_fingerprint`` for the values.
    * ``source_digest(view)``: digest of the files read for this one image (``""`` when the
      features come from the image alone). Part of the cache key too: editing a label image
      or re-running the 2D network invalidates exactly the entries that used it.
    * ``text_embeddings(vocab, templates, cache_dir=None)``: (K, D) class embeddings of the
      vocabulary's classes, in its order. Pseudo-labels are the argmax of
      ``normalize(pixel feature) · normalize(class embedding)``; the 3D network learns to
      match both. ``templates``/``cache_dir`` matter to text encoders only.
    * ``pixel_features(image, uv, view)``: (N, D) features at pixels ``uv`` (float (N, 2),
      u = column, v = row, pixel centres at integers, inside the image) of ``image``
      ((H, W, 3) uint8 RGB) seen by ``view``. A row of zeros or NaN means "no opinion"
      (e.g. an unlabelled pixel): that point gets no target.
    """

    model_name: str

    def identity(self) -> dict[str, Any]: ...

    def source_digest(self, view: TeacherView) -> str: ...

    def text_embeddings(self, vocab: Any, templates: Any = ..., cache_dir: str | Path | None = None
                        ) -> torch.Tensor: ...

    def pixel_features(self, image: np.ndarray, uv: np.ndarray, view: TeacherView) -> torch.Tensor: ...


# ----------------------------------------------------------------------------- digests
def _sha(*parts: bytes | str) -> "hashlib._Hash":
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h


def identity_digest(identity: Mapping[str, Any]) -> str:
    """SHA-256 of a teacher identity (canonical JSON); what cache keys are built from."""
    try:
        text = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TeacherError(f"teacher identity must be JSON data (str, numbers, lists, dicts): {exc}") from exc
    return _sha("teacher-identity", text).hexdigest()


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (remembered per (path, size, mtime), so training epochs that
    rebuild cache keys do not re-read unchanged files)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise TeacherError(f"teacher source not readable: {p} ({exc.strerror or exc})") from exc
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    got = _FILE_DIGESTS.get(key)
    if got is None:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        got = h.hexdigest()
        if len(_FILE_DIGESTS) > 100_000:
            _FILE_DIGESTS.clear()
        _FILE_DIGESTS[key] = got
    return got


def array_digest(a: np.ndarray | torch.Tensor) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().contiguous().numpy() if a.dtype != torch.bfloat16 else a.detach().float().cpu().numpy()
    a = np.ascontiguousarray(a)
    return _sha(str(a.dtype), str(a.shape), a.tobytes()).hexdigest()


def _code_text(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        code = getattr(obj, "__code__", None)
        return code.co_code.hex() if code is not None else ""


def state_fingerprint(obj: Any, *, max_depth: int = 8) -> str:
    """Digest of an object's class code and its whole state (attributes, arrays, tensors,
    module weights, nested containers). For teachers that do not describe themselves: two
    objects whose code or data differ get different fingerprints, whatever they are named.
    Opaque objects (no ``__dict__``, not a known type) count by their type only."""
    h = hashlib.sha256()
    seen: set[int] = set()

    def put(tag: str, data: bytes | str = b"") -> None:
        b = data.encode() if isinstance(data, str) else data
        h.update(tag.encode() + b"\0" + len(b).to_bytes(8, "little"))
        h.update(b)

    def walk(x: Any, depth: int) -> None:
        if depth > max_depth:
            put("deep", type(x).__qualname__)
            return
        if x is None or isinstance(x, (bool, int, float, complex, str, bytes)):
            put(type(x).__name__, repr(x) if not isinstance(x, bytes) else x)
            return
        if isinstance(x, (Path, os.PathLike)):
            put("path", os.fspath(x))
            return
        if isinstance(x, (np.ndarray, np.generic, torch.Tensor)):
            put("array", array_digest(np.asarray(x) if isinstance(x, np.generic) else x))
            return
        if id(x) in seen:
            put("cycle")
            return
        seen.add(id(x))
        if isinstance(x, torch.nn.Module):
            put("module", type(x).__qualname__)
            for k, v in sorted(x.state_dict().items()):
                put("param", k)
                walk(v, depth + 1)
            return
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            put("dataclass", type(x).__qualname__)
            for f in dataclasses.fields(x):
                put("field", f.name)
                walk(getattr(x, f.name), depth + 1)
            return
        if isinstance(x, Mapping):
            put("map", str(len(x)))
            for k in sorted(x, key=repr):
                walk(k, depth + 1)
                walk(x[k], depth + 1)
            return
        if isinstance(x, (set, frozenset)):
            put("set", str(len(x)))
            for v in sorted(x, key=repr):
                walk(v, depth + 1)
            return
        if isinstance(x, Sequence):
            put("seq", f"{type(x).__qualname__}:{len(x)}")
            for v in x:
                walk(v, depth + 1)
            return
        if inspect.isfunction(x) or inspect.ismethod(x) or inspect.isclass(x):
            put("code", f"{getattr(x, '__module__', '')}.{getattr(x, '__qualname__', '')}")
            put("src", _code_text(x))
            if inspect.ismethod(x):
                walk(x.__self__, depth + 1)
            return
        if inspect.ismodule(x):
            put("module-name", x.__name__)
            return
        put("object", f"{type(x).__module__}.{type(x).__qualname__}")
        put("src", _code_text(type(x)))
        state = getattr(x, "__dict__", None)
        if state is not None:
            walk(dict(state), depth + 1)
        slots = getattr(type(x), "__slots__", ())
        for s in ([slots] if isinstance(slots, str) else slots):
            if hasattr(x, s):
                put("slot", s)
                walk(getattr(x, s), depth + 1)

    walk(obj, 0)
    return h.hexdigest()


# ----------------------------------------------------------------------------- old-style teachers
def _accepts_view(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    if "view" in params:
        return True
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values()) or \
        sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            for p in params.values()) >= 3


class LegacyTeacher:
    """Wraps a teacher written before ``Teacher2D`` (``pixel_features(image, uv)`` and
    ``text_embeddings``, optionally ``cache_id``/``cache_preprocess``/``model``).

    Its identity is its declared ``cache_id``/``cache_preprocess`` *plus* a fingerprint of its
    class code and whole state (``state_fingerprint``), so two such teachers with the same
    name but different code, weights or data never share cache entries. It reads nothing but
    the image (``source_digest`` is ``""``).
    """

    reads_sources = False

    def __init__(self, teacher: Any) -> None:
        self.teacher = teacher
        self.model_name = str(getattr(teacher, "model_name", type(teacher).__name__))
        self._with_view = _accepts_view(teacher.pixel_features)
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            t = self.teacher
            pre = getattr(t, "cache_preprocess", None)
            self._identity = {
                "kind": "legacy",
                "class": f"{type(t).__module__}.{type(t).__qualname__}",
                "model_name": self.model_name,
                "cache_id": getattr(t, "cache_id", None),
                "cache_preprocess": json.loads(json.dumps(pre, default=str)) if pre is not None else None,
                "state": state_fingerprint(t),
            }
        return self._identity

    def source_digest(self, view: TeacherView) -> str:  # the image is its only input
        return ""

    def text_embeddings(self, vocab, templates=None, cache_dir=None) -> torch.Tensor:
        if templates is None:
            return self.teacher.text_embeddings(vocab, cache_dir=cache_dir)
        return self.teacher.text_embeddings(vocab, templates, cache_dir=cache_dir)

    def pixel_features(self, image: np.ndarray, uv: np.ndarray, view: TeacherView | None = None) -> torch.Tensor:
        if self._with_view:
            return self.teacher.pixel_features(image, uv, view)
        return self.teacher.pixel_features(image, uv)

    def __getattr__(self, name: str) -> Any:      # embed_dim, device, ... of the wrapped object
        if name == "teacher":
            raise AttributeError(name)
        return getattr(self.teacher, name)


def as_teacher(obj: Any) -> Any:
    """``obj`` itself when it implements ``Teacher2D``; a ``LegacyTeacher`` around an object that
    has only ``pixel_features`` and ``text_embeddings``; otherwise a TeacherError naming the
    missing methods."""
    if obj is None:
        raise TeacherError("no teacher given")
    missing_core = [m for m in ("pixel_features", "text_embeddings") if not callable(getattr(obj, m, None))]
    if missing_core:
        raise TeacherError(
            f"{type(obj).__name__} is not a 2D teacher: it has no {' and no '.join(missing_core)} method. "
            f"A teacher implements {', '.join(TEACHER_METHODS)} and a model_name "
            f"(clip2scene_core.teachers.Teacher2D; README, 'Your own 2D teacher').")
    if all(callable(getattr(obj, m, None)) for m in TEACHER_METHODS) and _accepts_view(obj.pixel_features):
        return obj
    log.info("%s has no identity()/source_digest()/view argument: wrapped as a LegacyTeacher "
             "(identity = cache_id + fingerprint of its code and state)", type(obj).__name__)
    return LegacyTeacher(obj)


def require_known_classes(vocab_names: Sequence[str], known: Sequence[str], who: str) -> list[int]:
    """Index in ``known`` of every vocabulary class (names matched by
    ``label_spaces.match_classes``); a ConfigError lists the classes the teacher knows when
    one is missing."""
    index = match_classes(vocab_names, known, allow_missing=True)
    missing = [n for n, i in zip(vocab_names, index) if i < 0]
    if missing:
        raise ConfigError(f"{who} has no class {missing}; it knows {list(known)}")
    return index.tolist()
