"""nuScenes readers: the devkit JSON layout and mmdet3d's info-pickle layout.

Both give LIDAR_TOP key frames (x, y, z, intensity, ring), the six cameras with
lidar → camera extrinsics, lidarseg labels mapped to the 16 benchmark classes and, on request,
earlier sweeps moved into the key frame through the ego poses. nuScenes images are already
undistorted, so the camera model is a pinhole (distortion model "none").
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import Clip2SceneError, InvalidPointCloudError
from ..geometry.transforms import invert_transform, transform_from_quat_wxyz
from ..types import Calibration, CameraFrame, CameraModel, Scan
from .base import DatasetReader, load_label_array, load_pickle, load_points_bin, read_rgb
from .classes import nuscenes_lidarseg_to_16
from .sample import Sample

__all__ = ["NUSCENES_CAMERAS", "NUSCENES_POINT_FIELDS", "NuScenesReader", "NuScenesInfoReader",
           "load_nuscenes_points"]

NUSCENES_CAMERAS: tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)
NUSCENES_POINT_FIELDS: tuple[str, ...] = ("x", "y", "z", "intensity", "ring")
_LIDAR = "LIDAR_TOP"
_REQUIRED_TABLES = ("sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor")


def load_nuscenes_points(path: Path, stamp_ns: int = 0) -> Scan:
    """A ``.pcd.bin`` file (float32 × 5: x, y, z, intensity, ring) as a Scan in the LIDAR_TOP frame."""
    pts = load_points_bin(Path(path), 5, "nuScenes LiDAR file")
    return Scan(pts, NUSCENES_POINT_FIELDS, frame_id=_LIDAR, stamp_ns=int(stamp_ns))


def _load_lidarseg(path: Path, num_points: int) -> np.ndarray:
    raw = load_label_array(path, np.uint8, num_points, "nuScenes lidarseg file")
    if raw.size and raw.max() > 31:
        raise InvalidPointCloudError(f"{path}: lidarseg index {int(raw.max())} is not in 0..31")
    return nuscenes_lidarseg_to_16(raw)


def _read_table(folder: Path, name: str, required: bool) -> list[dict[str, Any]] | None:
    path = folder / f"{name}.json"
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"nuScenes table '{name}' not found: {path}")
        return None
    try:
        rows = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Clip2SceneError(f"nuScenes table {path} is not valid JSON: {exc}") from exc
    if not isinstance(rows, list):
        raise Clip2SceneError(f"nuScenes table {path} must be a JSON list of records")
    return rows


@dataclass
class _KeyFrame:
    token: str
    scene: str
    lidar: dict[str, Any]                 # the LIDAR_TOP sample_data record
    cameras: dict[str, dict[str, Any]]    # channel → camera sample_data record


class NuScenesReader(DatasetReader):
    """Key frames of a nuScenes devkit folder (``root/<version_dir>/*.json``, ``root/samples``).

    Only the tables the geometry needs are required (sample, sample_data, calibrated_sensor,
    ego_pose, sensor); scene and lidarseg are used when present, log/map etc. are never read.
    Labels come from ``lidarseg/<version_dir>/<lidar sample_data token>_lidarseg.bin`` (or the
    lidarseg table's file name) when that file exists, else ``labels`` is None. ``num_sweeps``
    earlier LIDAR_TOP sweeps are followed through ``prev`` while their records and files exist.
    Samples are ordered by scene name, then time.
    """

    def __init__(self, root: str | Path, version_dir: str = "v1.0-mini",
                 cameras: Sequence[str] = NUSCENES_CAMERAS, num_sweeps: int = 0,
                 skip_missing_images: bool = False) -> None:
        self.root = Path(root)
        self.version_dir = version_dir
        self.camera_names = tuple(cameras)
        self.num_sweeps = int(num_sweeps)
        self.skip_missing_images = skip_missing_images
        folder = self.root / version_dir
        if not folder.is_dir():
            raise FileNotFoundError(f"nuScenes table folder not found: {folder}")
        tables = {name: _read_table(folder, name, True) for name in _REQUIRED_TABLES}
        scenes = _read_table(folder, "scene", False) or []
        lidarseg = _read_table(folder, "lidarseg", False) or []
        self._sample_data = {r["token"]: r for r in tables["sample_data"]}
        self._calib = {r["token"]: r for r in tables["calibrated_sensor"]}
        self._ego = {r["token"]: r for r in tables["ego_pose"]}
        self._lidarseg_file = {r["sample_data_token"]: r["filename"] for r in lidarseg}
        channel_of_sensor = {r["token"]: r["channel"] for r in tables["sensor"]}
        scene_name = {r["token"]: r.get("name", r["token"]) for r in scenes}

        per_sample: dict[str, dict[str, dict[str, Any]]] = {}
        for sd in tables["sample_data"]:
            if not sd.get("is_key_frame", False):
                continue
            calib = self._calib.get(sd["calibrated_sensor_token"])
            if calib is None:
                raise Clip2SceneError(
                    f"sample_data {sd['token']} refers to missing calibrated_sensor "
                    f"{sd['calibrated_sensor_token']}")
            channel = channel_of_sensor.get(calib["sensor_token"])
            if channel is None:
                raise Clip2SceneError(f"calibrated_sensor {calib['token']} refers to a missing sensor")
            per_sample.setdefault(sd["sample_token"], {})[channel] = sd

        frames = []
        for s in sorted(tables["sample"], key=lambda r: (scene_name.get(r["scene_token"], r["scene_token"]),
                                                        r["timestamp"])):
            records = per_sample.get(s["token"], {})
            if _LIDAR not in records:
                continue   # a sample without a LIDAR_TOP key frame has nothing to segment
            cams = {c: records[c] for c in self.camera_names if c in records}
            frames.append(_KeyFrame(s["token"], scene_name.get(s["scene_token"], s["scene_token"]),
                                    records[_LIDAR], cams))
        self._frames = frames

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def tokens(self) -> list[str]:
        return [f.token for f in self._frames]

    def sample_scenes(self) -> list[str]:
        return [f.scene for f in self._frames]

    def _sensor_to_global(self, sd: dict[str, Any]) -> np.ndarray:
        """sensor → ego (calibrated_sensor) then ego → global (ego_pose at that record's time)."""
        calib = self._calib[sd["calibrated_sensor_token"]]
        ego = self._ego.get(sd["ego_pose_token"])
        if ego is None:
            raise Clip2SceneError(f"sample_data {sd['token']} refers to missing ego_pose {sd['ego_pose_token']}")
        return (transform_from_quat_wxyz(ego["translation"], ego["rotation"])
                @ transform_from_quat_wxyz(calib["translation"], calib["rotation"]))

    def calibrations(self, index: int) -> dict[str, Calibration]:
        """Camera calibrations of key frame ``index`` without reading any file.

        lidar → ego(t_lidar) → global → ego(t_cam) → camera: each camera is exposed at its own
        time, and the vehicle moves up to ~40 ms between the LiDAR and camera timestamps.
        """
        frame = self._frames[index]
        lidar_to_global = self._sensor_to_global(frame.lidar)
        out = {}
        for channel, sd in frame.cameras.items():
            calib = self._calib[sd["calibrated_sensor_token"]]
            K = np.asarray(calib.get("camera_intrinsic") or [], dtype=np.float64)
            if K.shape != (3, 3):
                raise Clip2SceneError(f"{channel}: calibrated_sensor {calib['token']} has no 3x3 camera_intrinsic")
            T = invert_transform(self._sensor_to_global(sd)) @ lidar_to_global
            cam = CameraModel(int(sd.get("width") or 1600), int(sd.get("height") or 900), K, [], "none")
            out[channel] = Calibration(cam, T)
        return out

    def _load(self, index: int) -> Sample:
        frame = self._frames[index]
        lidar = frame.lidar
        scan = load_nuscenes_points(self.root / lidar["filename"], int(lidar["timestamp"]) * 1000)
        lidar_to_global = self._sensor_to_global(lidar)

        cameras = []
        for channel, calibration in self.calibrations(index).items():
            sd = frame.cameras[channel]
            path = self.root / sd["filename"]
            if not path.is_file() and self.skip_missing_images:
                continue
            cameras.append(CameraFrame(channel, read_rgb(path, f"{channel} image"), calibration,
                                       int(sd["timestamp"]) * 1000))

        labels = None
        seg = self._lidarseg_file.get(lidar["token"],
                                      f"lidarseg/{self.version_dir}/{lidar['token']}_lidarseg.bin")
        if (self.root / seg).is_file():
            labels = _load_lidarseg(self.root / seg, len(scan))

        sweeps = []
        to_key = invert_transform(lidar_to_global)
        prev = lidar.get("prev", "")
        while len(sweeps) < self.num_sweeps and prev:
            sd = self._sample_data.get(prev)
            if sd is None or not (self.root / sd["filename"]).is_file():
                break   # the chain leaves this (partial) dataset copy
            sweep = load_nuscenes_points(self.root / sd["filename"], int(sd["timestamp"]) * 1000)
            sweeps.append((sweep, to_key @ self._sensor_to_global(sd)))
            prev = sd.get("prev", "")

        return Sample(scan=scan, cameras=cameras, labels=labels, sweeps=sweeps,
                      lidar_to_world=lidar_to_global, vocabulary_name="nuscenes16",
                      token=frame.token, scene=frame.scene)


def _find(data_root: Path, rel: str, subdirs: Sequence[str]) -> Path:
    """Resolve an info-file path: as given, or its base name under the usual sub-folders."""
    candidates = [data_root / rel] + [data_root / d / Path(rel).name for d in subdirs]
    candidates.append(data_root / Path(rel).name)
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


class NuScenesInfoReader(DatasetReader):
    """nuScenes key frames from an mmdet3d (v1.1 format) info pickle.

    The pickle gives ``lidar_points`` (path, lidar2ego), ``ego2global`` and per camera
    ``lidar2cam`` and ``cam2img``; file names are resolved under ``data_root`` as given, under
    ``samples/<channel>/`` (``sweeps/LIDAR_TOP`` for sweeps) or flat. LiDAR files are always read
    as float32 × 5, whatever ``num_pts_feats`` says (mmdet3d loads 5 and then uses 4).

    The info file is a pickle, which runs code when read: pass ``trust_pickle=True`` for a
    file you trust like a program you run (refused with a ``ConfigError`` otherwise).
    """

    def __init__(self, pkl: str | Path, data_root: str | Path,
                 cameras: Sequence[str] = NUSCENES_CAMERAS, num_sweeps: int = 0,
                 skip_missing_images: bool = False, *, trust_pickle: bool = False) -> None:
        self.pkl = Path(pkl)
        self.data_root = Path(data_root)
        self.camera_names = tuple(cameras)
        self.num_sweeps = int(num_sweeps)
        self.skip_missing_images = skip_missing_images
        info = load_pickle(self.pkl, "mmdet3d info file", trust_pickle=trust_pickle)
        if isinstance(info, dict) and "data_list" in info:
            self._infos = list(info["data_list"])
            meta = info.get("metainfo", {}) or {}
        elif isinstance(info, list):
            self._infos, meta = info, {}
        else:
            raise Clip2SceneError(f"{self.pkl}: not an mmdet3d info file (no 'data_list')")
        self.version = str(meta.get("version", "v1.0-trainval"))
        for i, inf in enumerate(self._infos):
            if "lidar_points" not in inf:
                raise Clip2SceneError(f"{self.pkl}: entry {i} has no 'lidar_points' (older info format?)")

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def infos(self) -> list[dict[str, Any]]:
        """The info file's entries (``data_list``), in reader order."""
        return self._infos

    def _scene(self, info: dict[str, Any]) -> str:
        # v1.1 infos have no scene token; the log name (file-name prefix) groups a scene's frames.
        return str(info.get("scene_token") or Path(info["lidar_points"]["lidar_path"]).name.split("__")[0])

    def sample_scenes(self) -> list[str]:
        return [self._scene(info) for info in self._infos]

    def calibrations(self, index: int) -> dict[str, Calibration]:
        """Camera calibrations of entry ``index`` from ``lidar2cam`` and ``cam2img``.

        The image size is not in the info file; 1600×900 (all nuScenes cameras) is assumed here,
        and ``__getitem__`` checks it against the image it reads.
        """
        images = self._infos[index].get("images", {}) or {}
        out = {}
        for channel in self.camera_names:
            cam = images.get(channel)
            if not cam or cam.get("lidar2cam") is None or cam.get("cam2img") is None:
                continue
            K = np.asarray(cam["cam2img"], dtype=np.float64)[:3, :3]
            out[channel] = Calibration(CameraModel(1600, 900, K, [], "none"),
                                       np.asarray(cam["lidar2cam"], dtype=np.float64))
        return out

    def _load(self, index: int) -> Sample:
        info = self._infos[index]
        lp = info["lidar_points"]
        lidar_path = _find(self.data_root, lp["lidar_path"], [f"samples/{_LIDAR}"])
        stamp_ns = int(round(float(info.get("timestamp", 0)) * 1e9))
        scan = load_nuscenes_points(lidar_path, stamp_ns)
        lidar2ego = np.asarray(lp["lidar2ego"], dtype=np.float64)
        ego2global = np.asarray(info["ego2global"], dtype=np.float64)
        lidar_to_global = ego2global @ lidar2ego

        cameras = []
        images = info.get("images", {}) or {}
        for channel, cal in self.calibrations(index).items():
            path = _find(self.data_root, images[channel]["img_path"], [f"samples/{channel}"])
            if not path.is_file() and self.skip_missing_images:
                continue
            rgb = read_rgb(path, f"{channel} image")
            cam = CameraModel(rgb.shape[1], rgb.shape[0], cal.camera.K, [], "none")
            stamp = int(round(float(images[channel].get("timestamp", 0)) * 1e9))
            cameras.append(CameraFrame(channel, rgb, Calibration(cam, cal.lidar_to_camera), stamp))

        labels = None
        mask = info.get("pts_semantic_mask_path")
        if mask:
            seg_path = _find(self.data_root, mask, [f"lidarseg/{self.version}", "lidarseg"])
            labels = _load_lidarseg(seg_path, len(scan))

        sweeps = []
        to_key = invert_transform(lidar_to_global)
        for sw in (info.get("lidar_sweeps") or [])[: self.num_sweeps]:
            swp = sw["lidar_points"]
            path = _find(self.data_root, swp["lidar_path"], [f"sweeps/{_LIDAR}", f"samples/{_LIDAR}"])
            if not path.is_file():
                break
            sweep = load_nuscenes_points(path, int(round(float(sw.get("timestamp", 0)) * 1e9)))
            T = to_key @ np.asarray(sw["ego2global"], dtype=np.float64) @ np.asarray(swp["lidar2ego"], dtype=np.float64)
            sweeps.append((sweep, T))

        token = str(info.get("token", info.get("sample_idx", index)))
        scene = self._scene(info)
        return Sample(scan=scan, cameras=cameras, labels=labels, sweeps=sweeps,
                      lidar_to_world=lidar_to_global, vocabulary_name="nuscenes16",
                      token=token, scene=scene)
