"""Rigid transforms: quaternions ↔ rotation matrices, 4×4 poses, inversion, interpolation.

Two quaternion orders are in use around this package: nuScenes tables and RELLIS-3D YAML
store (w, x, y, z); ROS messages and scipy store (x, y, z, w). Every function names its order
(``_wxyz`` / ``_xyzw``) so that a swapped order cannot slip through silently.
"""
from __future__ import annotations

import numpy as np

from ..errors import TransformError

__all__ = [
    "quat_wxyz_to_matrix", "quat_xyzw_to_matrix", "matrix_to_quat_wxyz", "matrix_to_quat_xyzw",
    "wxyz_to_xyzw", "xyzw_to_wxyz", "make_transform", "transform_from_quat_wxyz",
    "transform_from_quat_xyzw", "invert_transform", "apply_transform", "slerp_wxyz",
    "interpolate_transforms", "interpolate_transform_at",
]


def _normalized_wxyz(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.shape[-1] != 4:
        raise TransformError(f"quaternion must have 4 components, got shape {q.shape}")
    if not np.all(np.isfinite(q)):
        raise TransformError(f"quaternion is not finite: {q.tolist()}")
    n = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(n < 1e-12):
        raise TransformError("quaternion has zero norm")
    return q / n


def wxyz_to_xyzw(q: np.ndarray) -> np.ndarray:
    """Reorder (w, x, y, z) → (x, y, z, w)."""
    q = np.asarray(q, dtype=np.float64)
    return np.concatenate([q[..., 1:], q[..., :1]], axis=-1)


def xyzw_to_wxyz(q: np.ndarray) -> np.ndarray:
    """Reorder (x, y, z, w) → (w, x, y, z)."""
    q = np.asarray(q, dtype=np.float64)
    return np.concatenate([q[..., 3:], q[..., :3]], axis=-1)


def quat_wxyz_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrix (..., 3, 3) of a (w, x, y, z) quaternion (normalised first)."""
    w, x, y, z = np.moveaxis(_normalized_wxyz(q), -1, 0)
    R = np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], axis=-1)
    return R.reshape(R.shape[:-1] + (3, 3))


def quat_xyzw_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrix of an (x, y, z, w) quaternion (ROS ``geometry_msgs/Quaternion`` order)."""
    return quat_wxyz_to_matrix(xyzw_to_wxyz(q))


def matrix_to_quat_wxyz(R: np.ndarray) -> np.ndarray:
    """Unit (w, x, y, z) quaternion with w ≥ 0 of a 3×3 rotation matrix (Shepperd's method)."""
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (3, 3) or not np.all(np.isfinite(R)):
        raise TransformError(f"rotation must be a finite 3x3 matrix, got shape {R.shape}")
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise TransformError("matrix is not a proper rotation")
    tr = np.trace(R)
    # Pick the largest of w, x, y, z to divide by: numerically stable for every rotation.
    if tr > max(R[0, 0], R[1, 1], R[2, 2]):
        s = 2.0 * np.sqrt(1.0 + tr)
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif R[0, 0] >= R[1, 1] and R[0, 0] >= R[2, 2]:
        s = 2.0 * np.sqrt(max(1.0 + R[0, 0] - R[1, 1] - R[2, 2], 1e-300))
        q = [(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif R[1, 1] >= R[2, 2]:
        s = 2.0 * np.sqrt(max(1.0 + R[1, 1] - R[0, 0] - R[2, 2], 1e-300))
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(max(1.0 + R[2, 2] - R[0, 0] - R[1, 1], 1e-300))
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


def matrix_to_quat_xyzw(R: np.ndarray) -> np.ndarray:
    """Unit (x, y, z, w) quaternion with w ≥ 0 of a 3×3 rotation matrix."""
    return wxyz_to_xyzw(matrix_to_quat_wxyz(R))


def make_transform(rotation: np.ndarray | None = None, translation: np.ndarray | None = None
                   ) -> np.ndarray:
    """4×4 homogeneous transform from a 3×3 rotation and a 3-vector translation."""
    T = np.eye(4)
    if rotation is not None:
        T[:3, :3] = np.asarray(rotation, dtype=np.float64).reshape(3, 3)
    if translation is not None:
        T[:3, 3] = np.asarray(translation, dtype=np.float64).reshape(3)
    if not np.all(np.isfinite(T)):
        raise TransformError("transform is not finite")
    return T


def transform_from_quat_wxyz(translation: np.ndarray, quat_wxyz: np.ndarray) -> np.ndarray:
    """4×4 transform from a translation and a (w, x, y, z) quaternion (nuScenes tables)."""
    return make_transform(quat_wxyz_to_matrix(quat_wxyz), translation)


def transform_from_quat_xyzw(translation: np.ndarray, quat_xyzw: np.ndarray) -> np.ndarray:
    """4×4 transform from a translation and an (x, y, z, w) quaternion (ROS messages)."""
    return make_transform(quat_xyzw_to_matrix(quat_xyzw), translation)


def invert_transform(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4×4 transform: [Rᵀ | −Rᵀt] (exact, no general matrix inverse)."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise TransformError(f"expected a finite 4x4 transform, got shape {T.shape}")
    R, t = T[:3, :3], T[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


def apply_transform(T: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Apply a 4×4 transform to (N, 3) points, in float64."""
    T = np.asarray(T, dtype=np.float64)
    p = np.asarray(xyz, dtype=np.float64)
    return p @ T[:3, :3].T + T[:3, 3]


def slerp_wxyz(q0: np.ndarray, q1: np.ndarray, alpha: float) -> np.ndarray:
    """Spherical linear interpolation of two (w, x, y, z) quaternions along the short arc."""
    a, b = _normalized_wxyz(q0), _normalized_wxyz(q1)
    dot = float(np.dot(a, b))
    if dot < 0.0:       # q and −q are the same rotation; take the shorter way round
        b, dot = -b, -dot
    if dot > 0.9995:    # nearly parallel: lerp is exact to rounding and avoids 0/0
        q = a + alpha * (b - a)
        return q / np.linalg.norm(q)
    theta = np.arccos(min(dot, 1.0))
    s = np.sin(theta)
    return (np.sin((1 - alpha) * theta) * a + np.sin(alpha * theta) * b) / s


def interpolate_transforms(T0: np.ndarray, T1: np.ndarray, alpha: float) -> np.ndarray:
    """Pose between T0 (alpha=0) and T1 (alpha=1): slerp of the rotation, lerp of the translation.

    ``alpha`` outside [0, 1] would extrapolate, which TF refuses too: TransformError.
    """
    if not np.isfinite(alpha) or alpha < 0.0 or alpha > 1.0:
        raise TransformError(f"interpolation factor must be in [0, 1], got {alpha}")
    T0 = np.asarray(T0, dtype=np.float64)
    T1 = np.asarray(T1, dtype=np.float64)
    q = slerp_wxyz(matrix_to_quat_wxyz(T0[:3, :3]), matrix_to_quat_wxyz(T1[:3, :3]), alpha)
    t = (1.0 - alpha) * T0[:3, 3] + alpha * T1[:3, 3]
    return make_transform(quat_wxyz_to_matrix(q), t)


def interpolate_transform_at(stamp0: float, T0: np.ndarray, stamp1: float, T1: np.ndarray,
                             stamp: float) -> np.ndarray:
    """Pose at time ``stamp`` between two stamped poses (any time unit, same for all three)."""
    if stamp1 == stamp0:
        if stamp != stamp0:
            raise TransformError("cannot interpolate between two poses with the same stamp")
        return np.asarray(T0, dtype=np.float64).copy()
    if stamp1 < stamp0:
        stamp0, T0, stamp1, T1 = stamp1, T1, stamp0, T0
    if stamp < stamp0 or stamp > stamp1:
        raise TransformError(f"stamp {stamp} is outside [{stamp0}, {stamp1}] (no extrapolation)")
    return interpolate_transforms(T0, T1, (stamp - stamp0) / (stamp1 - stamp0))
