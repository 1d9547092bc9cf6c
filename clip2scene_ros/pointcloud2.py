"""``sensor_msgs/PointCloud2`` ⇄ numpy structured arrays, for any field layout.

(Over ~400 lines: sensor_msgs_py's read/write API and our cloud conversions share the layout
checks and limits; one module keeps one owner of the PointCloud2 layout.)

Same API and semantics as ``sensor_msgs_py.point_cloud2`` (``read_points``,
``read_points_numpy``, ``create_cloud``, ``dtype_from_fields``, ``fields_from_dtype``), written
without rclpy so the same code reads rclpy messages and rosbags' deserialised messages. It
handles what drivers actually publish: padding between fields and at the end of a point,
``row_step`` larger than ``width * point_step``, organised clouds (``height > 1``), big-endian
data, fields with ``count > 1`` (read as ``name_0 .. name_{count-1}``, as sensor_msgs_py does)
and non-dense clouds holding NaN. Differences from sensor_msgs_py, on purpose:

* returned arrays are packed copies in native byte order (never views of ``msg.data``);
* an organised array is shaped ``(height, width)`` both when read and when created
  (sensor_msgs_py reads ``(width, height)`` and creates ``height = shape[1]``);
* ``uvs`` indexes the cloud itself (before NaN points are skipped) and also takes (u, v) pairs;
* malformed messages raise ``InvalidPointCloudError`` instead of ``AssertionError``.

On top of that: ``cloud_to_scan`` (message → ``clip2scene_core.types.Scan``),
``labeled_cloud`` (segmentation result → compact output cloud with label / score / packed rgb)
and ``labeled_cloud_like`` (the same result in the input cloud's own layout: organised clouds
stay H×W, every input field passes through).

Labelled clouds carry ``label`` as UINT32 (what PCL's ``PointXYZL`` / ``PointXYZRGBL`` read;
``pcl::fromROSMsg`` drops a UINT16 label), ``UNLABELED`` (65535) for points without a class,
``score`` FLOAT32 and ``rgb`` FLOAT32 holding 0x00RRGGBB.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from clip2scene_core import palette
from clip2scene_core.errors import InvalidPointCloudError
from clip2scene_core.label_spaces import UNLABELED
from clip2scene_core.palette import unpack_rgb
from clip2scene_core.types import Scan

from .msgs import MessageFactory, data_as_array, default_factory, header_stamp_ns, make_header
from .output_schema import OUTPUT_FIELDS, OUTPUT_SCHEMA, Column, encode_labels

__all__ = [
    "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "FLOAT32", "FLOAT64", "DATATYPES",
    "DUMMY_FIELD_PREFIX", "UNLABELED", "FIELD_ALIASES", "dtype_from_fields", "fields_from_dtype",
    "read_points", "read_points_numpy", "read_points_list", "create_cloud", "create_cloud_xyz32",
    "CloudStats", "cloud_to_scan", "kept_field_values", "scan_to_cloud", "labeled_cloud",
    "labeled_cloud_like", "output_cloud", "output_cloud_like", "LABEL_DATATYPE", "OUTPUT_FIELDS",
    "pack_rgb", "unpack_rgb",
    "make_point_field", "MAX_FIELDS", "MAX_POINT_STEP", "MAX_POINTS", "MAX_CLOUD_BYTES",
]

# sensor_msgs/PointField datatype constants.
INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = range(1, 9)
DATATYPES: dict[int, np.dtype] = {
    INT8: np.dtype(np.int8), UINT8: np.dtype(np.uint8), INT16: np.dtype(np.int16),
    UINT16: np.dtype(np.uint16), INT32: np.dtype(np.int32), UINT32: np.dtype(np.uint32),
    FLOAT32: np.dtype(np.float32), FLOAT64: np.dtype(np.float64),
}
_CODES: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): code for code, dt in DATATYPES.items()}

# Unnamed fields get this name plus their index (as in sensor_msgs_py).
DUMMY_FIELD_PREFIX = "unnamed_field"
# ``UNLABELED`` (65535, clip2scene_core.label_spaces): the label of points without a class
# (segmenter label -1: out of range, NaN, ...). The output ``label`` field is UINT32
# (``LABEL_DATATYPE``). `OUTPUT_FIELDS`, the fields the segmentation writes (an input field of
# one of these names is replaced), come from the output schema (``output_schema``).
LABEL_DATATYPE = UINT32
# Names under which drivers publish a field that ``cloud_to_scan`` asks for.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "intensity": ("intensity", "i", "remission", "reflectance"),
}

# Limits on what one message may ask of the converters, checked before anything is allocated
# (a PointField ``count`` or ``point_step`` is a free uint32: 4e9 would otherwise hang or crash
# the reader). Chosen far above real sensors: a 128-beam LiDAR with 2048 columns publishes
# 262,144 points of ~20 fields (~80 bytes each, 21 MB); descriptor clouds (PCL's VFH: 308
# floats) stay below the field limit too.
#: numpy fields of one point after ``count`` expansion (a field with count 3 is 3 fields)
MAX_FIELDS = 1024
#: bytes of one point (1024 FLOAT64 fields are 8 KiB)
MAX_POINT_STEP = 65536
#: height × width of one cloud (128× a 128 × 2048 sweep; dense maps of tens of millions too)
MAX_POINTS = 1 << 25
#: bytes of ``data`` in one cloud
MAX_CLOUD_BYTES = 1 << 31
# Clouds this module writes may append the output schema's fields (label, score, rgb) to an
# input that is at the limits; ``dtype_from_fields`` leaves them this much room.
_OUTPUT_ROOM_FIELDS = len(OUTPUT_SCHEMA)
_OUTPUT_ROOM_BYTES = 8 * len(OUTPUT_SCHEMA) + 8


# --------------------------------------------------------------------------------------------
# dtype ⇄ fields
# --------------------------------------------------------------------------------------------
def _field_tuple(f: Any, index: int) -> tuple[str, int, int, int]:
    """(name, offset, datatype, count) of a PointField of any backend."""
    try:
        name, offset, datatype, count = f.name, int(f.offset), int(f.datatype), int(f.count)
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidPointCloudError(f"field #{index} is not a PointField: {exc}") from None
    if not isinstance(name, str):
        raise InvalidPointCloudError(f"field #{index} has a name of type {type(name).__name__}")
    return (name or f"{DUMMY_FIELD_PREFIX}_{index}"), offset, datatype, count


def _short(name: str, limit: int = 64) -> str:
    """A field name for an error message (a name can be megabytes long)."""
    return name if len(name) <= limit else name[:limit] + f"... ({len(name)} chars)"


def dtype_from_fields(fields: Iterable[Any], point_step: int | None = None,
                      is_bigendian: bool = False) -> np.dtype:
    """Structured dtype of one point: one numpy field per PointField element.

    A field with ``count > 1`` becomes ``name_0 .. name_{count-1}``. ``point_step`` sets the
    item size (trailing padding); byte order follows ``is_bigendian``. At most `MAX_FIELDS`
    numpy fields and `MAX_POINT_STEP` bytes (plus room for the label / score / rgb fields this
    module appends); the counts are checked before any field is built.
    """
    return _dtype_from_fields(fields, point_step, is_bigendian,
                              MAX_FIELDS + _OUTPUT_ROOM_FIELDS, MAX_POINT_STEP + _OUTPUT_ROOM_BYTES)


def _dtype_from_fields(fields: Iterable[Any], point_step: int | None, is_bigendian: bool,
                       max_fields: int, max_step: int) -> np.dtype:
    order = ">" if is_bigendian else "<"
    if not isinstance(fields, (list, tuple)):
        fields = list(fields)
    if len(fields) > max_fields:
        raise InvalidPointCloudError(
            f"cloud has {len(fields)} PointFields; at most {max_fields} are accepted")
    if point_step is not None and not 0 <= int(point_step) <= max_step:
        raise InvalidPointCloudError(
            f"point_step {point_step} is outside [0, {max_step}] bytes")
    specs = [_field_tuple(f, i) for i, f in enumerate(fields)]
    total = 0
    for name, offset, datatype, count in specs:
        if datatype not in DATATYPES:
            raise InvalidPointCloudError(
                f"field '{_short(name)}' has unknown datatype {datatype} (PointField uses 1..8)")
        if count < 1:
            raise InvalidPointCloudError(f"field '{_short(name)}' has count {count}; must be >= 1")
        if offset < 0:
            raise InvalidPointCloudError(f"field '{_short(name)}' has negative offset {offset}")
        if offset + count * DATATYPES[datatype].itemsize > max_step:
            raise InvalidPointCloudError(
                f"field '{_short(name)}' (offset {offset}, count {count}) ends beyond "
                f"{max_step} bytes, the largest point accepted")
        total += count
        if total > max_fields:
            raise InvalidPointCloudError(
                f"the PointFields hold more than {max_fields} values per point (counts expanded)")
    names: list[str] = []
    seen: set[str] = set()
    formats: list[np.dtype] = []
    offsets: list[int] = []
    for name, offset, datatype, count in specs:
        base = DATATYPES[datatype].newbyteorder(order)
        for k in range(count):
            sub = f"{name}_{k}" if count > 1 else name
            if sub in seen:
                raise InvalidPointCloudError(f"duplicate field name '{_short(sub)}'")
            seen.add(sub)
            names.append(sub)
            formats.append(base)
            offsets.append(offset + k * base.itemsize)
    end = max((o + f.itemsize for o, f in zip(offsets, formats)), default=0)
    if point_step is None:
        point_step = end
    elif end > int(point_step):
        bad = [_short(n) for n, o, f in zip(names, offsets, formats) if o + f.itemsize > point_step]
        raise InvalidPointCloudError(
            f"field(s) {bad[:8]}{' ...' if len(bad) > 8 else ''} extend beyond point_step "
            f"{point_step} (need {end} bytes)")
    try:
        return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                         "itemsize": int(point_step)})
    except (TypeError, ValueError) as exc:   # e.g. a name numpy refuses
        raise InvalidPointCloudError(f"cannot lay out the PointFields: {exc}") from None


def make_point_field(name: str, offset: int, datatype: int, count: int = 1,
                     msg_factory: MessageFactory | None = None) -> Any:
    """One ``sensor_msgs/PointField`` of the factory's backend."""
    factory = msg_factory or default_factory()
    return factory.new("PointField", name=str(name), offset=int(offset), datatype=int(datatype),
                       count=int(count))


