"""Image / CompressedImage / CameraInfo conversions on a real nuScenes camera frame."""
from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from clip2scene_core.errors import CalibrationError, ImageDecodeError
from clip2scene_core.types import Calibration, CameraFrame
from clip2scene_ros.image import (
    camera_info_to_model, compressed_to_rgb, image_to_rgb, model_to_camera_info, rgb_to_compressed,
    rgb_to_image,
)
from clip2scene_ros.msgs import MessageFactory, make_header

FACTORY = MessageFactory.from_rosbags("ROS2_HUMBLE")
TS = FACTORY.typestore
ROS1 = MessageFactory.from_rosbags("ROS1_NOETIC")
SCENE = "nuscenes/mmdet3d_demo_scene-0061"
CAM_FRONT = "n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg"
STAMP = 1532402927612460000


def cdr(msg, name):
    typ = f"sensor_msgs/msg/{name}"
    return TS.deserialize_cdr(TS.serialize_cdr(msg, typ), typ)


@pytest.fixture(scope="module")
def jpeg_bytes(data_dir: Path) -> bytes:
    return (data_dir / SCENE / CAM_FRONT).read_bytes()


@pytest.fixture(scope="module")
def full_rgb(jpeg_bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(jpeg_bytes, np.uint8), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(bgr[:, :, ::-1])


@pytest.fixture(scope="module")
def rgb(full_rgb) -> np.ndarray:
    """A 240 x 322 crop (even width for YUV, odd sizes elsewhere would work too)."""
    return np.ascontiguousarray(full_rgb[300:540, 400:722])


@pytest.fixture(scope="module")
def front_info(data_dir: Path) -> dict:
    with open(data_dir / SCENE / "n015-2018-07-24-11-22-45+0800.pkl", "rb") as fh:
        info = pickle.load(fh)
    return info["data_list"][0]["images"]["CAM_FRONT"]


def image_msg(pixels: np.ndarray, encoding: str, pad: int = 0, big: bool = False):
    """Image message built by hand: rows of ``pixels`` bytes followed by ``pad`` garbage bytes."""
    h, w = pixels.shape[:2]
    raw = pixels.astype(pixels.dtype.newbyteorder(">" if big else "<")).reshape(h, -1).view(np.uint8)
    rows = np.full((h, raw.shape[1] + pad), 0xCD, dtype=np.uint8)
    rows[:, :raw.shape[1]] = raw
    return FACTORY.new("Image", header=make_header(STAMP, "CAM_FRONT", FACTORY), height=h, width=w,
                       encoding=encoding, is_bigendian=int(big), step=rows.shape[1],
                       data=rows.reshape(-1).copy())


def gray3(rgb: np.ndarray) -> np.ndarray:
    return np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)


@pytest.mark.parametrize("pad", [0, 13])
def test_8bit_colour_encodings(rgb, pad):
    alpha = np.random.default_rng(0).integers(0, 256, rgb.shape[:2] + (1,), dtype=np.uint8)
    cases = {
        "rgb8": rgb, "bgr8": rgb[:, :, ::-1], "8UC3": rgb[:, :, ::-1],
        "rgba8": np.concatenate([rgb, alpha], 2), "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], 2),
        "8UC4": np.concatenate([rgb[:, :, ::-1], alpha], 2),
    }
    for enc, px in cases.items():
        out = image_to_rgb(cdr(image_msg(np.ascontiguousarray(px), enc, pad), "Image"))
        assert out.dtype == np.uint8 and out.shape == rgb.shape, enc
        np.testing.assert_array_equal(out, rgb, err_msg=enc)


def test_duck_typed_message_with_bytes_data(rgb):
    """rclpy keeps uint8[] as array.array / bytes: decode them and return owned, writeable memory."""
    import array
    from types import SimpleNamespace
    h, w = rgb.shape[:2]
    for data in (rgb.tobytes(), array.array("B", rgb.tobytes())):
        msg = SimpleNamespace(height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3,
                              data=data)
        out = image_to_rgb(msg)
        np.testing.assert_array_equal(out, rgb)
        out[0, 0] = 0                                   # must not raise: writeable copy
    owned = image_msg(rgb, "rgb8")
    assert not np.shares_memory(image_to_rgb(owned), owned.data)


