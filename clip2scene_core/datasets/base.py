"""Shared pieces of the readers: the lazy indexable base class and file loaders with clear errors."""
from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import Clip2SceneError, ConfigError, ImageDecodeError, InvalidPointCloudError
from .sample import Sample

__all__ = ["DatasetReader", "require_file", "load_points_bin", "load_label_array", "read_rgb",
           "load_pickle", "PICKLE_RISK"]


class DatasetReader(ABC):
    """A sequence of Samples: the index is built up front, files are read only in ``__getitem__``.

    Keeping the constructor cheap matters for training: a DataLoader worker pickles the reader and
    each worker reads only the frames it is given.

    Contract of a reader (registered in ``registry.READERS`` under the name configs use):

    * constructor: keyword arguments = the config's ``data.args`` (relative paths under keys
      ending in root, path, pkl, file, bag or posed_images are made absolute by training's
      ``build_reader``); cheap, no file contents read;
    * ``__len__`` and ``_load(i) -> Sample`` (``Sample.labels``: (N,) int64 class index into
      ``Sample.class_names``, -1 = ignore, or None without ground truth);
    * ``sample_scenes()`` from the index when it can (the fallback here reads every sample).
    """

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _load(self, index: int) -> Sample: ...

    def __getitem__(self, index: int) -> Sample:
        n = len(self)
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {n} samples")
        return self._load(i)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self._load(i)

    def sample_scenes(self) -> list[str]:
        """Scene id of every sample, in order (for scene-level subsampling).

        The readers here answer from their index without reading any file; this fallback loads
        every sample.
        """
        return [self._load(i).scene for i in range(len(self))]


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` or raise FileNotFoundError naming what was looked for and where."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return Path(path)


def load_points_bin(path: Path, num_fields: int, what: str = "point cloud") -> np.ndarray:
    """Raw float32 records of ``num_fields`` values (KITTI/nuScenes ``.bin``) as (N, num_fields)."""
    require_file(path, what)
    size = Path(path).stat().st_size
    stride = 4 * num_fields
    if size % stride:
        raise InvalidPointCloudError(
            f"{path}: {size} bytes is not a multiple of {stride} ({num_fields} float32 per point)")
    return np.fromfile(path, dtype=np.float32).reshape(-1, num_fields)


def load_label_array(path: Path, dtype: Any, count: int, what: str = "label file") -> np.ndarray:
    """Per-point labels stored raw (``.label``, ``_lidarseg.bin``) or as ``.npy``; count checked."""
    require_file(path, what)
    if str(path).endswith(".npy"):
        labels = np.load(path).reshape(-1)
    else:
        labels = np.fromfile(path, dtype=dtype)
    if labels.shape[0] != count:
        raise InvalidPointCloudError(f"{path}: {labels.shape[0]} labels for {count} points")
    return labels


def read_rgb(path: Path, what: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file (OpenCV reads BGR; converted here)."""
    import cv2  # imported lazily: readers without images should not need OpenCV

    require_file(path, what)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageDecodeError(f"cannot decode {what}: {path}")
    return np.ascontiguousarray(img[:, :, ::-1])


#: what ``trust_pickle`` means, in the words every refusal uses
PICKLE_RISK = ("a Python pickle runs the code a crafted file names while it is read, like a "
               "script you execute")


def load_pickle(path: Path, what: str = "info file", *, trust_pickle: bool = False) -> Any:
    """Unpickle an mmdet3d-style info file (plain dicts/lists/numpy).

    Unpickling runs code from the file, so it is opt-in: ``trust_pickle=True`` (CLI
    ``--trust-pickle``, training config ``data.args.trust_pickle: true``) declares that the
    file is trusted like a program you run. Without it a :class:`ConfigError` says so and
    nothing is read.
    """
    require_file(path, what)
    if trust_pickle is not True:
        raise ConfigError(f"{what} {path} is a pickle and {PICKLE_RISK}: it is only read with "
                          "trust_pickle=True (CLI: --trust-pickle; training config: "
                          "data.args.trust_pickle: true), for files you trust")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise Clip2SceneError(f"cannot read {what} {path}: {exc}") from exc
