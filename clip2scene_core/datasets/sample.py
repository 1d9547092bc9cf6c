"""``Sample``: what every dataset reader returns for one key frame."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidPointCloudError
from ..types import CameraFrame, Scan
from .classes import CLASS_NAMES


@dataclass
class Sample:
    """One LiDAR key frame with its cameras, labels and earlier sweeps.

    ``labels``: (N,) int64 index into ``class_names`` (-1 = ignore), or None when unlabelled.
    ``sweeps``: earlier sweeps, each with the 4×4 transform sweep-lidar → key-frame lidar.
    ``scene``: scene id, so training can subsample whole scenes (CLIP2Scene's label-efficiency
    splits). ``class_names`` defaults to the list of ``vocabulary_name``; a user dataset
    without a preset sets ``vocabulary_name=None`` and passes its own names.
    """

    scan: Scan
    cameras: list[CameraFrame] = field(default_factory=list)
    labels: np.ndarray | None = None
    sweeps: list[tuple[Scan, np.ndarray]] = field(default_factory=list)
    lidar_to_world: np.ndarray | None = None
    vocabulary_name: str | None = None
    token: str = ""
    scene: str = ""
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.class_names is None and self.vocabulary_name in CLASS_NAMES:
            self.class_names = CLASS_NAMES[self.vocabulary_name]
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (len(self.scan),):
                raise InvalidPointCloudError(
                    f"sample '{self.token}': {labels.shape[0] if labels.ndim else 0} labels for "
                    f"{len(self.scan)} points")
            labels = labels.astype(np.int64, copy=False)
            if labels.size and self.class_names is not None:
                if labels.min() < -1 or labels.max() >= len(self.class_names):
                    raise InvalidPointCloudError(
                        f"sample '{self.token}': labels outside [-1, {len(self.class_names) - 1}]")
            self.labels = labels
        for i, (_, T) in enumerate(self.sweeps):
            if np.asarray(T).shape != (4, 4):
                raise InvalidPointCloudError(f"sample '{self.token}': sweep {i} transform is not 4x4")

    @property
    def num_points(self) -> int:
        return len(self.scan)
