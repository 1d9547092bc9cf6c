"""Camera messages ⇄ arrays: Image / CompressedImage → RGB uint8, RGB → Image, CameraInfo → model.

(Over ~400 lines: every ROS image encoding, the compressed formats and CameraInfo checks share
one set of limits and one error type; split apart they would each re-check the same layout.)

Pure functions on duck-typed messages (rclpy or rosbags). The segmenter wants (H, W, 3)
uint8 RGB whatever the driver publishes, so every supported encoding is turned into that:
8-bit colour and mono, 16-bit (scaled to 8 bits: v * 255 / 65535), Bayer mosaics (OpenCV
demosaicing; ROS names the 2×2 pattern from the top-left pixel) and packed YUV 4:2:2
(ROS ``yuv422`` is UYVY byte order; OpenCV's BT.601 video-range conversion, as cv_bridge).
Generic ``8UC3`` / ``8UC4`` / ``16UC3`` are taken as OpenCV's BGR(A) channel order.
``step`` row padding and ``is_bigendian`` are honoured; the result always owns its memory.
Anything else raises ``ImageDecodeError`` instead of guessing.

Bounded work per message: a raw image's height, width, step and encoding are checked against
its data length and the limits (`MAX_IMAGE_SIDE`, `MAX_IMAGE_PIXELS`) before its buffer is
touched; a ``CompressedImage`` must be JPEG or PNG (what image_transport's ``compressed``
plugin writes) and its size is read from the JPEG SOF / PNG IHDR header and checked against
the limits, and against the CameraInfo size when the caller gives one (``expected_size``),
*before* OpenCV decodes it (a 1 KB file can otherwise claim 20000×20000 pixels). CameraInfo
sizes, K, D, R and P are checked for finite, plausible values. Only the project's errors
(``ImageDecodeError``, ``CalibrationError``) leave these functions.
"""
from __future__ import annotations

import zlib
from typing import Any

import cv2
import numpy as np

from clip2scene_core.distortion import normalize_distortion
from clip2scene_core.errors import CalibrationError, ImageDecodeError
from clip2scene_core.types import CameraModel

from .msgs import MessageFactory, data_as_array, default_factory

__all__ = [
    "ENCODINGS", "image_to_rgb", "compressed_to_rgb", "rgb_to_image", "rgb_to_compressed",
    "camera_info_to_model", "model_to_camera_info", "compressed_image_size",
    "MAX_IMAGE_SIDE", "MAX_IMAGE_PIXELS", "MAX_JPEG_SCANS", "COMPRESSED_FORMATS",
    "MAX_FOCAL_PX", "MAX_PRINCIPAL_POINT", "MAX_DISTORTION", "MAX_DISTORTION_COEFFS",
]

# Limits on one image, checked before any pixel is allocated or decoded. Above the cameras
# robots carry: 8K UHD is 7680 x 4320 = 33.18 Mpx (automotive cameras are 1-8 Mpx). Decoding
# an image at the limit costs ~100 MB and about a second per camera, so it stays bounded.
#: pixels along either side of an image (and of a CameraInfo): 16K panoramas pass
MAX_IMAGE_SIDE = 16384
#: width x height of one image: 2^25 = 33.55 Mpx, just above 8K UHD (100 MB as RGB)
MAX_IMAGE_PIXELS = 1 << 25
#: scans (SOS markers) of one JPEG: libjpeg writes 1 (baseline) or ~10 (progressive); each
#: scan of a crafted progressive file costs a pass over the whole image
MAX_JPEG_SCANS = 256
#: what a CompressedImage may hold: image_transport's ``compressed`` plugin writes these two
COMPRESSED_FORMATS = ("jpeg", "png")
# CameraInfo plausibility: |fx|, |fy| in pixels (a 0.1° telephoto on a 16K sensor is ~9e6),
# the principal point within this many pixels of the image, |distortion coefficients|
MAX_FOCAL_PX = 1e7
MAX_PRINCIPAL_POINT = 1e6
MAX_DISTORTION = 1e6
#: entries of D (rational_polynomial uses 8; ROS allows longer vectors, zero-padded here)
MAX_DISTORTION_COEFFS = 64

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