def fields_from_dtype(dtype: np.dtype, msg_factory: MessageFactory | None = None) -> list[Any]:
    """PointFields describing a structured dtype (offsets kept; a subarray field → count)."""
    dtype = np.dtype(dtype)
    if dtype.names is None:
        raise InvalidPointCloudError(f"expected a structured dtype, got {dtype}")
    out = []
    for name in dtype.names:
        ftype, offset = dtype.fields[name][:2]
        count = 1
        if ftype.subdtype is not None:
            ftype, shape = ftype.subdtype
            count = int(np.prod(shape))
        code = _CODES.get((ftype.kind, ftype.itemsize))
        if code is None:
            raise InvalidPointCloudError(
                f"field '{name}' has dtype {ftype}, which PointField cannot represent")
        out.append(make_point_field(name, offset, code, count, msg_factory))
    return out


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _cloud_view(cloud: Any) -> np.ndarray:
    """(height, width) structured view of ``cloud.data`` in the message's byte order.

    Every size the message states is checked against the limits (`MAX_FIELDS`,
    `MAX_POINT_STEP`, `MAX_POINTS`, `MAX_CLOUD_BYTES`) and against the data length before
    anything is allocated; a malformed message raises ``InvalidPointCloudError``.
    """
    try:
        height, width = int(cloud.height), int(cloud.width)
        point_step, row_step = int(cloud.point_step), int(cloud.row_step)
        big = bool(cloud.is_bigendian)
        fields = cloud.fields
        fields = fields if isinstance(fields, (list, tuple)) else list(fields)
        raw = cloud.data
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidPointCloudError(f"not a PointCloud2 message: {exc}") from None
    for name, value in (("height", height), ("width", width), ("point_step", point_step),
                        ("row_step", row_step)):
        if value < 0:
            raise InvalidPointCloudError(f"{name} is {value}; must not be negative")
    if point_step > MAX_POINT_STEP:
        raise InvalidPointCloudError(
            f"point_step {point_step} exceeds {MAX_POINT_STEP} bytes, the largest point accepted")
    if height * width > MAX_POINTS:
        raise InvalidPointCloudError(
            f"{height}x{width} = {height * width} points exceeds the limit of {MAX_POINTS}")
    dt = _dtype_from_fields(fields, point_step, big, MAX_FIELDS, MAX_POINT_STEP)
    try:
        data = data_as_array(raw)
    except (TypeError, ValueError, OverflowError, BufferError) as exc:
        raise InvalidPointCloudError(f"cloud data is not a byte array: {exc}") from None
    if data.size > MAX_CLOUD_BYTES:
        raise InvalidPointCloudError(
            f"cloud data has {data.size} bytes; at most {MAX_CLOUD_BYTES} are accepted")
    if height * width == 0:
        return np.zeros((height, width), dtype=dt)
    if point_step <= 0:
        raise InvalidPointCloudError(f"point_step is {point_step} for a non-empty cloud")
    line = width * point_step
    if height > 1 and row_step < line:
        raise InvalidPointCloudError(
            f"row_step {row_step} < width {width} * point_step {point_step}")
    stride = row_step if height > 1 else line
    need = (height - 1) * stride + line
    most = height * max(row_step, line)
    if not need <= data.size <= most:
        raise InvalidPointCloudError(
            f"data has {data.size} bytes but a {height}x{width} cloud with point_step "
            f"{point_step} and row_step {row_step} needs {need}" + ("" if need == most else f"..{most}"))
    return np.ndarray((height, width), dtype=dt, buffer=data, strides=(stride, point_step))


