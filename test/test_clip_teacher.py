"""ClipTeacher: MaskCLIP dense features re-derived independently, preprocessing on a real
nuScenes camera image, pixel sampling, weights loading and its errors.

Models are small and randomly initialised (no weights can be downloaded here); the dense
path is checked against explicit matrix arithmetic on the model's own weights, with the
input of the last block captured from open_clip's unmodified forward.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.clip import ClipTeacher, MaskClipOptions, PreprocessConfig, register_model_config
from clip2scene_core.clip.maskclip import resize_pos_embed
from clip2scene_core.errors import (CalibrationError, CheckpointError, ConfigError, ImageDecodeError,
                                    WeightsNotFoundError)

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VIT_CFG = {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": 2, "width": 48, "patch_size": 16,
                                           "head_width": 16}, "text_cfg": TEXT_CFG}
RN_CFG = {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8,
                                          "head_width": 16}, "text_cfg": TEXT_CFG}


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """Give LayerNorm / BatchNorm non-trivial affine parameters and stats (fresh ones are 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))


@pytest.fixture(scope="module")
def vit() -> ClipTeacher:
    t = ClipTeacher.from_config(VIT_CFG, seed=0)
    _randomise_norms(t.model, 1)
    return t


@pytest.fixture(scope="module")
def resnet() -> ClipTeacher:
    t = ClipTeacher.from_config(RN_CFG, seed=0)
    _randomise_norms(t.model, 2)
    return t


@pytest.fixture(scope="module")
def cam_front(data_dir: Path) -> np.ndarray:
    path = next((data_dir / "nuscenes" / "mmdet3d_demo_scene-0061").glob("*__CAM_FRONT__*.jpg"))
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None and bgr.shape == (900, 1600, 3)
    return np.ascontiguousarray(bgr[:, :, ::-1])


# --- independent re-derivation helpers --------------------------------------------------
def _layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _act(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(block.mlp.gelu, torch.nn.GELU):
        return 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))
    return x * torch.sigmoid(1.702 * x)


