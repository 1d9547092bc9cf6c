"""Camera image → CLIP input, and the pixel ↔ feature-grid mapping that goes with it.

Images keep their aspect ratio (a 1600×900 nuScenes frame becomes 398×224, not a squashed
224×224) because dense features must stay aligned with projected LiDAR points. The resized
image is then padded (default; nothing is lost) or centre-cropped to a multiple of the
network stride (ViT patch size, 32 for ResNets), so every feature cell covers exactly
``stride``×``stride`` input pixels. ``ImageGeometry`` records the mapping so that pixel
coordinates of the *original* image can be sampled on the feature grid.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
from torch import Tensor

from ..errors import CalibrationError, ConfigError, ImageDecodeError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PreprocessConfig:
    """How camera images are sized for the teacher."""

    short_side: int = 224                 # resized short side (CLIP's training resolution)
    fit: Literal["pad", "crop"] = "pad"   # reach the stride multiple by padding or centre crop
    max_long_side: int | None = None      # optional cap on the long side (wide panoramas)

    def __post_init__(self) -> None:
        if int(self.short_side) <= 0:
            raise ConfigError(f"short_side must be positive, got {self.short_side}")
        if self.fit not in ("pad", "crop"):
            raise ConfigError(f"fit must be 'pad' or 'crop', got {self.fit!r}")
        if self.max_long_side is not None and int(self.max_long_side) <= 0:
            raise ConfigError(f"max_long_side must be positive, got {self.max_long_side}")


@dataclass(frozen=True)
class ImageGeometry:
    """Where the original image lies in the network input (all sizes are (height, width))."""

    orig_size: tuple[int, int]
    resized_size: tuple[int, int]
    input_size: tuple[int, int]
    offset: tuple[int, int]   # (top, left) crop offset in resized pixels; (0, 0) when padding
    stride: int

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.input_size[0] // self.stride, self.input_size[1] // self.stride

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): resized / original size per axis (they differ slightly by rounding)."""
        return (self.resized_size[0] / self.orig_size[0], self.resized_size[1] / self.orig_size[1])

    def to_input(self, uv: np.ndarray) -> np.ndarray:
        """Original pixel coords (u col, v row; integer = pixel centre) → input-pixel edges coords."""
        uv = np.asarray(uv, dtype=np.float64)
        sy, sx = self.scale
        x = (uv[:, 0] + 0.5) * sx - self.offset[1]
        y = (uv[:, 1] + 0.5) * sy - self.offset[0]
        return np.stack([x, y], axis=1)

    def inside(self, uv: np.ndarray) -> np.ndarray:
        """(N,) bool: the pixel lies in the image part that reached the network.

        Half a pixel of slack on each side, so both ``0 <= u < W`` and pixel-edge
        conventions (``-0.5 <= u <= W - 0.5``) count as inside.
        """
        xy = self.to_input(uv)
        sy, sx = self.scale
        h = min(self.resized_size[0] - self.offset[0], self.input_size[0])
        w = min(self.resized_size[1] - self.offset[1], self.input_size[1])
        return (np.isfinite(xy).all(1) & (xy[:, 0] >= -0.5 * sx) & (xy[:, 0] <= w + 0.5 * sx)
                & (xy[:, 1] >= -0.5 * sy) & (xy[:, 1] <= h + 0.5 * sy))

    def to_cells(self, uv: np.ndarray) -> np.ndarray:
        """(N, 2) (x, y) on the feature grid, cell centres at integers: where
        ``grid_sample(..., align_corners=False)`` reads ``to_grid(uv)`` before its border clamp
        (``((g + 1) · size − 1) / 2`` simplifies to ``input / stride − 0.5``)."""
        return self.to_input(uv) / self.stride - 0.5

    def to_grid(self, uv: np.ndarray) -> np.ndarray:
        """(N, 2) coords in [-1, 1] for ``grid_sample(..., align_corners=False)`` on the feature map."""
        xy = self.to_input(uv)
        return np.stack([2.0 * xy[:, 0] / self.input_size[1] - 1.0,
                         2.0 * xy[:, 1] / self.input_size[0] - 1.0], axis=1)


