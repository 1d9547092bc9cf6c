"""The data the whole package passes around: one name per concept.

``Scan`` (a LiDAR sweep), ``CameraModel`` (intrinsics as in a ROS CameraInfo),
``Calibration`` (a camera model plus the LiDAR→camera extrinsic), ``CameraFrame``
(an RGB image with its calibration). Plain numpy only: no torch, no ROS types.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .distortion import resolve_distortion_model
from .errors import CalibrationError, InvalidPointCloudError


@dataclass
class Scan:
    """One LiDAR sweep: ``points`` is (N, C) float32, column names in ``fields``.

    The first three fields are always x, y, z in the sensor frame ``frame_id`` (metres).
    """

    points: np.ndarray
    fields: tuple[str, ...] = ("x", "y", "z", "intensity")
    frame_id: str = "lidar"
    stamp_ns: int = 0

    def __post_init__(self) -> None:
        pts = np.asarray(self.points)
        if pts.ndim != 2:
            raise InvalidPointCloudError(f"Scan.points must be (N, C), got shape {pts.shape}")
        self.fields = tuple(self.fields)
        if pts.shape[1] != len(self.fields):
            raise InvalidPointCloudError(
                f"Scan.points has {pts.shape[1]} columns but fields are {self.fields}")
        if self.fields[:3] != ("x", "y", "z"):
            raise InvalidPointCloudError(f"first three fields must be x, y, z, got {self.fields[:3]}")
        self.points = np.ascontiguousarray(pts, dtype=np.float32)

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @property
    def xyz(self) -> np.ndarray:
        return self.points[:, :3]

    def has(self, name: str) -> bool:
        return name in self.fields

    def column(self, name: str) -> np.ndarray:
        try:
            return self.points[:, self.fields.index(name)]
        except ValueError:
            raise InvalidPointCloudError(f"scan has no field '{name}' (fields: {self.fields})") from None

    def select(self, mask: np.ndarray) -> "Scan":
        return Scan(self.points[mask], self.fields, self.frame_id, self.stamp_ns)


@dataclass
class CameraModel:
    """Pinhole camera with lens distortion, the fields of a ROS ``CameraInfo``.

    ``K`` is the 3×3 intrinsic matrix, ``D`` the distortion vector of ``distortion_model``
    (plumb_bob: k1 k2 p1 p2 k3; rational_polynomial: k1 k2 p1 p2 k3 k4 k5 k6;
    equidistant: k1 k2 k3 k4). Images are ``width``×``height`` pixels.
    """

    width: int
    height: int
    K: np.ndarray
    D: np.ndarray = field(default_factory=lambda: np.zeros(0))
    distortion_model: str = "plumb_bob"

    def __post_init__(self) -> None:
        self.K = np.asarray(self.K, dtype=np.float64).reshape(3, 3)
        self.D = np.asarray(self.D, dtype=np.float64).reshape(-1)
        self.distortion_model = resolve_distortion_model(self.distortion_model, self.D)
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise CalibrationError(f"image size must be positive, got {self.width}x{self.height}")
        self.width, self.height = int(self.width), int(self.height)
        fx, fy = self.K[0, 0], self.K[1, 1]
        if not np.all(np.isfinite(self.K)) or fx <= 0 or fy <= 0:
            raise CalibrationError(f"degenerate intrinsics K={self.K.tolist()}")


@dataclass
class Calibration:
    """A camera model and the rigid transform taking LiDAR points into the camera's optical frame."""

    camera: CameraModel
    lidar_to_camera: np.ndarray = field(default_factory=lambda: np.eye(4))

    def __post_init__(self) -> None:
        T = np.asarray(self.lidar_to_camera, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise CalibrationError(f"lidar_to_camera must be a finite 4x4 matrix, got {T.shape}")
        R = T[:3, :3]
        if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or not np.allclose(T[3], [0, 0, 0, 1]):
            raise CalibrationError("lidar_to_camera is not a rigid transform")
        self.lidar_to_camera = T


@dataclass
class CameraFrame:
    """An RGB image (H, W, 3) uint8 from camera ``name`` with its calibration at ``stamp_ns``."""

    name: str
    image: np.ndarray
    calibration: Calibration
    stamp_ns: int = 0

    def __post_init__(self) -> None:
        img = np.asarray(self.image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise CalibrationError(
                f"camera '{self.name}': image must be (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")
        cam = self.calibration.camera
        if (img.shape[1], img.shape[0]) != (cam.width, cam.height):
            raise CalibrationError(
                f"camera '{self.name}': image is {img.shape[1]}x{img.shape[0]} but calibration says "
                f"{cam.width}x{cam.height}")
        self.image = img
