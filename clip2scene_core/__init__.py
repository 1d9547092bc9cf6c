"""clip2scene_core: ROS-free library for CLIP2Scene open-vocabulary LiDAR segmentation."""
from .errors import (CalibrationError, CheckpointError, Clip2SceneError, ConfigError,
                     EmptyPointCloudError, ImageDecodeError, InvalidPointCloudError,
                     TransformError, WeightsNotFoundError)
from .types import Calibration, CameraFrame, CameraModel, Scan

__all__ = [
    "Calibration", "CameraFrame", "CameraModel", "Scan",
    "Clip2SceneError", "CalibrationError", "CheckpointError", "ConfigError",
    "EmptyPointCloudError", "ImageDecodeError", "InvalidPointCloudError", "TransformError",
    "WeightsNotFoundError",
]
__version__ = "0.1.0"
