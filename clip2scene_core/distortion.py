"""The one definition of ROS ``CameraInfo`` distortion models and their coefficient vectors.

``CameraModel`` (types.py), the lens code (geometry/camera.py) and the CameraInfo converter
(``clip2scene_ros.image``) all read a (model, D) pair through here, so an empty model name,
a short or over-long D and an unsupported model mean the same everywhere. A leaf module
(numpy and errors only): ``types`` imports it, so it cannot live in ``geometry/``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CalibrationError

__all__ = ["DISTORTION_MODELS", "NUM_COEFFS", "resolve_distortion_model", "normalize_distortion"]

#: coefficients of each model (plumb_bob: k1 k2 p1 p2 k3; rational_polynomial: k1 k2 p1 p2
#: k3 k4 k5 k6; equidistant: k1 k2 k3 k4; none: pinhole)
NUM_COEFFS: dict[str, int] = {"plumb_bob": 5, "rational_polynomial": 8, "equidistant": 4,
                              "none": 0}
DISTORTION_MODELS: tuple[str, ...] = tuple(NUM_COEFFS)


def resolve_distortion_model(model: str, D: Any) -> str:
    """The model a CameraInfo means: an empty name is ``none`` when D is all zeros, else
    ``plumb_bob`` (what ROS drivers mean by it); an unsupported name is a CalibrationError."""
    if model == "":
        return "none" if not np.any(np.asarray(D, dtype=np.float64)) else "plumb_bob"
    if model not in NUM_COEFFS:
        raise CalibrationError(f"unsupported distortion model '{model}' "
                               f"(supported: {list(DISTORTION_MODELS)})")
    return model


def normalize_distortion(model: str, D: Any) -> tuple[str, np.ndarray]:
    """(model, D padded with zeros to the model's length); CalibrationError otherwise.

    Shorter vectors are common (plumb_bob with 4 values, an empty D) and mean "zero" for the
    rest. Longer ones are accepted only if the extra entries are zero (ROS drivers send 14
    values for rational_polynomial with the thin-prism terms unused). D must be finite;
    ``none`` takes no non-zero coefficient and comes back with an empty D.
    """
    d = np.asarray(D, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(d)):
        raise CalibrationError(f"distortion coefficients are not finite: {d.tolist()}")
    model = resolve_distortion_model(model, d)
    n = NUM_COEFFS[model]
    if model == "none":
        if np.any(d != 0):
            raise CalibrationError(f"distortion model 'none' but D={d.tolist()}: non-zero "
                                   "coefficients")
        return model, np.zeros(0)
    if d.size > n:
        if np.any(d[n:] != 0):
            raise CalibrationError(
                f"{model} takes {n} coefficients, got {d.size} with non-zero extras {d[n:].tolist()}")
        d = d[:n]
    return model, np.concatenate([d, np.zeros(n - d.size)])
