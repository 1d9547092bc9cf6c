"""Fuzz: hostile messages and params files end in the project's own errors, fast and small.

Property tests (hypothesis) over everything that reads outside input: PointCloud2 (fields,
count, offset, datatype, point_step, row_step, height, width, byte order, data length), Image
(encoding, step, size), CompressedImage (format; random, truncated and mutated bytes,
including real JPEG / PNG files from test/data with mutated headers), CameraInfo, TF
(TransformBuffer / ListenerBuffer / TfResolver: add and look up) and the params file (random
YAML, YAML aliases, binary bytes). For every case:

- no exception other than a ``clip2scene_core.errors.Clip2SceneError`` subclass;
- no case over ``DEADLINE`` (hypothesis' per-example deadline);
- memory bounded: the traced peak (Python and numpy allocations) of one case stays under
  ``CASE_MEMORY``, and the process' peak RSS grows by less than ``FILE_RSS_GROWTH`` over the
  whole file (this also sees OpenCV's allocations).

And the pipeline: whatever a camera sends, the sweep still goes out labelled and the camera is
skipped with a reason. Examples per property: ``CLIP2SCENE_FUZZ_EXAMPLES`` (default 150; the
whole file runs in well under a minute). Runs are derandomised, so a failure reproduces;
``CLIP2SCENE_FUZZ_RANDOM=1`` draws new cases (a longer hunt:
``CLIP2SCENE_FUZZ_EXAMPLES=5000 CLIP2SCENE_FUZZ_RANDOM=1 pytest test/test_fuzz_messages.py``).
"""
from __future__ import annotations

import contextlib
import os
import resource
import struct
import tempfile
import tracemalloc
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clip2scene_core.config import load_yaml
from clip2scene_core.errors import Clip2SceneError
from clip2scene_core.types import CameraModel
from clip2scene_ros.image import (
    ENCODINGS, MAX_IMAGE_PIXELS, camera_info_to_model, compressed_to_rgb, image_to_rgb,
    model_to_camera_info,
)
from clip2scene_ros.msgs import MessageFactory, make_header
from clip2scene_ros.node_config import NODE_NAME, NodeConfig, load_params_file, parameter_specs
from clip2scene_ros.pipeline import CameraInput, PipelineConfig, SegmentationPipeline
from clip2scene_ros.pointcloud2 import (
    FLOAT32, MAX_POINTS, cloud_to_scan, create_cloud, labeled_cloud_like, make_point_field,
    read_points,
)
from clip2scene_ros.tf import ListenerBuffer, TfResolver, TransformBuffer, transform_to_matrix

FACTORY = MessageFactory.from_rosbags("ROS2_HUMBLE")
EXAMPLES = int(os.environ.get("CLIP2SCENE_FUZZ_EXAMPLES", "150"))
DEADLINE = timedelta(seconds=2)
CASE_MEMORY = 256 << 20          # bytes traced by tracemalloc during one case
FILE_RSS_GROWTH = 1 << 30        # peak RSS growth over the whole file

