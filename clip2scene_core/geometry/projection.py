"""Project LiDAR points into camera images: the link between 3D points and CLIP pixel features."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import CalibrationError, InvalidPointCloudError
from ..types import Calibration
from .camera import check_camera_model, distort, max_valid_radius, to_pixels

__all__ = ["Projection", "project_points", "project_to_cameras"]


@dataclass
class Projection:
    """Where each point lands in one image.

    ``uv`` (N, 2) float64 pixel coordinates (u = column, v = row; NaN where undefined),
    ``depth`` (N,) float64 z in the camera optical frame, ``valid`` (N,) bool: finite,
    depth ≥ min_depth, inside [0, W) × [0, H) and within the lens model's valid radius.
    """

    uv: np.ndarray
    depth: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return int(self.valid.shape[0])

    def select(self, mask: np.ndarray) -> "Projection":
        """The rows of the points in ``mask`` (bool (N,) or indices): a projection of all of a
        scan's points serves any subset of them (e.g. the points a segmenter kept)."""
        return Projection(uv=self.uv[mask], depth=self.depth[mask], valid=self.valid[mask])

    @property
    def pixel_indices(self) -> np.ndarray:
        """(M, 2) int64 (column, row) of the valid points, for indexing images as img[row, col]."""
        return np.floor(self.uv[self.valid]).astype(np.int64)


def _as_xyz(xyz: np.ndarray) -> np.ndarray:
    arr = np.asarray(xyz)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise InvalidPointCloudError(f"points must be (N, 3) (or (N, C>=3)), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise InvalidPointCloudError(f"points must be numeric, got dtype {arr.dtype}")
    return arr[:, :3].astype(np.float64, copy=False)


def _project(pts: np.ndarray, calibration: Calibration, min_depth: float) -> Projection:
    """The lens model runs on the points in front of the camera only (about half of a
    360° sweep, so a ring of cameras costs half as much): the others come back NaN / invalid."""
    if not isinstance(calibration, Calibration):
        raise CalibrationError(f"expected a Calibration, got {type(calibration).__name__}")
    cam = calibration.camera
    check_camera_model(cam)
    T = calibration.lidar_to_camera
    n = pts.shape[0]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        # one matrix-vector product per camera axis: cheaper than (N, 3) @ (3, 3) + an
        # (N, 3) finiteness reduction
        R, t = T[:3, :3], T[:3, 3]
        xc, yc, depth = pts @ R[0] + t[0], pts @ R[1] + t[1], pts @ R[2] + t[2]
        finite = np.isfinite(xc) & np.isfinite(yc) & np.isfinite(depth)
        ahead = np.flatnonzero(finite & (depth >= min_depth) & (depth > 0))
        z = depth[ahead]
        x = xc[ahead] / z
        y = yc[ahead] / z
        in_model = x * x + y * y < max_valid_radius(cam) ** 2
        xd, yd = distort(cam, x, y)
        uv_ahead = to_pixels(cam, xd, yd)
        u, v = uv_ahead[:, 0], uv_ahead[:, 1]
        inside = (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)
    uv = np.full((n, 2), np.nan)
    uv[ahead] = uv_ahead
    valid = np.zeros(n, dtype=bool)
    valid[ahead] = in_model & inside & np.isfinite(u) & np.isfinite(v)
    return Projection(uv=uv, depth=np.where(finite, depth, np.nan), valid=valid)


def project_points(xyz: np.ndarray, calibration: Calibration, min_depth: float = 0.5) -> Projection:
    """Project (N, 3) LiDAR-frame points into one camera.

    Non-finite points come back invalid (never an exception); a degenerate calibration raises
    CalibrationError; a wrongly shaped array raises InvalidPointCloudError.
    """
    if not np.isfinite(min_depth) or min_depth < 0:
        raise CalibrationError(f"min_depth must be a finite number >= 0, got {min_depth}")
    return _project(_as_xyz(xyz), calibration, float(min_depth))


def project_to_cameras(xyz: np.ndarray, calibrations: Sequence[Calibration],
                       min_depth: float = 0.5) -> list[Projection]:
    """One Projection per calibration, in order (an empty list for no cameras)."""
    if not np.isfinite(min_depth) or min_depth < 0:
        raise CalibrationError(f"min_depth must be a finite number >= 0, got {min_depth}")
    pts = _as_xyz(xyz)
    return [_project(pts, c, float(min_depth)) for c in calibrations]