def _short(text: Any, limit: int = 80) -> str:
    """A message string (encoding, format, frame id) for an error message, cut to ``limit``."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _check_size(width: int, height: int, what: str) -> None:
    """Refuse an image size outside (0, MAX_IMAGE_SIDE] per side or over MAX_IMAGE_PIXELS."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{what} has no pixels ({width}x{height})")
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"{what} is {width}x{height}: larger than the limit of {MAX_IMAGE_SIDE} px per side "
            f"and {MAX_IMAGE_PIXELS} px in all")


def _check_expected(width: int, height: int, expected_size: tuple[int, int] | None) -> None:
    if expected_size is not None and (width, height) != tuple(expected_size):
        ew, eh = expected_size
        raise CalibrationError(f"image is {width}x{height} but CameraInfo says {ew}x{eh}")


def _data(msg: Any) -> np.ndarray:
    try:
        return data_as_array(msg.data)
    except (AttributeError, TypeError, ValueError, OverflowError, BufferError) as exc:
        raise ImageDecodeError(f"image data is not a byte array: {exc}") from None


def _pixel_rows(msg: Any, channels: int, sample: np.dtype,
                expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, C) samples of an Image message in native byte order, padding removed."""
    try:
        height, width, step = int(msg.height), int(msg.width), int(msg.step)
        big = bool(msg.is_bigendian)
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise ImageDecodeError(f"not a sensor_msgs/Image: {exc}") from None
    _check_size(width, height, "image")
    _check_expected(width, height, expected_size)
    row = width * channels * sample.itemsize
    if step < row:
        raise ImageDecodeError(
            f"step {step} is smaller than a row of {width} px x {channels} ch x "
            f"{sample.itemsize} B = {row} B ('{_short(msg.encoding)}')")
    data = _data(msg)
    need, most = (height - 1) * step + row, height * step
    if not need <= data.size <= most:
        raise ImageDecodeError(
            f"image data has {data.size} bytes, expected {most} for {width}x{height} "
            f"'{_short(msg.encoding)}' with step {step}")
    # copy: the result must own writeable memory even when msg.data is read-only bytes
    rows = np.ndarray((height, row), dtype=np.uint8, buffer=data, strides=(step, 1)).copy()
    if sample.itemsize > 1:
        order = ">" if big else "<"
        rows = rows.view(sample.newbyteorder(order)).astype(sample)
    return rows.reshape(height, width, channels)


def _cv(what: str, fn: Any, *args: Any) -> np.ndarray:
    """An OpenCV call whose failure (``cv2.error``, out of memory) is an ImageDecodeError."""
    try:
        return fn(*args)
    except (cv2.error, MemoryError, ValueError, TypeError) as exc:
        raise ImageDecodeError(f"OpenCV failed to {what}: {' '.join(str(exc).split())[:300]}") from None


def image_to_rgb(msg: Any, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a ``sensor_msgs/Image`` (encodings in ``ENCODINGS``).

    ``expected_size`` (width, height), e.g. the CameraInfo's: a different size raises
    ``CalibrationError`` before the pixels are read.
    """
    try:
        encoding = str(msg.encoding)
    except AttributeError as exc:
        raise ImageDecodeError(f"not a sensor_msgs/Image: {exc}") from None
    if encoding not in ENCODINGS:
        raise ImageDecodeError(
            f"unsupported image encoding '{_short(encoding)}' (supported: {sorted(ENCODINGS)})")
    channels, sample, layout = ENCODINGS[encoding]
    px = _pixel_rows(msg, channels, sample, expected_size)
    if layout in _YUV:
        if px.shape[1] % 2:
            raise ImageDecodeError(f"'{encoding}' needs an even width, got {px.shape[1]}")
        return _cv(f"convert '{encoding}'", cv2.cvtColor, px, _YUV[layout])
    if sample.itemsize > 1:
        px = _to8(px)
    if layout in _BAYER:
        return _cv(f"demosaic '{encoding}'", cv2.cvtColor, np.ascontiguousarray(px[:, :, 0]),
                   _BAYER[layout])
    if layout == "mono":
        return np.repeat(px, 3, axis=2)
    if layout in ("bgr", "bgra"):
        px = px[:, :, 2::-1]
    return np.ascontiguousarray(px[:, :, :3])


