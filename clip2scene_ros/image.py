"""Camera messages ⇄ arrays: Image / CompressedImage → RGB uint8, RGB → Image, CameraInfo → model.

Pure functions on duck-typed messages (rclpy or rosbags). The segmenter wants (H, W, 3)
uint8 RGB whatever the driver publishes, so every supported encoding is turned into that:
8-bit colour and mono, 16-bit (scaled to 8 bits: v * 255 / 65535), Bayer mosaics (OpenCV
demosaicing; ROS names the 2×2 pattern from the top-left pixel) and packed YUV 4:2:2
(ROS ``yuv422`` is UYVY byte order; OpenCV's BT.601 video-range conversion, as cv_bridge).
Generic ``8UC3`` / ``8UC4`` / ``16UC3`` are taken as OpenCV's BGR(A) channel order.
``step`` row padding and ``is_bigendian`` are honoured; the result always owns its memory.
Anything else raises ``ImageDecodeError`` instead of guessing.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from clip2scene_core.errors import CalibrationError, ImageDecodeError
from clip2scene_core.types import CameraModel

from .msgs import MessageFactory, data_as_array, default_factory

__all__ = [
    "ENCODINGS", "image_to_rgb", "compressed_to_rgb", "rgb_to_image", "rgb_to_compressed",
    "camera_info_to_model", "model_to_camera_info",
]

_U8, _U16 = np.dtype(np.uint8), np.dtype(np.uint16)

# encoding → (channels, sample dtype, layout)
ENCODINGS: dict[str, tuple[int, np.dtype, str]] = {
    "rgb8": (3, _U8, "rgb"), "bgr8": (3, _U8, "bgr"), "rgba8": (4, _U8, "rgba"),
    "bgra8": (4, _U8, "bgra"), "mono8": (1, _U8, "mono"),
    "8UC1": (1, _U8, "mono"), "8UC3": (3, _U8, "bgr"), "8UC4": (4, _U8, "bgra"),
    "rgb16": (3, _U16, "rgb"), "bgr16": (3, _U16, "bgr"), "rgba16": (4, _U16, "rgba"),
    "bgra16": (4, _U16, "bgra"), "mono16": (1, _U16, "mono"),
    "16UC1": (1, _U16, "mono"), "16UC3": (3, _U16, "bgr"), "16UC4": (4, _U16, "bgra"),
    "bayer_rggb8": (1, _U8, "bayer_rggb"), "bayer_bggr8": (1, _U8, "bayer_bggr"),
    "bayer_gbrg8": (1, _U8, "bayer_gbrg"), "bayer_grbg8": (1, _U8, "bayer_grbg"),
    "bayer_rggb16": (1, _U16, "bayer_rggb"), "bayer_bggr16": (1, _U16, "bayer_bggr"),
    "bayer_gbrg16": (1, _U16, "bayer_gbrg"), "bayer_grbg16": (1, _U16, "bayer_grbg"),
    "yuv422": (2, _U8, "uyvy"), "uyvy": (2, _U8, "uyvy"), "UYVY": (2, _U8, "uyvy"),
    "yuyv": (2, _U8, "yuyv"), "YUYV": (2, _U8, "yuyv"), "yuv422_yuy2": (2, _U8, "yuyv"),
}

# The named OpenCV codes spell the ROS pattern directly (BayerRGGB == OpenCV's older "BayerBG").
_BAYER = {
    "bayer_rggb": cv2.COLOR_BayerRGGB2RGB, "bayer_bggr": cv2.COLOR_BayerBGGR2RGB,
    "bayer_gbrg": cv2.COLOR_BayerGBRG2RGB, "bayer_grbg": cv2.COLOR_BayerGRBG2RGB,
}
_YUV = {"uyvy": cv2.COLOR_YUV2RGB_UYVY, "yuyv": cv2.COLOR_YUV2RGB_YUYV}


def _to8(values: np.ndarray) -> np.ndarray:
    """16-bit → 8-bit with rounding: 0 → 0, 65535 → 255, g * 257 → g exactly."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _pixel_rows(msg: Any, channels: int, sample: np.dtype) -> np.ndarray:
    """(H, W, C) samples of an Image message in native byte order, padding removed."""
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    row = width * channels * sample.itemsize
    if step < row:
        raise ImageDecodeError(
            f"step {step} is smaller than a row of {width} px x {channels} ch x "
            f"{sample.itemsize} B = {row} B ('{msg.encoding}')")
    data = data_as_array(msg.data)
    need, most = (height - 1) * step + row, height * step
    if not need <= data.size <= most:
        raise ImageDecodeError(
            f"image data has {data.size} bytes, expected {most} for {width}x{height} "
            f"'{msg.encoding}' with step {step}")
    # copy: the result must own writeable memory even when msg.data is read-only bytes
    rows = np.ndarray((height, row), dtype=np.uint8, buffer=data, strides=(step, 1)).copy()
    if sample.itemsize > 1:
        order = ">" if bool(msg.is_bigendian) else "<"
        rows = rows.view(sample.newbyteorder(order)).astype(sample)
    return rows.reshape(height, width, channels)


