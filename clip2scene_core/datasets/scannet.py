"""ScanNet reader: mesh vertices (x, y, z, r, g, b) with NYU40 labels, and posed RGB frames.

ScanNet camera poses (``extrinsics``: camera → world) live in the raw, *unaligned* scan frame.
Exported point clouds are usually *axis-aligned* (``axis_align_matrix`` applied, as in
mmdet3d's ``*_vert_all.npy``). For aligned points the camera sees
``inverse(pose) · inverse(axis_align_matrix) · p``; forgetting that puts every point in the
wrong place, so the reader composes it and the tests check it against the vertex colours.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import Clip2SceneError, InvalidPointCloudError
from ..geometry.transforms import invert_transform
from ..types import Calibration, CameraFrame, CameraModel, Scan
from .base import DatasetReader, load_label_array, load_pickle, read_rgb, require_file
from .classes import nyu40_to_scannet20
from .sample import Sample

__all__ = ["ScanNetReader", "SCANNET_POINT_FIELDS"]

SCANNET_POINT_FIELDS: tuple[str, ...] = ("x", "y", "z", "r", "g", "b")


class ScanNetReader(DatasetReader):
    """Scenes ``root/<scene>_vert_all.npy`` (+ ``<scene>_sem_label_all.npy`` NYU40 ids).

    ``posed_images``: an mmdet3d ScanNet info pickle (list of dicts with ``point_cloud.lidar_idx``,
    ``intrinsics`` 4×4, ``extrinsics`` camera → world 4×4 per image, ``img_paths`` relative to the
    pickle's folder, ``annos.axis_align_matrix``). ``points_aligned`` says whether the vertices
    already have the axis alignment applied (True for ``*_vert_all.npy``). Frames whose pose is
    not finite (ScanNet marks lost tracking with -inf) are skipped. ``max_images`` caps the number
    of frames per scene (0 = all). Points are in the scene's world frame: ``lidar_to_world`` = I.
    The info pickle runs code when read: it needs ``trust_pickle=True`` (a file you trust like a
    program you run).
    """

    def __init__(self, root: str | Path, posed_images: str | Path | None = None,
                 scenes: Sequence[str] | None = None, points_aligned: bool = True,
                 max_images: int = 0, *, trust_pickle: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ScanNet folder not found: {self.root}")
        found = sorted(p.name[: -len("_vert_all.npy")] for p in self.root.glob("*_vert_all.npy"))
        if scenes is not None:
            missing = [s for s in scenes if s not in found]
            if missing:
                raise FileNotFoundError(f"ScanNet scene(s) {missing} not found in {self.root}")
            found = list(scenes)
        self.scenes = found
        self.points_aligned = points_aligned
        self.max_images = int(max_images)
        self._views: dict[str, dict[str, Any]] = {}
        self._image_root: Path | None = None
        if posed_images is not None:
            infos = load_pickle(Path(posed_images), "ScanNet info file", trust_pickle=trust_pickle)
            if isinstance(infos, dict) and "data_list" in infos:
                infos = infos["data_list"]
            if not isinstance(infos, list):
                raise Clip2SceneError(f"{posed_images}: expected a list of scene infos")
            self._image_root = Path(posed_images).parent
            for info in infos:
                scene = (info.get("point_cloud") or {}).get("lidar_idx")
                if scene and info.get("img_paths"):
                    self._views[str(scene)] = info

    def __len__(self) -> int:
        return len(self.scenes)

    def sample_scenes(self) -> list[str]:
        return list(self.scenes)

    def calibrations(self, index: int) -> list[tuple[Path, Calibration]]:
        """(image path, calibration with an assumed 1296×968 colour image) per posed frame."""
        info = self._views.get(self.scenes[index])
        if info is None:
            return []
        K = np.asarray(info["intrinsics"], dtype=np.float64)[:3, :3]
        axis_align = np.eye(4)
        if self.points_aligned:
            annos = info.get("annos") or {}
            if "axis_align_matrix" not in annos:
                raise Clip2SceneError(
                    f"scene {self.scenes[index]}: points are axis-aligned but the info has no "
                    "axis_align_matrix to undo it")
            axis_align = np.asarray(annos["axis_align_matrix"], dtype=np.float64).reshape(4, 4)
        unalign = invert_transform(axis_align)
        out = []
        for rel, pose in zip(info["img_paths"], info["extrinsics"]):
            pose = np.asarray(pose, dtype=np.float64)
            if not np.all(np.isfinite(pose)):
                continue
            out.append((self._image_root / rel,
                        Calibration(CameraModel(1296, 968, K, [], "none"), invert_transform(pose) @ unalign)))
            if self.max_images and len(out) >= self.max_images:
                break
        return out

    def _load(self, index: int) -> Sample:
        scene = self.scenes[index]
        path = require_file(self.root / f"{scene}_vert_all.npy", "ScanNet vertex file")
        pts = np.load(path)
        if pts.ndim != 2 or pts.shape[1] != 6:
            raise InvalidPointCloudError(f"{path}: expected (N, 6) x y z r g b, got {pts.shape}")
        scan = Scan(pts, SCANNET_POINT_FIELDS, frame_id=scene)

        labels = None
        label_path = self.root / f"{scene}_sem_label_all.npy"
        if label_path.is_file():
            labels = nyu40_to_scannet20(load_label_array(label_path, None, len(scan), "ScanNet label file"))

        cameras = []
        for img_path, cal in self.calibrations(index):
            rgb = read_rgb(img_path, "ScanNet colour image")
            cam = CameraModel(rgb.shape[1], rgb.shape[0], cal.camera.K, [], "none")
            cameras.append(CameraFrame(img_path.stem, rgb, Calibration(cam, cal.lidar_to_camera)))
        return Sample(scan=scan, cameras=cameras, labels=labels, sweeps=[],
                      lidar_to_world=np.eye(4), vocabulary_name="scannet20", token=scene,
                      scene=scene)
