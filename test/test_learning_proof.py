"""Proof that CLIP2Scene pre-training transfers the teacher's semantics into the 3D network.

No CLIP weights exist offline, so the *teacher* is made known: virtual cameras are built from
the real KITTI calibration (P2 intrinsics + velodyne→camera extrinsic of sequence 00, turned
about the LiDAR's vertical axis to cover 360°); into each image the real scan is rasterised
with a z-buffer, each pixel painted with the colour of its point's ground-truth class. The
teacher decodes a pixel's colour and returns the text embedding of that class plus noise (a
deliberately imperfect MaskCLIP). Text embeddings are random unit vectors.

Pre-training sees only images + points (no 3D label enters the loss) on frames 000000 and
000001 of SemanticKITTI sequence 00; the annotation-free mIoU (argmax over text embeddings
on the local and the global head, through the deployable checkpoint and the Segmenter) is
measured on 15 000 points of frame 000002, which it never saw, against chance, the majority
class and the same network untrained.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.datasets import SemanticKittiReader
from clip2scene_core.datasets.sample import Sample
from clip2scene_core.datasets.semantickitti import kitti_camera_calibration, parse_kitti_calib
from clip2scene_core.geometry import project_points
from clip2scene_core.metrics import ConfusionMatrix
from clip2scene_core.types import Calibration, CameraFrame

KITTI_ROOT = "semantickitti/squeezesegv3_sample_data"
W, H = 1241, 376


def class_colour(k: np.ndarray) -> np.ndarray:
    """Unique RGB per class index (k + 1, so black = no point)."""
    k = np.asarray(k, dtype=np.int64) + 1
    return np.stack([(k * 40) % 256, (k * 97) % 256, (k * 151) % 256], axis=-1).astype(np.uint8)


def virtual_cameras(calib_file: Path, n: int = 4) -> list[Calibration]:
    """The real P2 camera of KITTI seq 00, turned by 360°/n steps about the LiDAR z axis."""
    base = kitti_camera_calibration(parse_kitti_calib(calib_file), W, H, "P2")
    cams = []
    for i in range(n):
        a = 2 * math.pi * i / n
        Rz = np.eye(4)
        Rz[:2, :2] = [[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]   # rotate world by -a
        cams.append(Calibration(base.camera, base.lidar_to_camera @ Rz))
    return cams


def paint(xyz: np.ndarray, labels: np.ndarray, cal: Calibration) -> np.ndarray:
    """Rasterise the scan into ``cal``'s image: nearest point per pixel, coloured by class."""
    proj = project_points(xyz, cal, min_depth=1.0)
    idx = np.flatnonzero(proj.valid & (labels >= 0))
    uv = np.clip(np.floor(proj.uv[idx] + 0.5).astype(np.int64), 0, [W - 1, H - 1])
    order = np.argsort(-proj.depth[idx])               # far first, near overwrites
    img = np.zeros((H, W, 3), np.uint8)
    img[uv[order, 1], uv[order, 0]] = class_colour(labels[idx[order]])
    return img


class PaintedKitti:
    """SemanticKITTI samples with painted virtual camera images (labels stay on the sample
    for evaluation only; the training losses never read them)."""

    def __init__(self, data_dir: Path) -> None:
        self.reader = SemanticKittiReader(data_dir / KITTI_ROOT, sequences=["00"])
        self.cams = virtual_cameras(data_dir / KITTI_ROOT / "sequences/00/calib.txt")
        self._images: dict[int, list[np.ndarray]] = {}   # painting is deterministic: do it once

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> Sample:
        s = self.reader[i]
        if i not in self._images:
            self._images[i] = [paint(s.scan.xyz, s.labels, c) for c in self.cams]
        frames = [CameraFrame(f"virtual_{j}", img, c) for j, (img, c) in enumerate(zip(self._images[i], self.cams))]
        return Sample(scan=s.scan, cameras=frames, labels=s.labels, vocabulary_name=s.vocabulary_name,
                      token=s.token, scene=s.scene)


