"""SemanticKITTI reader (``sequences/<seq>/{velodyne,labels,image_2,calib.txt,poses.txt}``).

KITTI conventions used here: ``Tr`` maps velodyne → rectified cam0 (odometry calib.txt; the
object-detection files call it ``Tr_velo_to_cam`` and add ``R0_rect``). ``P2 = K [I | t]``
projects rectified cam0 coordinates into the left colour image, so the camera-2 optical frame
is reached with ``[I | K⁻¹ P2[:, 3]] · R0_rect · Tr``. ``poses.txt`` holds cam0 poses in the
first cam0 frame; the LiDAR pose is ``Tr⁻¹ · P · Tr``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import CalibrationError, Clip2SceneError
from ..geometry.transforms import invert_transform
from ..types import Calibration, CameraFrame, CameraModel, Scan
from .base import DatasetReader, load_label_array, load_points_bin, read_rgb, require_file
from .classes import semantickitti_to_19
from .sample import Sample

__all__ = ["SemanticKittiReader", "parse_kitti_calib", "kitti_camera_calibration",
           "read_kitti_poses", "KITTI_POINT_FIELDS"]

KITTI_POINT_FIELDS: tuple[str, ...] = ("x", "y", "z", "intensity")


def parse_kitti_calib(path: str | Path) -> dict[str, np.ndarray]:
    """``KEY: v1 v2 ...`` lines of a KITTI calib file → flat float64 arrays by key."""
    require_file(Path(path), "KITTI calibration file")
    out: dict[str, np.ndarray] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, values = line.partition(":")
        if not sep:
            raise CalibrationError(f"{path}:{n}: expected 'KEY: values', got {line[:40]!r}")
        try:
            out[key.strip()] = np.array([float(v) for v in values.split()], dtype=np.float64)
        except ValueError as exc:
            raise CalibrationError(f"{path}:{n}: {exc}") from exc
    return out


def _homogeneous(m: np.ndarray, name: str) -> np.ndarray:
    if m.size == 12:
        return np.vstack([m.reshape(3, 4), [0.0, 0.0, 0.0, 1.0]])
    if m.size == 16:
        return m.reshape(4, 4).copy()
    if m.size == 9:
        out = np.eye(4)
        out[:3, :3] = m.reshape(3, 3)
        return out
    raise CalibrationError(f"KITTI '{name}' has {m.size} values, expected 12 (3x4), 9 (3x3) or 16 (4x4)")


def velo_to_cam0(calib: dict[str, np.ndarray]) -> np.ndarray:
    """velodyne → rectified cam0 (4×4): ``R0_rect · Tr`` (R0_rect only in the object files)."""
    key = "Tr" if "Tr" in calib else "Tr_velo_to_cam" if "Tr_velo_to_cam" in calib else None
    if key is None:
        raise CalibrationError(f"KITTI calibration has no 'Tr' / 'Tr_velo_to_cam' (keys: {sorted(calib)})")
    T = _homogeneous(calib[key], key)
    if "R0_rect" in calib:
        T = _homogeneous(calib["R0_rect"], "R0_rect") @ T
    return T


def kitti_camera_calibration(calib: dict[str, np.ndarray], width: int, height: int,
                             camera: str = "P2") -> Calibration:
    """Calibration of a rectified KITTI camera (P0..P3) for LiDAR points: pinhole, no distortion.

    The images are rectified, so P's left 3×3 is the intrinsic matrix and its last column is the
    baseline offset, folded into the extrinsic so that ``K · T · X`` equals ``P · R0 · Tr · X``.
    """
    if camera not in calib or calib[camera].size not in (12, 16):
        raise CalibrationError(f"KITTI calibration has no 3x4 '{camera}' (keys: {sorted(calib)})")
    P = calib[camera].reshape(-1, 4)[:3]
    K = P[:, :3]
    if abs(np.linalg.det(K)) < 1e-9:
        raise CalibrationError(f"KITTI '{camera}' has a singular intrinsic part {K.tolist()}")
    offset = np.eye(4)
    offset[:3, 3] = np.linalg.solve(K, P[:, 3])
    return Calibration(CameraModel(width, height, K, [], "none"), offset @ velo_to_cam0(calib))


def read_kitti_poses(path: str | Path) -> np.ndarray:
    """poses.txt (one 3×4 row-major matrix per line) → (F, 4, 4) float64."""
    require_file(Path(path), "KITTI poses file")
    rows = np.loadtxt(path, dtype=np.float64, ndmin=2)
    if rows.shape[1] != 12:
        raise Clip2SceneError(f"{path}: expected 12 values per line, got {rows.shape[1]}")
    poses = np.tile(np.eye(4), (rows.shape[0], 1, 1))
    poses[:, :3, :] = rows.reshape(-1, 3, 4)
    return poses


class SemanticKittiReader(DatasetReader):
    """Scans of ``root/sequences/<seq>/velodyne/*.bin`` with labels, camera and poses when present.

    Labels: lower 16 bits of ``labels/<frame>.label`` through the learning map to the 19 classes
    (-1 = unlabeled / outlier / other-structure / other-object); None when the file is absent
    (test sequences). A camera (``image_2/<frame>.png``, P2 intrinsics) is added when the image
    exists. ``num_sweeps`` earlier frames of the sequence come with the transform from their
    poses when ``poses.txt`` exists; ``times.txt`` gives the scan stamps when present.
    calib.txt is read only when a camera or poses need it.
    """

    def __init__(self, root: str | Path, sequences: Sequence[str | int] = ("00",),
                 num_sweeps: int = 0, camera: str = "P2") -> None:
        self.root = Path(root)
        self.num_sweeps = int(num_sweeps)
        self.camera = camera
        self._frames: list[tuple[str, str]] = []   # (sequence, frame stem)
        self._first: dict[str, int] = {}            # sequence → index of its first frame
        for seq in sequences:
            seq = f"{int(seq):02d}" if str(seq).isdigit() else str(seq)
            velo = self.root / "sequences" / seq / "velodyne"
            if not velo.is_dir():
                raise FileNotFoundError(f"SemanticKITTI sequence folder not found: {velo}")
            stems = sorted(p.stem for p in velo.glob("*.bin"))
            self._first[seq] = len(self._frames)
            self._frames += [(seq, s) for s in stems]
        self._calib_cache: dict[str, dict[str, np.ndarray]] = {}
        self._pose_cache: dict[str, np.ndarray | None] = {}
        self._time_cache: dict[str, np.ndarray | None] = {}

    def __len__(self) -> int:
        return len(self._frames)

    def sample_scenes(self) -> list[str]:
        return [seq for seq, _ in self._frames]

    def _seq_dir(self, seq: str) -> Path:
        return self.root / "sequences" / seq

    def calib(self, seq: str) -> dict[str, np.ndarray]:
        if seq not in self._calib_cache:
            self._calib_cache[seq] = parse_kitti_calib(self._seq_dir(seq) / "calib.txt")
        return self._calib_cache[seq]

    def lidar_poses(self, seq: str) -> np.ndarray | None:
        """(F, 4, 4) LiDAR → world (first cam0 frame) poses, or None without poses.txt."""
        if seq not in self._pose_cache:
            path = self._seq_dir(seq) / "poses.txt"
            if not path.is_file():
                self._pose_cache[seq] = None
            else:
                Tr = velo_to_cam0(self.calib(seq))
                self._pose_cache[seq] = invert_transform(Tr) @ read_kitti_poses(path) @ Tr
        return self._pose_cache[seq]

    def stamp_ns(self, seq: str, stem: str) -> int:
        """Scan time from ``times.txt`` (seconds since the sequence start), 0 without it."""
        if seq not in self._time_cache:
            path = self._seq_dir(seq) / "times.txt"
            self._time_cache[seq] = np.loadtxt(path, ndmin=1) if path.is_file() else None
        times = self._time_cache[seq]
        if times is None or not stem.isdigit() or int(stem) >= len(times):
            return 0
        return int(round(float(times[int(stem)]) * 1e9))

    def _pose(self, poses: np.ndarray, seq: str, stem: str) -> np.ndarray:
        # poses.txt has one line per frame number, so the file name (not the list position) indexes it.
        if not stem.isdigit() or int(stem) >= len(poses):
            raise Clip2SceneError(
                f"{self._seq_dir(seq) / 'poses.txt'} has {len(poses)} poses; none for frame '{stem}'")
        return poses[int(stem)]

    def _scan(self, seq: str, stem: str) -> Scan:
        pts = load_points_bin(self._seq_dir(seq) / "velodyne" / f"{stem}.bin", 4, "SemanticKITTI scan")
        return Scan(pts, KITTI_POINT_FIELDS, frame_id="velodyne", stamp_ns=self.stamp_ns(seq, stem))

    def _load(self, index: int) -> Sample:
        seq, stem = self._frames[index]
        d = self._seq_dir(seq)
        scan = self._scan(seq, stem)

        labels = None
        label_path = d / "labels" / f"{stem}.label"
        if label_path.is_file():
            labels = semantickitti_to_19(load_label_array(label_path, np.uint32, len(scan),
                                                          "SemanticKITTI label file"))
        cameras = []
        image_path = d / f"image_{self.camera[1:]}" / f"{stem}.png"
        if image_path.is_file():
            rgb = read_rgb(image_path, "KITTI image")
            cal = kitti_camera_calibration(self.calib(seq), rgb.shape[1], rgb.shape[0], self.camera)
            cameras.append(CameraFrame(f"image_{self.camera[1:]}", rgb, cal))

        poses = self.lidar_poses(seq)
        lidar_to_world = None
        sweeps = []
        if poses is not None:
            lidar_to_world = self._pose(poses, seq, stem)
            to_key = invert_transform(lidar_to_world)
            # Earlier frames of the same sequence, nearest first.
            for j in range(index - 1, max(self._first[seq], index - self.num_sweeps) - 1, -1):
                _, prev = self._frames[j]
                sweeps.append((self._scan(seq, prev), to_key @ self._pose(poses, seq, prev)))
        return Sample(scan=scan, cameras=cameras, labels=labels, sweeps=sweeps,
                      lidar_to_world=lidar_to_world, vocabulary_name="semantickitti19",
                      token=f"{seq}/{stem}", scene=seq)