def _select(view: np.ndarray, field_names: Sequence[str] | None) -> np.ndarray:
    """Packed native-order copy of the chosen fields."""
    names = list(view.dtype.names) if field_names is None else list(field_names)
    missing = [n for n in names if n not in view.dtype.names]
    if missing:
        raise InvalidPointCloudError(
            f"field(s) {missing} not in the cloud (fields: {list(view.dtype.names)})")
    out = np.empty(view.shape, dtype=[(n, view.dtype.fields[n][0].newbyteorder("=")) for n in names])
    for n in names:
        out[n] = view[n]
    return out


def _nan_mask(points: np.ndarray) -> np.ndarray:
    """True where no floating-point field is NaN."""
    ok = np.ones(points.shape, dtype=bool)
    for n in points.dtype.names:
        if points.dtype.fields[n][0].kind == "f":
            ok &= ~np.isnan(points[n])
    return ok


def read_points(cloud: Any, field_names: Sequence[str] | None = None, skip_nans: bool = False,
                uvs: Iterable[Any] | np.ndarray | None = None,
                reshape_organized_cloud: bool = False) -> np.ndarray:
    """Points of ``cloud`` as a structured array (fields ``field_names``, default all).

    ``skip_nans`` drops points with a NaN in any selected float field unless the cloud says
    it is dense (as sensor_msgs_py). ``uvs`` picks points: flat indices, or (u, v) pairs
    meaning column u of row v. ``reshape_organized_cloud`` returns (height, width).
    """
    view = _cloud_view(cloud)
    height, width = view.shape
    points = _select(view, field_names)
    flat = points.reshape(-1)
    if uvs is not None:
        idx = np.asarray(uvs if isinstance(uvs, np.ndarray) else list(uvs))
        if idx.size and idx.dtype.kind not in "iu":
            raise InvalidPointCloudError(f"uvs must be integers, got {idx.dtype}")
        if idx.ndim == 2 and idx.shape[1] == 2:
            u, v = idx[:, 0].astype(np.int64), idx[:, 1].astype(np.int64)
            if np.any((u < 0) | (u >= width) | (v < 0) | (v >= height)):
                raise InvalidPointCloudError(f"uvs outside the {width}x{height} cloud")
            idx = v * width + u
        elif idx.ndim <= 1:
            idx = idx.reshape(-1).astype(np.int64)
            if np.any((idx < 0) | (idx >= flat.size)):
                raise InvalidPointCloudError(f"uvs index outside [0, {flat.size})")
        else:
            raise InvalidPointCloudError(f"uvs must be (K,) indices or (K, 2) pairs, got {idx.shape}")
        flat = flat[idx]
    drop_nans = skip_nans and not bool(cloud.is_dense)
    if reshape_organized_cloud and height > 1:
        if uvs is not None or drop_nans:
            raise InvalidPointCloudError(
                "reshape_organized_cloud cannot be combined with uvs or skipping NaN points")
        return points
    if drop_nans:
        flat = flat[_nan_mask(flat)]
    return flat


