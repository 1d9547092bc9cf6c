"""Lens models of ROS ``CameraInfo`` in vectorised numpy: distort normalised points, map to pixels.

The models follow OpenCV's definitions (``cv2.projectPoints`` for plumb_bob and
rational_polynomial, ``cv2.fisheye.projectPoints`` for equidistant) so calibrations made with
ROS ``camera_calibration`` or Kalibr project the same way here.

Validity of the lens model (why a point can be "in front of the camera and inside the image" yet
invalid): a radial polynomial is only a faithful model up to the radius where it stops growing.
Beyond it the polynomial folds back and maps far off-axis points, which the lens never images,
onto pixels inside the image. ``max_valid_radius`` finds that radius: the first undistorted
radius r (with θ = atan r for equidistant) where the distorted radius r_d(r) stops increasing,
searched on a fine grid up to a 89.9° field angle. Points at or beyond it are marked invalid.
Tangential terms (p1, p2) are left out of that search: they are small and do not fold.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..distortion import normalize_distortion
from ..errors import CalibrationError
from ..types import CameraModel

__all__ = ["check_camera_model", "distortion_coefficients", "distort", "max_valid_radius",
           "to_pixels"]


def distortion_coefficients(camera: CameraModel) -> np.ndarray:
    """D padded with zeros to the model's length; CalibrationError if it is too long or not
    finite (`clip2scene_core.distortion.normalize_distortion`, the one definition)."""
    return normalize_distortion(camera.distortion_model, camera.D)[1]


def check_camera_model(camera: CameraModel) -> None:
    """Refuse intrinsics a projection cannot use (CameraModel itself checks fx, fy > 0)."""
    K = np.asarray(camera.K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)):
        raise CalibrationError(f"K must be a finite 3x3 matrix, got {K.tolist()}")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise CalibrationError(f"focal lengths must be positive, got fx={K[0, 0]} fy={K[1, 1]}")
    if not np.allclose(K[1, 0], 0) or not np.allclose(K[2], [0.0, 0.0, 1.0]):
        raise CalibrationError(f"K must be upper triangular with last row [0, 0, 1], got {K.tolist()}")
    distortion_coefficients(camera)


def _radial_distorted(model: str, D: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Distorted radius as a function of the undistorted normalised radius (no tangential part)."""
    r2 = r * r
    if model == "plumb_bob":
        k1, k2, _, _, k3 = D
        return r * (1 + r2 * (k1 + r2 * (k2 + r2 * k3)))
    if model == "rational_polynomial":
        k1, k2, _, _, k3, k4, k5, k6 = D
        num = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
        den = 1 + r2 * (k4 + r2 * (k5 + r2 * k6))
        with np.errstate(divide="ignore", invalid="ignore"):
            return r * num / den
    if model == "equidistant":
        th = np.arctan(r)
        t2 = th * th
        return th * (1 + t2 * (D[0] + t2 * (D[1] + t2 * (D[2] + t2 * D[3]))))
    return r


@lru_cache(maxsize=256)
def _max_valid_radius_cached(model: str, coeffs: tuple[float, ...]) -> float:
    D = np.asarray(coeffs)
    # Grid uniform in field angle, so wide-angle lenses are sampled as finely as narrow ones.
    theta = np.linspace(0.0, np.deg2rad(89.9), 20001)
    r = np.tan(theta)
    with np.errstate(all="ignore"):
        rd = _radial_distorted(model, D, r)
        if model == "rational_polynomial":
            # A pole of the rational function (denominator 0) ends the valid range as well.
            den = 1 + r**2 * (D[5] + r**2 * (D[6] + r**2 * D[7]))
            bad_den = np.nonzero(den <= 0)[0]
        else:
            bad_den = np.zeros(0, dtype=int)
        # r[i] is the last grid radius before r_d stops increasing: conservative by one step.
        bad = np.nonzero(~np.isfinite(rd[1:]) | (np.diff(rd) <= 0))[0]
    stops = bad[:1].tolist() + bad_den[:1].tolist()
    if not stops:
        return float("inf")
    return float(r[min(stops)])


def max_valid_radius(camera: CameraModel) -> float:
    """Largest undistorted normalised radius sqrt((x/z)² + (y/z)²) the lens model is valid for.

    ``inf`` for the pinhole model and for polynomials that keep growing up to 89.9°.
    """
    if camera.distortion_model == "none":
        return float("inf")
    D = distortion_coefficients(camera)
    if not np.any(D):
        return float("inf")
    return _max_valid_radius_cached(camera.distortion_model, tuple(float(d) for d in D))


def distort(camera: CameraModel, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distort normalised image coordinates x = X/Z, y = Y/Z with the camera's lens model."""
    model = camera.distortion_model
    D = distortion_coefficients(camera)
    if model == "none":
        return x, y
    r2 = x * x + y * y
    if model == "equidistant":
        r = np.sqrt(r2)
        th = np.arctan(r)
        t2 = th * th
        thd = th * (1 + t2 * (D[0] + t2 * (D[1] + t2 * (D[2] + t2 * D[3]))))
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(r > 1e-12, thd / np.where(r > 1e-12, r, 1.0), 1.0)
        return x * scale, y * scale
    if model == "plumb_bob":
        k1, k2, p1, p2, k3 = D
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    else:  # rational_polynomial
        k1, k2, p1, p2, k3, k4, k5, k6 = D
        with np.errstate(divide="ignore", invalid="ignore"):
            radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    xy = x * y
    xd = x * radial + 2 * p1 * xy + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * xy
    return xd, yd


def to_pixels(camera: CameraModel, xd: np.ndarray, yd: np.ndarray) -> np.ndarray:
    """(N, 2) pixel coordinates (u = column, v = row) of distorted normalised coordinates."""
    K = camera.K
    u = K[0, 0] * xd + K[0, 1] * yd + K[0, 2]
    v = K[1, 1] * yd + K[1, 2]
    return np.stack([u, v], axis=-1)
