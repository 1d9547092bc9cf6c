"""The per-point fields of the labelled output clouds, in one table.

Each `OutputField` row says what a ``~/labeled_points`` field is called, its type, which
``SegmentationResult`` attribute it is made from and how. The pipeline (compact, input and
class-filtered clouds), ``pointcloud2`` (layout, which input fields are replaced) and
``label_info`` (what ``label`` means) all read this table, so a new per-point output is a new
attribute of ``clip2scene_core.segmenter.SegmentationResult`` plus one row here:

    OutputField("entropy", np.float32, source="entropy", fill=0.0)

Fields are written in table order after x, y, z [, intensity] (compact layout) or after the
input's own fields (``output_layout: input``), each at its natural alignment. An ``optional``
row is written only while the result carries its source (not None): ``relevance`` exists only
while an open-vocabulary query is set, so the default layout is label, score, rgb. Pure numpy:
no ROS, no torch.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip2scene_core import palette as _palette
from clip2scene_core.errors import InvalidPointCloudError
from clip2scene_core.label_spaces import UNLABELED

__all__ = ["UNLABELED", "LABEL_FIELD", "OutputField", "OUTPUT_SCHEMA", "OUTPUT_FIELDS",
           "Column", "encode_labels", "encode_rgb", "result_sources", "empty_sources",
           "expand_sources", "output_columns", "written_fields"]

# ``UNLABELED`` (65535, clip2scene_core.label_spaces): the ``label`` of points without a class
# (segmenter label -1: out of range, NaN, ...). The field is UINT32; the sentinel stays 65535
# so that it is also the ignore value of UINT16 ground-truth clouds and of label clouds
# written before the field became UINT32. Class indices must stay below it.
#: the field holding the class index (what ``~/label_classes`` describes)
LABEL_FIELD = "label"

#: (source values (n,), class palette (K, 3) uint8) → field values (n,)
Encoder = Callable[[np.ndarray, np.ndarray], np.ndarray]
#: one output field's values: (name, (n,) array of the field's dtype)
Column = tuple[str, np.ndarray]


def encode_labels(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Segmenter labels (-1 = none) → UINT32 ``label`` values (`UNLABELED` for -1)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise InvalidPointCloudError(f"labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < -1 or labels.max() >= UNLABELED):
        raise InvalidPointCloudError(
            f"labels must be in [-1, {UNLABELED - 1}], got [{labels.min()}, {labels.max()}]")
    # -1 wraps to 0xFFFFFFFF and the minimum makes it UNLABELED; valid labels stay below it
    out = labels.astype(np.uint32)
    return np.minimum(out, np.uint32(UNLABELED), out=out)


def encode_rgb(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Labels → the class colours packed as float32 0x00RRGGBB (PCL / RViz ``rgb``).

    The values of ``pack_rgb(colorize(labels, palette=palette))`` (labels < 0 or >= K get
    the unlabelled colour), looked up in a packed (K + 2,) table instead: one gather rather
    than an (N, 3) colour array packed again. Index ``label + 1`` clipped to the table: both
    ends hold the unlabelled colour.
    """
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    none = np.asarray(_palette.UNLABELED_COLOR, dtype=np.uint8).reshape(1, 3)
    table = _palette.pack_rgb(np.concatenate([none, pal, none])).view(np.uint32)
    idx = np.asarray(labels).reshape(-1).astype(np.int64)
    idx += 1
    return np.take(table, idx, mode="clip").view(np.float32)


@dataclass(frozen=True)
class OutputField:
    """One per-point field of the labelled clouds.

    ``source``: the ``SegmentationResult`` attribute holding one value per point of the scan;
    ``fill``: that attribute's value for a point the segmenter never saw (non-finite x/y/z,
    kept in place by ``output_layout: input``); ``encode``: source values → field values
    (None: a plain cast to ``dtype``); ``optional``: the field is written only while the
    result's ``source`` attribute is not None (else the row is left out of the cloud).
    """

    name: str
    dtype: Any                          # numpy type of the field: uint32 → UINT32, ...
    source: str
    fill: Any = 0
    encode: Encoder | None = None
    optional: bool = False

    def values(self, sources: Mapping[str, np.ndarray], palette: np.ndarray) -> np.ndarray:
        """(n,) values of this field, in ``dtype``."""
        src = np.asarray(sources[self.source])
        out = self.encode(src, palette) if self.encode is not None else src
        return np.asarray(out, dtype=self.dtype)