def read_points_numpy(cloud: Any, field_names: Sequence[str] | None = None,
                      skip_nans: bool = False, uvs: Iterable[Any] | np.ndarray | None = None,
                      reshape_organized_cloud: bool = False, dtype: Any = None) -> np.ndarray:
    """Like ``read_points`` but an unstructured (N, F) array (or (H, W, F)).

    All selected fields must share one datatype unless ``dtype`` says what to cast to.
    """
    pts = read_points(cloud, field_names, skip_nans, uvs, reshape_organized_cloud)
    types = {pts.dtype.fields[n][0] for n in pts.dtype.names}
    if dtype is None:
        if len(types) > 1:
            raise InvalidPointCloudError(
                f"fields {list(pts.dtype.names)} have different datatypes {sorted(map(str, types))}; "
                "pass dtype= or use read_points")
        dtype = types.pop()
    out = np.empty(pts.shape + (len(pts.dtype.names),), dtype=dtype)
    for i, n in enumerate(pts.dtype.names):
        out[..., i] = pts[n]
    return out


def read_points_list(cloud: Any, field_names: Sequence[str] | None = None,
                     skip_nans: bool = False, uvs: Iterable[Any] | None = None) -> list[tuple]:
    """Points as a list of tuples (slow; for small clouds and debugging)."""
    return [tuple(p) for p in read_points(cloud, field_names, skip_nans, uvs).tolist()]


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _check_fits(name: str, values: np.ndarray, target: np.dtype) -> None:
    """Refuse integer fields that would wrap around or receive NaN (numpy casts silently)."""
    if target.kind not in "iu" or values.size == 0:
        return
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        raise InvalidPointCloudError(f"field '{name}' is {target} but values contain NaN/inf")
    if values.dtype.kind in "iuf":
        info = np.iinfo(target)
        lo, hi = values.min(), values.max()
        if lo < info.min or hi > info.max:
            raise InvalidPointCloudError(
                f"field '{name}' is {target} but values span [{lo}, {hi}]")


