"""Open-vocabulary queries: a free text → a per-point ``relevance`` field and an RViz heat map.

Real data: a SemanticKITTI scan and the oracle teacher's class text embeddings
(`training.examples.oracle_teacher`: known unit vectors). The checkpoint's text embeddings are
those vectors and its heads are fitted to them in closed form (class-balanced least squares on
the random backbone's features of the scan), so the network labels cars "car" often enough to
test with. Relevance is the query's softmax probability among the query and the classes that
are not the query, so a query that is a vocabulary class gets exactly that class's label
probability: equal to the score where the label is that class, never above the score
elsewhere — an exact invariant, checked on every point.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from clip2scene_core.checkpoint import Checkpoint, save_checkpoint
from clip2scene_core.clip import Vocabulary, save_text_embeddings
from clip2scene_core.datasets import SemanticKittiReader
from clip2scene_core.errors import ConfigError
from clip2scene_core.models import ModelConfig, VoxelBatch, build_model
from clip2scene_core.segmenter import Segmenter, SegmenterConfig
from clip2scene_core.types import Scan
from clip2scene_core.voxelize import VoxelConfig, voxelize
from clip2scene_ros import replay
from clip2scene_ros.msgs import MessageFactory
from clip2scene_ros.node_config import NodeConfig, from_parameters, load_params_file, parameter_specs
from clip2scene_ros.pipeline import PipelineConfig, SegmentationPipeline, build_pipeline
from clip2scene_ros.pointcloud2 import read_points
from clip2scene_ros.rviz_config import render_rviz_config
from training.examples.oracle_teacher import KITTI_ROOT, OracleTeacher, random_text_embeddings

from test_pipeline import make_cloud

DIM = 32
CLIP_NAME = "oracle-teacher"
VOCAB = Vocabulary.preset("semantickitti19")
XYZI = ("x", "y", "z", "intensity")
CAR, ROAD = VOCAB.class_names.index("car"), VOCAB.class_names.index("road")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def kitti(data_dir):
    s = SemanticKittiReader(data_dir / KITTI_ROOT, sequences=["00"])[0]
    return s.scan, s.labels


@pytest.fixture(scope="module")
def text() -> torch.Tensor:
    """The oracle teacher's class text embeddings (19 known unit vectors)."""
    return OracleTeacher(random_text_embeddings(len(VOCAB.class_names), DIM)).text


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, kitti, text) -> Path:
    """A checkpoint whose text embeddings are the oracle's and whose heads map the (random)
    backbone's features of the scan onto the oracle embedding of each point's class."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="minkunet14a", in_channels=1, embed_dim=DIM, width_multiplier=0.25,
                      voxel=VoxelConfig(voxel_size=0.5, features=("intensity",)))
    model = build_model(cfg).eval()
    scan, gt = kitti
    vox = voxelize([scan], cfg.voxel)
    batch = VoxelBatch.from_voxels(vox, "cpu")
    with torch.no_grad():
        feats = model.backbone_features(batch)[batch.inverse]
    labels = gt[vox.point_mask]
    ok = labels >= 0
    x = torch.cat([feats[ok], torch.ones(int(ok.sum()), 1)], 1).double()
    y = text[labels[ok]].double()
    w = torch.from_numpy(1.0 / np.sqrt(np.bincount(labels[ok])[labels[ok]])).double()[:, None]
    sol = torch.linalg.lstsq(x * w, y * w).solution
    with torch.no_grad():
        for head in (model.local_head, model.global_head):
            head.weight.copy_(sol[:-1].t().float())
            head.bias.copy_(sol[-1].float())
    path = tmp_path_factory.mktemp("query") / "oracle.pt"
    save_checkpoint(path, Checkpoint(cfg, model.state_dict(), VOCAB, text, CLIP_NAME, {}))
    return path


@pytest.fixture(scope="module")
def queries(tmp_path_factory, text) -> Path:
    """An embedding file of three query texts: "car", "road", and "automobile" (car's vector)."""
    path = tmp_path_factory.mktemp("query") / "queries.pt"
    save_text_embeddings(path, Vocabulary.from_names(["car", "road", "automobile"]),
                         text[[CAR, ROAD, CAR]], CLIP_NAME)
    return path


def _seg(ckpt: Path, **kw) -> Segmenter:
    return Segmenter.load(ckpt, config=SegmenterConfig(device="cpu", **kw))


# ------------------------------------------------------------------------------------ core
@pytest.mark.parametrize("head", ["local", "both"])
def test_a_vocabulary_class_query_gives_its_label_probability(ckpt, queries, kitti, head):
    scan, gt = kitti
    seg = _seg(ckpt, head=head)
    plain = seg.segment(scan)
    assert plain.relevance is None and seg.query is None and seg.optional_sources == ()
    for name, k in (("car", CAR), ("road", ROAD), ("automobile", CAR)):
        seg.set_query(name, embeddings_file=queries)
        assert seg.query == name and seg.optional_sources == ("relevance",)
        res = seg.segment(scan)
        np.testing.assert_array_equal(res.labels, plain.labels)   # the query changes no label
        rel = res.relevance
        assert rel.dtype == np.float32 and rel.shape == (len(scan),) and res.query == name
        assert ((rel >= 0) & (rel <= 1)).all()
        mine = res.labels == k
        assert mine.sum() > 1000
        # exact: the query's probability is the class's (its own column is not a rival) —
        # the score where the label is that class, at most the score elsewhere
        np.testing.assert_allclose(rel[mine], res.scores[mine], atol=2e-6)
        assert (rel[~mine] <= res.scores[~mine] + 2e-6).all()
        # and it finds the real class: far higher on the ground-truth points of the class
        assert rel[gt == k].mean() > 2 * rel[(gt != k) & (gt >= 0)].mean()
    seg.set_query(None)
    assert seg.segment(scan).relevance is None and seg.query is None


@pytest.mark.parametrize("head", ["local", "global", "both"])
def test_folded_relevance_is_the_per_point_computation(ckpt, kitti, head):
    """Per voxel with the folded heads, gathered to points = the straightforward per-point
    cosine of the head output with [vocabulary; query], softmaxed, query column."""
    scan, _ = kitti
    scan = Scan(scan.points[::3], scan.fields)
    q = F.normalize(torch.randn(1, DIM, generator=torch.Generator().manual_seed(3)), dim=1)
    folded, straight = _seg(ckpt, head=head), _seg(ckpt, head=head, folded_heads=False)
    for seg in (folded, straight):
        seg.set_query("something new", embedding=q[0])
    a, b = folded.segment(scan), straight.segment(scan)
    # by hand, per point
    vox = voxelize([scan], folded.model_config.voxel)
    with torch.no_grad():
        out = folded.model(VoxelBatch.from_voxels(vox, "cpu"))
    loc, glo = F.normalize(out.local, dim=1), F.normalize(out.global_, dim=1)
    z = {"local": loc, "global": glo, "both": F.normalize(loc + glo, dim=1)}[head]
    logits = folded.logit_scale * z @ torch.cat([folded.text_embeddings, q]).t()
    expected = np.zeros(len(scan), np.float32)
    expected[vox.point_mask] = logits.softmax(dim=1)[:, -1].numpy()
    np.testing.assert_allclose(a.relevance, expected, atol=1e-5)
    np.testing.assert_allclose(b.relevance, expected, atol=1e-5)
    assert a.relevance.std() > 0.01          # a heat map, not a constant


def test_dropped_points_have_zero_relevance(ckpt, queries, kitti):
    scan, _ = kitti
    data = scan.points[:2000].copy()
    data[:10, 0] = np.nan                        # not voxelised: no label
    seg = _seg(ckpt)
    seg.set_query("car", embeddings_file=queries)
    res = seg.segment(Scan(data, scan.fields))
    assert (res.labels[:10] == -1).all() and (res.relevance[:10] == 0).all()
    empty = seg.segment(Scan(np.zeros((0, 4), np.float32), scan.fields))
    assert empty.relevance.shape == (0,)


def test_the_text_encoder_embeds_the_query_like_a_class(ckpt, tmp_path, monkeypatch):
    from clip2scene_core.clip import ClipTeacher

    monkeypatch.setenv("CLIP2SCENE_CACHE", str(tmp_path))
    tiny = {"embed_dim": DIM, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                           "heads": 2, "layers": 1},
            "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16,
                           "head_width": 16}}
    seg = _seg(ckpt)
    seg.teacher = ClipTeacher.from_config(tiny, device="cpu", seed=0)
    seg.set_query("fire hydrant")
    expected = seg.teacher.text_embeddings(Vocabulary.from_names(["fire hydrant"]))   # prompt-ensembled
    torch.testing.assert_close(seg._query.embedding, F.normalize(expected, dim=1))
    assert seg._query.source == "text encoder"


