"""Camera geometry: lens models, LiDAR→image projection and rigid-transform helpers."""
from .camera import (check_camera_model, distort, distortion_coefficients, max_valid_radius,
                     to_pixels)
from .projection import Projection, project_points, project_to_cameras
from .transforms import (apply_transform, interpolate_transform_at, interpolate_transforms,
                         invert_transform, make_transform, matrix_to_quat_wxyz,
                         matrix_to_quat_xyzw, quat_wxyz_to_matrix, quat_xyzw_to_matrix,
                         slerp_wxyz, transform_from_quat_wxyz, transform_from_quat_xyzw,
                         wxyz_to_xyzw, xyzw_to_wxyz)

__all__ = [
    "Projection", "project_points", "project_to_cameras",
    "check_camera_model", "distort", "distortion_coefficients", "max_valid_radius", "to_pixels",
    "apply_transform", "interpolate_transform_at", "interpolate_transforms", "invert_transform",
    "make_transform", "matrix_to_quat_wxyz", "matrix_to_quat_xyzw", "quat_wxyz_to_matrix",
    "quat_xyzw_to_matrix", "slerp_wxyz", "transform_from_quat_wxyz", "transform_from_quat_xyzw",
    "wxyz_to_xyzw", "xyzw_to_wxyz",
]
