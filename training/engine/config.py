"""Typed configs of the training CLIs (loaded strictly from YAML with ``from_dict``).

Defaults are the paper's pre-training recipe (SGD lr 0.1, momentum 0.9, cosine, 20 epochs,
τ = 0.5, λ = 1); ``config/pretrain_demo.yaml`` shrinks everything so it runs on a CPU.
A pretrain config's ``recipe`` (``project`` | ``released`` | ``paper``, ``training.engine.recipes``)
supplies the defaults of the keys where the project, the released code and the paper differ;
keys given in the file or with ``--set`` win.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clip2scene_core.config import from_dict, load_yaml
from clip2scene_core.errors import ConfigError
from clip2scene_core.losses import ScrConfig, SelfTrainingConfig, SsrConfig
from clip2scene_core.models import ModelConfig

from .recipes import apply_recipe


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

    ``reader`` names an entry of ``clip2scene_core.datasets.READERS`` (NuScenesReader,
    NuScenesInfoReader, SemanticKittiReader, ScanNetReader, Rellis3DReader) or ``"rosbag"``
    (``training.engine.data.TRAINING_READERS``); ``args`` are its constructor arguments. Relative paths in args
    (keys ending in root/path/pkl/dir/file) are resolved against the config file's repo root.
    """

    reader: str = "NuScenesReader"
    args: dict[str, Any] = field(default_factory=dict)
    indices: list[int] | None = None          # use only these samples (after scene subsampling)
    max_points: int | None = None             # random key-frame subsample (CPU demos/tests)
    max_sweep_points: int | None = None
    use_sweeps: bool = True                   # feed earlier sweeps (SSR's temporal part)
    # project the (aligned) sweeps into the key-frame cameras: their points get teacher pixels
    # and join SCR and SSR's pixel-point pairs (the released code); off: SSR point members only
    sweeps_to_keyframe_cameras: bool = False
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
    # MaskCLIP refinements (clip.refine), both off by default and part of the cache key when on:
    key_smoothing: dict[str, Any] = field(default_factory=dict)   # clip.KeySmoothing fields
    prompt_denoising: float | None = None     # pseudo-labels: drop classes below this confidence

    def __post_init__(self) -> None:
        from clip2scene_core.clip.refine import KeySmoothing   # torch: only when a config is built

        from_dict(KeySmoothing, dict(self.key_smoothing), "teacher.key_smoothing")
        if self.prompt_denoising is not None and not 0.0 <= float(self.prompt_denoising) <= 1.0:
            raise ConfigError(f"teacher.prompt_denoising is a confidence in [0, 1] (MaskCLIP: 0.5) or null, "
                              f"got {self.prompt_denoising}")


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
    # a preset's prompt names: its synonym lists, or "bare" class names (released code)
    prompts: Literal["synonyms", "bare"] = "synonyms"


