"""The epoch loop shared by pre-training and fine-tuning.

(Over ~400 lines: resume, checkpoint cadence, SIGTERM, NaN guards and DDP step counts are one
state machine; split apart, a resumed run could no longer be proven equal to an uninterrupted one.)

* a state file after every epoch (and every ``save_every_steps``, and on SIGTERM), written
  atomically, so SIGKILL loses at most one epoch;
* ``resume`` restarts at the saved (epoch, step) with the saved RNG states; batches and
  augmentations are functions of (seed, epoch, index), so a resumed CPU run is bitwise equal
  to an uninterrupted one;
* DDP: every rank runs the same number of steps; rank 0 writes files and logs;
* TensorBoard scalars and tqdm progress on rank 0;
* training length in epochs (``optim.epochs``) or in optimizer steps (``optim.steps``): with
  steps, the learning rate follows the step, data passes are not checkpoint boundaries, and
  history / TensorBoard / the state file are written every ``run.save_every_steps`` steps
  (default: a tenth of the run) and at the end;
* a non-finite loss or gradient stops training with ``NonFiniteLossError`` before the
  optimizer step (the last state file stays as it was, so ``--resume`` works); a state with
  non-finite weights is never written;
* ``resume`` refuses a state of another model, and one written with other settings
  (``RESUME_IGNORED`` lists what may differ) unless forced, naming the keys that differ.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from clip2scene_core.checkpoint import nonfinite_tensors, payload_digest
from clip2scene_core.errors import CheckpointError, Clip2SceneError

from .config import OptimConfig, RunConfig
from .data import Batch, TrainDataset, epoch_batches, make_loader
from .distributed import DistInfo, all_reduce_sum, barrier, unwrap
from .recipes import RECIPE_KEYS
from .state import StopFlag, capture_rng, load_state, restore_rng, save_state

StepFn = Callable[[torch.nn.Module, Batch, int, torch.Generator], tuple[torch.Tensor, dict[str, float]]]
log = logging.getLogger("clip2scene.training")

#: config keys that may differ on ``--resume``: where files go, devices, speed, logging.
#: Everything else (optimiser, losses, data, vocabulary, teacher, seed, length) must match.
RESUME_IGNORED = ("run.out_dir", "run.device", "run.num_workers", "run.log_every", "run.progress",
                  "run.num_threads", "run.save_every_steps", "run.save_rank_states", "run.deterministic",
                  "teacher.device", "teacher.cache_dir", "teacher.text_cache_dir", "pretrained", "model")


#: keys added after states were first written (training recipes), with the value that
#: reproduces the older behaviour: absent in a saved state and at that value now is no change
ADDED_KEY_DEFAULTS: dict[str, Any] = {
    "recipe": "project", "head_input": "last", "dropout": None, "vocabulary.prompts": "synonyms",
    "scr.ce_logits": "cosine", "ssr.form": "cell", "ssr.features": "fused", "ssr.metric": "cosine",
    "ssr.max_members": None, "sweeps_to_keyframe_cameras": False,
}


def _added_default(key: str, value: Any) -> bool:
    return any((key == k or key.endswith("." + k)) and value == v for k, v in ADDED_KEY_DEFAULTS.items())


class NonFiniteLossError(Clip2SceneError, FloatingPointError):
    """Training produced a NaN/inf loss or gradient; no step was taken, nothing was saved."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_IGNORED)


def _differing(saved: dict[str, Any], current: dict[str, Any], ignore: bool = True) -> list[tuple[str, Any, Any]]:
    a, b = _flatten(saved), _flatten(current)
    out = []
    for k in sorted(set(a) | set(b)):
        if ignore and _ignored(k):
            continue
        if k not in a and _added_default(k, b.get(k)):
            continue
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb and not (isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)) and list(va) == list(vb)):
            out.append((k, va, vb))
    return out


