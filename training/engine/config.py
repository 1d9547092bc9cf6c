"""Typed configs of the training CLIs (loaded strictly from YAML with ``from_dict``).

Defaults are the paper's pre-training recipe (SGD lr 0.1, momentum 0.9, cosine, 20 epochs,
τ = 0.5, λ = 1); ``config/pretrain_demo.yaml`` shrinks everything so it runs on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clip2scene_core.config import from_dict, load_yaml
from clip2scene_core.losses import ScrConfig, SelfTrainingConfig, SsrConfig
from clip2scene_core.models import ModelConfig


@dataclass
class AugmentConfig:
    """Point-cloud augmentation applied identically to the key frame and its sweeps."""

    enabled: bool = True
    rotate_z: float = 180.0           # degrees, uniform in [-rotate_z, rotate_z]
    flip_x: bool = True
    flip_y: bool = True
    scale: tuple[float, float] = (0.95, 1.05)


@dataclass
class DataConfig:
    """Which reader to build and how to sample it.

    ``reader`` names a class of ``clip2scene_core.datasets`` (NuScenesReader,
    NuScenesInfoReader, SemanticKittiReader, ScanNetReader, Rellis3DReader) or ``"rosbag"``
    (``clip2scene_ros.bag``); ``args`` are its constructor arguments. Relative paths in args
    (keys ending in root/path/pkl/dir/file) are resolved against the config file's repo root.
    """

    reader: str = "NuScenesReader"
    args: dict[str, Any] = field(default_factory=dict)
    indices: list[int] | None = None          # use only these samples (after scene subsampling)
    max_points: int | None = None             # random key-frame subsample (CPU demos/tests)
    max_sweep_points: int | None = None
    use_sweeps: bool = True                   # feed earlier sweeps (SSR's temporal part)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TeacherConfig:
    """The MaskCLIP teacher and its feature cache.

    ``weights``: local file / open_clip tag for real CLIP; with ``random_init`` a small random
    tower (``model_cfg``) is built instead (CPU demo, tests: no weights can be downloaded).
    """

    model_name: str = "ViT-B-16"
    weights: str | None = None
    random_init: bool = False
    model_cfg: dict[str, Any] = field(default_factory=dict)
    seed: int = 0                             # random_init weights seed (part of the cache key)
    device: str = "auto"
    cache_dir: str = "runs/teacher_cache"
    preprocess: dict[str, Any] = field(default_factory=dict)   # clip.PreprocessConfig fields
    min_depth: float = 1.0
    templates: str = "maskclip"                # prompt template set (clip.prompts)
    text_cache_dir: str | None = None


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    dampening: float = 0.1
    weight_decay: float = 1e-4
    nesterov: bool = False
    epochs: int = 20
    steps: int | None = None                  # train this many optimizer steps instead of `epochs`
    batch_size: int = 4                       # per process
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = 0
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and int(self.steps) < 1:
            from clip2scene_core.errors import ConfigError
            raise ConfigError(f"optim.steps must be >= 1 (or null for epochs), got {self.steps}")


@dataclass
class RunConfig:
    out_dir: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    deterministic: bool = True
    log_every: int = 10                       # steps between TensorBoard scalars
    progress: bool = True                     # tqdm bars
    num_threads: int | None = None            # torch.set_num_threads (CPU)
    save_every_steps: int | None = None       # extra mid-epoch checkpoints (with optim.steps: the record period)
    save_rank_states: bool = False            # each DDP rank writes rank<r>_model.pt (replica check)


@dataclass
class VocabConfig:
    preset: str | None = "nuscenes16"
    names: list[str] | None = None            # custom vocabulary instead of a preset


@dataclass
class PretrainLossConfig:
    scr: ScrConfig = field(default_factory=ScrConfig)
    ssr: SsrConfig = field(default_factory=SsrConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    self_train_unpaired: bool = False         # released code: CE to own argmax for unpaired points


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    vocabulary: VocabConfig = field(default_factory=VocabConfig)
    loss: PretrainLossConfig = field(default_factory=PretrainLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class FinetuneLossConfig:
    lovasz_weight: float = 1.0
    logit_scale: float = 1.0 / 0.07           # cosine · scale, as the Segmenter classifies
    learn_text: bool = True                   # fine-tune the text classifier as well


@dataclass
class FinetuneConfig:
    pretrained: str | None = None             # training state (last.pt) or deployable checkpoint
    text_init: Literal["checkpoint", "teacher", "random"] = "checkpoint"   # classifier initialisation
    label_fraction: float = 1.0               # 0.01, 0.05, ... of the scenes carry labels
    split_seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    val_data: DataConfig | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)   # only for the text embeddings
    vocabulary: VocabConfig = field(default_factory=VocabConfig)
    loss: FinetuneLossConfig = field(default_factory=FinetuneLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.02, epochs=100, dampening=0.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/finetune"))


@dataclass
class EvaluateConfig:
    checkpoint: str = "runs/pretrain/last.pt"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    vocabulary: VocabConfig | None = None     # default: the checkpoint's vocabulary
    heads: list[Literal["local", "global", "both"]] = field(default_factory=lambda: ["local", "global"])
    out_dir: str = "runs/evaluate"
    deploy_head: Literal["local", "global", "both"] = "local"
    device: str = "auto"


def load_training_config(cls: type, path: str | Path, overrides: list[str] | None = None):
    """YAML file → ``cls``; ``overrides`` like ``optim.epochs=2`` are applied first (YAML values)."""
    import yaml

    data = load_yaml(path)
    for item in overrides or []:
        key, _, raw = item.partition("=")
        if not key or not _:
            from clip2scene_core.errors import ConfigError
            raise ConfigError(f"override '{item}' must look like section.key=value")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return from_dict(cls, data)