def _manual_vit_dense(visual, last_in: torch.Tensor, grid: tuple[int, int], residual: bool) -> torch.Tensor:
    """MaskCLIP value path of the last block, token by token with explicit matrix products."""
    blk = visual.transformer.resblocks[-1]
    c = blk.attn.embed_dim
    w_v, b_v = blk.attn.in_proj_weight[2 * c:], blk.attn.in_proj_bias[2 * c:]
    w_o, b_o = blk.attn.out_proj.weight, blk.attn.out_proj.bias
    w1, b1 = blk.mlp.c_fc.weight, blk.mlp.c_fc.bias
    w2, b2 = blk.mlp.c_proj.weight, blk.mlp.c_proj.bias
    b = last_in.shape[0]
    out = torch.zeros(b, visual.proj.shape[1], grid[0], grid[1])
    for n in range(b):
        for i in range(grid[0] * grid[1]):
            x = last_in[n, 1 + i]
            v = w_v @ _layer_norm(x, blk.ln_1) + b_v
            z = w_o @ v + b_o
            if residual:
                z = x + z
                z = z + w2 @ _act(blk, w1 @ _layer_norm(z, blk.ln_2) + b1) + b2
            f = _layer_norm(z, visual.ln_post) @ visual.proj
            out[n, :, i // grid[1], i % grid[1]] = f / f.norm()
    return out


def _capture_last_block_input(visual, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    hook = visual.transformer.resblocks[-1].register_forward_pre_hook(
        lambda mod, args: seen.setdefault("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            visual(x)
    finally:
        hook.remove()
    return seen["x"]


# --- ViT ----------------------------------------------------------------------------------
@pytest.mark.parametrize("last_block", ["maskclip", "value_only"])
def test_vit_dense_matches_value_path_derivation(vit: ClipTeacher, last_block: str) -> None:
    teacher = ClipTeacher(vit.model, "custom", vit.tokenizer, "cpu", options=MaskClipOptions(last_block))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    last_in = _capture_last_block_input(teacher.model.visual, x)
    with torch.no_grad():
        expected = _manual_vit_dense(teacher.model.visual, last_in, (4, 4), last_block == "maskclip")
    dense, pooled = teacher.forward_input(x)
    assert dense.shape == (2, 24, 4, 4)
    torch.testing.assert_close(dense, expected, atol=2e-5, rtol=1e-4)
    # the class-token (pooled) path is open_clip's own encode_image at the native size
    with torch.no_grad():
        ref = teacher.model.encode_image(x, normalize=True)
    torch.testing.assert_close(pooled, ref, atol=1e-6, rtol=1e-5)
    # and the dense path really differs from the full-attention tokens
    with torch.no_grad():
        full = teacher.model.visual.ln_post(teacher.model.visual.transformer.resblocks[-1](last_in))[:, 1:]
    full = F.normalize(full @ teacher.model.visual.proj, dim=-1)
    assert not torch.allclose(full.reshape(2, 4, 4, -1).permute(0, 3, 1, 2), dense, atol=1e-3)


def test_vit_non_square_input_matches_model_built_for_that_size(vit: ClipTeacher) -> None:
    """A 32x64 input (2x4 patches) equals an open_clip ViT built for 32x64 whose positional
    embedding is the bicubic resize of the 4x4 one."""
    import open_clip

    cfg = {**VIT_CFG, "vision_cfg": {**VIT_CFG["vision_cfg"], "image_size": [32, 64]}}
    wide = open_clip.model.CLIP(**cfg).eval()
    sd = {k: v for k, v in vit.model.state_dict().items() if k != "visual.positional_embedding"}
    pos = vit.model.visual.positional_embedding.detach()
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(2, 4), mode="bicubic", align_corners=False)
    sd["visual.positional_embedding"] = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(8, -1)])
    wide.load_state_dict(sd, strict=True)

    x = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(4))
    dense, pooled = vit.forward_input(x)
    assert dense.shape == (1, 24, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(pooled, wide.encode_image(x, normalize=True), atol=1e-6, rtol=1e-5)
        last_in = _capture_last_block_input(wide.visual, x)
        expected = _manual_vit_dense(wide.visual, last_in, (2, 4), residual=True)
    torch.testing.assert_close(dense, expected, atol=2e-5, rtol=1e-4)


def test_pos_embed_resize_keeps_row_column_orientation() -> None:
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    pos = torch.cat([torch.zeros(1, 2), torch.stack([rows.flatten(), cols.flatten()], 1)])
    assert resize_pos_embed(pos, (4, 4), (4, 4)) is pos
    out = resize_pos_embed(pos, (4, 4), (3, 8))[1:].reshape(3, 8, 2)
    # channel 0 (row index) is constant along a row and grows down; channel 1 grows to the right
    assert torch.allclose(out[..., 0], out[..., 0][:, :1].expand(3, 8), atol=1e-5)
    assert (out[1:, 0, 0] > out[:-1, 0, 0]).all()
    assert torch.allclose(out[..., 1], out[..., 1][:1].expand(3, 8), atol=1e-5)
    assert (out[0, 1:, 1] > out[0, :-1, 1]).all()


# --- ResNet -------------------------------------------------------------------------------
def test_resnet_dense_matches_one_by_one_projection(resnet: ClipTeacher) -> None:
    visual = resnet.model.visual
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():   # open_clip's own trunk (stem + 4 stages) gives the last feature map
        f = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
    assert f.shape == (2, RN_CFG["vision_cfg"]["width"] * 32, 2, 3)
    pool = visual.attnpool
    expected = torch.zeros(2, 24, 2, 3)
    with torch.no_grad():
        for n in range(2):
            for r in range(2):
                for c in range(3):
                    v = pool.v_proj.weight @ f[n, :, r, c] + pool.v_proj.bias
                    o = pool.c_proj.weight @ v + pool.c_proj.bias
                    expected[n, :, r, c] = o / o.norm()
    dense, _ = resnet.forward_input(x)
    torch.testing.assert_close(dense, expected, atol=2e-5, rtol=1e-4)
    # at the native size the pooled path is open_clip's attention pool
    _, pooled = resnet.forward_input(x[..., :64])
    with torch.no_grad():
        ref = resnet.model.encode_image(x[..., :64], normalize=True)
    torch.testing.assert_close(pooled, ref, atol=1e-6, rtol=1e-5)
    # MaskCLIP skips the pool's positional embedding; the option adds it (and changes the map)
    with_pos = ClipTeacher(resnet.model, "custom", resnet.tokenizer,
                           options=MaskClipOptions(resnet_pos_embed=True)).forward_input(x)[0]
    assert not torch.allclose(with_pos, dense, atol=1e-3)


# --- real image: preprocessing, sampling, pseudo labels -----------------------------------
def test_nuscenes_camera_preprocessing_grid(vit: ClipTeacher, resnet: ClipTeacher,
                                            cam_front: np.ndarray) -> None:
    x, geo = vit.prepare(cam_front)
    # 1600x900 keeps its aspect: short side 224 -> 398 wide, padded to 400 (25 patches of 16)
    assert geo.resized_size == (224, 398) and x.shape == (1, 3, 224, 400) and geo.grid_size == (14, 25)
    assert torch.count_nonzero(x[..., 398:]) == 0
    mean = torch.tensor(vit.mean).view(3, 1)
    std = torch.tensor(vit.std).view(3, 1)
    rgb = (x[0, :, :, :398].reshape(3, -1) * std + mean).mean(1) * 255
    np.testing.assert_allclose(rgb.numpy(), cam_front.reshape(-1, 3).mean(0), atol=1.0)

    _, geo_rn = resnet.prepare(cam_front)
    assert geo_rn.input_size == (224, 416) and geo_rn.grid_size == (7, 13)
    feats = resnet.dense_features(cam_front)
    assert feats.shape == (1, 24, 7, 13)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(1, 7, 13))

    crop = ClipTeacher(vit.model, "custom", vit.tokenizer, preprocess=PreprocessConfig(fit="crop"))
    xc, gc = crop.prepare(cam_front)
    assert xc.shape == (1, 3, 224, 384) and gc.offset == (0, 7)