def create_cloud(header: Any, fields: Sequence[Any], points: Any, *,
                 point_step: int | None = None, is_bigendian: bool = False,
                 is_dense: bool | None = None,
                 msg_factory: MessageFactory | None = None) -> Any:
    """PointCloud2 holding ``points`` laid out as ``fields`` describe.

    ``points``: a structured array with the field names (N,) or organised (H, W); an
    unstructured (N, F) / (H, W, F) array with columns in field order; or a list of tuples.
    ``point_step`` adds trailing padding (zero bytes); ``is_dense`` defaults to "no NaN/inf
    in any float field".
    """
    factory = msg_factory or default_factory()
    dt = dtype_from_fields(fields, point_step, is_bigendian)
    names = list(dt.names)
    native = np.dtype([(n, dt.fields[n][0].newbyteorder("=")) for n in names])
    if isinstance(points, np.ndarray) and points.dtype.names is not None:
        src = points
        missing = [n for n in names if n not in src.dtype.names]
        extra = [n for n in src.dtype.names if n not in names]
        if missing or extra:
            raise InvalidPointCloudError(
                f"points have fields {list(src.dtype.names)} but the PointFields are {names}")
    else:
        arr = points if isinstance(points, np.ndarray) else None
        if arr is None:
            try:
                src = np.array([tuple(p) for p in points], dtype=native)
            except (TypeError, ValueError) as exc:
                raise InvalidPointCloudError(f"cannot convert points to {names}: {exc}") from None
        else:
            if arr.ndim not in (2, 3) or arr.shape[-1] != len(names):
                raise InvalidPointCloudError(
                    f"unstructured points must be (N, {len(names)}) or (H, W, {len(names)}) "
                    f"for fields {names}, got {arr.shape}")
            src = {n: arr[..., i] for i, n in enumerate(names)}
    shape = src.shape if isinstance(src, np.ndarray) else next(iter(src.values())).shape
    if len(shape) == 1:
        height, width = 1, shape[0]
    elif len(shape) == 2:
        height, width = shape
    else:
        raise InvalidPointCloudError(f"points must be 1-D or organised 2-D, got shape {shape}")
    for n in names:
        values = np.asarray(src[n]).reshape(height, width)
        _check_fits(n, values, dt.fields[n][0])
    data, buf = _new_buffer(dt, height, width, factory)
    for n in names:
        buf[n] = np.asarray(src[n]).reshape(height, width)
    if is_dense is None:
        is_dense = all(_all_finite(buf[n]) for n in names if dt.fields[n][0].kind == "f")
    if header is None:
        header = make_header(0, "", factory)
    out_fields = [make_point_field(*_field_tuple(f, i), msg_factory=factory)
                  for i, f in enumerate(fields)]
    return _cloud_message(header, out_fields, data, buf, bool(is_dense), factory,
                          is_bigendian=bool(is_bigendian))


def create_cloud_xyz32(header: Any, points: np.ndarray,
                       msg_factory: MessageFactory | None = None) -> Any:
    """Cloud with FLOAT32 x, y, z from an (N, 3) array."""
    fields = [make_point_field(n, 4 * i, FLOAT32, 1, msg_factory) for i, n in enumerate("xyz")]
    return create_cloud(header, fields, np.asarray(points, dtype=np.float32), msg_factory=msg_factory)


# --------------------------------------------------------------------------------------------
# clip2scene conversions
# --------------------------------------------------------------------------------------------
@dataclass
class CloudStats:
    """What ``cloud_to_scan`` did to a message, for logs and the node's diagnostics."""

    n_points: int                      # width * height of the message
    n_kept: int                        # points in the Scan
    n_nonfinite: int                   # dropped: x, y or z NaN / inf
    n_feature_nonfinite: int = 0       # extra-field values that were NaN / inf (set to 0)
    missing_fields: tuple[str, ...] = ()  # requested extra fields absent: filled with zeros
    field_sources: dict[str, str] = field(default_factory=dict)  # requested → message field
    organized: bool = False            # height > 1
    kept: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (n_points,) row-major
    # requested → dtype (native byte order) of the message field it was read from; the Scan
    # holds float32, this says what the cloud had (e.g. uint8 intensity of a Velodyne driver)
    field_dtypes: dict[str, np.dtype] = field(default_factory=dict)