class KnownTeacher:
    """MaskCLIP stand-in: pixel colour → class → its text embedding + Gaussian noise."""

    def __init__(self, text_emb: torch.Tensor, noise: float, seed: int = 0) -> None:
        self.text = F.normalize(text_emb.float(), dim=1)
        self.noise, self.seed = noise, seed
        self.model_name = "known-teacher"
        self.cache_id = f"known-teacher-{noise}-{seed}"
        self.cache_preprocess = {}
        self.lut = {tuple(class_colour(k)): k for k in range(len(text_emb))}

    def text_embeddings(self, vocab, templates=None, cache_dir=None):
        return self.text

    def pixel_features(self, image: np.ndarray, uv: np.ndarray) -> torch.Tensor:
        px = image[np.round(uv[:, 1]).astype(int), np.round(uv[:, 0]).astype(int)]
        cls = np.array([self.lut.get(tuple(p), -1) for p in px])
        rng = np.random.default_rng([self.seed, int(image.sum()) % (2 ** 31)])
        d = self.text.shape[1]
        feats = rng.normal(0, 1 / math.sqrt(d), (len(uv), d))   # ~unit noise; alone where no point
        known = cls >= 0
        feats[known] = self.text.numpy()[cls[known]] + self.noise * feats[known]
        return F.normalize(torch.from_numpy(feats).float(), dim=1)


def _configs(tmp: Path, epochs: int):
    from clip2scene_core.config import from_dict
    from training.engine.config import PretrainConfig

    return from_dict(PretrainConfig, {
        "data": {"reader": "SemanticKittiReader", "indices": [0, 1], "max_points": 6000,
                 "augment": {"rotate_z": 180.0, "scale": [0.95, 1.05]}},
        "model": {"backbone": "minkunet14a", "in_channels": 2, "embed_dim": 32, "width_multiplier": 0.125,
                  "voxel": {"voxel_size": 0.5, "point_range": [-50, -50, -4, 50, 50, 4],
                            "features": ["intensity", "z"]}},
        "teacher": {"model_name": "known-teacher", "cache_dir": str(tmp / "cache"), "min_depth": 1.0},
        "vocabulary": {"preset": "semantickitti19"},
        # the paper's losses: SCR = Eq. 1 with τ = 0.5, SSR with λ = 1 (no self-training)
        "loss": {"scr": {"variant": "contrastive", "temperature": 0.5},
                 "ssr": {"enabled": True, "grid_size": 1.0, "lam": 1.0},
                 "self_training": {"enabled": False}},
        # lr 0.5 instead of the paper's 0.1: 15 steps here instead of tens of thousands
        "optim": {"lr": 0.5, "momentum": 0.9, "dampening": 0.1, "epochs": epochs, "batch_size": 2,
                  "scheduler": "cosine"},
        "run": {"out_dir": str(tmp / "run"), "seed": 0, "device": "cpu", "progress": False, "log_every": 1},
    })


@pytest.fixture(scope="module")
def text_embeddings():
    # Random unit vectors: a random-init CLIP text tower gives nearly parallel class
    # embeddings (mean cosine ≈ 0.9), which no student could separate.
    g = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(19, 32, generator=g), dim=1)