def compute_geometry(height: int, width: int, stride: int, cfg: PreprocessConfig) -> ImageGeometry:
    """Resize keeping aspect so the short side is ``cfg.short_side``, then fit to ``stride``."""
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"image size must be positive, got {width}x{height}")
    s = cfg.short_side / min(height, width)
    if cfg.max_long_side is not None and max(height, width) * s > cfg.max_long_side:
        s = cfg.max_long_side / max(height, width)
    h, w = max(1, round(height * s)), max(1, round(width * s))
    if cfg.fit == "pad":
        hp, wp = -(-h // stride) * stride, -(-w // stride) * stride
        off = (0, 0)
    else:
        hp, wp = (h // stride) * stride, (w // stride) * stride
        if hp == 0 or wp == 0:
            raise ConfigError(f"image resized to {w}x{h} is smaller than the stride {stride}; cannot crop")
        off = ((h - hp) // 2, (w - wp) // 2)
    return ImageGeometry((int(height), int(width)), (h, w), (hp, wp), off, int(stride))


def as_image_batch(images: np.ndarray | Tensor | Sequence[np.ndarray]) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB from one image, a batch, a tensor, or a list of same-size images."""
    if isinstance(images, Tensor):
        images = images.detach().cpu().numpy()
    elif isinstance(images, (list, tuple)):
        if not images:
            raise ImageDecodeError("empty list of images")
        shapes = {np.asarray(im).shape for im in images}
        if len(shapes) != 1:
            raise ImageDecodeError(f"images in one batch must have the same size, got {sorted(shapes)}")
        images = np.stack([np.asarray(im) for im in images])
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ImageDecodeError(f"expected (H, W, 3) or (B, H, W, 3) RGB images, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ImageDecodeError(f"expected uint8 RGB images, got dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ImageDecodeError(f"empty image batch of shape {arr.shape}")
    return arr


def preprocess_images(images: np.ndarray | Tensor | Sequence[np.ndarray], stride: int,
                      cfg: PreprocessConfig | None = None,
                      mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD,
                      device: torch.device | str = "cpu") -> tuple[Tensor, ImageGeometry]:
    """(B, 3, Hp, Wp) float32 normalised network input and its ``ImageGeometry``.

    Shrinking uses area averaging (anti-aliased, like PIL's bicubic+antialias that open_clip
    uses); enlarging uses bicubic. Padding is zero *after* normalisation, i.e. the mean colour.
    """
    batch = as_image_batch(images)
    b, height, width, _ = batch.shape
    geo = compute_geometry(height, width, stride, cfg or PreprocessConfig())
    (h, w), (hp, wp), (oy, ox) = geo.resized_size, geo.input_size, geo.offset
    interp = cv2.INTER_AREA if h < height else cv2.INTER_CUBIC
    resized = np.stack([cv2.resize(np.ascontiguousarray(im), (w, h), interpolation=interp) for im in batch])
    x = torch.from_numpy(resized).to(device=device, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = (x - m) / s
    if cfg.fit == "pad":
        x = torch.nn.functional.pad(x, (0, wp - w, 0, hp - h))
    else:
        x = x[:, :, oy:oy + hp, ox:ox + wp]
    return x.contiguous(), geo


def sample_grid(features: Tensor, uv: np.ndarray, geometry: ImageGeometry,
                normalize: bool = True) -> Tensor:
    """Bilinear sample of (D, h, w) or (1, D, h, w) ``features`` at original-image pixels ``uv``.

    Raises CalibrationError when a pixel lies outside the part of the image that reached the
    network (pass only points that project into the image). Rows are re-normalised when
    ``normalize`` because interpolating unit vectors shortens them.
    """
    uv = np.asarray(uv, dtype=np.float64)
    if uv.ndim != 2 or uv.shape[1] != 2:
        raise CalibrationError(f"uv must be (N, 2) pixel coordinates, got shape {uv.shape}")
    if features.ndim == 3:
        features = features[None]
    if features.ndim != 4 or features.shape[0] != 1:
        raise CalibrationError(f"expected one (D, h, w) feature map, got shape {tuple(features.shape)}")
    if tuple(features.shape[-2:]) != geometry.grid_size:
        raise CalibrationError(
            f"feature map is {tuple(features.shape[-2:])} but the geometry expects {geometry.grid_size}")
    if uv.shape[0] == 0:
        return features.new_zeros((0, features.shape[1]))
    ok = geometry.inside(uv)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise CalibrationError(
            f"{bad.size} of {uv.shape[0]} pixel coordinates lie outside the "
            f"{geometry.orig_size[1]}x{geometry.orig_size[0]} image used for the features "
            f"(first: {uv[bad[0]].tolist()})")
    grid = torch.from_numpy(geometry.to_grid(uv)).to(features.device, features.dtype)
    out = torch.nn.functional.grid_sample(features, grid.view(1, 1, -1, 2), mode="bilinear",
                                          padding_mode="border", align_corners=False)
    out = out[0, :, 0].T.contiguous()
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out
