"""The output schema: one table of per-point output fields that every labelled cloud follows.

A new per-point output is a `SegmentationResult` attribute plus one `OutputField` row; here a
stand-in segmenter returns an extra attribute and a schema with one more row, and every cloud
the pipeline writes (compact, input layout, class-filtered) carries the new field, with the
row's fill value on points the segmenter never saw.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from clip2scene_core.palette import colorize, palette_for, unpack_rgb
from clip2scene_ros.msgs import MessageFactory, make_header
from clip2scene_ros.output_schema import (OUTPUT_FIELDS, OUTPUT_SCHEMA, UNLABELED, OutputField,
                                          expand_sources, output_columns, result_sources)
from clip2scene_ros.pipeline import PipelineConfig, SegmentationPipeline
from clip2scene_ros.pointcloud2 import (FLOAT32, UINT16, UINT32, create_cloud, labeled_cloud,
                                        labeled_cloud_like, make_point_field, output_cloud,
                                        output_cloud_like, read_points)

FACTORY = MessageFactory.from_rosbags()
CLASSES = ["road", "car", "tree"]
ENTROPY = OutputField("entropy", np.float32, "entropy", np.float32(-1.0))
RANK = OutputField("rank", np.uint16, "labels", -1, lambda labels, _pal: labels + 1)


class _Segmenter:
    """Labels point i with class i % 3 (every 5th point unlabelled) and reports an extra
    per-point ``entropy`` attribute, as a segmenter with a new output would."""

    class_names = CLASSES

    def segment(self, scan, cameras=(), predictions=(), projections=None):
        n = len(scan)
        labels = np.arange(n, dtype=np.int64) % 3
        labels[::5] = -1
        return SimpleNamespace(labels=labels, scores=np.linspace(0, 1, n, dtype=np.float32),
                               entropy=np.arange(n, dtype=np.float32) / 10, valid=labels >= 0,
                               class_names=list(CLASSES), timings={}, info={})


def _cloud(n: int = 40, nan_every: int = 7) -> tuple[object, np.ndarray]:
    rng = np.random.default_rng(0)
    pts = rng.uniform(-10, 10, (n, 4)).astype(np.float32)
    pts[::nan_every, 0] = np.nan
    fields = [make_point_field(c, 4 * i, FLOAT32, 1, FACTORY) for i, c in enumerate("xyz")]
    fields.append(make_point_field("ring", 12, UINT16, 1, FACTORY))
    arr = np.zeros(n, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("ring", "u2")])
    for i, c in enumerate("xyz"):
        arr[c] = pts[:, i]
    arr["ring"] = np.arange(n) % 16
    return create_cloud(make_header(7, "lidar", FACTORY), fields, arr, msg_factory=FACTORY), pts


def test_default_schema_is_the_published_layout():
    assert OUTPUT_FIELDS == ("label", "score", "rgb")
    assert [(f.source, f.optional) for f in OUTPUT_SCHEMA] == [
        ("labels", False), ("scores", False), ("labels", False), ("relevance", True)]
    labels = np.array([0, 2, -1, 1])
    scores = np.array([0.5, 0.25, 0.0, 1.0], np.float32)
    pal = palette_for(CLASSES)
    cols = output_columns({"labels": labels, "scores": scores}, pal, 4)
    assert [name for name, _ in cols] == ["label", "score", "rgb"]
    np.testing.assert_array_equal(cols[0][1], [0, 2, UNLABELED, 1])
    assert cols[0][1].dtype == np.uint32 and cols[1][1].dtype == cols[2][1].dtype == np.float32
    np.testing.assert_array_equal(unpack_rgb(cols[2][1]), colorize(labels, palette=pal))
    # the schema's clouds are byte for byte what the explicit-array API writes
    xyz = np.arange(12, dtype=np.float32).reshape(4, 3)
    header = make_header(1, "lidar", FACTORY)
    a = output_cloud(header, xyz, cols, msg_factory=FACTORY)
    b = labeled_cloud(header, xyz, labels, scores, rgb=colorize(labels, palette=pal),
                      msg_factory=FACTORY)
    assert bytes(a.data) == bytes(b.data) and a.point_step == b.point_step
    assert [(f.name, f.offset, f.datatype) for f in a.fields] == \
        [(f.name, f.offset, f.datatype) for f in b.fields]
    cloud, _ = _cloud(8, nan_every=3)
    like_a = output_cloud_like(cloud, output_columns({"labels": np.arange(8) % 3 - 1,
                                                      "scores": np.ones(8, np.float32)}, pal, 8),
                               msg_factory=FACTORY)
    like_b = labeled_cloud_like(cloud, np.arange(8) % 3 - 1, np.ones(8, np.float32),
                                colorize(np.arange(8) % 3 - 1, palette=pal), msg_factory=FACTORY)
    assert bytes(like_a.data) == bytes(like_b.data)


def test_sources_are_read_from_the_result_and_expanded_with_the_fill():
    result = _Segmenter().segment(np.zeros((6, 3)))
    sources = result_sources(result, OUTPUT_SCHEMA + (ENTROPY,))
    assert set(sources) == {"labels", "scores", "entropy"}
    kept = np.array([True, False, True, True, False, True, True, True])
    full = expand_sources(sources, kept, OUTPUT_SCHEMA + (ENTROPY,))
    np.testing.assert_array_equal(full["labels"][~kept], [-1, -1])
    np.testing.assert_array_equal(full["scores"][~kept], [0, 0])
    np.testing.assert_array_equal(full["entropy"][~kept], [-1, -1])
    np.testing.assert_array_equal(full["entropy"][kept], result.entropy)
    with pytest.raises(Exception, match="gradient"):
        result_sources(result, (OutputField("grad", np.float32, "gradient"),))


@pytest.mark.parametrize("layout", ["compact", "input"])
def test_a_new_output_field_is_one_schema_row(layout):
    """Segmenter attribute + schema row → the field in every cloud, nothing else to change."""
    schema = OUTPUT_SCHEMA + (ENTROPY, RANK)
    cfg = PipelineConfig(output_layout=layout, filter_classes=("car",))
    pipe = SegmentationPipeline(_Segmenter(), cfg, FACTORY, schema=schema)
    cloud, pts = _cloud()
    out = pipe.process(cloud)
    assert out.status == "ok", out.error
    kept = np.isfinite(pts[:, :3]).all(1)
    got = read_points(out.cloud)
    names = [f.name for f in out.cloud.fields]
    assert names[-5:] == ["label", "score", "rgb", "entropy", "rank"]
    assert {f.name: f.datatype for f in out.cloud.fields}["rank"] == UINT16
    expected = _Segmenter().segment(np.zeros((int(kept.sum()), 3)))
    if layout == "input":
        assert names[:4] == ["x", "y", "z", "ring"] and len(got) == len(pts)
        np.testing.assert_array_equal(got["entropy"][kept], expected.entropy)
        assert (got["entropy"][~kept] == -1).all() and (got["rank"][~kept] == 0).all()
        got = got[kept]
    else:
        assert names[:3] == ["x", "y", "z"] and len(got) == kept.sum()
        np.testing.assert_array_equal(got["entropy"], expected.entropy)
    np.testing.assert_array_equal(got["rank"], expected.labels + 1)
    np.testing.assert_array_equal(got["label"], np.where(expected.labels < 0, UNLABELED,
                                                         expected.labels))
    # the class-filtered cloud has the same fields, for the chosen points
    cars = expected.labels == 1
    filt = read_points(out.filtered_cloud)
    assert [f.name for f in out.filtered_cloud.fields] == names
    np.testing.assert_array_equal(filt["entropy"], expected.entropy[cars])
    assert (filt["label"] == 1).all() and {f.name: f.datatype for f in out.cloud.fields}["label"] == UINT32


def test_a_result_without_a_schema_source_fails_the_frame_naming_it():
    pipe = SegmentationPipeline(_Segmenter(), PipelineConfig(), FACTORY,
                                schema=OUTPUT_SCHEMA + (OutputField("grad", np.float32, "gradient"),))
    out = pipe.process(_cloud()[0])
    assert out.status == "error" and "gradient" in out.error and "grad" in out.error


@pytest.mark.parametrize("layout", ["compact", "input"])
def test_an_optional_field_is_written_only_while_the_result_carries_it(layout):
    """``relevance`` (an optional row): absent while the result's attribute is None — the
    cloud is byte for byte the default layout —, the last field while it is set."""
    class _Query(_Segmenter):
        relevance = None

        def segment(self, scan, cameras=(), predictions=(), projections=None):
            res = super().segment(scan)
            res.relevance = self.relevance if self.relevance is None else \
                np.linspace(0, 1, len(scan), dtype=np.float32)
            return res

    seg = _Query()
    cloud, pts = _cloud()
    plain = SegmentationPipeline(_Segmenter(), PipelineConfig(output_layout=layout), FACTORY,
                                 schema=OUTPUT_SCHEMA[:3]).process(cloud).cloud
    pipe = SegmentationPipeline(seg, PipelineConfig(output_layout=layout), FACTORY)
    off = pipe.process(cloud).cloud
    assert [f.name for f in off.fields] == [f.name for f in plain.fields]
    assert bytes(off.data) == bytes(plain.data) and off.point_step == plain.point_step
    seg.relevance = True
    on = pipe.process(cloud).cloud
    assert [f.name for f in on.fields][-4:] == ["label", "score", "rgb", "relevance"]
    got = read_points(on)
    kept = np.isfinite(pts[:, :3]).all(1)
    rel = np.linspace(0, 1, int(kept.sum()), dtype=np.float32)
    if layout == "input":
        np.testing.assert_array_equal(got["relevance"][kept], rel)
        assert (got["relevance"][~kept] == 0).all()
    else:
        np.testing.assert_array_equal(got["relevance"], rel)
    assert set(result_sources(SimpleNamespace(labels=1, scores=2, relevance=None))) == \
        {"labels", "scores"}
