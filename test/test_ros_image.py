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
    (dict(K=np.diag([-1.0, 1.0, 1.0])), "degenerate intrinsics"),
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
