"""Palette and PNG renders on real nuScenes data."""
from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from clip2scene_core.datasets import NUSCENES16_CLASSES, SEMANTICKITTI19_CLASSES, NuScenesReader
from clip2scene_core.geometry import project_points
from clip2scene_core.palette import (NUSCENES16_COLORS, SEMANTICKITTI19_COLORS, UNLABELED_COLOR,
                                     colorize, generate_colors, pack_rgb, palette_for, unpack_rgb)
from clip2scene_core.render import (draw_points, render_bev, render_confusion_matrix,
                                    render_projection)

NUS3 = "nuscenes/dororo99_v1.0-extract_3samples"


@pytest.fixture(scope="module")
def sample(data_dir):
    return NuScenesReader(data_dir / NUS3, "v1.0-extract-subset", cameras=["CAM_FRONT"])[0]


def _png(path):
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} is not a readable PNG"
    return img[:, :, ::-1]


def test_preset_palettes_use_benchmark_colours():
    pal = palette_for(NUSCENES16_CLASSES)
    assert tuple(pal[NUSCENES16_CLASSES.index("car")]) == NUSCENES16_COLORS["car"] == (255, 158, 0)
    kitti = palette_for(SEMANTICKITTI19_CLASSES)
    # the same name gets the convention of the vocabulary it is in
    assert tuple(kitti[0]) == SEMANTICKITTI19_COLORS["car"] != NUSCENES16_COLORS["car"]
    assert tuple(kitti[SEMANTICKITTI19_CLASSES.index("other-vehicle")]) == (0, 0, 255)
    spaced = palette_for(["driveable surface", "Construction Vehicle"])
    assert tuple(spaced[0]) == NUSCENES16_COLORS["driveable_surface"]
    assert tuple(spaced[1]) == NUSCENES16_COLORS["construction_vehicle"]


def test_generated_colours_distinct_and_stable():
    names = ["a red chair", "sofa", "lamp", "cat", "dog", "person on a bike", "traffic light",
             "mailbox", "bench", "statue", "fountain", "kiosk"]
    pal = palette_for(names)
    assert pal.shape == (12, 3) and pal.dtype == np.uint8
    np.testing.assert_array_equal(pal, palette_for(list(names)))
    dists = [np.linalg.norm(a.astype(float) - b) for a, b in itertools.combinations(pal, 2)]
    assert min(dists) >= 40
    assert all(np.linalg.norm(c.astype(float) - UNLABELED_COLOR) >= 40 for c in pal)
    # a mixed vocabulary keeps preset colours and avoids them for the new names
    mixed = palette_for(["car", "a red chair"])
    assert tuple(mixed[0]) == (255, 158, 0)
    assert np.linalg.norm(mixed[1].astype(float) - mixed[0]) >= 40
    assert len(generate_colors(60)) == 60


def test_colorize_and_pack_rgb():
    labels = np.array([0, 2, -1, 99, 1])
    c = colorize(labels, ["car", "driveable_surface", "manmade"])
    assert c.shape == (5, 3) and c.dtype == np.uint8
    assert tuple(c[0]) == (255, 158, 0) and tuple(c[2]) == tuple(c[3]) == UNLABELED_COLOR
    packed = pack_rgb(np.array([[255, 0, 0], [1, 2, 3]], dtype=np.uint8))
    assert packed.dtype == np.float32
    assert packed.view(np.uint32).tolist() == [0xFF0000, 0x010203]
    np.testing.assert_array_equal(unpack_rgb(pack_rgb(c)), c)


def test_render_bev_real_scan(sample, tmp_path):
    xyz = sample.scan.xyz
    labels = np.where(xyz[:, 2] < -1.5, NUSCENES16_CLASSES.index("driveable_surface"),
                      NUSCENES16_CLASSES.index("car"))
    labels[:50] = -1
    path = render_bev(xyz, labels, NUSCENES16_CLASSES, tmp_path / "bev" / "f.png", extent=40)
    img = _png(path)
    assert img.shape[0] >= 900 and img.shape[1] > img.shape[0]
    flat = img.reshape(-1, 3)
    for name in ("car", "driveable_surface"):
        colour = np.array(NUSCENES16_COLORS[name])
        assert np.any(np.all(np.abs(flat.astype(int) - colour) <= 2, axis=1)), name
    # a class that is not in the labels is not drawn
    assert not np.any(np.all(flat == np.array(NUSCENES16_COLORS["pedestrian"]), axis=1))
    with pytest.raises(ValueError):
        render_bev(xyz, labels[:-1], NUSCENES16_CLASSES, tmp_path / "x.png")


def test_render_projection_draws_labelled_points_where_they_project(sample, tmp_path):
    cam = sample.cameras[0]
    proj = project_points(sample.scan.xyz, cam.calibration)
    v = proj.valid
    assert v.sum() > 1000
    labels = np.full(v.sum(), NUSCENES16_CLASSES.index("car"))
    path = render_projection(cam.image, proj.uv[v], tmp_path / "cam.png", labels=labels,
                             class_names=NUSCENES16_CLASSES, depth=proj.depth[v], radius=1,
                             legend=False)
    img = _png(path)
    assert img.shape == cam.image.shape
    px = np.round(proj.uv[v]).astype(int)
    px = px[(px[:, 0] < img.shape[1]) & (px[:, 1] < img.shape[0])]
    hit = img[px[:, 1], px[:, 0]]
    assert np.mean(np.all(hit == (255, 158, 0), axis=1)) > 0.99
    # pixels far from any point keep the camera image
    untouched = np.ones(img.shape[:2], bool)
    untouched[np.clip(px[:, 1][:, None] + np.arange(-2, 3), 0, img.shape[0] - 1),
              np.clip(px[:, 0][:, None] + np.arange(-2, 3), 0, img.shape[1] - 1)] = False
    assert np.array_equal(img[:100, :100][untouched[:100, :100]], cam.image[:100, :100][untouched[:100, :100]])


def test_draw_points_ignores_outside_and_nan():
    img = np.zeros((10, 20, 3), np.uint8)
    out = draw_points(img, np.array([[5.0, 5.0], [-3, 4], [25, 1], [np.nan, 2]]),
                      np.array([[9, 9, 9]] * 4, np.uint8), radius=0)
    assert out[5, 5].tolist() == [9, 9, 9] and out.sum() == 27 and img.sum() == 0


def test_render_confusion_matrix(tmp_path):
    m = np.array([[50, 5, 0], [10, 30, 0], [0, 0, 0]])
    path = render_confusion_matrix(m, ["car", "road", "tree"], tmp_path / "cm.png",
                                   iou=np.array([0.77, 0.67, np.nan]), title="test")
    img = _png(path)
    assert img.shape[0] > 200 and img.shape[1] > 200
    # the dominant cell is drawn in the darkest blue of the colour map
    assert img.min() < 80
    with pytest.raises(ValueError):
        render_confusion_matrix(m, ["car", "road"], tmp_path / "bad.png")