def cloud_to_scan(msg: Any, fields: Sequence[str] = ("intensity",),
                  aliases: Mapping[str, Sequence[str]] = FIELD_ALIASES) -> tuple[Scan, CloudStats]:
    """``Scan`` with x, y, z and the requested extra ``fields`` (float32).

    Points with a non-finite coordinate are dropped (``stats.kept`` says which). A requested
    field the cloud lacks (under its name or an alias) becomes zeros and is listed in
    ``stats.missing_fields``; non-finite values of extra fields become 0 and are counted.
    """
    view = _cloud_view(msg)
    names = view.dtype.names
    absent = [c for c in "xyz" if c not in names]
    if absent:
        raise InvalidPointCloudError(f"cloud has no {absent} field(s) (fields: {list(names)})")
    flat = view.reshape(-1)
    n = flat.size
    extras = [f for f in dict.fromkeys(fields) if f not in ("x", "y", "z")]
    cols = np.empty((n, 3 + len(extras)), dtype=np.float32)
    # FLOAT64 values beyond float32's range become inf (then dropped / zeroed and counted)
    with np.errstate(over="ignore", invalid="ignore"):
        for i, c in enumerate("xyz"):
            cols[:, i] = flat[c]
    missing: list[str] = []
    sources: dict[str, str] = {}
    dtypes: dict[str, np.dtype] = {}
    for j, name in enumerate(extras):
        src = next((a for a in aliases.get(name, (name,)) if a in names), None)
        if src is None and name in names:
            src = name
        if src is None:
            missing.append(name)
            cols[:, 3 + j] = 0.0
        else:
            sources[name] = src
            dtypes[name] = flat.dtype.fields[src][0].newbyteorder("=")
            with np.errstate(over="ignore", invalid="ignore"):
                cols[:, 3 + j] = flat[src]
    # column by column: reductions along a short axis and boolean row indexing of (N, C)
    # arrays are several times slower in numpy; a sweep with no NaN is not copied again
    kept = np.isfinite(cols[:, 0])
    kept &= np.isfinite(cols[:, 1])
    kept &= np.isfinite(cols[:, 2])
    n_kept = int(np.count_nonzero(kept))
    pts = cols if n_kept == n else np.compress(kept, cols, axis=0)
    n_feat_bad = 0
    for j in range(3, pts.shape[1]):
        col = pts[:, j]
        if not _all_finite(col):
            bad = ~np.isfinite(col)
            n_feat_bad += int(np.count_nonzero(bad))
            col[bad] = 0.0
    try:
        frame_id, stamp_ns = str(msg.header.frame_id), header_stamp_ns(msg)
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidPointCloudError(f"cloud has no usable header: {exc}") from None
    scan = Scan(pts, ("x", "y", "z", *extras), frame_id=frame_id, stamp_ns=stamp_ns)
    stats = CloudStats(n_points=n, n_kept=n_kept, n_nonfinite=n - n_kept,
                       n_feature_nonfinite=n_feat_bad, missing_fields=tuple(missing),
                       field_sources=sources, organized=int(msg.height) > 1, kept=kept,
                       field_dtypes=dtypes)
    return scan, stats


def kept_field_values(msg: Any, stats: CloudStats, name: str,
                      scan: Scan | None = None) -> np.ndarray | None:
    """Values of the message field behind the Scan column ``name``, in the message's datatype.

    One value per point ``cloud_to_scan`` kept (``stats.kept``), native byte order; non-finite
    floats are 0 as in the Scan. None when the cloud lacks the field (``stats.missing_fields``).
    Used to write e.g. a uint8 intensity back as uint8 (the Scan holds float32).

    ``scan``: the Scan ``cloud_to_scan`` returned with ``stats``; when the field is FLOAT32 its
    column already holds exactly these values and is returned (a read-only view) instead of
    reading the message again.
    """
    src = stats.field_sources.get(name)
    if src is None:
        return None
    if scan is not None and stats.field_dtypes.get(name) == np.float32 and scan.has(name) \
            and len(scan) == stats.n_kept:
        values = scan.column(name).view()
        values.flags.writeable = False
        return values
    values = read_points(msg, [src])[src].reshape(-1)
    if values.size != stats.kept.size:
        raise InvalidPointCloudError(
            f"cloud has {values.size} points but the CloudStats describe {stats.kept.size}")
    values = values[stats.kept]
    if values.dtype.kind == "f":
        values[~np.isfinite(values)] = 0
    return values


def scan_to_cloud(scan: Scan, header: Any = None,
                  msg_factory: MessageFactory | None = None) -> Any:
    """PointCloud2 with one FLOAT32 field per Scan column (used by the dataset → bag tools)."""
    factory = msg_factory or default_factory()
    if header is None:
        header = make_header(scan.stamp_ns, scan.frame_id, factory)
    fields = [make_point_field(n, 4 * i, FLOAT32, 1, factory) for i, n in enumerate(scan.fields)]
    return create_cloud(header, fields, scan.points, msg_factory=factory)


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) colours → (N,) float32 "rgb" field values (``clip2scene_core.palette.pack_rgb``)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 2 or rgb.shape[1] != 3:
        raise InvalidPointCloudError(f"rgb must be (N, 3), got {rgb.shape}")
    try:
        return palette.pack_rgb(rgb)
    except ValueError as exc:
        raise InvalidPointCloudError(str(exc)) from None


def _packed_rgb(rgb: np.ndarray, n: int) -> np.ndarray:
    """(n, 3) uint8 colours or already-packed (n,) 32-bit values → (n,) float32 field values."""
    rgb = np.asarray(rgb)
    packed = pack_rgb(rgb) if rgb.ndim == 2 else rgb
    if packed.shape != (n,):
        raise InvalidPointCloudError(f"rgb must have shape ({n}, 3) or ({n},), got {rgb.shape}")
    if packed.dtype.itemsize != 4:
        raise InvalidPointCloudError(f"packed rgb must be 32-bit, got {packed.dtype}")
    return np.ascontiguousarray(packed).view(np.float32)