def test_bad_queries_are_clear_errors_and_keep_the_previous_query(ckpt, queries, tmp_path):
    seg = _seg(ckpt)
    with pytest.raises(ConfigError, match="no CLIP text encoder"):
        seg.set_query("car")
    seg.set_query("car", embeddings_file=queries)
    with pytest.raises(ConfigError) as exc:
        seg.set_query("fire hydrant", embeddings_file=queries)
    assert str(queries) in str(exc.value) and "'automobile'" in str(exc.value)
    with pytest.raises(ConfigError, match="dimension"):
        seg.set_query("x", embedding=torch.ones(DIM + 1))
    with pytest.raises(ConfigError, match="zero or not finite"):
        seg.set_query("x", embedding=torch.full((DIM,), float("nan")))
    other = tmp_path / "other.pt"
    save_text_embeddings(other, Vocabulary.from_names(["car"]), torch.ones(1, DIM), "ViT-B-16")
    with pytest.raises(Exception, match="ViT-B-16"):
        seg.set_query("car", embeddings_file=other)
    assert seg.query == "car"


# -------------------------------------------------------------------------------- pipeline
def test_pipeline_query_adds_the_field_on_the_next_frame_and_clearing_removes_it(ckpt, queries, kitti):
    scan, _ = kitti
    factory = MessageFactory.from_rosbags()
    points = scan.points[::4]
    cloud = make_cloud(points, factory, names=XYZI)
    cfg = PipelineConfig(publish_overlays=False, query_embeddings=str(queries))
    pipe = SegmentationPipeline(_seg(ckpt), cfg, factory)
    names = lambda out: [f.name for f in out.cloud.fields]   # noqa: E731
    plain = pipe.process(cloud)
    assert names(plain)[-3:] == ["label", "score", "rgb"]
    pipe.set_query("car")
    assert pipe.query == ""                     # queued: the next frame
    on = pipe.process(cloud)
    assert names(on)[-4:] == ["label", "score", "rgb", "relevance"] and pipe.query == "car"
    got = read_points(on.cloud)
    ref = _seg(ckpt)
    ref.set_query("car", embeddings_file=queries)
    np.testing.assert_array_equal(got["relevance"], ref.segment(on_scan(points)).relevance)
    empty = pipe.process(make_cloud(np.zeros((0, 4), np.float32), factory, names=XYZI))
    assert empty.status == "empty" and names(empty)[-1] == "relevance"
    # the input layout and the class-filtered cloud carry it too
    pipe.config.output_layout, pipe.config.filter_classes = "input", ("car",)
    both = pipe.process(cloud)
    assert names(both)[-1] == "relevance" and [f.name for f in both.filtered_cloud.fields][-1] == "relevance"
    pipe.config.output_layout, pipe.config.filter_classes = "compact", ()
    pipe.set_query("")
    off = pipe.process(cloud)
    assert names(off) == names(plain) and bytes(off.cloud.data) == bytes(plain.cloud.data)
    with pytest.raises(ConfigError, match="not in the embedding file"):
        pipe.set_query("fire hydrant")
    no_file = SegmentationPipeline(_seg(ckpt), PipelineConfig(publish_overlays=False), factory)
    with pytest.raises(ConfigError, match="query_embeddings"):
        no_file.set_query("car")