@pytest.mark.parametrize("big", [False, True])
def test_mono_and_16bit_encodings(rgb, big):
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    for enc in ("mono8", "8UC1"):
        np.testing.assert_array_equal(image_to_rgb(cdr(image_msg(gray, enc, 3), "Image")), gray3(rgb))
    # g * 257 spans the 16-bit range exactly: it must scale back to g
    for enc in ("mono16", "16UC1"):
        out = image_to_rgb(cdr(image_msg(gray.astype(np.uint16) * 257, enc, 2, big), "Image"))
        np.testing.assert_array_equal(out, gray3(rgb))
    out = image_to_rgb(cdr(image_msg(rgb.astype(np.uint16) * 257, "rgb16", 0, big), "Image"))
    np.testing.assert_array_equal(out, rgb)
    out = image_to_rgb(cdr(image_msg(rgb[:, :, ::-1].astype(np.uint16) * 257, "bgr16", 6, big),
                           "Image"))
    np.testing.assert_array_equal(out, rgb)
    # arbitrary 16-bit values: v * 255 / 65535, rounded
    v = np.random.default_rng(1).integers(0, 65536, (31, 17), dtype=np.uint16)
    out = image_to_rgb(image_msg(v, "mono16", 0, big))
    np.testing.assert_array_equal(out[:, :, 0], np.round(v / 65535.0 * 255).astype(np.uint8))