def test_pixel_features_sample_the_cell_under_the_pixel(vit: ClipTeacher, cam_front: np.ndarray) -> None:
    dense = vit.dense_features(cam_front)[0]
    assert dense.shape == (24, 14, 25)
    assert dense.flatten(1).std(1).mean() > 1e-3          # the real image gives varying features
    sx, sy = 398 / 1600, 224 / 900
    cells = [(0, 0), (5, 11), (13, 23), (7, 3)]
    uv = np.array([[(c + 0.5) * 16 / sx - 0.5, (r + 0.5) * 16 / sy - 0.5] for r, c in cells])
    feats = vit.pixel_features(cam_front, uv)
    expected = torch.stack([dense[:, r, c] for r, c in cells])
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-4)
    # half way between two cell centres: the normalised mean of the two
    mid = np.array([[(11 + 1.0) * 16 / sx - 0.5, 5.5 * 16 / sy - 0.5]])
    torch.testing.assert_close(vit.pixel_features(cam_front, mid)[0],
                               F.normalize(dense[:, 5, 11] + dense[:, 5, 12], dim=0), atol=1e-5, rtol=1e-4)
    # the last pixel column/row and the image edges are inside; a pixel beyond is not
    edges = vit.pixel_features(cam_front, np.array([[1599.0, 899.0], [-0.5, -0.5], [1599.9, 0.0]]))
    torch.testing.assert_close(edges[0], dense[:, 13, 24], atol=1e-5, rtol=1e-4)
    with pytest.raises(CalibrationError, match="outside"):
        vit.pixel_features(cam_front, np.array([[100.0, 100.0], [1700.0, 10.0]]))
    with pytest.raises(CalibrationError, match="outside"):
        vit.pixel_features(cam_front, np.array([[np.nan, 100.0]]))


def test_pseudo_labels_pick_most_similar_class(vit: ClipTeacher, cam_front: np.ndarray) -> None:
    dense = vit.dense_features(cam_front)
    text = torch.stack([dense[0, :, 2, 3], dense[0, :, 10, 20], dense[0, :, 6, 6]])
    labels, scores = vit.pseudo_labels(dense, text, return_scores=True)
    assert labels.shape == (1, 14, 25) and scores.shape == (1, 14, 25)
    assert labels[0, 2, 3] == 0 and labels[0, 10, 20] == 1 and labels[0, 6, 6] == 2
    assert torch.isclose(scores[0, 10, 20], torch.tensor(1.0), atol=1e-5)
    assert (scores <= 1 + 1e-5).all()
    sims = torch.einsum("dhw,kd->khw", dense[0], text)
    assert torch.equal(labels[0], sims.argmax(0))
    pts = dense[0].flatten(1).T
    assert torch.equal(vit.pseudo_labels(pts, text), labels.flatten())
    with pytest.raises(ConfigError):
        vit.pseudo_labels(dense, torch.randn(3, 7))