# --------------------------------------------------------------------------------------------
# CompressedImage: the size from the header, then OpenCV
# --------------------------------------------------------------------------------------------
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type → allowed bit depths (PNG spec, IHDR)
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# JPEG start-of-frame markers (C4 DHT, C8 JPG and CC DAC share the range but are not frames)
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                       0xCF})
# markers without a length field: TEM, RST0-7 (SOI / EOI are handled on their own)
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# other containers people put in a CompressedImage by mistake, for a clear error
_OTHER_SIGNATURES = (
    (b"BM", "BMP"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"), (b"RIFF", "RIFF/WebP"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"P1", "PBM"), (b"P2", "PGM"), (b"P3", "PPM"),
    (b"P4", "PBM"), (b"P5", "PGM"), (b"P6", "PPM"), (b"#?RADIANCE", "HDR"), (b"v/1\x01", "OpenEXR"),
)


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk (which must come first, CRC-checked)."""
    if len(data) < 33:
        raise ImageDecodeError(f"PNG is truncated: {len(data)} bytes, its header alone needs 33")
    length, kind = int.from_bytes(data[8:12], "big"), data[12:16]
    if kind != b"IHDR" or length != 13:
        raise ImageDecodeError("PNG does not start with a 13-byte IHDR chunk")
    if zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):
        raise ImageDecodeError("PNG IHDR chunk fails its CRC check: the file is corrupt")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, color, compression, filter_, interlace = data[24:29]
    if color not in _PNG_DEPTHS or depth not in _PNG_DEPTHS[color] or compression or filter_ \
            or interlace > 1:
        raise ImageDecodeError(
            f"PNG IHDR is invalid (bit depth {depth}, colour type {color}, compression "
            f"{compression}, filter {filter_}, interlace {interlace})")
    return width, height


def _jpeg_header(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's first start-of-frame segment (markers walked up to it)."""
    n, i = len(data), 2
    while True:
        while i < n and data[i] == 0xFF and i + 1 < n and data[i + 1] == 0xFF:
            i += 1   # fill bytes before a marker
        if i + 2 > n:
            raise ImageDecodeError("JPEG is truncated before its frame header (SOF)")
        if data[i] != 0xFF:
            raise ImageDecodeError(f"JPEG is corrupt: expected a marker at byte {i}")
        marker = data[i + 1]
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):
            raise ImageDecodeError(
                "JPEG has no frame header (SOF) before its "
                + {0xD8: "second start-of-image", 0xD9: "end-of-image", 0xDA: "first scan"}[marker])
        if i + 4 > n:
            raise ImageDecodeError("JPEG is truncated inside a segment header")
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            raise ImageDecodeError(f"JPEG segment at byte {i} has an invalid length {length}")
        if marker in _JPEG_SOF:
            if length < 8 or i + 10 > n:
                raise ImageDecodeError("JPEG frame header (SOF) is truncated")
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            components = data[i + 9]
            if height == 0:
                raise ImageDecodeError("JPEG frame header gives height 0 (DNL), not supported")
            if components not in (1, 3, 4):
                raise ImageDecodeError(f"JPEG has {components} colour components (1, 3 or 4 expected)")
            return width, height
        i += 2 + length


# pixels as the sensor delivered them: the CameraInfo describes those, so an EXIF rotation
# (which camera drivers never write) must not turn the image
_IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


