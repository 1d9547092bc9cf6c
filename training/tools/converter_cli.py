"""What the dataset → bag CLIs share: their output options, safe output names, one error policy."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["converter_parser", "writer_options", "safe_child", "run_cli"]


def converter_parser(doc: str) -> argparse.ArgumentParser:
    """Argument parser of a dataset → bag CLI: the module docstring as help, plus the output
    options every converter shares (read back with :func:`writer_options`)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, type=Path,
                   help="output rosbag2 directory (must not exist, or be empty; see --overwrite)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    p.add_argument("--raw-images", action="store_true", help="sensor_msgs/Image instead of JPEG CompressedImage")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output bag this tool wrote (or an empty folder); anything "
                        "else at the output path is refused, never deleted")
    p.add_argument("--quiet", action="store_true")
    return p


def writer_options(args: argparse.Namespace) -> dict:
    """The shared output options of :func:`converter_parser` as ``convert`` keyword arguments."""
    return {"storage": args.storage, "compressed_images": not args.raw_images,
            "jpeg_quality": args.jpeg_quality, "overwrite": args.overwrite, "progress": not args.quiet}


def safe_child(root: Path, name: str, taken: set[str] | None = None, default: str = "item") -> Path:
    """``root / <name made safe>``: a name taken from data (a scene name, a token) as ONE path
    component that stays inside ``root``.

    Only letters, digits, ``-``, ``_`` and inner dots are kept (separators, ``..``, leading
    dots, control characters become ``_``); an empty result becomes ``default``; names
    already in ``taken`` (case-insensitively, for case-insensitive file systems) get a
    ``-2``, ``-3``... suffix, so two data names never share an output. The resolved result is
    checked to lie directly inside ``root``.
    """
    from clip2scene_core.errors import Clip2SceneError

    text = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in str(name))
    text = text.lstrip(".").rstrip(".")[:120] or default
    if text in (".", ".."):
        text = default
    base, k = text, 1
    while taken is not None and text.lower() in taken:
        k += 1
        text = f"{base}-{k}"
    if taken is not None:
        taken.add(text.lower())
    child = Path(root) / text
    if child.resolve().parent != Path(root).resolve():
        raise Clip2SceneError(f"name {name!r} would leave the output folder {root}")
    return child


def run_cli(prog: str, body, args: argparse.Namespace) -> int:
    """Run a converter's ``body(args)``: the project's errors, refused paths, unreadable files
    and a full disk end in one ``prog: error: ...`` line and exit status 2."""
    from clip2scene_core.errors import Clip2SceneError
    from clip2scene_ros.bag import os_error_text

    try:
        return body(args)
    except Clip2SceneError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: {os_error_text(exc)}{where}", file=sys.stderr)
    return 2