def _described(items: list[tuple[str, Any, Any]]) -> list[str]:
    return [f"{k}: {va!r} -> {vb!r}" for k, va, vb in items]


def config_differences(saved: dict[str, Any], current: dict[str, Any], ignore: bool = True) -> list[str]:
    """``key: saved → current`` for every dotted key whose value differs."""
    return _described(_differing(saved, current, ignore))


def recipe_hint(differences: list[tuple[str, Any, Any]]) -> str:
    """For differing keys that a recipe supplies: the ``--set`` options that give back the
    saved values (a recipe's defaults may change between versions; the state keeps its own)."""
    sets = [f"--set {k}={json.dumps(va)}" for k, va, _ in differences
            if k in RECIPE_KEYS and va != "<absent>"]
    if not sets:
        return ""
    return (" Keys a recipe supplies differ (recipe defaults change between versions, README \"Recipes\"); "
            "to resume as the state was written, pass " + " ".join(sets) + ".")


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """Total 2-norm of the gradients (read only: the step is unchanged, bit for bit)."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = getattr(torch.nn.utils, "get_total_norm", None)
    if total is not None:
        return total(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(grads[0].device) for g in grads]))


def _tensor_digest(t: Any) -> str | None:
    return payload_digest({"t": t}) if isinstance(t, torch.Tensor) else None


class Interrupted(SystemExit):
    """Raised after the state was saved on SIGTERM; exit status 143 (128 + SIGTERM)."""

    def __init__(self) -> None:
        super().__init__(143)


def lr_at(cfg: OptimConfig, epoch: int) -> float:
    """Learning rate of ``epoch`` (cosine over ``epochs`` after a linear warm-up)."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.scheduler == "constant":
        return cfg.lr
    span = max(cfg.epochs - cfg.warmup_epochs, 1)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))


def lr_at_step(cfg: OptimConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step ``step`` of ``total`` (steps mode; warm-up counted in
    data passes of ``steps_per_epoch`` steps)."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (step + 1) / (warm + 1)
    if cfg.scheduler == "constant":
        return cfg.lr
    span = max(total - warm, 1)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * (step - warm) / span))