@dataclass
class PretrainLossConfig:
    scr: ScrConfig = field(default_factory=ScrConfig)
    ssr: SsrConfig = field(default_factory=SsrConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    # CE of unpaired key-frame points to their own argmax after the switch: the released code
    # computes this term and then overwrites it (no effect there), so no recipe turns it on
    self_train_unpaired: bool = False


@dataclass
class PretrainConfig:
    recipe: Literal["project", "released", "paper"] = "project"   # applied by load_training_config
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


# ----------------------------------------------------------------------------- value checks
def _number(path: str, value: Any, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, what: str = "") -> None:
    """ConfigError naming ``path`` unless ``value`` is a finite number in the given range."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{path}: {value!r} is not a finite number")
    bad = ((low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise ConfigError(f"{path}: {value!r} is out of range (must be {rng}{what})")


def _check_optim(o: OptimConfig, p: str) -> None:
    _number(f"{p}.lr", o.lr, low=0.0, low_open=True)
    _number(f"{p}.momentum", o.momentum, low=0.0, high=1.0, high_open=True)
    _number(f"{p}.dampening", o.dampening, low=0.0, high=1.0)
    _number(f"{p}.weight_decay", o.weight_decay, low=0.0)
    _number(f"{p}.epochs", o.epochs, low=1)
    _number(f"{p}.steps", o.steps, low=1, what=", or null to train optim.epochs epochs")
    _number(f"{p}.batch_size", o.batch_size, low=1)
    _number(f"{p}.warmup_epochs", o.warmup_epochs, low=0)
    _number(f"{p}.grad_clip", o.grad_clip, low=0.0, low_open=True, what=", or null for no clipping")
    if o.nesterov and (o.momentum <= 0 or o.dampening != 0):
        raise ConfigError(f"{p}.nesterov: Nesterov momentum needs {p}.momentum > 0 and {p}.dampening = 0 "
                          f"(got momentum {o.momentum}, dampening {o.dampening})")


def _check_run(r: RunConfig, p: str) -> None:
    _number(f"{p}.num_workers", r.num_workers, low=0)
    _number(f"{p}.log_every", r.log_every, low=0)
    _number(f"{p}.num_threads", r.num_threads, low=1)
    _number(f"{p}.save_every_steps", r.save_every_steps, low=1, what=", or null")


def _check_data(d: DataConfig, p: str) -> None:
    _number(f"{p}.max_points", d.max_points, low=1, what=", or null for all points")
    _number(f"{p}.max_sweep_points", d.max_sweep_points, low=1, what=", or null for all points")
    if d.indices is not None and any(i < 0 for i in d.indices):
        raise ConfigError(f"{p}.indices: sample indices must be >= 0, got {d.indices}")
    a = d.augment
    _number(f"{p}.augment.rotate_z", a.rotate_z, low=0.0, high=180.0)
    _number(f"{p}.augment.scale[0]", a.scale[0], low=0.0, low_open=True)
    _number(f"{p}.augment.scale[1]", a.scale[1], low=a.scale[0])


def _check_teacher(t: TeacherConfig, p: str) -> None:
    _number(f"{p}.min_depth", t.min_depth, low=0.0)


def _check_finetune_loss(lc: FinetuneLossConfig, p: str) -> None:
    _number(f"{p}.lovasz_weight", lc.lovasz_weight, low=0.0)
    _number(f"{p}.logit_scale", lc.logit_scale, low=0.0, low_open=True)


_CHECKS = {OptimConfig: _check_optim, RunConfig: _check_run, DataConfig: _check_data,
           TeacherConfig: _check_teacher, FinetuneLossConfig: _check_finetune_loss}


def _walk(obj: Any, path: str) -> None:
    """Every float of a config dataclass must be finite; known sections get range checks."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        check = _CHECKS.get(type(obj))
        if check is not None:
            check(obj, path)
        for f in dataclasses.fields(obj):
            _walk(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{path}: {obj!r} is not a finite number")


def validate_config(cfg: Any) -> Any:
    """Refuse non-finite and out-of-range training settings (learning rate, momentum, weight
    decay, epochs / steps, batch size, ...) with one ``ConfigError`` naming the key. Called by
    ``load_training_config`` and at the start of every ``run``; returns ``cfg``."""
    _walk(cfg, "")
    if isinstance(cfg, FinetuneConfig):
        _number("label_fraction", cfg.label_fraction, low=0.0, high=1.0, low_open=True)
    return cfg


#: ``1e-3``: YAML 1.1 reads it as a string (it wants ``1.0e-3``); on the command line it is a number
_EXPONENT_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _parse_override_value(item: str, raw: str) -> Any:
    import yaml

    try:
        if any(isinstance(ev, yaml.AliasEvent) for ev in yaml.parse(raw, Loader=yaml.SafeLoader)):
            raise ConfigError(f"--set {item}: YAML aliases (*name) are not supported in --set values")
        value = yaml.safe_load(raw)
        if isinstance(value, str) and _EXPONENT_NUMBER.match(value.strip()):
            return float(value)
        return value
    except yaml.YAMLError as exc:
        msg = " ".join(str(exc).split())
        raise ConfigError(f"--set {item}: the value is not valid YAML ({msg[:200]})") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values are YAML) to the loaded config mapping."""
    for item in overrides or []:
        key, eq, raw = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not key.strip() or any(not part for part in parts):
            raise ConfigError(f"--set '{item}' must look like section.key=value")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[:i + 1])
                raise ConfigError(f"--set {item}: {where} is a value ({child!r}), not a section with keys; "
                                  f"use --set {where}=VALUE")
            node = child
        node[parts[-1]] = _parse_override_value(item, raw)
    return data


def load_training_config(cls: type, path: str | Path, overrides: list[str] | None = None):
    """YAML file → ``cls``; ``overrides`` like ``optim.epochs=2`` are applied first (YAML values).
    A pretrain config's ``recipe`` then fills the keys left out (``recipes.apply_recipe``).
    Every problem (file, key, type, non-finite or out-of-range value) is one ConfigError."""
    data = apply_overrides(load_yaml(path), overrides)
    if cls is PretrainConfig:
        data = apply_recipe(data)
    return validate_config(from_dict(cls, data))
