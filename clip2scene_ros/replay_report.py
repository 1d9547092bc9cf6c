"""The replay report: latency statistics, the stdout table, report.json and the PNG renders.

`clip2scene_ros.replay_run.Replay` builds the report dict; this module turns records into
latency figures, the dict into the table ``clip2scene-replay`` prints, and writes
report.json (atomically) with the confusion-matrix PNG and the per-frame renders.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clip2scene_core.errors import Clip2SceneError
from clip2scene_core.geometry import project_points

from .bag import os_error_text
from .evaluation import Evaluator
from .frames import Frame
from .pipeline import PipelineOutput, SegmentationPipeline, TfLookup
from .pointcloud2 import read_points

log = logging.getLogger("clip2scene.replay")

STAGES = ("convert", "voxelize", "infer", "publish", "total")


def latency_table(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """p50 / p95 / max / mean (ms) per stage over the processed frames."""
    out: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        v = np.array([r["timings"][stage] for r in records if stage in r.get("timings", {})]) * 1000.0
        if v.size:
            out[stage] = {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                          "max": float(v.max()), "mean": float(v.mean()), "n": int(v.size)}
    return out


def format_table(report: dict[str, Any]) -> str:
    lines = []
    lat = report["latency_ms"]
    lines.append(f"{'stage':<10} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    for stage, s in lat.items():
        lines.append(f"{stage:<10} {s['p50']:9.1f} {s['p95']:9.1f} {s['max']:9.1f}")
    f = report["frames"]
    lines.append(f"frames: {f['lidar_messages']} sweeps in, {f['processed']} processed "
                 f"({f['ok']} ok, {f['empty']} empty, {f['error']} error), {f['written']} written")
    thr = report["throughput"]
    lines.append(f"throughput: {thr['frames_per_s_pipeline']:.2f} frames/s in the pipeline, "
                 f"{thr['frames_per_s_wall']:.2f} frames/s end to end, "
                 f"{thr['points_per_s'] / 1e3:.1f} kpoints/s")
    if report["dropped"]:
        lines.append("dropped: " + ", ".join(f"{k}: {v}" for k, v in report["dropped"].items()))
    for cam, reasons in report["cameras_skipped"].items():
        lines.append(f"camera {cam} skipped: " + ", ".join(f"{r} ×{n}" for r, n in reasons.items()))
    for text, n in (report.get("warnings") or {}).items():
        lines.append(f"warning ×{n}: {text}")
    b = report.get("bag") or {}
    if b.get("damaged"):
        lines.append(f"bag damage: {b.get('damage', '')} (truncated={b['truncated']} corrupt "
                     f"messages={b['corrupt_messages']} unreadable chunks={b['unreadable_chunks']} "
                     f"rows={b['unreadable_rows']} missing={b.get('missing_messages')})")
    ev = report.get("evaluation")
    if ev and ev.get("skipped"):
        lines.append("ground truth skipped: " + ", ".join(f"{r} ×{n}" for r, n in ev["skipped"].items()))
    if ev and ev["frames"]:
        lines.append(f"{'class':<22} {'IoU %':>7}")
        for n, v in ev["iou"].items():
            lines.append(f"{n:<22} {'   n/a' if v is None else f'{100 * v:7.2f}'}")
        miou = ev["miou"]
        lines.append(f"{'mIoU':<22} {'   n/a' if miou is None else f'{100 * miou:7.2f}'}  "
                     f"({ev['frames']} frames, {ev['points']} points)")
    elif ev:
        lines.append("evaluation: no frame could be evaluated")
    if report.get("error"):
        lines.append(f"run stopped: {report['error']}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], report_dir: Path, evaluator: Evaluator) -> None:
    """report.json (and the confusion-matrix PNG) into ``report_dir``; sets the report's
    ``report_json`` (None when it could not be written, then ``report_error`` says why)."""
    report["report_json"] = None
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        ev = report.get("evaluation")
        if ev and ev["frames"] and evaluator.cm is not None:
            from clip2scene_core.render import render_confusion_matrix

            path = render_confusion_matrix(
                evaluator.cm.matrix, evaluator.gt_class_names,
                report_dir / "confusion_matrix.png", iou=evaluator.cm.iou(),
                title=f"mIoU {100 * (ev['miou'] or 0):.1f}% ({ev['frames']} frames)")
            ev["confusion_png"] = str(path)
        target = report_dir / "report.json"
        tmp = target.with_name(".report.json.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        tmp.replace(target)
        report["report_json"] = str(target)
    except (OSError, Clip2SceneError, ValueError) as exc:
        text = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        log.error("cannot write the report to %s: %s", report_dir, text)
        report["report_error"] = f"cannot write the report to {report_dir}: {text}"


def render_frame(index: int, frame: Frame, out: PipelineOutput, gt: np.ndarray | None,
                 gt_class_names: Sequence[str] | None, pipeline: SegmentationPipeline,
                 tf_lookup: TfLookup, report_dir: Path, renders: list[str]) -> None:
    """BEV by predicted label (+ ground truth when known) and each camera with points drawn;
    each PNG's path is appended to ``renders`` as soon as it is written."""
    from clip2scene_core.render import render_bev, render_projection

    xyz_arr = read_points(out.cloud, ["x", "y", "z"])
    xyz = np.stack([xyz_arr["x"], xyz_arr["y"], xyz_arr["z"]], axis=1).reshape(-1, 3)
    labels = np.asarray(out.labels)
    if len(xyz) != len(labels) and out.kept is not None:   # output_layout: input
        xyz = xyz[np.asarray(out.kept).reshape(-1)]
    names = out.class_names
    d = report_dir / "renders"
    renders.append(str(render_bev(xyz, labels, names, d / f"frame_{index:04d}_bev.png",
                                  title=f"frame {index} @ {out.stamp_ns} (prediction)")))
    if gt is not None and gt_class_names and len(gt) == out.points_in == len(labels):
        renders.append(str(render_bev(xyz, gt, gt_class_names, d / f"frame_{index:04d}_bev_gt.png",
                                      title=f"frame {index} (ground truth)")))
    for cam in frame.cameras.values():
        # the pipeline's own decoded image and projection when it used this camera; decoded
        # and projected here only for a camera nothing else consumed (no overlay, no fusion)
        cf, proj = out.camera_frames.get(cam.name), out.projections.get(cam.name)
        if cf is None or proj is None:
            try:
                cf = pipeline.camera_frame(cam, out.frame_id, out.stamp_ns, tf_lookup)
            except (Clip2SceneError, LookupError) as exc:
                log.warning("frame %d: cannot render %s: %s", index, cam.name, exc)
                continue
            proj = project_points(xyz, cf.calibration, min_depth=pipeline.config.min_depth)
        v = proj.valid
        renders.append(str(render_projection(
            cf.image, proj.uv[v], d / f"frame_{index:04d}_{cam.name}.png", labels=labels[v],
            class_names=names, depth=proj.depth[v], title=f"{cam.name} frame {index}")))