def test_teacher_is_frozen(vit: ClipTeacher, cam_front: np.ndarray) -> None:
    assert not vit.model.training
    assert not any(p.requires_grad for p in vit.model.parameters())
    assert not vit.dense_features(cam_front[:64, :64]).requires_grad
    assert not vit.encode_text(["a car"]).requires_grad


def test_bad_images_are_rejected(vit: ClipTeacher) -> None:
    with pytest.raises(ImageDecodeError):
        vit.dense_features(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ImageDecodeError):
        vit.dense_features(np.zeros((32, 32), np.uint8))
    with pytest.raises(ImageDecodeError):
        vit.dense_features([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 48, 3), np.uint8)])


def test_encode_text_normalised_and_deterministic(vit: ClipTeacher) -> None:
    e = vit.encode_text(["a photo of a car.", "a photo of a road.", "a photo of a car."])
    assert e.shape == (3, 24)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(e[0], e[2])
    assert not torch.allclose(e[0], e[1], atol=1e-3)


def test_encode_text_equals_open_clip_full_context(vit: ClipTeacher) -> None:
    """Encoding stops at the last end-of-text token; open_clip runs all 77 positions."""
    texts = ["a car.", "a photo of the hard to see construction vehicle on the road.", "tree"]
    tokens = vit.tokenizer(texts)
    assert tokens.shape == (3, 77)
    with torch.no_grad():
        ref = vit.model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(vit.encode_text(texts), ref, atol=1e-5, rtol=1e-4)


# --- weights ------------------------------------------------------------------------------
def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "ViT-B-16.pt"
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        ClipTeacher.from_pretrained("ViT-B-16", weights=missing, device="cpu")


def test_failed_tag_download_says_how_to_use_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip.factory

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(WeightsNotFoundError, match=r"'openai'.*local path"):
        ClipTeacher.from_pretrained("RN50", weights="openai", device="cpu")
    with pytest.raises(WeightsNotFoundError, match="known tags"):
        ClipTeacher.from_pretrained("RN50", weights="no_such_tag", device="cpu")
    with pytest.raises(ConfigError, match="unknown CLIP model"):
        ClipTeacher.from_pretrained("NoSuchNet-7", weights="openai", device="cpu")


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_saved_weights_reload_through_from_pretrained(tmp_path: Path, vit: ClipTeacher,
                                                       cam_front: np.ndarray) -> None:
    register_model_config("c2s-test-vit-tiny", VIT_CFG, tmp_path / "configs")
    texts = ["a photo of a truck.", "there is a tree in the scene."]
    image = cam_front[::8, ::8].copy()

    state = tmp_path / "tiny_state_dict.pt"
    torch.save(vit.model.state_dict(), state)
    loaded = ClipTeacher.from_pretrained("c2s-test-vit-tiny", weights=state, device="cpu")
    assert loaded.weights_source.startswith("file:")
    torch.testing.assert_close(loaded.encode_text(texts), vit.encode_text(texts))
    torch.testing.assert_close(loaded.dense_features(image), vit.dense_features(image))
    assert loaded.weights_id == vit.weights_id

    # OpenAI ships TorchScript archives: a traced copy of the model must load the same way
    with torch.no_grad():
        traced = torch.jit.trace(vit.model, (torch.zeros(1, 3, 64, 64), vit.tokenizer(["a"])),
                                 strict=False, check_trace=False)
    archive = tmp_path / "tiny_torchscript.pt"
    traced.save(str(archive))
    from_ts = ClipTeacher.from_pretrained("c2s-test-vit-tiny", weights=archive, device="cpu",
                                          quick_gelu=False)
    torch.testing.assert_close(from_ts.encode_text(texts), vit.encode_text(texts))

    other = ClipTeacher.from_config(VIT_CFG, seed=7)
    assert other.weights_id != vit.weights_id
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        ClipTeacher.from_pretrained("c2s-test-vit-tiny", weights=bad, device="cpu")