def _given_columns(n: int, labels: Any, scores: Any, rgb: Any) -> list[Column]:
    """The schema's label / score / [rgb] columns from arrays given by the caller (the
    `labeled_cloud` API; the pipeline builds its columns from the schema itself)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    for name, values in (("labels", labels), ("scores", scores)):
        if values.shape != (n,):
            raise InvalidPointCloudError(f"{name} must have shape ({n},), got {values.shape}")
    cols: list[Column] = [("label", encode_labels(labels)), ("score", scores.astype(np.float32))]
    if rgb is not None:
        cols.append(("rgb", _packed_rgb(rgb, n)))
    return cols


def _column_code(name: str, values: np.ndarray) -> int:
    """PointField datatype of a column's values."""
    code = _CODES.get((values.dtype.kind, values.dtype.itemsize))
    if code is None or values.dtype.kind not in "iuf":
        raise InvalidPointCloudError(
            f"output field '{name}' has dtype {values.dtype}, which PointField cannot represent")
    return code


def _checked_columns(columns: Sequence[Column], n: int) -> list[tuple[str, int, np.ndarray]]:
    out = []
    for name, values in columns:
        values = np.asarray(values)
        if values.shape != (n,):
            raise InvalidPointCloudError(
                f"output field '{name}' must have shape ({n},), got {values.shape}")
        out.append((name, _column_code(name, values), values))
    return out


