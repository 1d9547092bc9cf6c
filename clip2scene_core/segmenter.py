"""``Segmenter``: a deployable checkpoint turned into per-point labels and scores.

(Over ~400 lines: one class, the checkpoint → labels path with its vocabulary, query and
camera-fusion state, which share one lock and one device.)

The 3D network embeds every point into CLIP's space; a point's class is the text embedding
it is closest to, so the vocabulary is just a matrix that can be swapped at run time. When a
CLIP teacher is loaded and camera frames are given, the teacher's dense pixel predictions
are fused into the points that project into an image.

Camera fusion comes in two steps, which a caller may run apart: `Segmenter.predict_camera`
runs the teacher on one image (the expensive part, vocabulary-independent), and
``segment(scan, predictions=...)`` fuses given predictions into a sweep's probabilities,
each through its own calibration. ``segment(scan, cameras)`` does both inline. The ROS node
runs the first on a worker of its own, off the sweep's critical path
(`clip2scene_ros.runner.TeacherWorker`). A prediction is folded into the vocabulary's text
embeddings where it is made (`clip2scene_core.fusion`: exact, K numbers per point instead of
D), so a sweep reads each seen point's probabilities at O(K); only points a camera sees get
probabilities of their own, the others keep their voxel's.

Open-vocabulary queries. `Segmenter.set_query` sets a free text whose embedding comes from
the CLIP text encoder (prompt-ensembled like a vocabulary class) or from a saved embedding
file; while one is set, every result carries ``relevance``: per point, the softmax
probability of the query among the query and the vocabulary's classes (those that are not the
query itself), at the segmenter's logit scale, from the 3D network's head alone (camera
fusion does not change it). Why the softmax and not (cos + 1) / 2: CLIP cosines of unrelated
and related texts differ by a few hundredths, so (cos + 1) / 2 is ≈ 0.6 everywhere, while
the softmax is near 1 where the query wins over every known class and near 0 where another
class does: a heat map with fixed bounds 0 … 1. A query equal to a vocabulary class gets
exactly that class's label probability.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .clip.preprocess import ImageGeometry
from .device import autocast_for, resolve_device, resolve_precision
from .errors import CheckpointError, ConfigError, EmptyPointCloudError
from .fusion import (FoldedFeatures, FoldSlot, fold_features, folded_probabilities, fuse_into_rows,
                     sampled_probabilities)
from .geometry.projection import Projection
from .types import Calibration, CameraFrame, Scan


@dataclass
class SegmenterConfig:
    """Run-time options (not stored in the checkpoint)."""

    device: str = "auto"
    # Which head classifies and the softmax scale of its cosine logits. None: what the
    # checkpoint says it was trained with (extra["head"] / extra["logit_scale"]), else
    # the local head and CLIP's own scale of 100.
    head: Literal["local", "global", "both"] | None = None
    logit_scale: float | None = None
    # classify backbone rows (voxels) with the heads folded into the text embeddings (exact,
    # `clip2scene_core.classify`); False: embed every point with the head, the reference path
    folded_heads: bool = True
    camera_fusion: bool = True          # fuse teacher pixel predictions when cameras are given
    camera_weight: float = 0.5          # weight of the 2D probabilities for points seen by a camera
    # read the teacher's probabilities at each point from its features folded into the text
    # embeddings (exact, O(K) per point, `clip2scene_core.fusion`); False: sample the D-dim
    # features per point, the reference path
    folded_fusion: bool = True
    # metres in front of a camera to count as seen, when `segment` projects the points itself
    # (the ROS pipeline passes projections made with the node's own min_depth)
    min_depth: float = 0.5
    # precision of the teacher's image forward: auto (fp16 on CUDA, bf16 on a CPU with native
    # bf16 — AVX512-BF16 / AMX —, else fp32), fp32, bf16 or fp16 (CUDA only)
    teacher_precision: str = "auto"
    # GEMM precision of the sparse backbone's convolutions at inference: auto (bf16 on a CPU
    # with native bf16 — AVX512-BF16 / AMX —, else fp32), fp32 or bf16 (emulated, ~10× slower,
    # on CPUs without it); `clip2scene_core.sparse.set_precision`
    sparse_precision: str = "auto"


@dataclass
class CameraPrediction:
    """The CLIP teacher's dense features of one camera image, ready to be fused into sweeps.

    ``calibration`` maps the sweep's points into the image; a prediction fused into a
    different sweep gets that sweep's LiDAR→camera transform (`with_calibration`).
    """

    name: str
    stamp_ns: int                       # the image's stamp
    features: torch.Tensor              # (D, h, w) L2-normalised MaskCLIP features
    geometry: ImageGeometry             # pixel ↔ feature-grid mapping of this image
    calibration: Calibration
    seconds: float = 0.0                # teacher time (preprocess + forward)
    precision: str = "fp32"             # what the forward ran at
    # the features folded into a vocabulary's text embeddings (`Segmenter.fold_prediction`),
    # shared by the copies `with_calibration` makes
    fold: FoldSlot = field(default_factory=FoldSlot, repr=False, compare=False)

    def with_calibration(self, calibration: Calibration) -> "CameraPrediction":
        return dataclasses.replace(self, calibration=calibration)


@dataclass(frozen=True)
class Query:
    """A free-text query and its unit text embedding (see `Segmenter.set_query`)."""

    text: str
    embedding: torch.Tensor             # (1, D) unit row, on the segmenter's device
    source: str = ""                    # "text encoder", the embedding file, or "given"


@dataclass
class SegmentationResult:
    labels: np.ndarray                  # (N,) int64 index into class_names; -1 for dropped points
    scores: np.ndarray                  # (N,) float32 probability of the label; 0 for dropped points
    valid: np.ndarray                   # (N,) bool: point was finite and inside the voxel range
    class_names: list[str]
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage
    info: dict[str, object] = field(default_factory=dict)     # counts: dropped, cameras used/skipped
    # (N,) float32 in [0, 1] while a query is set (`Segmenter.set_query`), 0 for dropped points;
    # None without a query
    relevance: np.ndarray | None = None
    query: str | None = None            # the query's text, when relevance is set

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class Segmenter:
    """Per-point open-vocabulary labels from a CLIP2Scene network."""

    def __init__(self, model: torch.nn.Module, model_config, vocabulary, text_embeddings: torch.Tensor,
                 clip_model: str = "", teacher=None, config: SegmenterConfig | None = None,
                 extra: dict | None = None) -> None:
        self.config = config or SegmenterConfig()
        self.device = resolve_device(self.config.device)
        self.model = model.to(self.device).eval()
        from .sparse import set_precision

        # what the backbone's convolutions run at ("fp32" / "bf16"), resolved for this device
        self.sparse_precision = set_precision(self.model, self.config.sparse_precision, self.device)
        self.model_config = model_config
        self.clip_model = clip_model
        self.teacher = teacher
        self.extra = dict(extra or {})
        self.head = self.config.head or str(self.extra.get("head", "local"))
        if self.head not in ("local", "global", "both"):
            raise ConfigError(f"unknown head '{self.head}' (local, global or both)")
        scale = self.config.logit_scale if self.config.logit_scale is not None else self.extra.get("logit_scale")
        try:
            self.logit_scale = float(100.0 if scale is None else scale)
        except (TypeError, ValueError):
            raise ConfigError(f"logit_scale {scale!r} is not a number") from None
        if not np.isfinite(self.logit_scale) or self.logit_scale <= 0:
            raise ConfigError(f"logit_scale {scale!r} must be a finite positive number")
        self._lock = threading.Lock()
        self._vocab = None  # (Vocabulary, (K, D) tensor on device), swapped atomically
        # (emb, query embedding or None) it was folded for, and the classifier
        self._folded: tuple[torch.Tensor, torch.Tensor | None, object] | None = None
        self._query: Query | None = None   # swapped atomically, like the vocabulary
        self._install_vocabulary(vocabulary, text_embeddings)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, teacher=None,
                        config: SegmenterConfig | None = None) -> "Segmenter":
        from .models import build_model

        from .checkpoint import check_finite

        check_finite({"weights": ckpt.state_dict, "text_embeddings": ckpt.text_embeddings}, "checkpoint",
                     "refused")
        model = build_model(ckpt.model_config)
        try:
            model.load_state_dict(ckpt.state_dict, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint weights do not fit the model config: {exc}") from exc
        return cls(model, ckpt.model_config, ckpt.vocabulary, ckpt.text_embeddings, ckpt.clip_model,
                   teacher=teacher, config=config, extra=ckpt.extra)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", teacher=None,
             config: SegmenterConfig | None = None) -> "Segmenter":
        """Load a deployable checkpoint (CheckpointError on a corrupt or mismatched file)."""
        config = config or SegmenterConfig()
        if device != "auto":
            config = dataclasses.replace(config, device=device)
        return cls.from_checkpoint(load_checkpoint(path, map_location="cpu"), teacher, config)

    def to_checkpoint(self) -> Checkpoint:
        vocab, emb = self._vocab
        return Checkpoint(self.model_config, self.model.state_dict(), vocab, emb.cpu(),
                          self.clip_model, dict(self.extra))

    def save(self, path: str | Path) -> None:
        save_checkpoint(path, self.to_checkpoint())

    # ------------------------------------------------------------------ device memory
    def offload(self) -> None:
        """Move the network (and text embeddings, teacher) to the CPU and free cached GPU memory.

        A managed node calls this on deactivate, so an idle segmenter holds no GPU memory;
        `restore` moves everything back to ``self.device`` before the next frame.
        """
        self._move(torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def restore(self) -> None:
        """Undo `offload`: everything back on ``self.device``."""
        self._move(self.device)

    def _move(self, device: torch.device) -> None:
        self._folded = None
        with self._lock:
            self.model.to(device)
            vocab, emb = self._vocab
            self._vocab = (vocab, emb.to(device))
            q = self._query
            if q is not None:
                self._query = dataclasses.replace(q, embedding=q.embedding.to(device))
        move = getattr(self.teacher, "to", None)
        if callable(move):
            move(device)

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocabulary(self):
        return self._vocab[0]

    @property
    def class_names(self) -> list[str]:
        return list(self._vocab[0].class_names)

    @property
    def text_embeddings(self) -> torch.Tensor:
        return self._vocab[1]

    def _install_vocabulary(self, vocabulary, emb: torch.Tensor) -> None:
        emb = torch.as_tensor(emb, dtype=torch.float32)
        if emb.ndim != 2 or emb.shape[0] != len(vocabulary.class_names):
            raise ConfigError(
                f"text embeddings {tuple(emb.shape)} do not match {len(vocabulary.class_names)} classes")
        if emb.shape[1] != self.model_config.embed_dim:
            raise ConfigError(f"text embeddings have dimension {emb.shape[1]}, the network outputs "
                              f"{self.model_config.embed_dim}")
        bad = ~torch.isfinite(emb).all(1)
        if bool(bad.any()):
            names = [vocabulary.class_names[i] for i in torch.nonzero(bad).flatten().tolist()[:5]]
            raise ConfigError(f"text embeddings of {names} contain NaN or inf")
        emb = F.normalize(emb, dim=1).to(self.device)
        with self._lock:
            self._vocab = (vocabulary, emb)

    def set_vocabulary(self, vocabulary, text_embeddings: torch.Tensor | None = None) -> None:
        """Replace the classes; takes effect on the next ``segment`` call.

        ``vocabulary`` is a Vocabulary or a list of class names. Without ``text_embeddings``
        the loaded CLIP teacher's text encoder computes them.
        """
        from .clip.vocabulary import Vocabulary

        if not isinstance(vocabulary, Vocabulary):
            names = [str(n).strip() for n in vocabulary]
            if not names or any(not n for n in names) or len(set(names)) != len(names):
                raise ConfigError(f"class names must be non-empty and unique, got {names}")
            vocabulary = Vocabulary.from_names(names)
        if text_embeddings is None:
            if self.teacher is None:
                raise ConfigError("no CLIP text encoder is loaded: give text embeddings "
                                  "(an embedding file) or load the segmenter with a teacher")
            text_embeddings = self.teacher.text_embeddings(vocabulary)
        self._install_vocabulary(vocabulary, text_embeddings)

    def load_vocabulary_file(self, path: str | Path) -> None:
        """Swap in a vocabulary saved with ``clip.vocabulary.save_text_embeddings``."""
        from .clip.text_bank import load_text_embeddings

        te = load_text_embeddings(path, model_name=self.clip_model or None,
                                  embed_dim=self.model_config.embed_dim)
        self._install_vocabulary(te.vocabulary, te.embeddings)

    # ------------------------------------------------------------------------- query
    @property
    def query(self) -> str | None:
        """The text of the query in effect (None: none, no ``relevance`` in results)."""
        q = self._query
        return None if q is None else q.text

    @property
    def optional_sources(self) -> tuple[str, ...]:
        """The optional result attributes the next ``segment`` fills (``relevance`` while a
        query is set): what a caller writing an empty cloud lays out."""
        return ("relevance",) if self._query is not None else ()

    def query_embedding(self, text: str, embeddings_file: str | Path | None = None) -> torch.Tensor:
        """(1, D) unit embedding of ``text``: from ``embeddings_file`` (a file written by
        ``clip.save_text_embeddings`` whose class names are the query texts) when given, else
        from the CLIP text encoder (prompt-ensembled like a vocabulary class); ConfigError
        when neither is available or the file does not hold ``text``."""
        from .clip.vocabulary import Vocabulary

        text = str(text).strip()
        if not text:
            raise ConfigError("a query needs a non-empty text")
        if embeddings_file:
            from .clip.text_bank import load_text_embeddings

            te = load_text_embeddings(embeddings_file, model_name=self.clip_model or None,
                                      embed_dim=self.model_config.embed_dim)
            names = list(te.vocabulary.class_names)
            hit = [i for i, n in enumerate(names) if n == text] or \
                [i for i, n in enumerate(names) if n.strip().lower() == text.lower()]
            if not hit:
                shown = names[:20] + (["..."] if len(names) > 20 else [])
                raise ConfigError(f"query {text!r} is not in the embedding file {embeddings_file} "
                                  f"(it holds {shown})")
            emb = te.embeddings[hit[0]:hit[0] + 1]
        elif self.teacher is not None:
            emb = self.teacher.text_embeddings(Vocabulary.from_names([text]))
        else:
            raise ConfigError(f"cannot embed the query {text!r}: no CLIP text encoder is loaded "
                              "(clip_weights) and no query embedding file is given")
        return self._check_query_embedding(text, emb)

    def _check_query_embedding(self, text: str, emb) -> torch.Tensor:
        emb = torch.as_tensor(emb, dtype=torch.float32).detach().reshape(1, -1)
        if emb.shape[1] != self.model_config.embed_dim:
            raise ConfigError(f"the embedding of query {text!r} has dimension {emb.shape[1]}, "
                              f"the network outputs {self.model_config.embed_dim}")
        if not bool(torch.isfinite(emb).all()) or float(emb.norm()) == 0.0:
            raise ConfigError(f"the embedding of query {text!r} is zero or not finite")
        return F.normalize(emb, dim=1)

    def set_query(self, text: str | None, embedding=None,
                  embeddings_file: str | Path | None = None) -> None:
        """Set (or, with None / "", clear) the open-vocabulary query; takes effect on the next
        ``segment`` call. ``embedding``: its (D,) or (1, D) text embedding as is; otherwise
        `query_embedding` (``embeddings_file``, else the CLIP text encoder). ConfigError (or
        CheckpointError for an unreadable file; the previous query stays) when it cannot be
        embedded."""
        text = "" if text is None else str(text).strip()
        if not text:
            self._query = None
            return
        if embedding is not None:
            emb, source = self._check_query_embedding(text, embedding), "given"
        else:
            emb = self.query_embedding(text, embeddings_file)
            source = str(embeddings_file) if embeddings_file else "text encoder"
        with self._lock:
            self._query = Query(text, emb.to(self.device), source)

    # ------------------------------------------------------------------- inference
    def _classifier(self, emb: torch.Tensor, query: torch.Tensor | None = None):
        """The folded classifier of this vocabulary (+ the query as a last column), re-folded
        when either or the device changes."""
        from .classify import FoldedClassifier

        cached = self._folded
        if cached is not None and cached[0] is emb and cached[1] is query:
            return cached[2]
        rows = emb if query is None else torch.cat([emb, query.to(emb.device)])
        clf = FoldedClassifier(self.model.local_head, self.model.global_head, rows, self.head,
                               self.logit_scale)
        self._folded = (emb, query, clf)
        return clf

    def _row_logits(self, batch, emb: torch.Tensor, query: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Class logits per backbone row, the query's logits (None without one), and whether
        rows are points (else voxels). The query is one more column of the same classifier."""
        if not self.config.folded_heads:
            rows = emb if query is None else torch.cat([emb, query.to(emb.device)])
            logits, point_wise = self._point_logits(self.model(batch), rows), True
        else:
            feats = self.model.backbone_features(batch)
            point_wise = bool(getattr(self.model.backbone, "point_wise", False))
            logits = self._classifier(emb, query).logits(feats)
        if query is None:
            return logits, None, point_wise
        k = emb.shape[0]
        return logits[:, :k], logits[:, k], point_wise

    def _point_logits(self, out, emb: torch.Tensor) -> torch.Tensor:
        head = self.head
        if head == "local":
            feats = F.normalize(out.local, dim=1)
        elif head == "global":
            feats = F.normalize(out.global_, dim=1)
        else:
            feats = F.normalize(F.normalize(out.local, dim=1) + F.normalize(out.global_, dim=1), dim=1)
        return self.logit_scale * feats @ emb.t()

    @property
    def consumes_cameras(self) -> bool:
        """Whether `segment` uses the camera frames it is given (teacher loaded, fusion on)."""
        return self.teacher is not None and bool(self.config.camera_fusion)

    @torch.inference_mode()
    def predict_camera(self, frame: CameraFrame, precision: str | None = None) -> CameraPrediction:
        """The teacher's dense features of ``frame`` (ConfigError without a teacher), folded
        into the vocabulary in effect when ``config.folded_fusion`` (`fold_prediction`).

        ``precision`` (default ``config.teacher_precision``): see `SegmenterConfig`; the
        features come back as float32 whatever the forward ran at.
        """
        if self.teacher is None:
            raise ConfigError("no CLIP teacher loaded: camera predictions need one")
        dev = torch.device(getattr(self.teacher, "device", self.device))
        prec = resolve_precision(precision or self.config.teacher_precision, dev)
        t0 = time.perf_counter()
        with autocast_for(prec, dev):
            dense, geo = self.teacher.dense_features_with_geometry(frame.image)
        feats = dense[0].float()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        pred = CameraPrediction(frame.name, int(frame.stamp_ns), feats, geo, frame.calibration,
                                time.perf_counter() - t0, prec)
        if self.config.camera_fusion and self.config.folded_fusion:
            self.fold_prediction(pred)   # here, on the teacher's thread: sweeps only read it
        return pred

    def fold_prediction(self, prediction: CameraPrediction,
                        embeddings: torch.Tensor | None = None) -> FoldedFeatures:
        """``prediction``'s features folded into ``embeddings`` (default: the vocabulary in
        effect), kept on the prediction (`FoldSlot`) and re-folded only when the embeddings
        change: what `clip2scene_core.fusion.folded_probabilities` reads."""
        emb = self._vocab[1] if embeddings is None else embeddings
        folded = prediction.fold.folded
        if folded is None or not folded.matches(emb):
            folded = fold_features(prediction.features, emb)
            prediction.fold.folded = folded
        return folded

    def _camera_probabilities(self, pred: CameraPrediction, uv: np.ndarray, emb: torch.Tensor,
                              device: torch.device) -> torch.Tensor:
        """(n, K) teacher probabilities at pixels ``uv`` of one prediction: folded (exact,
        `clip2scene_core.fusion`) or, with ``config.folded_fusion`` off, D features sampled
        per point (the reference)."""
        if self.config.folded_fusion:
            return folded_probabilities(self.fold_prediction(pred, emb), uv, pred.geometry,
                                        self.logit_scale, device)
        return sampled_probabilities(pred.features, uv, pred.geometry, emb, self.logit_scale, device)

    def _fuse_cameras(self, row_probs: torch.Tensor, point_rows: np.ndarray | None,
                      xyz: np.ndarray, kept: np.ndarray, cameras: Sequence[CameraFrame],
                      emb: torch.Tensor, info: dict, predictions: Sequence[CameraPrediction] = (),
                      projections: Sequence[Projection] | None = None
                      ) -> tuple[np.ndarray, torch.Tensor]:
        """The kept points seen by any camera (frames: run the teacher now; predictions:
        computed before) and their blended probabilities (`fusion.fuse_into_rows`); every
        other point keeps its row. ``xyz``: all the scan's points, ``kept``: which were
        voxelised; ``projections``: of all of them into each camera (None: projected here at
        ``config.min_depth``)."""
        from .geometry import project_points

        # position among the kept points of each scan point (only read where kept)
        kept_pos = np.cumsum(kept) - 1
        seen: list[tuple[np.ndarray, torch.Tensor]] = []
        for i, item in enumerate([*cameras, *predictions]):
            proj = project_points(xyz, item.calibration, min_depth=self.config.min_depth) \
                if projections is None else projections[i]
            idx = np.flatnonzero(proj.valid & kept)
            if idx.size == 0:   # checked first: an image nothing projects into costs no teacher
                info["cameras_skipped"].append((item.name, "no point projects into the image"))
                continue
            pred = self.predict_camera(item) if isinstance(item, CameraFrame) else item
            uv = proj.uv[idx]
            inside = pred.geometry.inside(uv)  # the teacher may crop the image borders
            idx, uv = idx[inside], uv[inside]
            seen.append((kept_pos[idx], self._camera_probabilities(pred, uv, emb, row_probs.device)))
            info["cameras_used"].append(item.name)
        points, probs = fuse_into_rows(row_probs, point_rows, seen, self.config.camera_weight)
        info["points_seen_by_cameras"] = int(points.size)
        return points, probs

    @torch.inference_mode()
    def segment(self, scan: Scan, cameras: Sequence[CameraFrame] = (),
                predictions: Sequence[CameraPrediction] = (),
                projections: Sequence[Projection] | None = None) -> SegmentationResult:
        """Label every point of ``scan``; points that cannot be voxelised get label -1.

        ``cameras`` are fused running the teacher now (inline); ``predictions`` (from
        `predict_camera`, each with the calibration of *this* sweep) are fused as they are.
        Both need ``config.camera_fusion``; frames also need a teacher. ``projections``: one
        `Projection` of all the scan's points per camera, then per prediction (a caller that
        also draws them projects once, with its own ``min_depth``); None: projected here at
        ``config.min_depth``.
        """
        from .models import VoxelBatch
        from .voxelize import voxelize

        vocab, emb = self._vocab  # one consistent vocabulary (and query) for this frame
        query = self._query
        n = len(scan)
        if projections is not None:
            projections = list(projections)
            if len(projections) != len(cameras) + len(predictions) \
                    or any(len(p) != n for p in projections):
                raise ConfigError(f"projections must be one per camera and prediction "
                                  f"({len(cameras)} + {len(predictions)}), each of the scan's "
                                  f"{n} points; got {[len(p) for p in projections]}")
        labels = np.full(n, -1, dtype=np.int64)
        scores = np.zeros(n, dtype=np.float32)
        info: dict[str, object] = {"points_in": n, "cameras_used": [], "cameras_skipped": []}
        timings: dict[str, float] = {}
        relevance = None if query is None else np.zeros(n, dtype=np.float32)
        qtext = None if query is None else query.text
        if n == 0:
            return SegmentationResult(labels, scores, np.zeros(0, bool), list(vocab.class_names),
                                      timings, {**info, "points_dropped": 0}, relevance, qtext)
        t0 = time.perf_counter()
        try:
            voxels = voxelize([scan], self.model_config.voxel)
        except EmptyPointCloudError as exc:
            info.update(points_dropped=n, reason=str(exc))
            return SegmentationResult(labels, scores, np.zeros(n, bool), list(vocab.class_names),
                                      timings, info, relevance, qtext)
        batch = VoxelBatch.from_voxels(voxels, self.device)
        timings["voxelize"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        logits, q_logits, point_rows = self._row_logits(
            batch, emb, None if query is None else query.embedding)
        probs = logits.float().softmax(dim=1)
        if q_logits is not None:
            from .classify import query_negatives, query_relevance

            rel = query_relevance(logits, q_logits, query_negatives(
                vocab.class_names, emb, query.text, query.embedding))
            if not point_rows:        # per voxel, gathered to its points
                rel = rel[batch.inverse]
            relevance[voxels.point_mask] = rel.cpu().numpy()
        fuse_frames = bool(cameras) and self.teacher is not None and self.config.camera_fusion
        predictions = list(predictions) if self.config.camera_fusion else []
        fuse = fuse_frames or bool(predictions)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings["infer"] = time.perf_counter() - t0
        if cameras and not fuse_frames:
            reason = "no CLIP teacher loaded" if self.teacher is None else "camera fusion disabled"
            info["cameras_skipped"] = [(c.name, reason) for c in cameras]
        score, label = probs.max(dim=1)
        if not point_rows:            # one label per voxel, gathered to its points last
            score, label = score[batch.inverse], label[batch.inverse]
        if fuse:   # only the points a camera sees get probabilities of their own
            t0 = time.perf_counter()
            points, fused = self._fuse_cameras(
                probs, None if point_rows else voxels.inverse, scan.xyz, voxels.point_mask,
                cameras if fuse_frames else (), emb, info, predictions,
                None if projections is None
                else (projections[:len(cameras)] if fuse_frames else [])
                + projections[len(cameras):][:len(predictions)])
            if points.size:
                at = torch.from_numpy(points).to(label.device)
                score[at], label[at] = fused.max(dim=1)
            timings["cameras"] = time.perf_counter() - t0
        labels[voxels.point_mask] = label.cpu().numpy()
        scores[voxels.point_mask] = score.cpu().numpy()
        info["points_dropped"] = int(n - voxels.point_mask.sum())
        return SegmentationResult(labels, scores, voxels.point_mask.copy(), list(vocab.class_names),
                                  timings, info, relevance, qtext)
