"""MaskCLIP key smoothing / prompt denoising (``clip2scene_core.clip.refine``): CPU cost and
effect in a controlled case.

(a) cost: ClipTeacher on open_clip's ViT-B-16 (random weights) on a real nuScenes CAM_FRONT
    (1600x900 -> 400x224 input, 14x25 patches), one torch thread, smoothing off/on interleaved
    in one process, CPU time (time.thread_time); plus the smoothing step alone at 350 and
    1400 patches (short side 224 / 448).
(b) effect: RELLIS-3D frame 104's real 2D labels on the teacher's patch grid; each patch's
    feature = its class's text embedding (random unit, D 512, 19 RELLIS classes) + isotropic
    Gaussian noise of norm sigma; argmax upsampled to the 1920x1200 label image; pixel mIoU.
    Keys: "self" = the noisy features themselves, "indep(s)" = a per-class key vector plus
    independent noise of scale s (what trained CLIP keys are meant to be: grouped by object),
    "vitB16" = the random ViT-B-16's real keys of this image (they carry no object grouping).
(c) teacher pass: ``TeacherCache.compute_entry`` on a real nuScenes key frame's CAM_FRONT
    (the LiDAR points projected into it), prompt denoising (``teacher.prompt_denoising``)
    off/on interleaved, CPU time per camera.

Random weights say nothing about CLIP's real keys or confidences (a random tower's logit scale
is 14.3, so nearly every class stays below 0.5); (b) shows what each refinement does when its
assumption holds. Figures only; nothing is asserted (test/test_refine.py and
test/test_teacher_cache_denoise.py check the behaviour). About 1-3 minutes of CPU.

    python -m benchmarks.maskclip_refine [--reps 4] [--seeds 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from clip2scene_core.clip import ClipTeacher, KeySmoothing, kept_classes, key_smoothing, prompt_denoise
from clip2scene_core.clip.maskclip import dense_forward_with_keys
from clip2scene_core.datasets.classes import rellis3d_to_index
from clip2scene_core.metrics import ConfusionMatrix
from clip2scene_core.teachers import read_label_image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "test/data"


def vit_b16() -> ClipTeacher:
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    return ClipTeacher(model, "ViT-B-16", open_clip.get_tokenizer("ViT-B-16"))


def cost(teacher: ClipTeacher, reps: int) -> None:
    path = next((DATA / "nuscenes/mmdet3d_demo_scene-0061").glob("*__CAM_FRONT__*.jpg"))
    img = np.ascontiguousarray(cv2.imread(str(path))[:, :, ::-1])
    x, geo = teacher.prepare(img)
    print(f"input {tuple(x.shape)} grid {geo.grid_size}")
    on = KeySmoothing(enabled=True)
    times = {"off": [], "on": []}
    teacher.forward_input(x)                                   # warm-up
    for _ in range(reps):
        for name in ("off", "on"):
            teacher.key_smoothing = on if name == "on" else KeySmoothing()
            t0 = time.thread_time()
            teacher.forward_input(x)
            times[name].append(time.thread_time() - t0)
    teacher.key_smoothing = KeySmoothing()
    off, onm = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"(a) forward CPU ms/image: off {1e3 * off:.0f}, on {1e3 * onm:.0f}, added {1e3 * (onm - off):.1f} "
          f"({100 * (onm / off - 1):+.2f}%)  [{reps} interleaved reps each, medians]")
    d, _, k = dense_forward_with_keys(teacher.model.visual, x)
    for hw in [(14, 25), (28, 50)]:
        f = torch.randn(1, d.shape[1], *hw)
        kk = torch.randn(1, k.shape[1], *hw)
        n = 20 if hw[0] < 20 else 5
        t0 = time.thread_time()
        for _ in range(n):
            key_smoothing(F.normalize(f, dim=1), kk, 0.5)
        print(f"    smoothing step alone at {hw[0]}x{hw[1]}={hw[0] * hw[1]} patches: "
              f"{1e3 * (time.thread_time() - t0) / n:.1f} CPU ms")


def grid_labels(labels: np.ndarray, resized: tuple[int, int], grid: tuple[int, int], stride: int) -> np.ndarray:
    """Majority class of each patch of the resized (padded) label image (-1: padding only)."""
    small = cv2.resize(labels.astype(np.int32), (resized[1], resized[0]), interpolation=cv2.INTER_NEAREST)
    pad = np.full((grid[0] * stride, grid[1] * stride), -1, np.int64)
    pad[:resized[0], :resized[1]] = small
    cells = pad.reshape(grid[0], stride, grid[1], stride).transpose(0, 2, 1, 3).reshape(grid[0], grid[1], -1)
    out = np.full(grid, -1, np.int64)
    for i in range(grid[0]):
        for j in range(grid[1]):
            v = cells[i, j][cells[i, j] >= 0]
            if v.size:
                out[i, j] = np.bincount(v).argmax()
    return out


def effect(teacher: ClipTeacher, seeds: int = 5) -> None:
    raw = read_label_image(DATA / "rellis3d/utils_example/frame000104-1581624663_149.png")
    gt = rellis3d_to_index(raw.astype(np.int64))
    bgr = cv2.imread(str(DATA / "rellis3d/utils_example/frame000104-1581624663_149.jpg"))
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    x, geo = teacher.prepare(rgb)
    grid, stride = geo.grid_size, geo.stride
    cell = grid_labels(gt, geo.resized_size, grid, stride)
    # original pixel -> patch (for upsampling the patch argmax to the label image)
    H, W = gt.shape
    rows = np.minimum(((np.arange(H) + 0.5) * geo.resized_size[0] / H // stride).astype(int), grid[0] - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * geo.resized_size[1] / W // stride).astype(int), grid[1] - 1)
    K, D = 19, 512
    present = sorted(set(np.unique(gt).tolist()))
    print(f"(b) RELLIS frame 104: grid {grid} ({grid[0] * grid[1]} patches), {len(present)} of {K} classes present")
    with torch.no_grad():
        _, _, vit_keys = dense_forward_with_keys(teacher.model.visual, x)
    vit_keys = vit_keys[0]
    kc = F.normalize(vit_keys.flatten(1), dim=0)
    print(f"    random ViT-B-16 keys: mean patch-pair cosine {float((kc.T @ kc).mean()):.3f}")

    def miou(pred_cell: torch.Tensor) -> float:
        pix = pred_cell.numpy()[rows[:, None], cols[None, :]]
        cm = ConfusionMatrix(K)
        cm.update(pix.reshape(-1), gt.reshape(-1))
        return cm.miou()

    valid = torch.from_numpy(cell >= 0)
    variants = ["ceiling (no noise)", "plain", "denoise0.5",
                "ks self thr0.5", "ks self top8",
                "ks indep(0.5) thr0.5", "ks indep(1.0) thr0.5", "ks vitB16 top8", "ks vitB16 thr0.9",
                "ks indep(0.5)+denoise"]
    for sigma in (6.0, 10.0, 14.0):
        res = {v: [] for v in variants}
        removed = []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            text = F.normalize(torch.randn(K, D, generator=g), dim=1)
            lab = torch.from_numpy(np.where(cell >= 0, cell, 0))
            clean = text[lab].permute(2, 0, 1)
            feats = F.normalize(clean + sigma * torch.randn(clean.shape, generator=g) / D ** 0.5, dim=0)
            key_vec = F.normalize(torch.randn(K, 64, generator=g), dim=1)[lab].permute(2, 0, 1)
            keys = {s: key_vec + s * torch.randn(key_vec.shape, generator=g) / 8.0 for s in (0.5, 1.0)}

            def scores(f: torch.Tensor, text: torch.Tensor = text) -> torch.Tensor:
                return torch.einsum("dhw,kd->khw", F.normalize(f, dim=0), text)

            s0 = scores(feats)
            den = prompt_denoise(s0, 0.5)
            removed.append(int(torch.isinf(den).all(2).all(1).sum()))
            out = {
                "ceiling (no noise)": scores(clean), "plain": s0, "denoise0.5": den,
                "ks self thr0.5": scores(key_smoothing(feats, feats, 0.5)),
                "ks self top8": scores(key_smoothing(feats, feats, -1.0, 8)),
                "ks indep(0.5) thr0.5": scores(key_smoothing(feats, keys[0.5], 0.5)),
                "ks indep(1.0) thr0.5": scores(key_smoothing(feats, keys[1.0], 0.5)),
                "ks vitB16 top8": scores(key_smoothing(feats, vit_keys, -1.0, 8)),
                "ks vitB16 thr0.9": scores(key_smoothing(feats, vit_keys, 0.9)),
            }
            out["ks indep(0.5)+denoise"] = prompt_denoise(out["ks indep(0.5) thr0.5"], 0.5)
            for v, s in out.items():
                res[v].append(miou(s.argmax(0)))
            acc = float((s0.argmax(0)[valid] == lab[valid]).float().mean())
        base = statistics.mean(res["plain"])
        print(f"  sigma {sigma:g}: patch accuracy (last seed) {acc:.3f}; absent classes removed by denoising "
              f"(mean over seeds) {statistics.mean(removed):.1f} of {K - len(present)}")
        for v in variants:
            m = statistics.mean(res[v])
            print(f"    {v:24s} mIoU {m:.3f}  diff {m - base:+.3f}  ratio {m / base:.3f}")


def teacher_pass(teacher: ClipTeacher, reps: int) -> None:
    from clip2scene_core.clip import Vocabulary
    from clip2scene_core.datasets import NuScenesReader
    from training.engine.teacher_cache import Preprocess, TeacherCache

    sample = NuScenesReader(DATA / "nuscenes/dororo99_v1.0-extract_3samples", version_dir="v1.0-extract-subset",
                            cameras=("CAM_FRONT",))[0]
    text = teacher.text_embeddings(Vocabulary.preset("nuscenes16"), "single", use_cache=False).float().cpu()
    with tempfile.TemporaryDirectory() as tmp:
        caches = {"off": TeacherCache(tmp, "bench", Preprocess({}, 1.0)),
                  "on": TeacherCache(tmp, "bench", Preprocess({}, 1.0, 0.5))}
        times: dict[str, list[float]] = {"off": [], "on": []}
        keys = {}
        for _ in range(reps):
            for name, cache in caches.items():
                t0 = time.thread_time()
                keys[name] = cache.compute_entry(teacher, sample.scan, sample.cameras[0], text)
                times[name].append(time.thread_time() - t0)
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        kept = int(caches["on"].read_entry(keys["on"])["keep"].sum())
        points = len(caches["off"].read_entry(keys["off"])["labels"])
    print(f"(c) teacher pass CPU ms/camera ({points} points): denoising off {1e3 * off:.0f}, on {1e3 * on:.0f}, "
          f"ratio {on / off:.3f}  [{reps} interleaved reps each, medians; random weights kept {kept} of "
          f"{len(text)} classes]")
    fmap = F.normalize(torch.randn(teacher.embed_dim, 14, 25), dim=0)
    n = 200
    t0 = time.thread_time()
    for _ in range(n):
        kept_classes(torch.einsum("dhw,kd->khw", fmap, text), 0.5)
    print(f"    denoising step alone (scores of 14x25 cells x {len(text)} classes + kept_classes): "
          f"{1e3 * (time.thread_time() - t0) / n:.3f} CPU ms")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=4, help="interleaved repetitions of each timed variant")
    ap.add_argument("--seeds", type=int, default=5, help="noise draws per sigma in (b)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t = vit_b16()
    cost(t, args.reps)
    effect(t, args.seeds)
    teacher_pass(t, args.reps)


if __name__ == "__main__":
    main()