def build_sgd(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


@dataclass
class TrainResult:
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    state_path: Path | None = None


class Trainer:
    """Runs ``step_fn`` over ``dataset`` for ``optim.epochs`` epochs with checkpoint/resume."""

    def __init__(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step_fn: StepFn,
                 dataset: TrainDataset, voxel_cfg, optim: OptimConfig, run: RunConfig, dist: DistInfo,
                 kind: str, payload: Callable[[], dict[str, Any]] | None = None,
                 epoch_end: Callable[[int], dict[str, float]] | None = None) -> None:
        self.model, self.optimizer, self.step_fn = model, optimizer, step_fn
        self.dataset, self.voxel_cfg, self.optim, self.run, self.dist = dataset, voxel_cfg, optim, run, dist
        self.kind = kind
        self.payload = payload or (lambda: {})
        self.epoch_end = epoch_end
        self.out_dir = Path(run.out_dir)
        self.state_path = self.out_dir / "last.pt"
        self.generator = torch.Generator().manual_seed(run.seed + 1)   # self-training coins
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, float] = {}     # running sums of the current epoch (kept across resume)
        self._count = 0
        self._writer = None
        self._saved_at: str | None = None     # what the state file on disk holds

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "rng": capture_rng({"self_training": self.generator}),
            "history": self.history,
            "epoch_sums": dict(self._sums), "epoch_count": self._count,
            "world_size": self.dist.world_size,
            **self.payload(),
        }

    def _position(self) -> str:
        if self.step_in_epoch == 0:
            return f"the end of epoch {self.epoch} (global step {self.global_step})" if self.epoch else "the start"
        return f"epoch {self.epoch + 1}, step {self.step_in_epoch} (global step {self.global_step})"

    def save(self, path: Path | None = None) -> None:
        # weights are replicated: every rank sees the same answer (no rank waits at the barrier)
        bad = nonfinite_tensors(unwrap(self.model).state_dict())
        if bad:
            kept = f"{self.state_path} still holds {self._saved_at}" if self._saved_at else "no state was saved yet"
            raise NonFiniteLossError(
                f"{self.kind}: the weights became non-finite ({', '.join(bad[:3])}) at {self._position()}; "
                f"not saved, {kept}")
        if self.dist.is_main:
            save_state(path or self.state_path, self.state_dict())
        if path is None or Path(path) == self.state_path:
            self._saved_at = f"the state at {self._position()}"
        barrier(self.dist)

    def _check_compatible(self, st: dict[str, Any], path: Path, force: bool) -> bool:
        """Refuse a state of another model; one of other settings unless ``force``. True when
        settings differ (forced)."""
        current = self.payload()
        if "model_config" in st and "model_config" in current:
            items = _differing(st["model_config"], current["model_config"], ignore=False)
            if items:
                raise CheckpointError(
                    f"{path}: cannot resume: the state is of a different model ({'; '.join(_described(items))}); "
                    f"use the model settings it was trained with, or a new run.out_dir."
                    + recipe_hint([(f"model.{k}", va, vb) for k, va, vb in items]))
        diff: list[str] = []
        hint = ""
        if isinstance(st.get("config"), dict) and "config" in current:
            items = _differing(st["config"], current["config"])
            diff, hint = _described(items), recipe_hint(items)
        elif "config" in current:
            log.warning("%s holds no config (older file): the settings cannot be compared", path)
        for key, what in (("teacher_id", "teacher identity"), ("num_samples", "number of training samples")):
            if key in st and key in current and st[key] != current[key]:
                diff.append(f"{what}: {st[key]!r} -> {current[key]!r}")
        if "text_embeddings" in st and "text_embeddings" in current:
            a, b = _tensor_digest(st["text_embeddings"]), _tensor_digest(current["text_embeddings"])
            if a is not None and b is not None and a != b:
                diff.append("text embeddings (teacher / vocabulary): differ")
        if not diff:
            return False
        shown = "; ".join(diff[:12]) + (f"; and {len(diff) - 12} more" if len(diff) > 12 else "")
        if not force:
            raise CheckpointError(
                f"{path}: --resume refused: the state was written with other settings ({shown}). "
                f"Resume with the settings it was written with, train into a new run.out_dir, or pass "
                f"--force-resume to continue this state with the new settings (not reproducible).{hint}")
        log.warning("--force-resume: continuing %s with changed settings: %s", path, shown)
        return True

    def resume(self, path: str | Path | None = None, force: bool = False) -> bool:
        """Load ``path`` (default ``out_dir/last.pt``); False (and a warning) when there is
        nothing to resume: training then starts from scratch.

        CheckpointError when the state is of another kind or model, or (unless ``force``) was
        written with other settings than the current ones (``RESUME_IGNORED`` may differ)."""
        path = Path(path) if path else self.state_path
        if not path.is_file():
            if self.dist.is_main:
                log.warning("--resume: there is no training state at %s; starting from scratch", path)
            return False
        st = load_state(path, map_location="cpu")   # RNG states must stay CPU tensors
        if st.get("kind") != self.kind:
            raise CheckpointError(f"{path} is a '{st.get('kind')}' state, not '{self.kind}'")
        changed = self._check_compatible(st, path, force)
        try:
            unwrap(self.model).load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: the saved weights do not fit this model: {first}") from exc
        for g in self.optimizer.param_groups:      # the configured hyper-parameters (lr: per step)
            g.update(momentum=self.optim.momentum, dampening=self.optim.dampening,
                     weight_decay=self.optim.weight_decay, nesterov=self.optim.nesterov)
        self.epoch, self.step_in_epoch, self.global_step = st["epoch"], st["step_in_epoch"], st["global_step"]
        self.history = list(st.get("history", []))
        self._sums = dict(st.get("epoch_sums", {}))
        self._count = int(st.get("epoch_count", 0))
        if self.step_in_epoch and changed:
            # the batches of this epoch may depend on what changed: restart it from its start
            log.warning("--force-resume with changed settings: epoch %d restarts", self.epoch + 1)
            self.step_in_epoch = 0
            self._sums, self._count = {}, 0
        elif self.step_in_epoch and st.get("world_size", 1) != self.dist.world_size:
            # batches of an epoch depend on the world size: restart this epoch from its start
            import logging
            logging.getLogger("clip2scene.training").warning(
                "resuming mid-epoch with %d processes instead of %d: epoch %d restarts",
                self.dist.world_size, st.get("world_size", 1), self.epoch + 1)
            self.step_in_epoch = 0
            self._sums, self._count = {}, 0
        restore_rng(st["rng"], {"self_training": self.generator})
        self._saved_at = f"the state at {self._position()}"
        return True

    # ------------------------------------------------------------------ logging
    @property
    def writer(self):
        if self._writer is None and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.out_dir / "tb"))
        return self._writer

    def _log(self, scalars: dict[str, float], step: int, prefix: str) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    # ------------------------------------------------------------------ loop
    def _train_step(self, batch: Batch, epoch: int, lr: float) -> dict[str, float]:
        """One optimizer step; adds the scalars to the running sums."""
        batch = batch.to(self.dist.device)
        loss, scalars = self.step_fn(self.model, batch, epoch, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.optim.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        else:
            norm = _grad_norm(self.model)
        bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(norm.detach())).float().reshape(1)
        if self.dist.distributed:           # every rank stops together (the others would wait)
            bad = all_reduce_sum(bad, self.dist)
        if float(bad) > 0:
            self._diverged(loss, norm, epoch)
        self.optimizer.step()
        self.step_in_epoch += 1
        self.global_step += 1
        scalars = {"loss": float(loss.detach()), **scalars}
        for k, v in scalars.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1
        if self.dist.is_main and self.run.log_every and self.global_step % self.run.log_every == 0:
            self._log({**scalars, "lr": lr}, self.global_step, "train")
        return scalars

    def _diverged(self, loss: torch.Tensor, norm: torch.Tensor, epoch: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        what = f"loss {float(loss.detach()):g}, gradient norm {float(norm.detach()):g}"
        if self.dist.distributed:
            what += " on at least one process"
        kept = (f"{self.state_path} still holds {self._saved_at} for --resume" if self._saved_at
                else "no state was saved yet")
        raise NonFiniteLossError(
            f"{self.kind}: non-finite loss or gradient ({what}) at epoch {epoch + 1}, step "
            f"{self.step_in_epoch + 1} (global step {self.global_step + 1}); training stopped before "
            f"this step, nothing was written: {kept}. Lower optim.lr, set optim.grad_clip, or check "
            f"the data and the teacher targets")

    def _check_stop(self, stop: StopFlag) -> None:
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.dist.device)
        if float(all_reduce_sum(flag, self.dist)) > 0:
            self.save()
            raise Interrupted()

    def fit(self) -> TrainResult:
        if self.optim.steps is not None:
            return self._fit_steps()
        from tqdm import tqdm

        stop = StopFlag()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        epochs_run = 0
        try:
            while self.epoch < self.optim.epochs:
                epoch = self.epoch
                lr = lr_at(self.optim, epoch)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                self.dataset.set_epoch(epoch)
                batches = epoch_batches(len(self.dataset), self.optim.batch_size, epoch, self.run.seed,
                                        self.dist.rank, self.dist.world_size)
                todo = batches[self.step_in_epoch:]
                loader = make_loader(self.dataset, todo, self.voxel_cfg, self.run.num_workers)
                bar = tqdm(loader, total=len(todo), initial=0, disable=not (self.run.progress and self.dist.is_main),
                           desc=f"{self.kind} epoch {epoch + 1}/{self.optim.epochs}", leave=False)
                self.model.train()
                t0 = time.perf_counter()
                for batch in bar:
                    scalars = self._train_step(batch, epoch, lr)
                    if self.dist.is_main:
                        bar.set_postfix(loss=f"{scalars['loss']:.4f}")
                    if self.run.save_every_steps and self.global_step % self.run.save_every_steps == 0 \
                            and self.step_in_epoch < len(batches):
                        self.save()
                    self._check_stop(stop)
                bar.close()
                means = {k: v / max(self._count, 1) for k, v in self._sums.items()}
                self._sums, self._count = {}, 0
                means["lr"] = lr
                means["epoch_seconds"] = time.perf_counter() - t0
                self.epoch += 1
                self.step_in_epoch = 0
                if self.epoch_end is not None:
                    means.update(self.epoch_end(epoch))
                means["epoch"] = float(epoch)
                self.history.append(means)
                self._log(means, epoch, "epoch")
                self.save()
                epochs_run += 1
            self._save_rank_state()
        finally:
            stop.restore()
            self._close_writer()
        return TrainResult(epochs_run, self.history, self.state_path)

    def _fit_steps(self) -> TrainResult:
        """``optim.steps`` optimizer steps over as many data passes as needed (the last one cut
        short); a record (history, TensorBoard, state file) every ``period`` steps."""
        from tqdm import tqdm

        total = int(self.optim.steps)
        per_epoch = len(epoch_batches(len(self.dataset), self.optim.batch_size, 0, self.run.seed,
                                      self.dist.rank, self.dist.world_size))
        period = self.run.save_every_steps or max(1, math.ceil(total / 10))
        stop = StopFlag()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        passes = 0
        bar = tqdm(total=total, initial=self.global_step, disable=not (self.run.progress and self.dist.is_main),
                   desc=f"{self.kind} steps", leave=False)
        t0 = time.perf_counter()
        try:
            while self.global_step < total:
                epoch = self.epoch
                self.dataset.set_epoch(epoch)
                batches = epoch_batches(len(self.dataset), self.optim.batch_size, epoch, self.run.seed,
                                        self.dist.rank, self.dist.world_size)
                todo = batches[self.step_in_epoch:][: total - self.global_step]
                loader = make_loader(self.dataset, todo, self.voxel_cfg, self.run.num_workers)
                self.model.train()
                for batch in loader:
                    lr = lr_at_step(self.optim, self.global_step, total, per_epoch)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    scalars = self._train_step(batch, epoch, lr)
                    bar.update(1)
                    if self.dist.is_main:
                        bar.set_postfix(loss=f"{scalars['loss']:.4f}", data_pass=epoch + 1)
                    if self.step_in_epoch == len(batches):          # data pass complete
                        self.epoch += 1
                        self.step_in_epoch = 0
                        passes += 1
                    if self.global_step % period == 0 or self.global_step == total:
                        means = {k: v / max(self._count, 1) for k, v in self._sums.items()}
                        self._sums, self._count = {}, 0
                        means["lr"] = lr
                        means["seconds"] = time.perf_counter() - t0
                        t0 = time.perf_counter()
                        if self.epoch_end is not None:
                            means.update(self.epoch_end(epoch))
                        means["epoch"] = float(epoch)
                        means["step"] = float(self.global_step)
                        self.history.append(means)
                        self._log(means, self.global_step, "period")
                        self.save()
                    self._check_stop(stop)
            self._save_rank_state()
        finally:
            bar.close()
            stop.restore()
            self._close_writer()
        return TrainResult(passes, self.history, self.state_path)

    def _save_rank_state(self) -> None:
        if self.run.save_rank_states:
            from clip2scene_core.atomic import atomic_torch_save
            atomic_torch_save(unwrap(self.model).state_dict(), self.out_dir / f"rank{self.dist.rank}_model.pt")

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