def image_to_rgb(msg: Any) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a ``sensor_msgs/Image`` (encodings in ``ENCODINGS``)."""
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise ImageDecodeError(
            f"unsupported image encoding '{encoding}' (supported: {sorted(ENCODINGS)})")
    channels, sample, layout = ENCODINGS[encoding]
    px = _pixel_rows(msg, channels, sample)
    if layout in _YUV:
        if px.shape[1] % 2:
            raise ImageDecodeError(f"'{encoding}' needs an even width, got {px.shape[1]}")
        return cv2.cvtColor(px, _YUV[layout])
    if sample.itemsize > 1:
        px = _to8(px)
    if layout in _BAYER:
        return cv2.cvtColor(px[:, :, 0], _BAYER[layout])
    if layout == "mono":
        return np.repeat(px, 3, axis=2)
    if layout in ("bgr", "bgra"):
        px = px[:, :, 2::-1]
    return np.ascontiguousarray(px[:, :, :3])


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a ``sensor_msgs/CompressedImage`` (JPEG, PNG, ... via OpenCV)."""
    fmt = str(getattr(msg, "format", ""))
    if "compresseddepth" in fmt.lower().replace(" ", ""):
        raise ImageDecodeError(f"'{fmt}' is a depth image, not a camera image")
    data = data_as_array(msg.data)
    if data.size == 0:
        raise ImageDecodeError("compressed image is empty")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise ImageDecodeError(f"OpenCV cannot decode the {data.size}-byte '{fmt}' image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
        raise ImageDecodeError(f"expected a non-empty (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    return rgb


def rgb_to_image(rgb: np.ndarray, header: Any, factory: MessageFactory | None = None,
                 encoding: str = "rgb8") -> Any:
    """``sensor_msgs/Image`` of an RGB array in ``encoding`` (rgb8, bgr8, rgba8, bgra8, mono8)."""
    factory = factory or default_factory()
    rgb = _check_rgb(rgb)
    if encoding == "rgb8":
        px = rgb
    elif encoding == "bgr8":
        px = rgb[:, :, ::-1]
    elif encoding in ("rgba8", "bgra8"):
        alpha = np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)
        px = np.concatenate([rgb if encoding == "rgba8" else rgb[:, :, ::-1], alpha], axis=2)
    elif encoding == "mono8":
        px = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    else:
        raise ImageDecodeError(f"cannot encode an RGB image as '{encoding}' "
                               "(use rgb8, bgr8, rgba8, bgra8 or mono8)")
    px = np.ascontiguousarray(px)
    height, width = px.shape[:2]
    return factory.new("Image", header=header, height=int(height), width=int(width),
                       encoding=encoding, is_bigendian=0, step=int(px.strides[0]),
                       data=factory.uint8_data(px.reshape(-1)))


def rgb_to_compressed(rgb: np.ndarray, header: Any, factory: MessageFactory | None = None,
                      fmt: str = "jpeg", quality: int = 90) -> Any:
    """``sensor_msgs/CompressedImage`` (jpeg or png) with image_transport's format string."""
    factory = factory or default_factory()
    rgb = _check_rgb(rgb)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    if fmt in ("jpeg", "jpg"):
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        fmt = "jpeg"
    elif fmt == "png":
        ok, buf = cv2.imencode(".png", bgr)
    else:
        raise ImageDecodeError(f"cannot compress to '{fmt}' (use jpeg or png)")
    if not ok:
        raise ImageDecodeError(f"OpenCV failed to encode a {rgb.shape} image as {fmt}")
    return factory.new("CompressedImage", header=header, format=f"rgb8; {fmt} compressed bgr8",
                       data=factory.uint8_data(buf.reshape(-1)))


# --------------------------------------------------------------------------------------------
# CameraInfo
# --------------------------------------------------------------------------------------------
_D_LENGTHS = {"plumb_bob": 5, "rational_polynomial": 8, "equidistant": 4}


def _field(msg: Any, *names: str) -> Any:
    """First attribute of ``names`` the message has (ROS 2 ``k`` vs ROS 1 ``K``)."""
    for n in names:
        if hasattr(msg, n):
            return getattr(msg, n)
    raise CalibrationError(f"CameraInfo has none of the fields {names}")


def _distortion(model: str, d: np.ndarray, frame: str) -> tuple[str, np.ndarray]:
    """Validated (model, D): short vectors padded with zeros, zero tails trimmed."""
    if model == "":
        if not np.any(d):
            return "none", np.zeros(0)
        if d.size > 5:
            raise CalibrationError(
                f"camera '{frame}': empty distortion_model with {d.size} non-zero coefficients")
        model = "plumb_bob"
    if model == "none":
        if np.any(d):
            raise CalibrationError(f"camera '{frame}': distortion_model 'none' but D={d.tolist()}")
        return model, np.zeros(0)
    n = _D_LENGTHS.get(model)
    if n is None:
        raise CalibrationError(f"camera '{frame}': unsupported distortion model '{model}' "
                               f"(supported: {sorted(_D_LENGTHS)} and 'none')")
    if d.size > n and np.any(d[n:]):
        raise CalibrationError(
            f"camera '{frame}': {model} takes {n} coefficients, got {d.size}: {d.tolist()}")
    out = np.zeros(n)
    out[:min(n, d.size)] = d[:n]
    return model, out


def camera_info_to_model(msg: Any, binned_roi: bool = True) -> CameraModel:
    """``CameraModel`` of a CameraInfo (ROS 2 ``k``/``d`` or ROS 1 ``K``/``D``).

    With ``binned_roi`` (default) the model describes the image actually published: a
    region of interest shifts the principal point and sets the size, binning divides the
    first two rows of K and the size (image_geometry's convention, no half-pixel shift).
    ``binned_roi=False`` returns the full-sensor calibration. An all-zero K (an
    uncalibrated camera) or an ROI outside the sensor raises ``CalibrationError``.
    """
    frame = str(getattr(getattr(msg, "header", None), "frame_id", "?"))
    K = np.asarray(_field(msg, "k", "K"), dtype=np.float64).reshape(-1)
    if K.size != 9:
        raise CalibrationError(f"camera '{frame}': K must have 9 values, got {K.size}")
    K = K.reshape(3, 3)
    if not np.any(K):
        raise CalibrationError(f"camera '{frame}' is not calibrated: K is all zeros")
    D = np.asarray(_field(msg, "d", "D"), dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(D)):
        raise CalibrationError(f"camera '{frame}': D is not finite: {D.tolist()}")
    model, D = _distortion(str(msg.distortion_model), D, frame)
    width, height = int(msg.width), int(msg.height)
    if binned_roi:
        roi = getattr(msg, "roi", None)
        x0, y0 = (int(roi.x_offset), int(roi.y_offset)) if roi is not None else (0, 0)
        rw, rh = (int(roi.width), int(roi.height)) if roi is not None else (0, 0)
        if (rw, rh) == (0, 0):  # "full resolution" per sensor_msgs/RegionOfInterest
            if (x0, y0) != (0, 0):
                raise CalibrationError(f"camera '{frame}': ROI has offsets but no size")
            rw, rh = width, height
        if rw <= 0 or rh <= 0 or x0 + rw > width or y0 + rh > height:
            raise CalibrationError(
                f"camera '{frame}': ROI x={x0} y={y0} {rw}x{rh} is outside the {width}x{height} sensor")
        bx = int(getattr(msg, "binning_x", 0)) or 1
        by = int(getattr(msg, "binning_y", 0)) or 1
        K = K.copy()
        K[0, 2] -= x0
        K[1, 2] -= y0
        K[0] /= bx
        K[1] /= by
        width, height = rw // bx, rh // by
    try:
        return CameraModel(width=width, height=height, K=K, D=D, distortion_model=model)
    except CalibrationError as exc:
        raise CalibrationError(f"camera '{frame}': {exc}") from None


def model_to_camera_info(model: CameraModel, header: Any,
                         factory: MessageFactory | None = None) -> Any:
    """CameraInfo of an unrectified camera: K, D, R = I, P = [K | 0] (for the bag writers)."""
    factory = factory or default_factory()
    upper = factory.backend == "rosbags" and any(
        n == "K" for n, _ in factory.typestore.fielddefs[factory.type_name("CameraInfo")][1])
    P = np.zeros((3, 4))
    P[:, :3] = model.K
    values = {"k": model.K, "d": model.D, "r": np.eye(3), "p": P}
    arrays = {(k.upper() if upper else k): factory.float64_array(v) for k, v in values.items()}
    dm = "" if model.distortion_model == "none" else model.distortion_model
    return factory.new("CameraInfo", header=header, height=int(model.height),
                       width=int(model.width), distortion_model=dm, **arrays)