#: the fields of every labelled cloud, in this order (published layout: do not reorder)
OUTPUT_SCHEMA: tuple[OutputField, ...] = (
    OutputField(LABEL_FIELD, np.uint32, "labels", -1, encode_labels),
    OutputField("score", np.float32, "scores", np.float32(0.0)),
    OutputField("rgb", np.float32, "labels", -1, encode_rgb),
    # open-vocabulary query relevance in [0, 1] (SegmentationResult.relevance), only while a
    # query is set
    OutputField("relevance", np.float32, "relevance", np.float32(0.0), optional=True),
)
#: names of the fields every labelled cloud has; an input field of one of these names is
#: replaced (an optional field's name only while it is written)
OUTPUT_FIELDS: tuple[str, ...] = tuple(f.name for f in OUTPUT_SCHEMA if not f.optional)


def _sources_of(schema: Sequence[OutputField]) -> dict[str, Any]:
    """source attribute → its fill value (first row naming it wins)."""
    out: dict[str, Any] = {}
    for f in schema:
        out.setdefault(f.source, f.fill)
    return out


def _optional_sources(schema: Sequence[OutputField]) -> set[str]:
    """Sources read by optional rows only (a required row's source is always needed)."""
    required = {f.source for f in schema if not f.optional}
    return {f.source for f in schema if f.optional} - required


def result_sources(result: Any, schema: Sequence[OutputField] = OUTPUT_SCHEMA
                   ) -> dict[str, np.ndarray]:
    """The per-point arrays ``schema`` reads from a ``SegmentationResult`` (any object with
    those attributes), by attribute name; an optional row's source only when it is not None."""
    optional = _optional_sources(schema)
    missing = [s for s in _sources_of(schema) if s not in optional and not hasattr(result, s)]
    if missing:
        raise InvalidPointCloudError(
            f"the segmentation result has no {missing} for the output fields "
            f"{[f.name for f in schema if f.source in missing]}")
    return {s: np.asarray(getattr(result, s)) for s in _sources_of(schema)
            if s not in optional or getattr(result, s, None) is not None}


def empty_sources(schema: Sequence[OutputField] = OUTPUT_SCHEMA,
                  optional: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Zero-length source arrays (a cloud without points: no segmentation ran); of the
    optional rows' sources only those named in ``optional`` (what the segmenter would fill)."""
    skip = _optional_sources(schema) - set(optional)
    return {s: np.full(0, fill) for s, fill in _sources_of(schema).items() if s not in skip}


def expand_sources(sources: Mapping[str, np.ndarray], kept: np.ndarray,
                   schema: Sequence[OutputField] = OUTPUT_SCHEMA) -> dict[str, np.ndarray]:
    """Source arrays of the scan's points (``kept.sum()`` each) → one value per input point,
    the row's ``fill`` where ``kept`` is False (optional sources absent from ``sources`` stay
    absent)."""
    kept = np.asarray(kept, dtype=bool).reshape(-1)
    optional = _optional_sources(schema)
    out = {}
    for s, fill in _sources_of(schema).items():
        if s in optional and s not in sources:
            continue
        values = np.asarray(sources[s])
        full = np.full(kept.size, fill, dtype=values.dtype)
        full[kept] = values
        out[s] = full
    return out


def written_fields(sources: Mapping[str, np.ndarray],
                   schema: Sequence[OutputField] = OUTPUT_SCHEMA) -> tuple[OutputField, ...]:
    """The rows of ``schema`` a cloud with these sources has: every required row, and the
    optional rows whose source is present."""
    return tuple(f for f in schema if not f.optional or f.source in sources)


def output_columns(sources: Mapping[str, np.ndarray], palette: np.ndarray, n: int,
                   schema: Sequence[OutputField] = OUTPUT_SCHEMA) -> list[Column]:
    """(name, values) of every ``schema`` field for ``n`` points, in table order (an
    optional row only when its source is in ``sources``)."""
    rows = written_fields(sources, schema)
    for s in _sources_of(rows):
        shape = np.shape(sources[s])
        if shape != (n,):
            raise InvalidPointCloudError(f"{s} must have shape ({n},), got {shape}")
    return [(f.name, f.values(sources, palette)) for f in rows]