def on_scan(points: np.ndarray) -> Scan:
    return Scan(np.ascontiguousarray(points[:, :4]), XYZI)


def test_a_query_that_fails_on_the_frame_thread_is_a_warning_not_a_failure(ckpt, kitti):
    class Encoder:
        def text_embeddings(self, vocab):
            raise RuntimeError("text tower exploded")

    seg = _seg(ckpt)
    seg.teacher = Encoder()
    seg.config.camera_fusion = False
    factory = MessageFactory.from_rosbags()
    pipe = SegmentationPipeline(seg, PipelineConfig(publish_overlays=False), factory)
    pipe.set_query("car")                          # a text encoder exists: embedded on the frame
    out = pipe.process(make_cloud(kitti[0].points[::8], factory, names=XYZI))
    assert out.ok and any("text tower exploded" in w for w in out.warnings)
    assert [f.name for f in out.cloud.fields][-1] == "rgb" and pipe.query == ""


def test_node_parameters_and_params_file(tmp_path, ckpt, queries):
    specs = {s.name: s for s in parameter_specs()}
    assert specs["query"].dynamic and specs["query"].type is str and specs["query"].default == ""
    assert not specs["query_embeddings"].dynamic
    cfg = from_parameters({"checkpoint": str(ckpt), "query": "  car ", "query_embeddings": str(queries)})
    assert cfg.query == "car"
    pipe = build_pipeline(cfg, _seg(ckpt))
    assert pipe.config.query_embeddings == str(queries)
    with pytest.raises(ConfigError, match="not in the embedding file"):
        build_pipeline(from_parameters({"query": "tree", "query_embeddings": str(queries)}), _seg(ckpt))
    with pytest.raises(ConfigError, match="no CLIP text encoder"):
        build_pipeline(NodeConfig(query="car"), _seg(ckpt))
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {
        "query": "car", "query_embeddings": str(queries)}}}))
    assert load_params_file(params).query == "car"