def test_pretraining_beats_chance_and_untrained_on_unseen_scan(data_dir, tmp_path, text_embeddings):
    from clip2scene_core.models import build_model
    from clip2scene_core.segmenter import Segmenter, SegmenterConfig
    from training import pretrain
    from training.engine import common
    from training.evaluate import evaluate_segmenter

    data = PaintedKitti(data_dir)
    teacher = KnownTeacher(text_embeddings, noise=1.5)
    cfg = _configs(tmp_path, epochs=15)
    out = pretrain.run(cfg, reader=data, teacher=teacher)

    # the teacher is informative but imperfect: measure its pseudo-label accuracy on frame 0
    # through the cache pretrain.run returns (the cache is public; entries are found by content)
    s0 = data[0]
    pseudo = out["teacher_cache"].pseudo_labels(s0, text_embeddings)
    seen = (pseudo >= 0) & (s0.labels >= 0)
    teacher_acc = float((pseudo[seen] == s0.labels[seen]).mean())
    assert 0.6 < teacher_acc < 0.98
    # run's own agreement figure covers frames 0 and 1: the same kind of number
    assert abs(out["teacher_agreement"]["accuracy"] - teacher_acc) < 0.05

    s2 = data.reader[2]                # the scan pre-training never saw (no cameras needed)
    sel = np.random.default_rng(0).choice(len(s2.scan), 15000, replace=False)   # CPU budget
    test = [Sample(scan=s2.scan.select(sel), labels=s2.labels[sel], vocabulary_name=s2.vocabulary_name)]
    gt = test[0].labels
    k = len(text_embeddings)
    chance = ConfusionMatrix(k)
    chance.update(np.random.default_rng(0).integers(0, k, len(gt)), gt)
    majority = ConfusionMatrix(k)            # a stronger baseline that even peeks at the labels
    majority.update(np.full(len(gt), np.bincount(gt[gt >= 0]).argmax()), gt)

    vocab = common.build_vocabulary(cfg.vocabulary)
    torch.manual_seed(0)
    untrained = Segmenter(build_model(cfg.model), cfg.model, vocab, text_embeddings, "known",
                          config=SegmenterConfig(device="cpu"))
    before = evaluate_segmenter(untrained, test, heads=("local",))["confusion"]["local"]
    trained = Segmenter.load(out["checkpoint"], device="cpu")
    after = evaluate_segmenter(trained, test, heads=("local", "global"))["confusion"]

    figures = {"teacher_pseudo_label_accuracy": teacher_acc, "chance_miou": chance.miou(),
               "majority_class_miou": majority.miou(),
               "untrained_miou": before.miou(), "pretrained_miou_local": after["local"].miou(),
               "pretrained_miou_global": after["global"].miou(),
               "loss_first_epoch": out["history"][0]["loss"], "loss_last_epoch": out["history"][-1]["loss"]}
    print("learning proof:", json.dumps(figures, indent=1))
    print(after["local"].table(list(vocab.class_names)))
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]
    for head in ("local", "global"):      # SCR trains the local head, SSR the global one
        assert after[head].miou() > 3.0 * chance.miou(), head
        assert after[head].miou() > 2.0 * majority.miou(), head
        assert after[head].miou() > before.miou() + 0.04, head


def test_2d_label_teacher_transfers_to_the_3d_labels(data_dir, tmp_path):
    """A dataset's 2D annotations as the teacher (README, worked example): the real RELLIS-3D
    frame, its 2D label image as teacher, pre-training alone (the 3D labels enter no loss),
    then annotation-free scores against the 3D labels. Inside the camera's view the network
    must approach the teacher's own agreement with the 3D labels; outside it (no teacher
    there) it must beat copying the nearest seen point's pseudo-label. The untrained network
    (the run's ``initial_checkpoint``) meets none of it."""
    from training.examples.rellis_label_teacher import format_figures, run_example

    f = run_example(data_dir / "rellis3d/utils_example", tmp_path, steps=100, max_points=15000, lr=0.4,
                    progress=False)
    print(format_figures(f))
    inside, outside = f["inside"], f["outside"]
    teacher = inside["teacher"]
    assert teacher == pytest.approx({**f["teacher_agreement"]})      # run's figure = the scored one
    assert 0.7 < teacher["accuracy"] < 0.85                          # informative, imperfect (77.3 %)
    assert f["loss_last"] < f["loss_first"]
    assert inside["pretrained"]["accuracy"] > 0.85 * teacher["accuracy"]
    assert inside["pretrained"]["miou"] > 0.8 * teacher["miou"]
    assert outside["pretrained"]["miou"] > outside["nearest_visible"]["miou"]
    assert outside["pretrained"]["accuracy"] > 0.15
    for region in (inside, outside):
        assert region["untrained"]["accuracy"] < 0.05 and region["untrained"]["miou"] < 0.05
