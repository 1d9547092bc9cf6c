"""``make demo`` / ``clip2scene-demo``: the product end to end on the bundled real nuScenes key frames.

1. convert the samples (LIDAR_TOP + 6 cameras + calibration + ego poses) to rosbag2 (mcap),
   one bag per scene;
2. get the default model: ``--checkpoint`` / ``$CLIP2SCENE_CHECKPOINT`` if given, else
   pre-train one with CLIP2Scene on the samples (real CLIP ViT-B/16 teacher when its weights
   can be had, otherwise a random teacher, said loudly);
3. replay each bag through the same pipeline as the ROS node, writing the labelled bag, a
   latency report and PNG renders (bird's-eye view, labels projected into the cameras).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from clip2scene_core.cli import start_cli

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "test/data/nuscenes/dororo99_v1.0-extract_3samples"
log = logging.getLogger("clip2scene.demo")


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _quiet_downloads() -> None:
    """An offline machine's download retries are noise here: the outcome is reported below.

    huggingface_hub configures its logger lazily, on first use, from HF_HUB_VERBOSITY.
    """
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    try:
        from huggingface_hub.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()


def convert_samples(out: Path) -> list[Path]:
    """One rosbag2 per scene: the samples come from two logs (two cars, 38 days apart)."""
    from training.tools import nuscenes_to_bag

    root = out / "bags"
    rc = nuscenes_to_bag.main(["--root", str(SAMPLES), "--version-dir", "v1.0-extract-subset",
                               "--out", str(root), "--split-scenes", "--overwrite", "--quiet"])
    if rc != 0:
        raise SystemExit(f"demo: converting the samples failed (exit {rc})")
    return sorted(p.parent for p in root.glob("*/metadata.yaml"))


def pretrain_default_model(out: Path, retrain: bool) -> tuple[Path, str]:
    """Pre-train on the samples; returns (checkpoint, description of the teacher)."""
    from clip2scene_core.errors import WeightsNotFoundError
    from training import pretrain
    from training.engine.config import PretrainConfig, load_training_config

    clip_weights = os.environ.get("CLIP2SCENE_CLIP_WEIGHTS", "openai")
    attempts = [  # (config, teacher description, output folder, extra overrides)
        ("config/pretrain_demo_clip.yaml", f"CLIP ViT-B-16 ({clip_weights})", out / "model_clip",
         [f"teacher.weights={clip_weights}"]),
        ("config/pretrain_demo.yaml", "a RANDOM-initialised CLIP (no CLIP weights here)",
         out / "model_random", []),
    ]
    for config, teacher, run_dir, extra in attempts:
        ckpt = run_dir / "model.pt"
        if ckpt.is_file() and not retrain:
            print(f"using the model pre-trained earlier: {ckpt} (teacher: {teacher}; --retrain to redo)")
            return ckpt, teacher
        overrides = [f"run.out_dir={run_dir}", f"teacher.cache_dir={run_dir / 'teacher_cache'}", *extra]
        cfg = load_training_config(PretrainConfig, ROOT / config, overrides)
        print(f"pre-training the default model with {teacher} ({config}) ...", flush=True)
        try:
            result = pretrain.run(cfg)
        except WeightsNotFoundError as exc:
            print(f"\nWARNING: no CLIP weights: {exc}\n"
                  "         Set CLIP2SCENE_CLIP_WEIGHTS=/path/to/ViT-B-16 weights (open_clip or OpenAI "
                  "file) for a meaningful model.\n"
                  "         Continuing with a random teacher: the pipeline runs, the labels carry no "
                  "meaning.\n", flush=True)
            continue
        return Path(result["checkpoint"]), teacher
    raise SystemExit("demo: pre-training failed")


def main(argv: list[str] | None = None) -> int:
    start_cli()   # before torch loads
    ap = argparse.ArgumentParser(prog="clip2scene-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--checkpoint", type=Path, default=os.environ.get("CLIP2SCENE_CHECKPOINT") or None,
                    help="deployable checkpoint; default: pre-train one on the samples")
    ap.add_argument("--retrain", action="store_true", help="pre-train again even if a model exists")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    _quiet_downloads()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    _banner("1/3 nuScenes samples → rosbag2")
    bags = convert_samples(out)
    print("input bags:", *map(str, bags), sep="\n  ")

    _banner("2/3 default model")
    if args.checkpoint:
        ckpt, teacher = args.checkpoint, "given checkpoint"
    else:
        ckpt, teacher = pretrain_default_model(out, args.retrain)
    print(f"checkpoint: {ckpt}")

    _banner("3/3 replay through the segmentation pipeline")
    from clip2scene_ros import replay

    scenes = {}
    for bag in bags:
        labeled, report_dir = out / "labeled" / bag.name, out / "report" / bag.name
        rc = replay.main([str(bag), "--out", str(labeled), "--checkpoint", str(ckpt), "--overwrite",
                          "--device", args.device, "--render-frames", "0,1",
                          "--report-dir", str(report_dir)])
        if rc != 0:
            print(f"demo: replay of {bag} failed (exit {rc})", file=sys.stderr)
            return rc
        report = json.loads((report_dir / "report.json").read_text())
        scenes[bag.name] = {"input_bag": str(bag), "labeled_bag": str(labeled),
                            "report": str(report_dir / "report.json"), "frames": report.get("frames"),
                            "tf": report.get("tf")}
    pngs = sorted(str(p.relative_to(out)) for p in (out / "report").rglob("*.png"))
    summary = {"checkpoint": str(ckpt), "teacher": teacher, "scenes": scenes, "renders": pngs}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _banner("done")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