# ------------------------------------------------------------------------------------ RViz
def test_rviz_heat_map_display(repo_root):
    """A second display of the labelled cloud, Intensity on 'relevance', fixed 0..1, off."""
    rendered = yaml.safe_load(render_rviz_config(
        (repo_root / "rviz" / "segment.rviz").read_text(), node_name="seg", namespace="right",
        num_classes=19))["Visualization Manager"]["Displays"]
    heat = [d for d in rendered if d.get("Channel Name") == "relevance"]
    assert len(heat) == 1
    d = heat[0]
    assert d["Class"] == "rviz_default_plugins/PointCloud2" and d["Color Transformer"] == "Intensity"
    assert (d["Min Intensity"], d["Max Intensity"], d["Autocompute Intensity Bounds"]) == (0, 1, False)
    assert d["Enabled"] is False and d["Value"] is False
    assert d["Topic"]["Value"] == "/right/seg/labeled_points"


# ---------------------------------------------------------------------------------- replay
def test_replay_query(tmp_path, data_dir, ckpt, queries, capsys):
    from clip2scene_ros.bag import BagReader
    from training.tools import semantickitti_to_bag

    bag = tmp_path / "kitti_in"
    assert semantickitti_to_bag.main(["--root", str(data_dir / "semantickitti/mmdet3d_tests"),
                                      "--out", str(bag), "--quiet"]) == 0
    common = [str(bag), "--checkpoint", str(ckpt), "--device", "cpu", "--no-progress", "--quiet",
              "--no-eval", "--no-cameras"]
    out = tmp_path / "out"
    assert replay.main(common + ["--out", str(out), "--query", "car",
                                 "--query-embeddings", str(queries)]) == 0
    with BagReader(out) as reader:
        clouds = [m for m in reader.messages() if m.topic.endswith("/labeled_points")]
    assert clouds
    got = read_points(clouds[0].msg)
    assert got.dtype.names[-4:] == ("label", "score", "rgb", "relevance")
    seg = _seg(ckpt)
    seg.set_query("car", embeddings_file=queries)
    res = seg.segment(on_scan(np.stack([got[c] for c in ("x", "y", "z", "intensity")], 1)))
    np.testing.assert_allclose(got["relevance"], res.relevance, atol=1e-6)
    # bad queries stop the run before any work, with the reason (exit 2)
    for extra, message in ((["--query", "tree", "--query-embeddings", str(queries)], "'automobile'"),
                           (["--query", "car"], "no CLIP text encoder")):
        capsys.readouterr()
        assert replay.main(common + ["--out", str(tmp_path / "bad")] + extra) == 2
        assert message in capsys.readouterr().err
    report = json.loads((tmp_path / "out_report" / "report.json").read_text())
    assert report