def _compressed_kind(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG_SIGNATURE:
        return "png"
    return ""


def compressed_image_size(data: bytes | bytearray | memoryview | np.ndarray,
                          fmt: str = "") -> tuple[str, int, int]:
    """(kind, width, height) of a JPEG or PNG, read from its header without decoding.

    ``kind`` is "jpeg" or "png" (from the bytes, whatever ``fmt`` says); other formats and
    malformed headers raise ``ImageDecodeError``.
    """
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    kind = _compressed_kind(raw)
    if kind == "png":
        width, height = _png_size(raw)
    elif kind == "jpeg":
        width, height = _jpeg_header(raw)
    else:
        other = next((name for sig, name in _OTHER_SIGNATURES if raw.startswith(sig)), None)
        what = f"a {other} image" if other else "neither JPEG nor PNG data"
        raise ImageDecodeError(
            f"compressed image ('{_short(fmt)}') holds {what}: only JPEG and PNG are accepted "
            f"(image_transport's compressed formats)")
    return kind, width, height


def compressed_to_rgb(msg: Any, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a ``sensor_msgs/CompressedImage`` holding a JPEG or PNG.

    The size is read from the file's header and checked against `MAX_IMAGE_SIDE` /
    `MAX_IMAGE_PIXELS` and ``expected_size`` (width, height; a mismatch is a
    ``CalibrationError``) before OpenCV decodes anything; a JPEG may have at most
    `MAX_JPEG_SCANS` scans. Other formats (BMP, TIFF, ``compressedDepth``, ...) and corrupt
    data raise ``ImageDecodeError``.
    """
    fmt = str(getattr(msg, "format", ""))
    if "compresseddepth" in fmt.lower().replace(" ", ""):
        raise ImageDecodeError(f"'{_short(fmt)}' is a depth image, not a camera image")
    data = _data(msg)
    if data.size == 0:
        raise ImageDecodeError("compressed image is empty")
    raw = data.tobytes()
    kind, width, height = compressed_image_size(raw, fmt)
    _check_size(width, height, f"{kind.upper()} image")
    _check_expected(width, height, expected_size)
    if kind == "jpeg":
        scans = raw.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise ImageDecodeError(f"JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are accepted")
    img = _cv(f"decode the {data.size}-byte {kind.upper()} image", cv2.imdecode,
              np.ascontiguousarray(data), _IMREAD_FLAGS)
    if img is None:
        raise ImageDecodeError(
            f"OpenCV cannot decode the {data.size}-byte {kind.upper()} image ('{_short(fmt)}')")
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 \
            or img.shape[:2] != (height, width):
        raise ImageDecodeError(
            f"the {kind.upper()} header says {width}x{height} but OpenCV decoded "
            f"{img.shape} {img.dtype}")
    return _cv("convert BGR to RGB", cv2.cvtColor, img, cv2.COLOR_BGR2RGB)


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
def _field(msg: Any, *names: str) -> Any:
    """First attribute of ``names`` the message has (ROS 2 ``k`` vs ROS 1 ``K``)."""
    for n in names:
        if hasattr(msg, n):
            return getattr(msg, n)
    raise CalibrationError(f"CameraInfo has none of the fields {names}")


def _distortion(model: str, d: np.ndarray, frame: str) -> tuple[str, np.ndarray]:
    """Validated (model, D) (`clip2scene_core.distortion.normalize_distortion`), naming the camera."""
    try:
        return normalize_distortion(model, d)
    except CalibrationError as exc:
        raise CalibrationError(f"camera '{frame}': {exc}") from None


def _values(msg: Any, names: tuple[str, ...], frame: str, sizes: tuple[int, ...],
            max_len: int = 64) -> np.ndarray:
    """A CameraInfo array field as finite float64 values of one of ``sizes`` (empty: any)."""
    raw = _field(msg, *names)
    try:
        n = len(raw)
    except TypeError:
        raise CalibrationError(f"camera '{frame}': {names[0].upper()} is not an array") from None
    if n > max_len or (sizes and n not in sizes):
        raise CalibrationError(f"camera '{frame}': {names[0].upper()} has {n} values, expected "
                               + (" or ".join(map(str, sizes)) if sizes else f"at most {max_len}"))
    try:
        values = np.asarray(raw, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CalibrationError(f"camera '{frame}': {names[0].upper()} is not numeric: {exc}") from None
    if values.size != n:
        raise CalibrationError(f"camera '{frame}': {names[0].upper()} is not a flat array")
    if not np.all(np.isfinite(values)):
        raise CalibrationError(f"camera '{frame}': {names[0].upper()} is not finite: {values.tolist()}")
    return values


def _int(msg: Any, name: str, frame: str, default: Any = None) -> int:
    value = getattr(msg, name, default)
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise CalibrationError(f"camera '{frame}': {name} is not an integer: {_short(repr(value))}") \
            from None


def camera_info_to_model(msg: Any, binned_roi: bool = True) -> CameraModel:
    """``CameraModel`` of a CameraInfo (ROS 2 ``k``/``d`` or ROS 1 ``K``/``D``).

    With ``binned_roi`` (default) the model describes the image actually published: a
    region of interest shifts the principal point and sets the size, binning divides the
    first two rows of K and the size (image_geometry's convention, no half-pixel shift).
    ``binned_roi=False`` returns the full-sensor calibration. An all-zero K (an
    uncalibrated camera), an ROI outside the sensor, a size of 0 or beyond `MAX_IMAGE_SIDE` /
    `MAX_IMAGE_PIXELS`, non-finite K / D / R / P, focal lengths that are not positive or beyond
    `MAX_FOCAL_PX`, a principal point beyond `MAX_PRINCIPAL_POINT` or distortion coefficients
    beyond `MAX_DISTORTION` raise ``CalibrationError``.
    """
    try:
        frame = _short(getattr(getattr(msg, "header", None), "frame_id", "?"), 64)
    except Exception:  # noqa: BLE001 - a frame id only names the camera in messages
        frame = "?"
    width, height = _int(msg, "width", frame), _int(msg, "height", frame)
    try:
        _check_size(width, height, "CameraInfo")
    except ImageDecodeError as exc:
        raise CalibrationError(f"camera '{frame}': {exc}") from None
    K = _values(msg, ("k", "K"), frame, (9,))
    K = K.reshape(3, 3)
    if not np.any(K):
        raise CalibrationError(f"camera '{frame}' is not calibrated: K is all zeros")
    fx, fy = K[0, 0], K[1, 1]
    if not (0 < fx <= MAX_FOCAL_PX and 0 < fy <= MAX_FOCAL_PX):
        raise CalibrationError(f"camera '{frame}': focal lengths fx={fx:g} fy={fy:g} must be in "
                               f"(0, {MAX_FOCAL_PX:g}] px")
    if np.max(np.abs(K)) > max(MAX_FOCAL_PX, MAX_PRINCIPAL_POINT) \
            or abs(K[0, 2]) > MAX_PRINCIPAL_POINT or abs(K[1, 2]) > MAX_PRINCIPAL_POINT:
        raise CalibrationError(f"camera '{frame}': K holds implausible values: {K.tolist()}")
    D = _values(msg, ("d", "D"), frame, (), MAX_DISTORTION_COEFFS)
    if np.any(np.abs(D) > MAX_DISTORTION):
        raise CalibrationError(f"camera '{frame}': distortion coefficients beyond "
                               f"{MAX_DISTORTION:g}: {D.tolist()}")
    for names, size in ((("r", "R"), 9), (("p", "P"), 12)):   # unused here, but must be sane
        if any(hasattr(msg, n) for n in names):
            _values(msg, names, frame, (size,))
    try:
        model_name = getattr(msg, "distortion_model", "")
        model_name = model_name if isinstance(model_name, str) else str(model_name)
    except Exception:  # noqa: BLE001
        model_name = "?"
    model, D = _distortion(_short(model_name, 64), D, frame)
    if binned_roi:
        roi = getattr(msg, "roi", None)
        x0, y0 = (_int(roi, "x_offset", frame), _int(roi, "y_offset", frame)) \
            if roi is not None else (0, 0)
        rw, rh = (_int(roi, "width", frame), _int(roi, "height", frame)) \
            if roi is not None else (0, 0)
        if (rw, rh) == (0, 0):  # "full resolution" per sensor_msgs/RegionOfInterest
            if (x0, y0) != (0, 0):
                raise CalibrationError(f"camera '{frame}': ROI has offsets but no size")
            rw, rh = width, height
        if rw <= 0 or rh <= 0 or x0 < 0 or y0 < 0 or x0 + rw > width or y0 + rh > height:
            raise CalibrationError(
                f"camera '{frame}': ROI x={x0} y={y0} {rw}x{rh} is outside the {width}x{height} sensor")
        bx = _int(msg, "binning_x", frame, 0) or 1
        by = _int(msg, "binning_y", frame, 0) or 1
        if bx < 0 or by < 0:
            raise CalibrationError(f"camera '{frame}': binning {bx}x{by} must not be negative")
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