# CLIP2SCENE_FUZZ_RANDOM=1: new random cases on every run (default: the same cases each run)
FUZZ = settings(max_examples=EXAMPLES, deadline=DEADLINE, database=None,
                derandomize=os.environ.get("CLIP2SCENE_FUZZ_RANDOM", "") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
FEW = settings(FUZZ, max_examples=max(10, EXAMPLES // 3))

U32 = st.integers(0, 2**32 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)


_PICK = st.integers(0, 2**16 - 1)


def mostly(usual: st.SearchStrategy, hostile: st.SearchStrategy, weight: int = 3) -> st.SearchStrategy:
    """``usual`` about weight/(weight+1) of the time, else ``hostile``, so that most cases get
    past the first check and reach the deeper code. (Hypothesis favours 0 and boundary values
    of a draw; both pick ``usual`` here.)"""
    return _PICK.flatmap(lambda k: hostile if k % (weight + 1) == 1 else usual)


def chance(draw, n: int) -> bool:
    """True about 1 time in ``n`` (not on hypothesis' favourite values 0 and 2^16 - 1)."""
    return draw(_PICK) % n == 1

JPEG_FILE = "scannet/mmdet3d_pr748_multiview/posed_images/scene0000_00/00000.jpg"   # 1296x968
PNG_FILE = "rellis3d/utils_example/frame000104-1581624663_149.png"                  # 1920x1200
DATA = Path(__file__).resolve().parent / "data"


# ----------------------------------------------------------------------------- harness
def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


@pytest.fixture(scope="module", autouse=True)
def memory_watch():
    """Trace allocations for the per-case bound; check the peak RSS growth of the file."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    rss0 = _rss_bytes()
    yield
    if started:
        tracemalloc.stop()
    assert _rss_bytes() - rss0 < FILE_RSS_GROWTH


@contextlib.contextmanager
def bounded():
    """One fuzz case: its traced peak allocation must stay under CASE_MEMORY."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    yield
    peak = tracemalloc.get_traced_memory()[1]
    assert peak - base < CASE_MEMORY, f"one case allocated {(peak - base) >> 20} MB"


def project_errors_only(fn, *args, **kwargs) -> Any:
    """fn's result, or None when it raised one of the project's errors (anything else fails)."""
    try:
        return fn(*args, **kwargs)
    except Clip2SceneError:
        return None


def _random_bytes(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


# ----------------------------------------------------------------------------- PointCloud2
NAMES = st.one_of(st.sampled_from(["x", "y", "z", "intensity", "i", "ring", "t", "label", "rgb",
                                   "", "x_0", "x_1", "unnamed_field_1"]), st.text(max_size=6))


@st.composite
def point_fields(draw, factory: MessageFactory) -> list:
    if draw(mostly(st.just(True), st.just(False))):   # a driver-like layout, a few fields hostile
        spec = [[n, 4 * i, FLOAT32, 1] for i, n in enumerate(["x", "y", "z", "intensity", "ring"])]
        spec = spec[:draw(mostly(st.integers(3, 5), st.integers(0, 2)))]
        if draw(st.booleans()):
            spec.append(["t", 4 * len(spec), draw(st.integers(1, 8)), draw(st.integers(1, 3))])
        for _ in range(draw(mostly(st.just(0), st.integers(1, 3), 2))):
            if not spec:
                break
            f = draw(st.sampled_from(spec))
            k = draw(st.integers(0, 3))
            f[k] = draw([NAMES, st.one_of(st.integers(0, 64), U32),
                         st.one_of(st.integers(0, 10), st.integers(0, 255)),
                         st.one_of(st.integers(0, 4), st.integers(0, 300), U32)][k])
    else:
        spec = [[draw(NAMES), draw(st.one_of(st.integers(0, 32), U32)),
                 draw(st.one_of(st.integers(1, 8), st.integers(0, 255))),
                 draw(st.one_of(st.integers(1, 4), st.integers(0, 2000), U32))]
                for _ in range(draw(st.integers(0, 6)))]
    return [make_point_field(n, o, d, c, factory) for n, o, d, c in spec]


@st.composite
def clouds(draw, factory: MessageFactory = FACTORY) -> Any:
    fields = draw(point_fields(factory))
    end = max((f.offset + 4 * min(f.count, 2**20) for f in fields), default=0)
    height = draw(mostly(st.integers(0, 4), st.one_of(st.integers(0, 64), U32)))
    width = draw(mostly(st.integers(0, 64), U32))
    point_step = draw(mostly(st.sampled_from([min(end, 2**32 - 1), min(end + 3, 2**32 - 1)]),
                             st.one_of(st.integers(0, 64), U32)))
    row_step = draw(mostly(st.just(min(width * point_step, 2**32 - 1)),
                           st.one_of(st.integers(0, 512), U32)))
    need = (height - 1) * row_step + width * point_step if height and width else 0
    seed = draw(U32)
    if 0 < need <= 1 << 16 and draw(mostly(st.just(True), st.just(False))):
        n = need + draw(st.sampled_from([0, 0, 0, 1, -1]))
    else:
        n = draw(st.integers(0, 256))
    data = _random_bytes(seed, max(n, 0))
    return factory.new("PointCloud2", header=make_header(draw(st.integers(0, 2**62)), "lidar", factory),
                       height=height, width=width, fields=fields,
                       is_bigendian=draw(st.booleans()), point_step=point_step, row_step=row_step,
                       data=factory.uint8_data(data), is_dense=draw(st.booleans()))


def check_cloud(cloud: Any) -> None:
    with bounded():
        got = project_errors_only(cloud_to_scan, cloud, ("intensity", "ring"))
        project_errors_only(read_points, cloud)
        if got is not None:
            scan, stats = got
            assert stats.n_points == int(cloud.height) * int(cloud.width) <= MAX_POINTS
            assert len(scan) == stats.n_kept and np.all(np.isfinite(scan.points))
            n = stats.n_points
            out = project_errors_only(labeled_cloud_like, cloud, np.full(n, -1), np.zeros(n),
                                      msg_factory=FACTORY)
            if out is not None:
                assert out.width * out.height == n


@FUZZ
@given(cloud=clouds())
def test_pointcloud2_fuzz(cloud):
    check_cloud(cloud)


def test_pointcloud2_fuzz_rclpy_messages():
    """The same property on rclpy's generated classes (array('B') data, their own types)."""
    try:
        rclpy_factory = MessageFactory.from_rclpy()
    except Clip2SceneError:
        pytest.skip("rclpy's message classes are not importable")

    @FEW
    @given(cloud=clouds(rclpy_factory))
    def run(cloud):
        check_cloud(cloud)

    run()


# ----------------------------------------------------------------------------- Image
@st.composite
def raw_images(draw) -> tuple[Any, tuple[int, int] | None]:
    encoding = draw(mostly(st.sampled_from(sorted(ENCODINGS)), st.one_of(
        st.sampled_from(["", "32FC1", "16SC1", "jpeg", "RGB8", "rgb8 "]), st.text(max_size=8))))
    height = draw(mostly(st.integers(1, 12), st.one_of(st.just(0), U32)))
    width = draw(mostly(st.integers(1, 12), st.one_of(st.just(0), U32)))
    channels, sample, _ = ENCODINGS.get(encoding, (3, np.dtype(np.uint8), ""))
    row = width * channels * sample.itemsize
    step = draw(mostly(st.sampled_from([min(row, 2**32 - 1), min(row + 3, 2**32 - 1)]),
                       st.one_of(st.integers(0, 128), U32)))
    need = (height - 1) * step + row if height and width else 0
    if 0 < need <= 1 << 16 and draw(mostly(st.just(True), st.just(False))):
        n = draw(st.sampled_from([k for k in (need, height * step, need - 1, need + 1)
                                  if k <= (1 << 16) + 1]))
    else:
        n = draw(st.integers(0, 256))
    msg = FACTORY.new("Image", header=make_header(1, "cam", FACTORY), height=height, width=width,
                      encoding=encoding, is_bigendian=draw(st.integers(0, 1)), step=step,
                      data=FACTORY.uint8_data(_random_bytes(draw(U32), max(n, 0))))
    expected = draw(st.one_of(st.none(), st.just((width, height)), st.just((width, height)),
                              st.tuples(st.integers(1, 12), st.integers(1, 12))))
    return msg, expected


@FUZZ
@given(case=raw_images())
def test_image_fuzz(case):
    msg, expected = case
    with bounded():
        rgb = project_errors_only(image_to_rgb, msg, expected_size=expected)
    if rgb is not None:
        assert rgb.shape == (msg.height, msg.width, 3) and rgb.dtype == np.uint8
        assert expected is None or (rgb.shape[1], rgb.shape[0]) == tuple(expected)


# ----------------------------------------------------------------------------- CompressedImage
def _tiny(ext: str) -> bytes:
    img = (np.arange(17 * 11 * 3) % 251).astype(np.uint8).reshape(11, 17, 3)
    return cv2.imencode(ext, img)[1].tobytes()


REAL = {"jpeg": (DATA / JPEG_FILE).read_bytes(), "png": (DATA / PNG_FILE).read_bytes(),
        "tiny_jpeg": _tiny(".jpg"), "tiny_png": _tiny(".png")}
REAL_SIZE = {"jpeg": (1296, 968), "png": (1920, 1200), "tiny_jpeg": (17, 11), "tiny_png": (17, 11)}


def _sof_offset(data: bytes) -> int:
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return i


DIMS = st.one_of(st.integers(0, 2048), st.integers(16000, 70000), st.integers(0, 2**31 + 5))


@st.composite
def compressed_payloads(draw) -> tuple[bytes, tuple[int, int] | None]:
    kind = draw(mostly(st.sampled_from(["jpeg", "png", "tiny_jpeg", "tiny_png", "tiny_jpeg",
                                        "tiny_png"]), st.sampled_from(["random", "signature"])))
    if kind == "random":
        return draw(st.binary(max_size=600)), None
    if kind == "signature":   # other containers and broken JPEG / PNG starts
        head = draw(st.sampled_from([b"BM", b"GIF89a", b"II*\x00", b"RIFF", b"\xff\xd8\xff",
                                     b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"P6\n", b"\x00"]))
        return head + draw(st.binary(max_size=200)), None
    data = bytearray(REAL[kind])
    if kind.endswith("png"):
        if draw(mostly(st.just(False), st.just(True), 2)):   # other dimensions / depth / colour type, CRC fixed up
            w, h = draw(DIMS), draw(DIMS)
            data[16:24] = struct.pack(">II", w % 2**32, h % 2**32)
            if draw(st.booleans()):
                data[24], data[25] = draw(st.integers(0, 20)), draw(st.integers(0, 8))
            data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    else:
        sof = _sof_offset(bytes(data))
        if draw(mostly(st.just(False), st.just(True), 2)):
            h, w = draw(DIMS) % 65536, draw(DIMS) % 65536
            data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
            if draw(st.booleans()):
                data[sof + 9] = draw(st.integers(0, 255))   # number of components
    for _ in range(draw(mostly(st.just(0), st.integers(1, 4), 1))):   # byte flips in the header
        pos = draw(mostly(st.integers(8, min(len(data), 1024) - 1), st.integers(0, 7)))
        data[pos] = draw(st.integers(0, 255))
    if draw(mostly(st.just(False), st.just(True), 2)):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut]
    if chance(draw, 6):             # a run of markers / garbage inserted
        pos = draw(st.integers(0, min(len(data), 1024)))
        data[pos:pos] = draw(st.sampled_from([b"\xff" * 40, b"\xff\xda" * 300, b"\xff\xd8",
                                              b"\x00" * 64]))
    return bytes(data), REAL_SIZE[kind]


FORMATS = st.one_of(st.sampled_from(["jpeg", "png", "rgb8; jpeg compressed bgr8",
                                     "bgr8; png compressed ", "bmp", "", "tiff",
                                     "16UC1; compressedDepth png"]), st.text(max_size=12))


@FUZZ
@given(payload=compressed_payloads(), fmt=FORMATS, with_info=st.booleans())
def test_compressed_image_fuzz(payload, fmt, with_info):
    data, size = payload
    msg = FACTORY.new("CompressedImage", header=make_header(1, "cam", FACTORY), format=fmt,
                      data=FACTORY.uint8_data(np.frombuffer(data, np.uint8)))
    expected = size if with_info else None
    with bounded():
        rgb = project_errors_only(compressed_to_rgb, msg, expected_size=expected)
    if rgb is not None:
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
        assert rgb.shape[0] * rgb.shape[1] <= MAX_IMAGE_PIXELS
        assert expected is None or (rgb.shape[1], rgb.shape[0]) == expected


# ----------------------------------------------------------------------------- CameraInfo
@st.composite
def camera_infos(draw) -> Any:
    K = [1266.4, 0.0, 816.3, 0.0, 1266.4, 491.5, 0.0, 0.0, 1.0]
    if chance(draw, 4):
        K = draw(st.lists(FLOATS, min_size=9, max_size=9))
    else:
        for _ in range(draw(mostly(st.just(0), st.integers(1, 2), 1))):
            K[draw(st.integers(0, 8))] = draw(FLOATS)
    D = draw(mostly(st.lists(st.floats(-1, 1), max_size=8),
                    st.one_of(st.lists(FLOATS, max_size=12), st.lists(st.just(0.0), max_size=100))))
    zero_or = lambda hostile: mostly(st.just(0), hostile)  # noqa: E731
    roi = FACTORY.new("RegionOfInterest", x_offset=draw(zero_or(st.one_of(st.integers(0, 8), U32))),
                      y_offset=draw(zero_or(st.one_of(st.integers(0, 8), U32))),
                      height=draw(zero_or(st.one_of(st.integers(0, 900), U32))),
                      width=draw(zero_or(st.one_of(st.integers(0, 1600), U32))))
    msg = FACTORY.new(
        "CameraInfo", header=make_header(1, draw(st.text(max_size=4)), FACTORY),
        height=draw(mostly(st.just(900), st.one_of(st.integers(0, 1200), U32))),
        width=draw(mostly(st.just(1600), st.one_of(st.integers(0, 1600), U32))),
        distortion_model=draw(mostly(st.sampled_from(["", "plumb_bob", "rational_polynomial",
                                                      "equidistant", "none"]),
                                     st.one_of(st.just("fisheye"), st.text(max_size=8)))),
        d=FACTORY.float64_array(D), k=FACTORY.float64_array(K),
        r=FACTORY.float64_array(draw(st.lists(FLOATS, min_size=9, max_size=9))
                                if chance(draw, 6) else np.eye(3)),
        p=FACTORY.float64_array(draw(st.lists(FLOATS, min_size=12, max_size=12))
                                if chance(draw, 6) else np.zeros(12)),
        binning_x=draw(zero_or(st.one_of(st.integers(0, 4), U32))),
        binning_y=draw(zero_or(st.one_of(st.integers(0, 4), U32))), roi=roi)
    if chance(draw, 10):      # wrong lengths, as a duck-typed message could carry
        msg.k = np.asarray(draw(st.lists(st.floats(-10, 10), max_size=12)))
    return msg


@FUZZ
@given(info=camera_infos())
def test_camera_info_fuzz(info):
    with bounded():
        model = project_errors_only(camera_info_to_model, info)
    if model is not None:
        assert 0 < model.width * model.height <= MAX_IMAGE_PIXELS
        assert np.all(np.isfinite(model.K)) and np.all(np.isfinite(model.D))
        assert model.K[0, 0] > 0 and model.K[1, 1] > 0


# ----------------------------------------------------------------------------- TF
FRAMES = st.sampled_from(["map", "odom", "base_link", "lidar", "cam", "/map", "", "cam/"])


@st.composite
def transforms(draw) -> Any:
    kind = draw(st.sampled_from(["unit", "near", "random"]))
    if kind == "random":
        q = draw(st.lists(FLOATS, min_size=4, max_size=4))
    else:
        q = np.asarray(draw(st.lists(st.floats(-1, 1), min_size=4, max_size=4)))
        assume(np.linalg.norm(q) > 1e-3)
        q = q / np.linalg.norm(q) * (1.0 if kind == "unit" else draw(st.floats(0.99, 1.01)))
    t = draw(st.one_of(st.lists(st.floats(-100, 100), min_size=3, max_size=3),
                       st.lists(FLOATS, min_size=3, max_size=3)))
    stamp = FACTORY.new("Time", sec=draw(st.one_of(st.integers(0, 5), st.integers(-2**31, 2**31 - 1))),
                        nanosec=draw(st.one_of(st.integers(0, 10**9 - 1), U32)))
    header = FACTORY.new("Header", stamp=stamp, frame_id=draw(FRAMES))
    tr = FACTORY.new("Transform", translation=FACTORY.new("Vector3", x=t[0], y=t[1], z=t[2]),
                     rotation=FACTORY.new("Quaternion", x=float(q[0]), y=float(q[1]),
                                          z=float(q[2]), w=float(q[3])))
    return FACTORY.new("TransformStamped", header=header, child_frame_id=draw(FRAMES), transform=tr)


def _rigid(T: np.ndarray) -> bool:
    R = T[:3, :3]
    return bool(np.all(np.isfinite(T)) and np.allclose(R @ R.T, np.eye(3), atol=1e-6))


@FUZZ
@given(items=st.lists(st.tuples(transforms(), st.booleans()), max_size=8),
       queries=st.lists(st.tuples(FRAMES, FRAMES, st.one_of(st.integers(0, 6 * 10**9),
                                                            st.integers(-2**63, 2**63))),
                        max_size=5))
def test_tf_fuzz(items, queries):
    with bounded():
        buf = TransformBuffer(tolerance_ns=10**6)
        listener = ListenerBuffer(timeout_s=0.0)
        for tr, static in items:
            project_errors_only(buf.add, tr, static)
            (listener.on_tf_static if static else listener.on_tf)(
                FACTORY.new("TFMessage", transforms=[tr]))
            T = project_errors_only(transform_to_matrix, tr)
            assert T is None or _rigid(T)
        resolver = TfResolver(buf, "auto")
        for target, source, stamp in queries:
            for T in (project_errors_only(buf.lookup, target, source, stamp),
                      project_errors_only(buf.lookup_full, target, stamp, source, stamp // 2, "map"),
                      project_errors_only(listener.lookup, target, source, stamp),
                      project_errors_only(resolver, target, stamp, source, stamp)):
                assert T is None or _rigid(T)
            buf.can_transform(target, source, stamp)


# ----------------------------------------------------------------------------- params file
_TMP = Path(tempfile.mkdtemp(prefix="clip2scene-fuzz-params-"))
PARAM_NAMES = [s.name for s in parameter_specs()] + [
    "camera.front.image_topic", "camera.front.transport", "use_sim_time", "qos_overrides./x.y"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), FLOATS,
                    st.text(max_size=10))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=12)
TYPED = st.one_of(st.booleans(), st.integers(-5, 2000), st.floats(-1, 100),
                  st.sampled_from(["auto", "cpu", "cuda:0", "raw", "compressed", "keep", "drop",
                                   "input", "compact", "latest", "reliable", "sensor_data", "odom"]),
                  st.lists(st.sampled_from(["front", "left", "car", "road", ""]), max_size=3))
INSERTS = ["&a ", "*a", "*b", "!!python/object:os.system ", "\x00", "{", "[", "- ", ": ", "\t",
           "<<: *a\n", "? ", "!!binary ", "2020-99-99", "\ufeff", "'", '"']


@st.composite
def params_texts(draw) -> bytes:
    kind = draw(mostly(st.just("tree"), st.sampled_from(["text", "binary"])))
    if kind == "binary":
        return draw(st.binary(max_size=400))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    keys = mostly(st.sampled_from(PARAM_NAMES), st.text(max_size=6))
    params = draw(st.dictionaries(keys, mostly(TYPED, VALUES, 2), max_size=6))
    top = draw(st.sampled_from(["/**", NODE_NAME, f"/{NODE_NAME}", "other", "**"]))
    tree = {top: params if chance(draw, 6) else {"ros__parameters": params}}
    text = yaml.safe_dump(tree, allow_unicode=True)
    for _ in range(draw(mostly(st.just(0), st.integers(1, 3), 1))):
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.sampled_from(INSERTS)) + text[pos:]
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(content=params_texts())
def test_params_file_fuzz(content):
    p = _TMP / "params.yaml"
    p.write_bytes(content)
    with bounded():
        cfg = project_errors_only(load_params_file, p)
        project_errors_only(load_yaml, p)
    assert cfg is None or isinstance(cfg, NodeConfig)


@FEW
@given(depth=st.integers(1, 12), width=st.integers(1, 12), where=st.sampled_from(
    ["class_names", "cameras", "slop", "camera"]))
def test_params_alias_bombs(depth, width, where):
    """Aliases of aliases: refused in a params file (as rcl does); bounded in any YAML."""
    lines = ["/**:", "  ros__parameters:", '    l0: &l0 ["lol"]']
    for i in range(1, depth):
        lines.append(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    lines.append(f"    {where}: [{', '.join([f'*l{depth - 1}'] * width)}]")
    p = _TMP / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    with bounded():
        assert project_errors_only(load_params_file, p) is None
        project_errors_only(load_yaml, p)


# ----------------------------------------------------------------------------- pipeline
class _StubResult:
    def __init__(self, n: int) -> None:
        self.labels = np.zeros(n, np.int64)
        self.scores = np.ones(n, np.float32)
        self.class_names = ["thing"]
        self.timings: dict[str, float] = {}
        self.info: dict[str, Any] = {}


class _StubSegmenter:
    """Labels every point 0 and records the cameras it was given."""

    class_names = ["thing"]
    consumes_cameras = True   # every camera is decoded and checked for it (none is idle)

    def __init__(self) -> None:
        self.cameras: list[str] = []

    def segment(self, scan, cameras=(), predictions=(), projections=None):
        self.cameras = [c.name for c in cameras]
        return _StubResult(len(scan))


def _identity_lookup(*_args) -> np.ndarray:
    return np.eye(4)


CLOUD = create_cloud(make_header(5, "lidar", FACTORY),
                     [make_point_field(n, 4 * i, FLOAT32, 1, FACTORY) for i, n in enumerate("xyz")],
                     np.random.default_rng(0).uniform(-20, 20, (64, 3)).astype(np.float32),
                     msg_factory=FACTORY)
GOOD_INFO = model_to_camera_info(CameraModel(17, 11, np.array([[20.0, 0, 8], [0, 20, 5], [0, 0, 1]])),
                                 make_header(1, "cam", FACTORY), FACTORY)


@st.composite
def camera_inputs(draw) -> CameraInput:
    kind = draw(st.sampled_from(["compressed", "raw", "info"]))
    info = GOOD_INFO
    if kind == "compressed":
        data, _ = draw(compressed_payloads())
        image = FACTORY.new("CompressedImage", header=make_header(1, "cam", FACTORY),
                            format=draw(FORMATS), data=FACTORY.uint8_data(np.frombuffer(data, np.uint8)))
    elif kind == "raw":
        image, _ = draw(raw_images())
    else:
        image = FACTORY.new("CompressedImage", header=make_header(1, "cam", FACTORY),
                            format="png", data=FACTORY.uint8_data(np.frombuffer(REAL["tiny_png"], np.uint8)))
        info = draw(camera_infos())
    return CameraInput(draw(st.sampled_from(["front", "left", "rear"])), image, info)


@FEW
@given(cameras=st.lists(camera_inputs(), min_size=1, max_size=3, unique_by=lambda c: c.name),
       lookup_fails=st.booleans())
def test_pipeline_skips_bad_cameras_and_still_labels_the_sweep(cameras, lookup_fails):
    segmenter = _StubSegmenter()
    pipeline = SegmentationPipeline(segmenter, PipelineConfig(publish_overlays=False), FACTORY,
                                    _identity_lookup)

    def broken_lookup(*_args):
        raise RuntimeError("a TF backend's own error type")

    with bounded():
        out = pipeline.process(CLOUD, cameras, tf_lookup=broken_lookup if lookup_fails else None)
    assert out.status == "ok" and out.cloud is not None and out.points_out == 64
    names = {c.name for c in cameras}
    assert set(out.cameras_used) | set(out.cameras_skipped) == names
    assert set(out.cameras_used) == set(segmenter.cameras)
    assert all(reason for reason in out.cameras_skipped.values())
    if lookup_fails:
        assert not out.cameras_used