def _append_fields(cols: Sequence[tuple[str, int, np.ndarray]], offset: int,
                   factory: MessageFactory) -> tuple[list[Any], int]:
    """PointFields for ``cols`` laid out from byte ``offset`` (natural alignment), and the
    point_step (a multiple of 4)."""
    fields = []
    for name, code, _ in cols:
        size = DATATYPES[code].itemsize
        offset = -(-offset // size) * size  # natural alignment: floats on 4-byte boundaries
        fields.append(make_point_field(name, offset, code, 1, factory))
        offset += size
    return fields, -(-offset // 4) * 4


def _intensity_code(values: np.ndarray, datatype: int | None) -> int:
    if datatype is not None:
        if datatype not in DATATYPES:
            raise InvalidPointCloudError(f"intensity_datatype {datatype} is not a PointField datatype")
        return int(datatype)
    # the array's own datatype (uint8 stays UINT8, float32 FLOAT32); others become FLOAT32
    return _CODES.get((values.dtype.kind, values.dtype.itemsize), FLOAT32) \
        if values.dtype.kind in "iuf" else FLOAT32


def _new_buffer(dt: np.dtype, height: int, width: int, factory: MessageFactory
                ) -> tuple[Any, np.ndarray]:
    """(the message's zeroed ``data`` in the factory's own container, a (height, width)
    structured view of it): values are written once, straight into the bytes the message
    keeps (`MessageFactory.uint8_buffer`)."""
    data, raw = factory.uint8_buffer(height * width * dt.itemsize)
    return data, raw.view(dt).reshape(height, width)


def _new_cloud(fields: list[Any], step: int, height: int, width: int, factory: MessageFactory
               ) -> tuple[Any, np.ndarray]:
    """`_new_buffer` for the little-endian layout ``fields`` describe."""
    return _new_buffer(dtype_from_fields(fields, step), height, width, factory)


def _all_finite(values: np.ndarray) -> bool:
    """No NaN / inf in ``values``: min and max propagate NaN and show ±inf, in two passes
    without the (N,) bool temporaries of ``isfinite(...).all()``."""
    if values.size == 0:
        return True
    return bool(np.isfinite(values.min()) and np.isfinite(values.max()))


def _cloud_message(header: Any, fields: list[Any], data: Any, buf: np.ndarray,
                   is_dense: bool, factory: MessageFactory, *, is_bigendian: bool = False) -> Any:
    """The PointCloud2 around ``data`` (from `_new_buffer`), handed over without a copy."""
    height, width = buf.shape
    msg = factory.new(
        "PointCloud2", header=header, height=int(height), width=int(width), fields=fields,
        is_bigendian=bool(is_bigendian), point_step=int(buf.dtype.itemsize),
        row_step=int(buf.dtype.itemsize * width), is_dense=bool(is_dense))
    return factory.set_uint8(msg, "data", data)


def output_cloud(header: Any, xyz: np.ndarray, columns: Sequence[Column],
                 intensity: np.ndarray | None = None,
                 msg_factory: MessageFactory | None = None, *,
                 intensity_datatype: int | None = None) -> Any:
    """Compact output cloud (height 1): x, y, z (FLOAT32), [intensity], then ``columns``
    ((name, (N,) values) in order, e.g. ``output_schema.output_columns``; the values' dtype is
    the field's datatype).

    ``intensity`` keeps its array's datatype (uint8 → UINT8, float32 → FLOAT32; a type
    PointField cannot hold, e.g. int64, becomes FLOAT32) unless ``intensity_datatype`` names one.
    ``is_dense`` says whether every float field is finite.
    """
    factory = msg_factory or default_factory()
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise InvalidPointCloudError(f"xyz must be (N, 3), got {xyz.shape}")
    n = xyz.shape[0]
    cols: list[tuple[str, int, np.ndarray]] = [
        ("x", FLOAT32, xyz[:, 0]), ("y", FLOAT32, xyz[:, 1]), ("z", FLOAT32, xyz[:, 2])]
    if intensity is not None:
        intensity = np.asarray(intensity)
        if intensity.shape != (n,):
            raise InvalidPointCloudError(f"intensity must have shape ({n},), got {intensity.shape}")
        cols.append(("intensity", _intensity_code(intensity, intensity_datatype), intensity))
    cols += _checked_columns(columns, n)
    fields, step = _append_fields(cols, 0, factory)
    data, buf = _new_cloud(fields, step, 1, n, factory)
    points = buf[0]
    is_dense = True
    for name, _, values in cols:
        points[name] = values
        if points.dtype.fields[name][0].kind == "f":
            # the source when it was written unchanged (often contiguous), else what was written
            same = values.dtype == points.dtype.fields[name][0]
            is_dense = is_dense and _all_finite(values if same else points[name])
    if header is None:
        header = make_header(0, "", factory)
    return _cloud_message(header, fields, data, buf, is_dense, factory)


def labeled_cloud(header: Any, xyz: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                  intensity: np.ndarray | None = None, rgb: np.ndarray | None = None,
                  msg_factory: MessageFactory | None = None, *,
                  intensity_datatype: int | None = None) -> Any:
    """Compact output cloud (height 1): x, y, z (FLOAT32), [intensity], label (UINT32),
    score (FLOAT32), [rgb (FLOAT32)] (`output_cloud` with given arrays).

    Label -1 (a point the segmenter dropped) is written as ``UNLABELED`` (65535). ``rgb`` is
    (N, 3) uint8 colours (packed here) or already-packed (N,) float32/uint32.
    """
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise InvalidPointCloudError(f"xyz must be (N, 3), got {xyz.shape}")
    return output_cloud(header, xyz, _given_columns(xyz.shape[0], labels, scores, rgb), intensity,
                        msg_factory, intensity_datatype=intensity_datatype)


def output_cloud_like(cloud: Any, columns: Sequence[Column], *, select: np.ndarray | None = None,
                      msg_factory: MessageFactory | None = None) -> Any:
    """Output cloud in the layout of the input ``cloud``: its header, every point and field,
    then ``columns`` ((name, values) with one value per input point, row-major, NaN points
    included).

    All input fields pass through at their offsets with their datatype and count (ring, time,
    t, reflectivity, intensity ...), except those named like an output field (`OUTPUT_FIELDS`
    or a column), which are replaced by the columns, appended after the input fields. An
    organised cloud stays height × width; ``is_dense`` is True only when every point has
    finite x, y, z. The output is little-endian whatever the input was.

    ``select``: (N,) bool; when given, only those points, as an unorganised (height 1) cloud
    (same fields): the class-filtered cloud in the input's fields.
    """
    factory = msg_factory or default_factory()
    view = _cloud_view(cloud)
    n = view.size
    absent = [c for c in "xyz" if c not in view.dtype.names]
    if absent:
        raise InvalidPointCloudError(f"cloud has no {absent} field(s) (fields: {list(view.dtype.names)})")
    cols = _checked_columns(columns, n)
    replaced = set(OUTPUT_FIELDS) | {name for name, _, _ in cols}
    passed = [t for t in (_field_tuple(f, i) for i, f in enumerate(cloud.fields))
              if t[0] not in replaced]
    in_fields = [make_point_field(*t, msg_factory=factory) for t in passed]
    in_names = dtype_from_fields(in_fields).names if in_fields else ()
    end = dtype_from_fields(in_fields).itemsize if in_fields else 0
    out_fields, step = _append_fields(cols, end, factory)
    fields = in_fields + out_fields
    if select is not None:
        select = np.asarray(select)
        if select.shape != (n,) or select.dtype != bool:
            raise InvalidPointCloudError(f"select must be ({n},) bool, got {select.shape} {select.dtype}")
        data, buf = _new_cloud(fields, step, 1, int(np.count_nonzero(select)), factory)
        points = buf[0]
        for nm in in_names:
            points[nm] = view[nm].reshape(-1)[select]
        for name, _, values in cols:
            points[name] = values[select]
    else:
        data, buf = _new_cloud(fields, step, *view.shape, factory)
        points = buf
        for nm in in_names:
            points[nm] = view[nm]
        for name, _, values in cols:
            points[name] = values.reshape(view.shape)
    is_dense = all(_all_finite(points[c]) for c in "xyz")
    return _cloud_message(cloud.header, fields, data, buf, is_dense, factory)


def labeled_cloud_like(cloud: Any, labels: np.ndarray, scores: np.ndarray,
                       rgb: np.ndarray | None = None, *, select: np.ndarray | None = None,
                       msg_factory: MessageFactory | None = None) -> Any:
    """`output_cloud_like` with given ``labels`` / ``scores`` / ``rgb``: one value per input
    point (row-major, NaN points included: give them label -1 → ``UNLABELED``)."""
    n = _cloud_view(cloud).size
    return output_cloud_like(cloud, _given_columns(n, labels, scores, rgb), select=select,
                             msg_factory=msg_factory)
