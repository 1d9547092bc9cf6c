"""RELLIS-3D reader: an off-road "user dataset" with its own ontology (Ouster OS1 + Basler camera).

Works on the release layout (``<seq>/os1_cloud_node_kitti_bin/*.bin``,
``os1_cloud_node_semantickitti_label_id/*.label``, ``pylon_camera_node/frame<stem>-*.jpg``) and
on a flat folder holding the same files (the ``utils/example`` sample). Calibration files:
``camera_info.txt`` (``fx fy cx cy``) and ``transforms.yaml``
(``os1_cloud_node-pylon_camera_node``: q w,x,y,z + t), which is the camera pose in the LiDAR
frame, so lidar → camera = inverse([R(q) | t]) (as RELLIS-3D's own lidar2img notebook reads it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from ..errors import CalibrationError
from ..geometry.transforms import invert_transform, transform_from_quat_wxyz
from ..types import Calibration, CameraFrame, CameraModel, Scan
from .base import DatasetReader, load_label_array, load_points_bin, read_rgb, require_file
from .classes import RELLIS3D_CLASSES, rellis3d_to_index
from .sample import Sample

__all__ = ["Rellis3DReader", "read_rellis_calibration", "RELLIS3D_NOTEBOOK_DISTORTION"]

# plumb_bob coefficients printed in RELLIS-3D's lidar2img notebook (not stored in a data file).
RELLIS3D_NOTEBOOK_DISTORTION: tuple[float, ...] = (-0.134313, -0.025905, 0.002181, 0.00084, 0.0)
_EXTRINSIC_KEY = "os1_cloud_node-pylon_camera_node"


def read_rellis_calibration(folder: str | Path, width: int = 1920, height: int = 1200,
                            distortion: Sequence[float] | None = None) -> Calibration:
    """Calibration from ``camera_info.txt`` + ``transforms.yaml`` in ``folder``.

    ``distortion=None`` gives a pinhole model (how the README's 7428-point check was made);
    pass RELLIS3D_NOTEBOOK_DISTORTION for the plumb_bob model of the raw images.
    """
    folder = Path(folder)
    info = require_file(folder / "camera_info.txt", "RELLIS-3D camera_info.txt")
    try:
        fx, fy, cx, cy = (float(v) for v in info.read_text().split())
    except ValueError as exc:
        raise CalibrationError(f"{info}: expected 4 numbers 'fx fy cx cy': {exc}") from exc
    tf_path = require_file(folder / "transforms.yaml", "RELLIS-3D transforms.yaml")
    try:
        tf = yaml.safe_load(tf_path.read_text())[_EXTRINSIC_KEY]
        q = [tf["q"][k] for k in ("w", "x", "y", "z")]
        t = [tf["t"][k] for k in ("x", "y", "z")]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise CalibrationError(f"{tf_path}: no '{_EXTRINSIC_KEY}' with q (w,x,y,z) and t: {exc}") from exc
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    if distortion is None:
        cam = CameraModel(width, height, K, [], "none")
    else:
        cam = CameraModel(width, height, K, list(distortion), "plumb_bob")
    return Calibration(cam, invert_transform(transform_from_quat_wxyz(t, q)))


class Rellis3DReader(DatasetReader):
    """Ouster scans of a RELLIS-3D folder with ontology labels mapped to ``RELLIS3D_CLASSES``.

    The labels index RELLIS3D_CLASSES (void → -1, label space ``rellis3d``); ``vocabulary_name``
    is None and ``Sample.class_names`` carries the names, as for a user's dataset. Points with no
    return are (0, 0, 0) in the files (53,364 of the 131,072 of the bundled frame); by default
    they are kept so point i is row i of the file. ``drop_no_return=True`` removes them (with
    their labels): they are not measurements, and at the sensor's origin they would otherwise
    pile into one voxel and count in every metric.
    """

    def __init__(self, root: str | Path, distortion: Sequence[float] | None = None,
                 load_images: bool = True, drop_no_return: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"RELLIS-3D folder not found: {self.root}")
        bins = self.root / "os1_cloud_node_kitti_bin"
        self._bin_dir = bins if bins.is_dir() else self.root
        labels = self.root / "os1_cloud_node_semantickitti_label_id"
        self._label_dir = labels if labels.is_dir() else self._bin_dir
        images = self.root / "pylon_camera_node"
        self._image_dir = images if images.is_dir() else self.root
        # Ouster scans are named by frame number only; skip e.g. the Velodyne "vel000104.bin".
        self._stems = sorted(p.stem for p in self._bin_dir.glob("*.bin") if p.stem.isdigit())
        self.distortion = distortion
        self.load_images = load_images
        self.drop_no_return = bool(drop_no_return)
        self._calibration: Calibration | None = None

    def __len__(self) -> int:
        return len(self._stems)

    def sample_scenes(self) -> list[str]:
        return [self.root.name] * len(self._stems)

    @property
    def calibration(self) -> Calibration:
        if self._calibration is None:
            self._calibration = read_rellis_calibration(self.root, distortion=self.distortion)
        return self._calibration

    def image_path(self, index: int) -> Path | None:
        """``frame<stem>-<stamp>.jpg`` of frame ``index``, or None when there is none."""
        matches = sorted(self._image_dir.glob(f"frame{self._stems[index]}-*.jpg"))
        return matches[0] if matches else None

    def _load(self, index: int) -> Sample:
        stem = self._stems[index]
        pts = load_points_bin(self._bin_dir / f"{stem}.bin", 4, "RELLIS-3D scan")
        scan = Scan(pts, ("x", "y", "z", "intensity"), frame_id="os1_cloud_node")
        labels = None
        label_path = self._label_dir / f"{stem}.label"
        if label_path.is_file():
            labels = rellis3d_to_index(load_label_array(label_path, np.uint32, len(scan),
                                                        "RELLIS-3D label file"))
        if self.drop_no_return:
            keep = np.flatnonzero(np.any(scan.xyz != 0.0, axis=1))
            scan = scan.select(keep)
            labels = labels[keep] if labels is not None else None
        cameras = []
        img = self.image_path(index) if self.load_images else None
        if img is not None:
            rgb = read_rgb(img, "RELLIS-3D image")
            base = self.calibration
            cam = CameraModel(rgb.shape[1], rgb.shape[0], base.camera.K, base.camera.D,
                              base.camera.distortion_model)
            cameras.append(CameraFrame("pylon_camera_node", rgb, Calibration(cam, base.lidar_to_camera)))
        return Sample(scan=scan, cameras=cameras, labels=labels, sweeps=[], lidar_to_world=None,
                      vocabulary_name=None, token=stem, scene=self.root.name,
                      class_names=RELLIS3D_CLASSES)