def bayer_mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Sample the real image through a colour-filter array named top-left first (ROS naming)."""
    channel = {"r": 0, "g": 1, "b": 2}
    out = np.zeros(rgb.shape[:2], np.uint8)
    for k, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, channel[pattern[k]]]
    return out


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_demosaic_uses_the_ros_pattern(rgb, pattern):
    mosaic = bayer_mosaic(rgb, pattern)
    errors = {}
    for decode_as in ("rggb", "bggr", "gbrg", "grbg"):
        out = image_to_rgb(cdr(image_msg(mosaic, f"bayer_{decode_as}8", 5), "Image"))
        assert out.shape == rgb.shape
        errors[decode_as] = np.abs(out.astype(int) - rgb).mean()
    assert errors[pattern] < 1.5                       # demosaicing is close to the original
    assert all(errors[pattern] < 0.5 * e for p, e in errors.items() if p != pattern), errors
    out16 = image_to_rgb(image_msg(mosaic.astype(np.uint16) * 257, f"bayer_{pattern}16", 0, True))
    assert np.abs(out16.astype(int) - rgb).mean() == errors[pattern]


def yuv422(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BT.601 video-range Y, and U, V averaged over horizontal pixel pairs."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    q = lambda a: np.clip(np.round(a), 0, 255).astype(np.uint8)  # noqa: E731
    return q(y), q((u[:, 0::2] + u[:, 1::2]) / 2), q((v[:, 0::2] + v[:, 1::2]) / 2)


def test_yuv422_byte_orders(rgb):
    y, u, v = yuv422(rgb)
    h, w = y.shape
    uyvy = np.stack([u, y[:, 0::2], v, y[:, 1::2]], -1).reshape(h, w, 2)
    yuyv = np.stack([y[:, 0::2], u, y[:, 1::2], v], -1).reshape(h, w, 2)
    for enc, px in [("yuv422", uyvy), ("uyvy", uyvy), ("yuyv", yuyv), ("yuv422_yuy2", yuyv)]:
        out = image_to_rgb(cdr(image_msg(px, enc, 4), "Image"))
        assert np.abs(out.astype(int) - rgb).mean() < 1.5, enc
    wrong = image_to_rgb(image_msg(uyvy, "yuyv"))
    assert np.abs(wrong.astype(int) - rgb).mean() > 20


def test_compressed_real_jpeg(jpeg_bytes, full_rgb):
    msg = FACTORY.new("CompressedImage", header=make_header(STAMP, "CAM_FRONT", FACTORY),
                      format="jpeg", data=np.frombuffer(jpeg_bytes, np.uint8).copy())
    out = compressed_to_rgb(cdr(msg, "CompressedImage"))
    assert out.shape == (900, 1600, 3)
    np.testing.assert_array_equal(out, full_rgb)


def test_compressed_channel_order_and_roundtrip(rgb):
    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])       # OpenCV writes BGR arrays
    assert ok
    msg = FACTORY.new("CompressedImage", format="png", data=png.reshape(-1))
    np.testing.assert_array_equal(compressed_to_rgb(msg), rgb)
    header = make_header(STAMP, "CAM_FRONT", FACTORY)
    back = cdr(rgb_to_compressed(rgb, header, FACTORY, fmt="png"), "CompressedImage")
    assert back.format == "rgb8; png compressed bgr8"
    np.testing.assert_array_equal(compressed_to_rgb(back), rgb)
    jpg = cdr(rgb_to_compressed(rgb, header, FACTORY, fmt="jpeg", quality=95), "CompressedImage")
    assert "jpeg" in jpg.format and len(jpg.data) < rgb.nbytes
    assert np.abs(compressed_to_rgb(jpg).astype(int) - rgb).mean() < 3


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_rgb_to_image_roundtrip(rgb, encoding):
    msg = cdr(rgb_to_image(rgb, make_header(STAMP, "overlay", FACTORY), FACTORY, encoding), "Image")
    assert (msg.encoding, msg.height, msg.width) == (encoding, 240, 322)
    assert msg.header.frame_id == "overlay"
    expected = gray3(rgb) if encoding == "mono8" else rgb
    np.testing.assert_array_equal(image_to_rgb(msg), expected)


@pytest.mark.parametrize("change, match", [
    ({"encoding": "32FC1"}, "unsupported image encoding '32FC1'"),
    ({"step": 100}, "step 100 is smaller"),
    ({"height": 241}, "image data has"),
    ({"width": 0}, "no pixels"),
])
def test_bad_images_raise(rgb, change, match):
    msg = image_msg(rgb, "rgb8")
    for k, v in change.items():
        setattr(msg, k, v)
    with pytest.raises(ImageDecodeError, match=match):
        image_to_rgb(msg)


def test_bad_compressed_and_yuv_raise(rgb, jpeg_bytes):
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        compressed_to_rgb(FACTORY.new("CompressedImage", format="jpeg",
                                      data=np.frombuffer(jpeg_bytes[:200], np.uint8).copy()))
    with pytest.raises(ImageDecodeError, match="empty"):
        compressed_to_rgb(FACTORY.new("CompressedImage", format="jpeg"))
    with pytest.raises(ImageDecodeError, match="depth"):
        compressed_to_rgb(FACTORY.new("CompressedImage", format="16UC1; compressedDepth",
                                      data=np.frombuffer(jpeg_bytes, np.uint8).copy()))
    with pytest.raises(ImageDecodeError, match="even width"):
        image_to_rgb(image_msg(np.zeros((4, 5, 2), np.uint8), "uyvy"))
    with pytest.raises(ImageDecodeError, match="cannot encode"):
        rgb_to_image(rgb, make_header(0, "x", FACTORY), FACTORY, "yuv422")


# ---- CameraInfo ------------------------------------------------------------------------------
def camera_info(factory, K, width=1600, height=900, D=(0.0,) * 5, model="plumb_bob", **extra):
    upper = factory is ROS1
    arrays = {"k": np.asarray(K, float).reshape(-1), "d": np.asarray(D, float)}
    arrays = {(k.upper() if upper else k): v for k, v in arrays.items()}
    return factory.new("CameraInfo", header=make_header(STAMP, "CAM_FRONT", factory), width=width,
                       height=height, distortion_model=model, **arrays, **extra)


def test_camera_info_real_calibration_ros2_and_ros1(front_info, full_rgb):
    K = np.asarray(front_info["cam2img"], dtype=np.float64)
    model = camera_info_to_model(cdr(camera_info(FACTORY, K), "CameraInfo"))
    np.testing.assert_array_equal(model.K, K)
    assert (model.width, model.height) == (full_rgb.shape[1], full_rgb.shape[0])
    assert model.distortion_model == "plumb_bob" and model.D.shape == (5,)
    # the model fits the real image and the real extrinsic
    CameraFrame("CAM_FRONT", full_rgb, Calibration(model, np.asarray(front_info["lidar2cam"])))
    typ = "sensor_msgs/msg/CameraInfo"
    ros1 = ROS1.typestore.deserialize_ros1(
        ROS1.typestore.serialize_ros1(camera_info(ROS1, K), typ), typ)
    assert hasattr(ros1, "K") and not hasattr(ros1, "k")
    m1 = camera_info_to_model(ros1)
    np.testing.assert_array_equal(m1.K, K)
    assert (m1.width, m1.height) == (1600, 900)


@pytest.mark.parametrize("factory", [FACTORY, ROS1], ids=["ros2", "ros1"])
def test_model_to_camera_info_roundtrip(front_info, factory):
    K = np.asarray(front_info["cam2img"], dtype=np.float64)
    D = np.array([-0.3, 0.1, 1e-3, -2e-3, 0.0, 0.01, 0.0, 0.002])
    first = camera_info_to_model(camera_info(FACTORY, K, D=D, model="rational_polynomial"))
    msg = model_to_camera_info(first, make_header(STAMP, "CAM_FRONT", factory), factory)
    again = camera_info_to_model(msg)
    np.testing.assert_array_equal(again.K, K)
    np.testing.assert_array_equal(again.D, D)
    assert again.distortion_model == "rational_polynomial"
    P = np.asarray(msg.P if factory is ROS1 else msg.p).reshape(3, 4)
    np.testing.assert_array_equal(P[:, :3], K)


def test_camera_info_binning_and_roi(front_info, data_dir):
    """The published (binned ROI) model projects like the full model shifted and scaled."""
    K = np.asarray(front_info["cam2img"], dtype=np.float64)
    roi = FACTORY.new("RegionOfInterest", x_offset=100, y_offset=50, width=1200, height=800)
    msg = camera_info(FACTORY, K, binning_x=2, binning_y=4, roi=roi)
    model = camera_info_to_model(cdr(msg, "CameraInfo"))
    assert (model.width, model.height) == (600, 200)
    full = camera_info_to_model(msg, binned_roi=False)
    np.testing.assert_array_equal(full.K, K)
    assert (full.width, full.height) == (1600, 900)
    pts = np.fromfile(data_dir / SCENE / (
        "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"),
        dtype=np.float32).reshape(-1, 5)[:, :3].astype(np.float64)
    T = np.asarray(front_info["lidar2cam"], dtype=np.float64)
    cam = pts @ T[:3, :3].T + T[:3, 3]
    cam = cam[cam[:, 2] > 1.0]
    uv_full = (cam @ K.T)[:, :2] / cam[:, 2:3]
    uv_pub = (cam @ model.K.T)[:, :2] / cam[:, 2:3]
    np.testing.assert_allclose(uv_pub[:, 0], (uv_full[:, 0] - 100) / 2, rtol=0, atol=1e-9)
    np.testing.assert_allclose(uv_pub[:, 1], (uv_full[:, 1] - 50) / 4, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(K=np.zeros(9)), "not calibrated: K is all zeros"),
    (dict(K=np.diag([-1.0, 1.0, 1.0])), "focal lengths fx=-1 fy=1 must be in"),
    (dict(D=np.arange(1.0, 9.0)), "plumb_bob takes 5 coefficients"),
    (dict(model="fisheye62"), "unsupported distortion model 'fisheye62'"),
    (dict(D=(0.1, 0.0, 0.0, 0.0, 0.0), model="none"), "'none' but D"),
    (dict(roi="outside"), "outside the 1600x900 sensor"),
])
def test_bad_camera_info_raises(front_info, kwargs, match):
    K = kwargs.pop("K", np.asarray(front_info["cam2img"]))
    if kwargs.pop("roi", None):
        kwargs["roi"] = FACTORY.new("RegionOfInterest", x_offset=900, y_offset=0, width=800, height=900)
    with pytest.raises(CalibrationError, match=match):
        camera_info_to_model(camera_info(FACTORY, K, **kwargs))


def test_short_distortion_vectors_are_padded(front_info):
    K = np.asarray(front_info["cam2img"])
    m = camera_info_to_model(camera_info(FACTORY, K, D=(0.1, -0.05, 0.0, 0.0)))
    np.testing.assert_array_equal(m.D, [0.1, -0.05, 0.0, 0.0, 0.0])
    m = camera_info_to_model(camera_info(FACTORY, K, D=(), model=""))
    assert m.distortion_model == "none" and m.D.size == 0


# ---- bounded work per message (issue 9) -----------------------------------------------------
import struct  # noqa: E402
import zlib  # noqa: E402

from clip2scene_ros.image import (  # noqa: E402
    MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, MAX_JPEG_SCANS, compressed_image_size,
)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_file(width: int, height: int, idat: bytes, depth: int = 8, color: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def compressed(data: bytes, fmt: str = "png"):
    return FACTORY.new("CompressedImage", header=make_header(1, "cam", FACTORY), format=fmt,
                       data=FACTORY.uint8_data(np.frombuffer(data, np.uint8)))


def test_bmp_in_a_compressed_image_is_an_image_decode_error():
    """A 70-byte BMP made OpenCV raise cv2.error (replay died; the node dropped the frame)."""
    ok, buf = cv2.imencode(".bmp", np.zeros((2, 3, 3), np.uint8))
    bmp = bytearray(buf.tobytes())
    bmp[18:26] = struct.pack("<ii", 2**31 - 1, 2**31 - 1)     # absurd size: cv2.error before
    with pytest.raises(ImageDecodeError, match="holds a BMP image: only JPEG and PNG"):
        compressed_to_rgb(compressed(bytes(bmp)))
    ok, tif = cv2.imencode(".tiff", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ImageDecodeError, match="TIFF"):
        compressed_to_rgb(compressed(tif.tobytes(), "tiff"))


@pytest.mark.parametrize("side", [20000, 32000, 2**31 - 1])
def test_oversized_png_is_refused_from_its_header(side):
    """A 183-byte corrupt PNG took 4.9 GB / 3.7 s, a 1.17 MB 20000x20000 one 3.1 GB / 43 s:
    decoded before any size check. The IHDR size is now checked first."""
    co = zlib.compressobj(9)
    idat = co.compress(b"\x00" * (1 + 3 * 1000) * 4) + co.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(ImageDecodeError, match=f"{side}x{side}: larger than the limit"):
        compressed_to_rgb(compressed(png_file(side, side, idat)))


def test_image_size_is_checked_against_the_camera_info_before_decoding():
    png = cv2.imencode(".png", np.zeros((4, 6, 3), np.uint8))[1].tobytes()
    assert compressed_image_size(png) == ("png", 6, 4)
    assert compressed_to_rgb(compressed(png), expected_size=(6, 4)).shape == (4, 6, 3)
    with pytest.raises(CalibrationError, match="image is 6x4 but CameraInfo says 1600x900"):
        compressed_to_rgb(compressed(png), expected_size=(1600, 900))
    # a within-limits size that does not match the CameraInfo is never decoded either
    big = png_file(5000, 5000, b"")
    with pytest.raises(CalibrationError, match="5000x5000"):
        compressed_to_rgb(compressed(big), expected_size=(1600, 900))


def test_jpeg_size_comes_from_its_sof_header(jpeg_bytes):
    assert compressed_image_size(jpeg_bytes) == ("jpeg", 1600, 900)
    data = bytearray(jpeg_bytes)
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(ImageDecodeError, match="60000x60000: larger than the limit"):
        compressed_to_rgb(compressed(bytes(data), "jpeg"))
    data[i + 5:i + 9] = struct.pack(">HH", 0, 100)
    with pytest.raises(ImageDecodeError, match="height 0"):
        compressed_to_rgb(compressed(bytes(data), "jpeg"))
    with pytest.raises(ImageDecodeError, match="truncated before its frame header"):
        compressed_to_rgb(compressed(jpeg_bytes[:i], "jpeg"))
    many_scans = jpeg_bytes[:-2] + b"\xff\xda" * (MAX_JPEG_SCANS + 1) + b"\xff\xd9"
    with pytest.raises(ImageDecodeError, match="scans"):
        compressed_to_rgb(compressed(many_scans, "jpeg"))


def test_every_real_image_header_gives_the_size_opencv_decodes(data_dir):
    paths = sorted(data_dir.rglob("*.jpg")) + sorted(data_dir.rglob("*.png"))
    assert len(paths) >= 5
    for path in paths[:40]:
        data = path.read_bytes()
        kind, w, h = compressed_image_size(data)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        assert (kind, img.shape[1], img.shape[0]) == (path.suffix[1:].replace("jpg", "jpeg"), w, h), path


def test_corrupt_png_header_and_data():
    png = bytearray(cv2.imencode(".png", np.zeros((4, 6, 3), np.uint8))[1].tobytes())
    png[17] ^= 0xFF                                   # size changed without fixing the CRC
    with pytest.raises(ImageDecodeError, match="CRC"):
        compressed_to_rgb(compressed(bytes(png)))
    good = cv2.imencode(".png", np.zeros((4, 6, 3), np.uint8))[1].tobytes()
    with pytest.raises(ImageDecodeError, match="OpenCV cannot decode"):
        compressed_to_rgb(compressed(good[:40] + b"\x00" * 20))


@pytest.mark.parametrize("height, width, step, match", [
    (MAX_IMAGE_SIDE + 1, 1, 3 * 1, "larger than the limit"),
    (2**32 - 1, 2**32 - 1, 3 * (2**32 - 1), "larger than the limit"),
    (8192, 4097, 3 * 4097, "larger than the limit"),
    (0, 5, 15, "no pixels"),
])
def test_raw_image_sizes_are_checked_before_the_buffer(height, width, step, match):
    assert 8192 * 4097 > MAX_IMAGE_PIXELS >= 7680 * 4320   # 8K UHD passes
    msg = FACTORY.new("Image", header=make_header(1, "cam", FACTORY), height=height, width=width,
                      encoding="rgb8", step=step, data=FACTORY.uint8_data(np.zeros(12, np.uint8)))
    with pytest.raises(ImageDecodeError, match=match):
        image_to_rgb(msg)


def test_raw_image_against_the_camera_info_size(rgb):
    msg = image_msg(rgb, "rgb8")
    h, w = rgb.shape[:2]
    assert image_to_rgb(msg, expected_size=(w, h)).shape == rgb.shape
    with pytest.raises(CalibrationError, match=f"image is {w}x{h} but CameraInfo says 10x10"):
        image_to_rgb(msg, expected_size=(10, 10))


@pytest.mark.parametrize("change, match", [
    (dict(width=0, height=0), "no pixels"),
    (dict(width=100_000, height=900), "larger than the limit"),
    (dict(K=np.array([np.nan, 0, 800, 0, 1266, 450, 0, 0, 1])), "K is not finite"),
    (dict(K=np.array([0.0, 0, 800, 0, 0, 450, 0, 0, 1])), "focal lengths fx=0 fy=0"),
    (dict(K=np.array([1e12, 0, 800, 0, 1e12, 450, 0, 0, 1])), "focal lengths"),
    (dict(K=np.array([1266, 0, 1e9, 0, 1266, 450, 0, 0, 1])), "implausible"),
    (dict(D=(np.inf, 0, 0, 0, 0)), "D is not finite"),
    (dict(D=(1e9, 0, 0, 0, 0)), "distortion coefficients beyond"),
    (dict(D=(0.0,) * 1000), "D has 1000 values"),
    (dict(p=np.full(12, np.nan)), "P is not finite"),
    (dict(r=np.full(9, np.inf)), "R is not finite"),
])
def test_absurd_camera_info_values_are_calibration_errors(front_info, change, match):
    K = change.pop("K", np.asarray(front_info["cam2img"]).reshape(-1))
    msg = camera_info(FACTORY, np.asarray(K).reshape(3, 3), **{k: v for k, v in change.items()
                                                               if k in ("width", "height", "D")})
    for key in ("p", "r"):
        if key in change:
            setattr(msg, key, FACTORY.float64_array(change[key]))
    with pytest.raises(CalibrationError, match=match):
        camera_info_to_model(msg)


def test_one_definition_of_distortion_models_for_types_lens_code_and_camera_info():
    from clip2scene_core.distortion import normalize_distortion, resolve_distortion_model
    from clip2scene_core.geometry import distortion_coefficients
    from clip2scene_core.types import CameraModel
    from clip2scene_ros.image import _distortion

    assert resolve_distortion_model("", [0, 0, 0]) == "none"
    assert resolve_distortion_model("", [0.1]) == "plumb_bob"
    assert CameraModel(4, 4, np.eye(3), [0.1, 0.0], "").distortion_model == "plumb_bob"
    model, D = normalize_distortion("plumb_bob", [0.1, 0.2, 0.0, 0.0])
    assert model == "plumb_bob" and D.tolist() == [0.1, 0.2, 0.0, 0.0, 0.0]
    assert _distortion("", np.array([0.1, 0.2, 0.0, 0.0]), "cam")[1].tolist() == D.tolist()
    np.testing.assert_array_equal(
        distortion_coefficients(CameraModel(4, 4, np.eye(3), [0.1, 0.2, 0, 0], "plumb_bob")), D)
    for model, D in (("fisheye62", []), ("none", [0.1]), ("equidistant", [0, 0, 0, 0, 1.0]),
                     ("plumb_bob", [np.nan])):
        with pytest.raises(CalibrationError) as core:
            normalize_distortion(model, D)
        with pytest.raises(CalibrationError) as ros:
            _distortion(model, np.asarray(D, dtype=float), "cam")
        assert str(ros.value) == f"camera 'cam': {core.value}"
