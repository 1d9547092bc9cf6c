"""Exception types of clip2scene_core.

Callers (the ROS node, the replay tool, training) catch these to skip a frame or refuse a
file with a clear message instead of crashing; anything else is a bug.
"""
from __future__ import annotations


class Clip2SceneError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidPointCloudError(Clip2SceneError, ValueError):
    """A point array has the wrong shape, dtype or field layout."""


class EmptyPointCloudError(InvalidPointCloudError):
    """No valid (finite, in-range) point is left to process."""


class CalibrationError(Clip2SceneError, ValueError):
    """Camera intrinsics or extrinsics are degenerate or inconsistent."""


class ImageDecodeError(Clip2SceneError, ValueError):
    """An image message cannot be turned into an RGB array (unknown encoding, bad size)."""


class TransformError(Clip2SceneError, LookupError):
    """A coordinate transform is missing or cannot be interpolated at the asked time."""


class CheckpointError(Clip2SceneError, RuntimeError):
    """A checkpoint file is missing, corrupt, of an unknown version or does not fit the model."""


class ConfigError(Clip2SceneError, ValueError):
    """A configuration file has unknown keys, missing keys or values of the wrong type."""


class WeightsNotFoundError(Clip2SceneError, FileNotFoundError):
    """Model weights were asked for but no local file or download is available."""
